"""The language-model contract (jblip.language_model) and the family registry, for every family.

- prefill + decode_step give the full forward's logits (left-padded decoder-only prompts,
  right-padded T5 encoder inputs), and `reorder` / `repeat` move rows of the decode state;
- the head accumulates in float32 under bfloat16 compute;
- scanned (stacked) params round-trip to the HF checkpoint keys: export -> same keys and
  bit-equal tensors as the original file, and reloading the export gives identical params.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jblip
from jblip.convert.export import export_hf
from jblip.convert.readers import open_checkpoint
from jblip.convert.rules import flatten
from jblip import families
from jblip import language_model as lm
from jblip.config import LlamaConfig, OPTConfig, T5Config
from tests.hf_models import TINY_T5, tiny_blip2, tiny_instructblip

TEXT = {
    # GQA (2 kv heads for 4 query heads) and 3 layers, so the stacked cache has a real layer axis
    "llama": LlamaConfig(vocab_size=131, hidden_size=56, intermediate_size=96, num_layers=3, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=128, pad_token_id=0),
    # word_embed_proj_dim != hidden_size: project_in / project_out around the stack
    "opt": OPTConfig(vocab_size=101, hidden_size=40, ffn_dim=72, num_layers=2, num_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=24),
    "t5": T5Config(vocab_size=97, d_model=36, d_kv=12, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=3,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20),
}
B, P, STEPS = 3, 6, 4


def build(name, dtype=jnp.float32):
    text = TEXT[name]
    module = families.family(name).module_class()(text, dtype=dtype, param_dtype=dtype)
    ids = jnp.ones((1, 2), jnp.int32)
    dec = jnp.zeros((1, 1), jnp.int32) if families.family(name).encoder_decoder else None
    init = jax.jit(lambda key: module.init(key, ids, jnp.ones((1, 2), jnp.int32), dec, method=module.forward_ids))
    params = nn.unbox(init(jax.random.key(1))["params"])
    # larger weights than the init's 0.02 so that the logits are far from flat
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, params)
    return text, module, params


def prompt(name, width, seed=0):
    rng = np.random.default_rng(seed)
    embeds = rng.normal(size=(B, P, width)).astype(np.float32)
    lengths = np.array([P, 2, 4])
    if families.family(name).prompt_padding_side == "left":
        mask = np.arange(P)[None] >= (P - lengths)[:, None]
    else:
        mask = np.arange(P)[None] < lengths[:, None]
    return jnp.asarray(embeds), jnp.asarray(mask.astype(np.int32))


def run(module, params, method, *args):
    return module.apply({"params": params}, *args, method=method)


def greedy(module, params, embeds, mask, steps=STEPS):
    """Contract decode: logits [B, steps + 1, V] and the fed tokens [B, steps]."""
    cache = module.init_cache(B, module.cache_length(P, steps))  # needs no params
    logits, state = jax.jit(lambda e, k, c: run(module, params, lambda m, e, k, c: m.prefill(e, k, c), e, k, c))(
        embeds, mask, cache)
    step = jax.jit(lambda t, s: run(module, params, lambda m, t, s: m.decode_step(t, s), t, s))
    out, tokens = [logits], []
    for _ in range(steps):
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        logits, state = step(token, state)
        out.append(logits)
        tokens.append(token)
    assert step._cache_size() == 1  # one decode program for every step (traced slot)
    return jnp.stack(out, 1), jnp.stack(tokens, 1), state


def full_forward(name, module, params, embeds, mask, tokens):
    """The contract's __call__ over prompt + fed tokens, at the positions greedy decoding scored."""
    if families.family(name).encoder_decoder:
        start = jnp.full((B, 1), TEXT[name].decoder_start_token_id, jnp.int32)
        return jax.jit(lambda e, k, d: run(module, params, None, e, k, d))(
            embeds, mask, jnp.concatenate([start, tokens], 1))

    def forward(m, embeds, mask, tokens):
        both = jnp.concatenate([embeds, m.embed(tokens).astype(embeds.dtype)], 1)
        return m(both, jnp.concatenate([mask, jnp.ones(tokens.shape, mask.dtype)], 1))[:, P - 1:]
    return jax.jit(lambda e, k, t: run(module, params, forward, e, k, t))(embeds, mask, tokens)


@pytest.mark.parametrize("name", list(TEXT))
def test_prefill_and_decode_steps_equal_the_full_forward(name):
    text, module, params = build(name)
    width = text.word_embed_proj_dim if name == "opt" else text.hidden_size
    embeds, mask = prompt(name, width)
    got, tokens, state = greedy(module, params, embeds, mask)
    want = full_forward(name, module, params, embeds, mask, tokens)
    delta = float(jnp.abs(got - want).max())
    print(f"{name}: prefill + {STEPS} decode steps vs full forward: max |delta| = {delta:.2e} "
          f"(logit std {float(want.std()):.2f})")
    assert got.dtype == jnp.float32 and float(want.std()) > 0.5
    assert delta <= 1e-4
    layers = text.num_decoder_layers if name == "t5" else text.num_layers
    assert state.cache["k"].shape[:2] == (layers, B)  # one stacked cache [L, B, N, S, H]


