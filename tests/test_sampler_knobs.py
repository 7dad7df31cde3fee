"""Sampler knobs are traced per-row data: new values never recompile, one batch mixes them (each row
as if run alone), per-row processors equal HF's row by row, and bad values fail with a message
naming the knob.

Compilations are counted with the jitted decode's `_cache_size()` (one entry per compiled
specialisation of `VisionLanguageModel._generate_jit`)."""
import numpy as np
import pytest
import torch

import jblip
from jblip import processors
from jblip.sampling import SamplerConfig, split
from tests.hf_models import IMAGE_TOKEN, NUM_QUERIES, left_padded_prompts, right_padded_text, tiny_instructblip

NEW = 8


# ----------------------------------------------------------------------------- processors vs HF, per row

def _hf_rows(processor_for_row, ids, scores, values):
    """HF's processor applied row by row, each row with its own knob value."""
    out = [processor_for_row(v)(torch.tensor(ids[i:i + 1]), torch.tensor(scores[i:i + 1])).numpy()
           for i, v in enumerate(values)]
    return np.concatenate(out)


@pytest.fixture(scope="module")
def scores_and_history():
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((4, 50)) * 3).astype(np.float32)
    history = rng.integers(0, 50, size=(4, 12))
    history[:, 10:12] = history[:, 2:4]  # the last two tokens occurred before: no-repeat bans follow
    return scores, history


def test_per_row_processors_equal_hf_row_by_row(scores_and_history):
    from transformers.generation import logits_process as lp
    scores, history = scores_and_history
    valid = np.ones(history.shape, bool)

    penalties = [1.0, 1.3, 2.0, 0.7]
    ours = processors.repetition_penalty(scores, history, valid, np.float32(penalties))
    ref = _hf_rows(lambda p: lp.RepetitionPenaltyLogitsProcessor(p), history, scores, penalties)
    np.testing.assert_array_equal(ours, ref)

    sizes = [0, 1, 2, 3]
    ours = processors.no_repeat_ngram(scores, history, valid, history.shape[1], np.int32(sizes), 4)
    ref = _hf_rows(lambda n: (lambda i, s: s) if n == 0 else lp.NoRepeatNGramLogitsProcessor(n),
                   history, scores, sizes)
    np.testing.assert_array_equal(ours, ref)
    assert np.isinf(np.asarray(ours)[3]).any(), "the repeated 3-gram should ban a token"

    ks = [0, 1, 5, 50]
    ours = processors.top_k_filter(scores, np.int32(ks), 64)
    ref = _hf_rows(lambda k: (lambda i, s: s) if k == 0 else lp.TopKLogitsWarper(k), history, scores, ks)
    np.testing.assert_array_equal(ours, ref)

    ps = [1.0, 0.9, 0.5, 0.05]
    tails = (1.0 - np.float64(ps)).astype(np.float32)
    ours = processors.top_p_filter(scores, tails)
    ref = _hf_rows(lambda p: (lambda i, s: s) if p == 1.0 else lp.TopPLogitsWarper(p), history, scores, ps)
    np.testing.assert_array_equal(ours, ref)


# ----------------------------------------------------------------------------- a tiny model

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("vicuna")
    hf = tiny_instructblip(path, seed=0)
    model = jblip.load_pretrained(str(path))
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
    ids, mask = left_padded_prompts([4, 1, 6], 128, pad_id=0, bos_id=2, seed=0, image_token=IMAGE_TOKEN)
    q_ids, q_mask = right_padded_text([3, 7, 2], 99, 0)
    inputs = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, qformer_input_ids=q_ids,
                  qformer_attention_mask=q_mask)
    return hf, model, inputs, str(path)


def _row_alone(inputs, i):
    """Input row i by itself, without the batch's left padding."""
    n = int(inputs["attention_mask"][i, NUM_QUERIES:].sum())
    ids = inputs["input_ids"]
    row_ids = np.concatenate([ids[i, :NUM_QUERIES], ids[i, ids.shape[1] - n:]])[None]
    return dict(pixel_values=inputs["pixel_values"][i:i + 1], input_ids=row_ids, attention_mask=np.ones_like(row_ids),
                qformer_input_ids=inputs["qformer_input_ids"][i:i + 1],
                qformer_attention_mask=inputs["qformer_attention_mask"][i:i + 1])


