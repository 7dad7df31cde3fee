"""OPT decoder: parity with HF torch OPTForCausalLM, cached decoding, conversion table, full-size shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jblip.convert import stacking
from jblip.convert.rules import ConversionError, DictSource, convert_params, flatten, plan
from jblip.convert.tables.opt import RULES
from jblip.config import PRESETS, text_config_from_hf
from jblip.opt import OPTModel



def hf_opt(word_embed_proj_dim=40, pre_ln=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=101, hidden_size=40, ffn_dim=72, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64,
                                 word_embed_proj_dim=word_embed_proj_dim, do_layer_norm_before=pre_ln,
                                 init_std=0.2, dropout=0.0, attn_implementation="eager")
    model = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1/0: move them so they matter
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def to_jax(hf_model, **batch_shape):
    """jblip config (through text_config_from_hf), module and converted params of a HF OPT model."""
    text = text_config_from_hf(hf_model.config.to_dict())
    module = OPTModel(text)
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2, text.word_embed_proj_dim)),
                                       jnp.ones((1, 2), jnp.int32))["params"])
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    return text, module, convert_params(DictSource(state), RULES, abstract)


def multimodal_batch(embed_fn, width, num_queries=4, lengths=(7, 4, 2), extra=0, seed=1):
    """The BLIP-2 layout, left padded: [queries | PAD... | prompt], plus `extra` later tokens."""
    rng = np.random.default_rng(seed)
    prompt_len = max(lengths)
    T = num_queries + prompt_len + extra
    ids = rng.integers(3, 101, size=(len(lengths), prompt_len + extra))
    mask = np.zeros((len(lengths), T), np.int32)
    mask[:, :num_queries] = 1
    for b, n in enumerate(lengths):
        mask[b, num_queries + prompt_len - n:] = 1
        ids[b, :prompt_len - n] = 1  # pad id
    queries = rng.normal(size=(len(lengths), num_queries, width)).astype(np.float32) * 0.5
    embeds = np.concatenate([queries, np.asarray(embed_fn(ids))], axis=1)
    return embeds, mask


def logits_at(module, params, embeds, positions, key_mask, cache=None, slot=0):
    """(fp32 logits, cache) at explicit positions (HF's pads: -1), through the contract's decode + head."""
    def run(m, e, p, k, c, i):
        hidden, cache = m.decode(e, p, k, c, i)
        return m.head(hidden), cache
    return module.apply({"params": params}, embeds, positions, key_mask, cache, slot, method=run)


def hf_positions(mask):
    """What HF OPT derives from the attention mask: cumsum(mask)*mask - 1 (pads -> -1)."""
    return (np.cumsum(mask, axis=1) * mask - 1).astype(np.int32)


@pytest.mark.parametrize("word_embed_proj_dim,pre_ln", [(40, True), (24, True), (24, False)])
def test_logits_match_hf(word_embed_proj_dim, pre_ln):
    hf = hf_opt(word_embed_proj_dim, pre_ln)
    text, module, params = to_jax(hf)
    embed = lambda ids: module.apply({"params": params}, jnp.asarray(ids), method=OPTModel.embed)
    embeds, mask = multimodal_batch(embed, text.word_embed_proj_dim)
    logits, cache = logits_at(module, params, jnp.asarray(embeds), jnp.asarray(hf_positions(mask)),
                              jnp.asarray(mask, bool))
    with torch.no_grad():
        ref = hf(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask)).logits.numpy()
    valid = mask.astype(bool)
    delta = np.abs(np.asarray(logits) - ref)[valid].max()
    print(f"OPT proj={word_embed_proj_dim} pre_ln={pre_ln}: max |logits - HF| = {delta:.2e} "
          f"(logit std {ref[valid].std():.2f})")
    assert cache is None and logits.dtype == jnp.float32
    assert delta <= 1e-4


def test_embed_matches_hf_input_ids():
    hf = hf_opt()
    text, module, params = to_jax(hf)
    ids = np.array([[2, 17, 99, 5], [1, 1, 2, 40]])
    mask = (ids != 1).astype(np.int32)
    logits = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method=OPTModel.forward_ids)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    delta = np.abs(np.asarray(logits) - ref)[mask.astype(bool)].max()
    print(f"OPT forward_ids: max |logits - HF| = {delta:.2e}")
    assert delta <= 1e-4


def test_cached_decoding_matches_full_forward():
    hf = hf_opt()
    text, module, params = to_jax(hf)
    embed = lambda ids: module.apply({"params": params}, jnp.asarray(ids), method=OPTModel.embed)
    steps = 4
    embeds, mask = multimodal_batch(embed, text.word_embed_proj_dim, extra=steps)
    positions, key_mask = jnp.asarray(hf_positions(mask)), jnp.asarray(mask, bool)
    full, _ = logits_at(module, params, jnp.asarray(embeds), positions, key_mask)

    run = jax.jit(lambda e, p, c, i: logits_at(module, params, e, p, key_mask, c, i))
    B, S = mask.shape
    prefill = S - steps
    cache = module.init_cache(B, S)
    logits, cache = run(embeds[:, :prefill], positions[:, :prefill], cache, 0)
    got = [logits]
    for t in range(prefill, S):  # one token per step; the jitted step is reused (traced cache_index)
        logits, cache = run(embeds[:, t:t + 1], positions[:, t:t + 1], cache, jnp.int32(t))
        got.append(logits)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    delta = np.abs(got - np.asarray(full))[mask.astype(bool)].max()
    print(f"OPT cached vs full forward: max |Δ| = {delta:.2e}")
    assert run._cache_size() == 2  # prefill shape + one decode shape
    assert cache["k"].shape == (text.num_layers, B, text.num_heads, S, text.head_dim)  # one stacked array
    assert delta <= 1e-5


def test_bad_inputs_raise():
    text = PRESETS["blip2-opt-2.7b"].text
    tiny = OPTModel(type(text)(vocab_size=11, hidden_size=8, ffn_dim=12, num_layers=1, num_heads=2,
                               max_position_embeddings=16, word_embed_proj_dim=8))
    e, p, m = jnp.zeros((1, 3, 8)), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool)
    init = lambda *args: jax.eval_shape(lambda: tiny.init(jax.random.key(0), *args, method=OPTModel.decode))
    with pytest.raises(ValueError, match="word_embed_proj_dim"):
        init(jnp.zeros((1, 3, 6)), p, m)
    with pytest.raises(ValueError, match="key_mask"):
        init(e, p, jnp.ones((1, 5), bool))
    with pytest.raises(ValueError, match="positions"):
        init(e, p[:, :2], m)


def test_conversion_reports_missing_and_unexpected_keys():
    hf = hf_opt()
    text, module, params = to_jax(hf)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    state.pop("model.decoder.layers.1.fc2.bias")
    state["model.decoder.layers.0.self_attn.rotary.weight"] = np.zeros(3)
    with pytest.raises(ConversionError) as err:
        convert_params(DictSource(state), RULES, abstract)
    assert "layers_1/mlp/fc2/bias" in str(err.value) and "rotary" in str(err.value)  # per-layer names
    # lm_head is only a tied copy: a file without it converts to the same params
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    again = convert_params(DictSource(state), RULES, abstract)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)))


def abstract_params(text):
    module = OPTModel(text, param_dtype=jnp.bfloat16)
    return nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1, text.word_embed_proj_dim)),
                                   jnp.ones((1, 1), jnp.int32))["params"])


@pytest.mark.parametrize("name,count", [("blip2-opt-2.7b", 2_651_596_800), ("blip2-opt-6.7b", 6_658_473_984)])
def test_full_size_param_count(name, count):
    params = abstract_params(PRESETS[name].text)
    assert "lm_head" not in params and "project_in" not in params
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == count


def test_table_fits_released_hf_keys():
    from tests.test_full_size import hf_key_shapes  # the released checkpoint's keys, from transformers
    shapes = {k[len("language_model."):]: s for k, s in hf_key_shapes("blip2-opt-2.7b").items()
              if k.startswith("language_model.")}
    targets = flatten(abstract_params(PRESETS["blip2-opt-2.7b"].text))
    assignment = plan(shapes, RULES, targets)  # raises on any missing/unexpected/mis-shaped key
    assert set(assignment) == set(stacking.per_layer_specs(targets))


def test_bfloat16_runs_close_to_float32():
    hf = hf_opt()
    text, module, params = to_jax(hf)
    embed = lambda ids: module.apply({"params": params}, jnp.asarray(ids), method=OPTModel.embed)
    embeds, mask = multimodal_batch(embed, text.word_embed_proj_dim)
    args = (jnp.asarray(embeds), jnp.asarray(hf_positions(mask)), jnp.asarray(mask, bool))
    full, _ = logits_at(module, params, *args)
    bf16 = OPTModel(text, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    half, _ = logits_at(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), *args)
    valid = mask.astype(bool)
    delta = np.abs(np.asarray(half) - np.asarray(full))[valid].max()
    print(f"OPT bf16 vs fp32: max |Δ| = {delta:.2e}")
    assert half.dtype == jnp.float32 and delta < 0.1 * np.asarray(full)[valid].std()