@pytest.mark.parametrize("name", list(TEXT))
def test_reorder_and_repeat_move_rows_of_the_state(name):
    text, module, params = build(name)
    width = text.word_embed_proj_dim if name == "opt" else text.hidden_size
    embeds, mask = prompt(name, width)
    _, tokens, state = greedy(module, params, embeds, mask, steps=1)
    step = jax.jit(lambda t, s: run(module, params, lambda m, t, s: m.decode_step(t, s), t, s)[0])
    token = tokens[:, -1]
    base = step(token, state)
    # repeat, then keep beam 1 of every row: the same logits as the unrepeated state
    twice = lm.repeat(state, 2)
    assert twice.cache["k"].shape[1] == 2 * B and twice.key_mask.shape[0] == 2 * B
    np.testing.assert_allclose(step(jnp.repeat(token, 2), twice)[1::2], base, atol=1e-5)
    # beam search: every beam of a row continues a (possibly different) beam of the same row
    src = jnp.array([1, 1, 2, 2, 5, 4])
    perturbed = twice.replace(cache=jax.tree.map(lambda x: x.at[:, 1::2].multiply(0.5), twice.cache))
    moved = lm.reorder(perturbed, src)
    got = step(jnp.repeat(token, 2), moved)
    ref = step(jnp.repeat(token, 2), perturbed)
    np.testing.assert_allclose(got, ref[src], atol=1e-5)
    assert float(jnp.abs(got[0] - base[0]).max()) > 1e-3  # the halved cache of beam 1 really moved


def test_llama_head_accumulates_in_float32_under_bfloat16():
    text, module, params = build("llama", jnp.bfloat16)
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, text.hidden_size)), jnp.bfloat16)
    logits = run(module, params, lambda m, h: m.head(h), hidden)
    kernel = params["lm_head"]["kernel"]
    exact = np.asarray(hidden, np.float32) @ np.asarray(kernel, np.float32)  # the same bf16 inputs
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits) - exact).max() <= 1e-4 * np.abs(exact).max()


def test_registry_knows_each_family_and_nothing_else():
    assert families.family("t5").encoder_decoder and families.family("t5").prompt_padding_side == "right"
    assert not families.family("llama").encoder_decoder and families.family("opt").prompt_padding_side == "left"
    for name, entry in families.FAMILIES.items():
        cls = entry.module_class()
        for method in ("embed", "hidden", "head", "forward_ids", "cache_length", "init_cache", "prefill",
                       "decode_step", "history"):
            assert callable(getattr(cls, method)), (name, method)
        assert entry.hf_rules(TEXT[name])
    with pytest.raises(ValueError, match="unknown language-model family 'gpt2'"):
        families.family("gpt2")


CHECKPOINTS = {
    "llama": lambda p: tiny_instructblip(p, seed=11),
    "opt": lambda p: tiny_blip2(p, seed=12),
    "t5": lambda p: tiny_instructblip(p, seed=13, text=TINY_T5),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_scanned_params_round_trip_to_hf_keys(name, tmp_path):
    original, exported = tmp_path / "hf", tmp_path / "export"
    CHECKPOINTS[name](original)
    model = jblip.load_pretrained(str(original))
    assert model.config.family == name
    llm = model.params["llm"]
    assert "layers" in (llm["decoder"] if name == "t5" else llm)  # the LM's stack is scanned
    export_hf(model, str(exported))
    with open_checkpoint(str(original)) as src, open_checkpoint(str(exported)) as out:
        keys = set(out.keys())
        tied_copies = set(src.keys()) - keys  # e.g. OPT's lm_head / T5's embed_tokens: aliases of one param
        assert all(k.endswith(("lm_head.weight", "embed_tokens.weight")) for k in tied_copies), tied_copies
        assert keys <= set(src.keys())
        for key in sorted(keys):
            np.testing.assert_array_equal(out.read(key), src.read(key), err_msg=key)
        layer_keys = [k for k in keys if ".layers.1." in k or ".block.1." in k]
        assert layer_keys  # the per-layer names came back from the stacked params
    again = flatten(jblip.load_pretrained(str(exported)).params)
    before = flatten(model.params)
    assert set(again) == set(before)
    for path in before:
        np.testing.assert_array_equal(np.asarray(again[path]), np.asarray(before[path]), err_msg=path)