def _compiles(model):
    return model._generate_jit._cache_size()


def test_sweeping_knobs_within_a_bucket_never_recompiles(setup):
    _, model, inputs, _ = setup
    base = dict(strategy="sample", temperature=0.8, top_p=0.9, top_k=5, repetition_penalty=1.3,
                no_repeat_ngram_size=2, min_new_tokens=1, max_new_tokens=NEW, eos_token_ids=(2,))
    before = _compiles(model)
    first = model.generate(**inputs, **base)
    assert _compiles(model) == before + 1
    sweep = [dict(temperature=t) for t in (0.5, 1.7)] + [dict(top_p=p) for p in (0.3, 0.99)] + \
            [dict(top_k=k) for k in (1, 40)] + [dict(repetition_penalty=r) for r in (1.1, 2.5)] + \
            [dict(no_repeat_ngram_size=3), dict(min_new_tokens=3), dict(max_new_tokens=3),
             dict(max_new_tokens=16, min_new_tokens=16), dict(temperature=[0.5, 1.0, 2.0], max_new_tokens=[2, 9, 5])]
    outputs = [model.generate(**inputs, **{**base, **change}, seed=1) for change in sweep]
    assert _compiles(model) == before + 1, "a knob value recompiled the decode"
    assert outputs[-3].tokens.shape[1] == 3 and outputs[-2].tokens.shape[1] == 16
    assert np.asarray(outputs[-2].lengths).tolist() == [16, 16, 16]   # min_new_tokens = 16 forbids EOS
    assert np.asarray(outputs[-1].lengths).max() <= 9 and np.asarray(outputs[-1].lengths)[0] <= 2
    assert not all(np.array_equal(first.tokens, o.tokens[:, :NEW]) for o in outputs[:2])

    # every processor compiled in: neutral values do not change the program either
    keep = dict(base, all_processors=True)
    model.generate(**inputs, **keep)
    after = _compiles(model)
    for change in (dict(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                        min_new_tokens=0), dict(temperature=0.6)):
        model.generate(**inputs, **{**keep, **change})
    assert _compiles(model) == after
    # the counter is live: a structural change (strategy) compiles once more
    model.generate(**inputs, max_new_tokens=NEW)
    assert _compiles(model) == after + 1


def test_beam_knobs_never_recompile(setup):
    _, model, inputs, _ = setup
    beam = dict(strategy="beam", num_beams=3, max_new_tokens=NEW, min_new_tokens=1, repetition_penalty=1.5,
                eos_token_ids=(2,))
    model.generate(**inputs, **beam)
    before = _compiles(model)
    for change in (dict(length_penalty=0.0), dict(length_penalty=-1.5), dict(repetition_penalty=1.1),
                   dict(max_new_tokens=5, min_new_tokens=2), dict(length_penalty=[1.0, 2.0, 0.5])):
        model.generate(**inputs, **{**beam, **change})
    assert _compiles(model) == before


def test_mixed_sampling_rows_equal_each_row_alone(setup):
    _, model, inputs, _ = setup
    knobs = dict(temperature=[0.7, 1.5, 1.0], top_p=[0.8, 1.0, 0.95], top_k=[0, 7, 20],
                 repetition_penalty=[1.0, 1.4, 1.2], max_new_tokens=[NEW, 3, 6], min_new_tokens=[0, 2, 1])
    seeds = [11, 12, 13]
    batch = model.generate(**inputs, strategy="sample", eos_token_ids=(2,), seed=seeds, **knobs)
    tokens, lengths = np.asarray(batch.tokens), np.asarray(batch.lengths)
    assert tokens.shape == (3, NEW)
    assert lengths[1] <= 3 and (tokens[1, 3:] == 0).all()   # row 1 stops at its own limit
    for i in range(3):
        own = {k: v[i] for k, v in knobs.items()}
        alone = model.generate(**_row_alone(inputs, i), strategy="sample", eos_token_ids=(2,), seed=seeds[i], **own)
        width = own["max_new_tokens"]
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], tokens[i, :width], err_msg=f"row {i}")
        assert int(alone.lengths[0]) == lengths[i]
    # a scalar seed s gives row b the seed s + b
    shifted = model.generate(**inputs, strategy="sample", eos_token_ids=(2,), seed=11, **knobs)
    np.testing.assert_array_equal(shifted.tokens, tokens)


