"""Flan-T5 parity with HF torch T5ForConditionalGeneration, cached decoding, bucket tables, param counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from jblip.convert import stacking
from jblip.convert.rules import DictSource, convert_params, flatten, plan
from jblip.convert.tables.t5 import RULES, rules_for
from jblip.config import PRESETS, T5Config
from jblip.t5 import T5Model, relative_position_bucket

TINY = dict(vocab_size=97, d_model=40, d_kv=12, num_heads=3, d_ff=72, num_layers=2, num_decoder_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)


def hf_model(feed_forward_proj, dense_act_fn, tied, seed=0):
    kwargs = dict(TINY, feed_forward_proj=feed_forward_proj, dense_act_fn=dense_act_fn, dropout_rate=0.0,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if not tied:
        kwargs["tie_word_embeddings"] = False  # transformers 5: only switches off the output rescale
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(HFT5Config(**kwargs)).eval()
    model.config._attn_implementation = "eager"
    # larger std than HF's init so outputs are far from flat, yet O(1) logits: T5 does not scale q.k,
    # so bigger q/k weights make softmax amplify float32 rounding past the 1e-5 cache tolerance
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 if "shared" in name else p.shape[-1] ** -0.5))
    if not tied:  # transformers 5 ties lm_head to shared regardless of the flag: give it its own matrix
        model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(TINY["vocab_size"], TINY["d_model"]))
    return model


def ours(tied, act, gated):
    cfg = T5Config(**TINY, dense_act_fn=act, is_gated_act=gated, tie_word_embeddings=tied)
    return cfg, T5Model(cfg)


def convert(model, hf, cfg):
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    B, T, S = 2, 3, 5
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((B, S, cfg.d_model)),
                                                          jnp.ones((B, S)), jnp.zeros((B, T), jnp.int32))["params"]))
    return {"params": convert_params(DictSource(sd), rules_for(cfg), abstract)}


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    lengths = np.array([9, 5])   # right padding, different lengths
    S = lengths.max()
    mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int64)
    embeds = rng.standard_normal((2, S, TINY["d_model"])).astype(np.float32)
    decoder_ids = rng.integers(2, TINY["vocab_size"], size=(2, 7))
    decoder_ids[:, 0] = 0  # decoder_start_token_id
    return embeds, mask, decoder_ids


def hf_forward(hf, embeds, mask, decoder_ids):
    with torch.no_grad():
        out = hf(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                 decoder_input_ids=torch.from_numpy(decoder_ids))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


@pytest.mark.parametrize("variant", ["flan", "original"])
def test_matches_hf(variant):
    tied = variant == "original"   # original T5: relu, plain FFN, head tied to shared + d_model**-0.5
    hf = hf_model("relu" if tied else "gated-gelu", "relu" if tied else "gelu", tied)
    assert hf.config.dense_act_fn == ("relu" if tied else "gelu")  # exact GELU kept (the Salesforce checkpoints use it)
    assert hf.config.scale_decoder_outputs == tied
    assert (hf.lm_head.weight is hf.shared.weight) == tied
    if not tied:
        assert not torch.equal(hf.lm_head.weight, hf.shared.weight)
    cfg, model = ours(tied, "relu" if tied else "gelu", gated=not tied)
    params = convert(model, hf, cfg)
    assert ("lm_head" in params["params"]) != tied

    embeds, mask, decoder_ids = inputs()
    ref_enc, ref_logits = hf_forward(hf, embeds, mask, decoder_ids)
    enc = model.apply(params, jnp.asarray(embeds), jnp.asarray(mask), method=T5Model.encode)
    logits = model.apply(params, jnp.asarray(embeds), jnp.asarray(mask), jnp.asarray(decoder_ids))
    d_enc = np.abs(np.asarray(enc) - ref_enc).max()
    d_logits = np.abs(np.asarray(logits) - ref_logits).max()
    print(f"{variant}: encoder max|d|={d_enc:.2e} (scale {np.abs(ref_enc).max():.1f}), "
          f"logits max|d|={d_logits:.2e} (scale {np.abs(ref_logits).max():.1f})")
    assert logits.dtype == jnp.float32
    assert ref_logits.std() > 1.0  # not flat
    assert d_enc <= 1e-4 and d_logits <= 1e-4


def test_embed_is_shared_unscaled():
    hf = hf_model("gated-gelu", "gelu", tied=False)
    cfg, model = ours(False, "gelu", True)
    params = convert(model, hf, cfg)
    ids = np.array([[0, 5, 96]])
    got = model.apply(params, jnp.asarray(ids), method=T5Model.embed)
    np.testing.assert_array_equal(np.asarray(got), hf.shared.weight.detach().numpy()[ids])


def test_cached_decoding_matches_full_forward():
    hf = hf_model("gated-gelu", "gelu", tied=False)
    cfg, model = ours(False, "gelu", True)
    params = convert(model, hf, cfg)
    embeds, mask, decoder_ids = inputs()
    m, ids = jnp.asarray(mask), jnp.asarray(decoder_ids)
    enc = model.apply(params, jnp.asarray(embeds), m, method=T5Model.encode)
    full = model.apply(params, jnp.asarray(embeds), m, ids)

    def decode(mod, ids, cache, slot, enc_out=None, cross=None):
        hidden, cache, cross = mod.decode(ids, m, cache, slot, enc_out=enc_out, cross=cross)
        return mod.head(hidden), cache, cross

    _, no_cache, _ = model.apply(params, ids, None, 0, enc, method=decode)
    assert no_cache is None
    T = decoder_ids.shape[1]
    cache = model.init_cache(2, T + 3)   # longer than needed: unused slots must stay masked
    # the first token computes every layer's cross-attention K/V (stacked, heads-major); later steps reuse them
    logits, cache, cross = model.apply(params, ids[:, :1], cache, 0, enc, method=decode)
    assert cross["k"].shape == (cfg.num_decoder_layers, 2, 3, embeds.shape[1], 12)
    step = jax.jit(lambda p, ids, c, i: model.apply(p, ids, c, i, None, cross, method=decode)[:2])
    steps = [logits]
    for t in range(1, T):
        logits, cache = step(params, ids[:, t:t + 1], cache, jnp.int32(t))
        steps.append(logits)
    d_step = np.abs(np.concatenate(steps, 1) - np.asarray(full)).max()

    # prefill two tokens, then continue one at a time from a python-int index
    cache = model.init_cache(2, T)
    pre, cache, cross = model.apply(params, ids[:, :2], cache, 0, enc, method=decode)
    rest = [model.apply(params, ids[:, t:t + 1], cache, t, None, cross, method=decode)[0] for t in range(2, 3)]
    d_prefill = np.abs(np.concatenate([pre] + rest, 1) - np.asarray(full)[:, :3]).max()
    print(f"cached decode max|d| step-by-step={d_step:.2e}, prefill+step={d_prefill:.2e}")
    assert d_step <= 1e-5 and d_prefill <= 1e-5

    with pytest.raises(ValueError, match="does not fit"):
        model.apply(params, ids[:, :1], cache, T, None, cross, method=decode)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_table_matches_hf(bidirectional):
    rel = np.arange(-600, 601)
    ref = HFT5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional, 32, 128).numpy()
    got = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128))
    np.testing.assert_array_equal(got, ref)
    # spot checks worked out by hand from the bucket formula (16 exact buckets, then log-spaced)
    table = dict(zip(rel.tolist(), got.tolist()))
    if bidirectional:
        assert [table[-r] for r in (7, 8, 11, 12, 16, 90, 91, 600)] == [7, 8, 8, 9, 10, 14, 15, 15]
        assert table[16] == 26 and table[0] == 0
    else:
        assert [table[-n] for n in (15, 16, 18, 19, 112, 113)] == [15, 16, 16, 17, 30, 31]
        assert table[5] == 0


def abstract_params(cfg: T5Config):
    model = T5Model(cfg)
    return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, cfg.d_model)),
                                                      jnp.ones((1, 2)), jnp.zeros((1, 1), jnp.int32))["params"]))


@pytest.mark.parametrize("preset,count", [("instructblip-flan-t5-xl", 2_849_757_184),
                                          ("instructblip-flan-t5-xxl", 11_135_332_352)])
def test_param_count(preset, count):
    cfg = PRESETS[preset].text
    total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params(cfg)))
    assert total == count


def test_table_covers_hf_checkpoint_keys():
    """Every `language_model.*` key of the real InstructBLIP Flan-T5-XL checkpoint is placed, shapes agree."""
    from tests.test_full_size import hf_key_shapes  # the released checkpoint's keys, from transformers
    keys = {k[len("language_model."):]: s for k, s in hf_key_shapes("instructblip-flan-t5-xl").items()
            if k.startswith("language_model.")}
    keys["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = (32, 32)
    targets = flatten(abstract_params(PRESETS["instructblip-flan-t5-xl"].text))
    assignment = plan(keys, RULES, targets)  # per-layer paths (the stacks' slices)
    assert set(assignment) == set(stacking.per_layer_specs(targets))
    assert assignment["shared/embedding"][0] == "shared.weight"
    assert assignment["lm_head/kernel"][0] == "lm_head.weight"


def test_rejects_float16():
    cfg = T5Config(**TINY)
    with pytest.raises(ValueError, match="float16"):
        T5Model(cfg, dtype=jnp.float16).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 40)), jnp.ones((1, 2)),
                                            jnp.zeros((1, 1), jnp.int32))
