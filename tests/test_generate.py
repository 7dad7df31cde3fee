"""Decoding equals HF `generate` token for token (greedy, beam search with penalties), per family."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jblip
from tests.hf_models import (IMAGE_TOKEN, NUM_QUERIES, TINY_T5, left_padded_prompts, right_padded_text,
                             tiny_blip2, tiny_instructblip)

NEW = 10
BUILDERS = {
    "vicuna": lambda p: tiny_instructblip(p, seed=0),
    "opt": lambda p: tiny_blip2(p, seed=4),
    "t5": lambda p: tiny_instructblip(p, seed=3, text=TINY_T5),
}


def prompts(family, lengths, seed=0):
    if family == "t5":  # [<image>*Q | prompt | </s> | pad...]
        rng = np.random.default_rng(seed)
        width = max(lengths) + 1
        ids, mask = [], []
        for n in lengths:
            body = [IMAGE_TOKEN] * NUM_QUERIES + rng.integers(3, 126, size=n).tolist() + [1]
            pad = NUM_QUERIES + width - len(body)
            ids.append(body + [0] * pad)
            mask.append([1] * len(body) + [0] * pad)
        return np.array(ids), np.array(mask)
    pad = 1 if family == "opt" else 0
    return left_padded_prompts(lengths, 128, pad_id=pad, bos_id=2, seed=seed, image_token=IMAGE_TOKEN)


@pytest.fixture(scope="module", params=list(BUILDERS))
def setup(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family)
    hf = BUILDERS[family](path)
    model = jblip.load_pretrained(str(path))
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
    ids, mask = prompts(family, [4, 1, 6])
    q = {}
    if model.config.qformer.use_text_input:
        q_ids, q_mask = right_padded_text([3, 7, 2], 99, 0)
        q = dict(qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
    inputs = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, **q)
    # Use as EOS a token that the model really emits early, so stopping and padding are exercised.
    first = hf_generate(hf, inputs, model, eos=127, pad=0)
    return family, hf, model, inputs, int(first[0, 2])


def hf_generate(hf, inputs, model, eos, pad, **options):
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = hf.generate(**t, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                          **options).numpy()
    skip = 1 if model.config.family == "t5" else inputs["input_ids"].shape[1]
    return out[:, skip:]


def assert_same_tokens(ours, ref, eos):
    """Equal up to and including each row's first EOS; after it jblip pads."""
    ours = np.asarray(ours.tokens)
    for row, (a, b) in enumerate(zip(ours, ref)):
        stop = next((i + 1 for i, tok in enumerate(b) if tok == eos), len(b))
        assert a[:stop].tolist() == b[:stop].tolist(), f"row {row}: jblip {a.tolist()} vs HF {b.tolist()}"


def test_greedy_matches_hf(setup):
    family, hf, model, inputs, eos = setup
    ref = hf_generate(hf, inputs, model, eos=eos, pad=0)
    ours = model.generate(**inputs, max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=0)
    print(family, "eos", eos, "\n", ref)
    assert (ref == eos).any(), "the test should exercise early stopping"
    assert_same_tokens(ours, ref, eos)


def test_beam_search_with_penalties_matches_hf(setup):
    family, hf, model, inputs, eos = setup
    opts = dict(num_beams=5, repetition_penalty=1.5, length_penalty=1.0)
    ref = hf_generate(hf, inputs, model, eos=eos, pad=0, **opts, num_return_sequences=2)
    ours = model.generate(**inputs, strategy="beam", max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=0,
                          **opts, num_return_sequences=2)
    assert_same_tokens(ours, ref, eos)