def test_mixed_beam_rows_equal_each_row_alone(setup):
    _, model, inputs, _ = setup
    knobs = dict(length_penalty=[1.0, -2.0, 3.0], max_new_tokens=[NEW, 4, 6], repetition_penalty=[1.5, 1.0, 1.2],
                 no_repeat_ngram_size=[0, 2, 1])
    # every processor compiled in, so each row alone (batch of 1) shares one program
    beam = dict(strategy="beam", num_beams=3, num_return_sequences=2, eos_token_ids=(2,), all_processors=True)
    batch = model.generate(**inputs, **beam, **knobs)
    for i in range(3):
        own = {k: v[i] for k, v in knobs.items()}
        alone = model.generate(**_row_alone(inputs, i), **beam, **own)
        width = own["max_new_tokens"]
        np.testing.assert_array_equal(np.asarray(alone.tokens), np.asarray(batch.tokens)[2 * i:2 * i + 2, :width])
        np.testing.assert_allclose(np.asarray(alone.scores), np.asarray(batch.scores)[2 * i:2 * i + 2], rtol=1e-5)


def test_mixed_rows_on_a_mesh_equal_one_device(setup):
    from jblip import sharding
    _, model, inputs, path = setup
    sharded = jblip.load_pretrained(path, mesh=sharding.make_mesh("data=2,fsdp=2,tensor=2"))
    knobs = dict(strategy="sample", temperature=[0.7, 1.3, 2.0], top_k=[0, 5, 9], top_p=[0.9, 1.0, 0.8],
                 max_new_tokens=[6, 3, 5], repetition_penalty=[1.0, 1.2, 1.5], eos_token_ids=(2,), seed=[4, 5, 6])
    one, mesh = model.generate(**inputs, **knobs), sharded.generate(**inputs, **knobs)
    np.testing.assert_array_equal(np.asarray(mesh.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(mesh.lengths), np.asarray(one.lengths))


def _hf_generate(hf, inputs, **options):
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = hf.generate(**t, do_sample=False, pad_token_id=0, **options).numpy()
    return out[:, inputs["input_ids"].shape[1]:]


def _assert_prefix_equal(ours, ref, eos, width):
    for row, (a, b) in enumerate(zip(np.asarray(ours), ref)):
        b = b[:width]
        stop = next((i + 1 for i, tok in enumerate(b) if tok == eos), len(b))
        assert a[:stop].tolist() == b[:stop].tolist(), f"row {row}: jblip {a.tolist()} vs HF {b.tolist()}"
        assert (a[stop:] == 0).all()


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_per_row_limits_and_penalties_equal_hf_per_setting(setup, strategy):
    """Row i of one mixed batch equals HF run on the batch with row i's settings."""
    hf, model, inputs, _ = setup
    eos = int(_hf_generate(hf, inputs, max_new_tokens=3, eos_token_id=127)[0, 2])  # emitted, so rows stop early
    knobs = dict(max_new_tokens=[NEW, 3, 6], repetition_penalty=[1.0, 1.5, 1.2], no_repeat_ngram_size=[2, 0, 1],
                 min_new_tokens=[0, 2, 1])
    if strategy == "beam":
        knobs.update(num_beams=3, length_penalty=[1.0, 0.0, -1.0])
    ours = model.generate(**inputs, strategy=strategy, eos_token_ids=(eos,), pad_token_id=0, **knobs)
    stopped = 0
    for i in range(3):
        own = {k: v[i] if isinstance(v, list) else v for k, v in knobs.items()}
        ref = _hf_generate(hf, inputs, eos_token_id=eos, **own)[i:i + 1]
        _assert_prefix_equal(np.asarray(ours.tokens)[i:i + 1], ref, eos, own["max_new_tokens"])
        stopped += int((ref[0, :own["max_new_tokens"]] == eos).any())
    assert stopped, "some row should stop at EOS"


# ----------------------------------------------------------------------------- validation at the API boundary

@pytest.mark.parametrize("options, message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=[1.0, float("inf")]), "temperature must be finite"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), "top_p must be finite"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=float("-inf")), "repetition_penalty must be finite"),
    (dict(length_penalty=float("nan")), "length_penalty must be finite"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size must be >= 0"),
    (dict(min_new_tokens=-1), "min_new_tokens must be >= 0"),
    (dict(min_new_tokens=5, max_new_tokens=3), "min_new_tokens 5 > max_new_tokens 3"),
    (dict(min_new_tokens=[1, 4], max_new_tokens=[3, 3]), r"min_new_tokens \(1, 4\) > max_new_tokens \(3, 3\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=float("inf")), "max_new_tokens must be finite"),
    (dict(temperature=[1.0, 0.5], top_p=[0.9, 0.9, 0.9]), "disagree on the number of rows: temperature has 2, top_p has 3"),
    (dict(num_return_sequences=0), "num_return_sequences must be an integer >= 1, got 0"),
    (dict(num_beams=0), "num_beams must be an integer >= 1, got 0"),
    (dict(num_beams=3), "num_beams=3 needs strategy='beam'"),
    (dict(strategy="beam", num_beams=2, num_return_sequences=3), "num_return_sequences 3 > num_beams 2"),
    (dict(strategy="greedy", num_return_sequences=2), "greedy decoding returns one sequence"),
    (dict(strategy="nucleus"), "unknown decoding strategy 'nucleus'"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(max_new_tokens=40, max_new_tokens_cap=32), "max_new_tokens_cap=32 is below the largest max_new_tokens 40"),
    (dict(top_k=100, top_k_cap=64), "top_k_cap=64 is below the largest top_k 100"),
    (dict(eos_token_ids=(2, -1)), "eos_token_ids must be an integer >= 0, got -1"),
    (dict(pad_token_id=1.5), "pad_token_id must be an integer >= 0, got 1.5"),
])
def test_bad_knobs_fail_with_a_message_naming_them(options, message):
    with pytest.raises(ValueError, match=message) as error:
        SamplerConfig(**options)
    if "num_beams" in options and options["num_beams"] == 0:
        assert "strategy" not in str(error.value)


def test_row_counts_are_checked_against_the_batch():
    with pytest.raises(ValueError, match="temperature has 2 values, one per row, but the batch has 3 rows"):
        split(SamplerConfig(temperature=[0.5, 0.7]), 3)
    with pytest.raises(ValueError, match="seed has 2 values, one per row, but the batch has 3 rows"):
        split(SamplerConfig(), 3, seed=[1, 2])


def test_split_keeps_only_structure_static():
    static, rows = split(SamplerConfig(strategy="sample", temperature=[0.5, 1.0], top_k=3, max_new_tokens=[5, 20],
                                       eos_token_ids=(2,)), 2, seed=7)
    assert static.max_new_tokens_cap == 32 and static.top_k_cap == 64
    assert static.processors == ("temperature", "top_k")
    assert rows.temperature.tolist() == [0.5, 1.0] and rows.max_new_tokens.tolist() == [5, 20]
    assert rows.seed.tolist() == [7, 8]
    # other values in the same buckets give the same static half (the same compiled program)
    same, _ = split(SamplerConfig(strategy="sample", temperature=0.9, top_k=50, max_new_tokens=30,
                                  eos_token_ids=(2,)), 2)
    assert same == static
    # greedy and beam never compile the sampling-only processors in
    greedy, _ = split(SamplerConfig(temperature=0.5, top_p=0.5, top_k=4), 1)
    assert greedy.processors == () and greedy == split(SamplerConfig(), 1)[0]