def test_sampling_top_k_1_is_greedy_and_seeded(setup):
    family, hf, model, inputs, eos = setup
    if family != "vicuna":
        pytest.skip("sampler behaviour is family independent")
    greedy = model.generate(**inputs, max_new_tokens=NEW)
    top1 = model.generate(**inputs, max_new_tokens=NEW, strategy="sample", top_k=1, seed=3)
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)
    a = model.generate(**inputs, max_new_tokens=NEW, strategy="sample", temperature=1.5, seed=7)
    b = model.generate(**inputs, max_new_tokens=NEW, strategy="sample", temperature=1.5, seed=7)
    c = model.generate(**inputs, max_new_tokens=NEW, strategy="sample", temperature=1.5, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_batch_invariance_and_single_compile_per_bucket(setup):
    family, hf, model, inputs, eos = setup
    if family != "vicuna":
        pytest.skip("checked once")
    rng = np.random.default_rng(5)
    pixels = rng.standard_normal((4, 3, 28, 28)).astype(np.float32)
    ids, mask = prompts(family, [2, 9, 5, 1], seed=4)
    q_ids, q_mask = right_padded_text([3, 7, 2, 5], 99, 2)
    batch = model.generate(pixels, ids, mask, q_ids, q_mask, max_new_tokens=NEW)
    before = model._generate_jit._cache_size()
    for i in range(4):
        n = int(mask[i, NUM_QUERIES:].sum())  # strip this row's padding
        row_ids = np.concatenate([ids[i, :NUM_QUERIES], ids[i, ids.shape[1] - n:]])[None]
        alone = model.generate(pixels[i:i + 1], row_ids, np.ones_like(row_ids), q_ids[i:i + 1], q_mask[i:i + 1],
                               max_new_tokens=NEW)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
    # rows of 4 different lengths (all in the 16 bucket) compiled once for batch size 1
    assert model._generate_jit._cache_size() == before + 1


def test_both_layer_loops_decode_alike(setup):
    """CPU programs decode over per-layer weight buffers, accelerators over the stacked scan
    (`jblip.scan.LAYER_LOOPS`): the same tokens and scores, whichever the platform picks."""
    family, hf, model, inputs, eos = setup
    assert model.layer_loop == "unrolled"  # the CPU choice; the HF tests above ran through it
    scanned = jblip.VisionLanguageModel(model.config, model.params, layer_loop="scan")
    cases = [dict(), dict(strategy="beam", num_beams=3, num_return_sequences=2, repetition_penalty=1.5),
             dict(strategy="sample", temperature=1.3, top_p=0.9, seed=5)]
    for options in cases:
        a = model.generate(**inputs, max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=0, **options)
        b = scanned.generate(**inputs, max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=0, **options)
        np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=str(options))
        np.testing.assert_array_equal(a.lengths, b.lengths)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer_loop must be one of"):
        jblip.VisionLanguageModel(model.config, model.params, layer_loop="python")


def test_cpu_generate_is_prefill_then_decode_without_ynnpack(setup):
    """On CPU, generate runs as two programs, the decode loop compiled without YNNPACK
    (`jblip.compiler_options`): the same tokens and scores as the one program accelerators run."""
    family, hf, model, inputs, eos = setup
    if family != "vicuna":
        pytest.skip("checked once")
    from jblip.compiler_options import decode_options
    from jblip.generate import generate as generate_tokens
    from jblip.pretrained import _as_nhwc
    from jblip.sampling import split
    assert decode_options("cpu") and decode_options("tpu") is None and decode_options("gpu") is None
    assert decode_options("cpu", tied_head=True) is None  # XLA's own kernels are slow for [V, D] heads
    programs = model._generate_jit
    prepend = model.query_layout(inputs["input_ids"])
    args = dict(pixel_values=_as_nhwc(inputs["pixel_values"], model.config.vision.num_channels),
                input_ids=jnp.asarray(inputs["input_ids"], jnp.int32),
                attention_mask=jnp.asarray(inputs["attention_mask"], jnp.int32),
                qformer_ids=jnp.asarray(inputs["qformer_input_ids"], jnp.int32),
                qformer_mask=jnp.asarray(inputs["qformer_attention_mask"], jnp.int32))
    one_program = jax.jit(functools.partial(generate_tokens, model.module, layer_loop=model.layer_loop),
                          static_argnames=("static", "prepend_queries"))
    for options in (dict(), dict(strategy="beam", num_beams=3, repetition_penalty=1.5),
                    dict(strategy="sample", temperature=1.3, top_p=0.9)):
        sampler = model.default_sampler().replace(max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=0, **options)
        static, rows = split(sampler, args["input_ids"].shape[0], 3)
        a = programs(model.params, model._decode_llm_params(), static, rows, prepend, **args)
        b = one_program(model.params, static, rows, prepend_queries=prepend, **args)
        np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=str(options))
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    prefilled = programs.prefill(model.params, None, static, prepend, **args)
    decode_hlo = programs.decode.lower(model.params, None, static, rows, prefilled).compile().as_text()
    assert "ynn_fusion" not in decode_hlo


def test_argmax_matches_jnp_argmax_with_ties_and_nans():
    from jblip.processors import argmax
    scores = np.array([[1.0, 3.0, 3.0, 0.0], [-np.inf] * 4, [0.0, np.nan, 5.0, np.nan], [2.0, 1.0, 0.0, 2.0]],
                      np.float32)
    np.testing.assert_array_equal(argmax(scores), np.argmax(scores, axis=-1))
