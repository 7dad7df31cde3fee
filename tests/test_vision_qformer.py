"""Parity of the EVA ViT and the Q-Former (InstructBLIP and BLIP-2) with HF torch, fp32."""
from dataclasses import replace

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import Blip2QFormerConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel
from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerModel, InstructBlipVisionModel

from jblip.convert.fuse import FuseQVBias
from jblip.convert.rules import DictSource, Rule, convert_params, flatten, plan
from jblip.convert.stacking import per_layer_specs
from jblip.convert.tables import qformer as qformer_table
from jblip.convert.tables import vision as vision_table
from jblip.config import TINY_QFORMER, TINY_VISION, QFormerConfig, VisionConfig
from jblip.qformer import QFormer
from jblip.vision import VisionTransformer, torch_bicubic_matrix

TOL = 1e-4
NUM_QUERIES = 6
QFORMER_3 = replace(TINY_QFORMER, num_layers=3)  # cross-attention on layers 0 and 2


# --------------------------------------------------------------------------- helpers

def hf_vision_config(cfg: VisionConfig) -> InstructBlipVisionConfig:
    assert cfg.post_layernorm_eps == cfg.layer_norm_eps  # HF has one eps for both
    hf = InstructBlipVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                  patch_size=cfg.patch_size, image_size=cfg.image_size,
                                  layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, qkv_bias=True)
    hf._attn_implementation = "eager"
    return hf


def hf_qformer_config(cfg: QFormerConfig):
    common = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                  cross_attention_frequency=cfg.cross_attention_frequency,
                  encoder_hidden_size=cfg.encoder_hidden_size, vocab_size=cfg.vocab_size,
                  max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
                  hidden_act=cfg.hidden_act, pad_token_id=cfg.pad_token_id)
    if cfg.use_text_input:
        hf = InstructBlipQFormerConfig(**common)
    else:
        hf = Blip2QFormerConfig(**common, use_qformer_text_input=False)
    hf._attn_implementation = "eager"
    return hf


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float = 0.2):
    """Replace the (tiny, near-zero) HF init with well-spread random values."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_scale = isinstance(module, torch.nn.LayerNorm) and name == "weight"
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return model.eval()


def state_dict_numpy(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def abstract_params(module, *args):
    return jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *args))["params"])


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------- vision

@pytest.fixture(scope="module")
def vision_pair():
    torch.manual_seed(0)
    hf = randomize(InstructBlipVisionModel(hf_vision_config(TINY_VISION)), seed=1)
    model = VisionTransformer(TINY_VISION)
    size = TINY_VISION.image_size
    params = convert_params(DictSource(state_dict_numpy(hf)), vision_table.RULES,
                            abstract_params(model, jnp.zeros((1, size, size, 3))))
    return hf, model, params


def run_vision(hf, model, params, height, width, seed=0):
    pixels = np.random.default_rng(seed).standard_normal((2, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(pixels), interpolate_pos_encoding=True)
    got, pre = jax.jit(lambda p, x: model.apply({"params": p}, x, return_pre_norm=True))(
        params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    return got, pre, want.last_hidden_state.numpy()


def test_vision_matches_hf_at_checkpoint_size(vision_pair):
    hf, model, params = vision_pair
    got, pre, want = run_vision(hf, model, params, 28, 28)
    assert got.shape == want.shape == (2, 1 + 7 * 7, TINY_VISION.hidden_size)
    d = max_diff(got, want)
    print(f"vision 28x28 max|d|={d:.2e}")
    assert d <= TOL
    # the pre-norm output is what post_layernorm normalises
    norm = hf.post_layernorm
    with torch.no_grad():
        renormed = norm(torch.from_numpy(np.array(pre))).numpy()
    assert max_diff(renormed, want) <= TOL
    assert max_diff(pre, got) > 0.1


@pytest.mark.parametrize("height,width", [(36, 36), (20, 20), (36, 24), (30, 31)])
def test_vision_interpolated_positions_match_hf(vision_pair, height, width):
    hf, model, params = vision_pair
    got, _, want = run_vision(hf, model, params, height, width, seed=height + width)
    assert got.shape == want.shape == (2, 1 + (height // 4) * (width // 4), TINY_VISION.hidden_size)
    d = max_diff(got, want)
    print(f"vision {height}x{width} max|d|={d:.2e}")
    assert d <= TOL


@pytest.mark.parametrize("in_size,out_size", [(7, 9), (7, 5), (16, 26), (26, 16), (5, 5), (3, 1)])
def test_bicubic_matrix_matches_torch_interpolate(in_size, out_size):
    x = torch.randn(1, 2, in_size, 4)
    want = torch.nn.functional.interpolate(x, size=(out_size, 4), mode="bicubic", align_corners=False)
    got = np.einsum("oi,bciw->bcow", torch_bicubic_matrix(in_size, out_size), x.numpy())
    assert max_diff(got, want.numpy()) <= 1e-5


def test_vision_rejects_channels_first(vision_pair):
    _, model, params = vision_pair
    with pytest.raises(ValueError, match="NHWC"):
        model.apply({"params": params}, jnp.zeros((1, 3, 28, 28)))


# --------------------------------------------------------------------------- Q-Former

def qformer_pair(cfg: QFormerConfig, seed: int):
    torch.manual_seed(seed)
    hf_cls = InstructBlipQFormerModel if cfg.use_text_input else Blip2QFormerModel
    hf = randomize(hf_cls(hf_qformer_config(cfg)), seed=seed)
    queries = np.random.default_rng(seed).standard_normal((1, NUM_QUERIES, cfg.hidden_size)).astype(np.float32)
    model = QFormer(cfg, NUM_QUERIES)
    table = qformer_table.INSTRUCT_RULES if cfg.use_text_input else qformer_table.BLIP2_RULES
    source = {**state_dict_numpy(hf), "query_tokens": queries}
    rules = [*table, Rule(r"query_tokens", "query_tokens")]
    params = convert_params(DictSource(source), rules,
                            abstract_params(model, jnp.zeros((1, 5, cfg.encoder_hidden_size))))
    return hf, torch.from_numpy(queries), model, params


def test_instruct_qformer_matches_hf_with_padded_instructions():
    hf, queries, model, params = qformer_pair(QFORMER_3, seed=3)
    rng = np.random.default_rng(4)
    batch, length, image_tokens = 3, 7, 11
    image = rng.standard_normal((batch, image_tokens, QFORMER_3.encoder_hidden_size)).astype(np.float32)
    ids = rng.integers(1, QFORMER_3.vocab_size, (batch, length))
    mask = np.zeros((batch, length), np.int64)
    for row, n in enumerate([7, 4, 2]):  # right padding, as the BERT tokenizer does
        mask[row, :n] = 1
    ids = ids * mask  # pad id 0

    with torch.no_grad():
        full_mask = torch.cat([torch.ones(batch, NUM_QUERIES, dtype=torch.long), torch.from_numpy(mask)], dim=1)
        want = hf(input_ids=torch.from_numpy(ids), attention_mask=full_mask,
                  query_embeds=queries.expand(batch, -1, -1), encoder_hidden_states=torch.from_numpy(image),
                  encoder_attention_mask=torch.ones(batch, image_tokens, dtype=torch.long)).last_hidden_state.numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(image), jnp.asarray(ids), jnp.asarray(mask))
    assert got.shape == want.shape == (batch, NUM_QUERIES + length, QFORMER_3.hidden_size)
    d_query = max_diff(got[:, :NUM_QUERIES], want[:, :NUM_QUERIES])
    d_all = max_diff(got, want)
    print(f"instruct qformer queries max|d|={d_query:.2e}, all positions max|d|={d_all:.2e}")
    assert d_query <= TOL and d_all <= TOL

    # queries_only (what the model uses) skips the last layer's text rows and gives the same queries
    only = jax.jit(lambda *a: model.apply({"params": params}, *a, queries_only=True))(
        jnp.asarray(image), jnp.asarray(ids), jnp.asarray(mask))
    assert only.shape == (batch, NUM_QUERIES, QFORMER_3.hidden_size)
    assert max_diff(only, got[:, :NUM_QUERIES]) <= 1e-6

    # the mask matters: without it the padded rows' query outputs change
    unmasked = jax.jit(model.apply)({"params": params}, jnp.asarray(image), jnp.asarray(ids))
    assert max_diff(unmasked[2, :NUM_QUERIES], want[2, :NUM_QUERIES]) > 1e-3
    assert max_diff(unmasked[0], want[0]) <= TOL  # row 0 has no padding


def test_instruct_qformer_without_text_matches_hf():
    hf, queries, model, params = qformer_pair(QFORMER_3, seed=5)
    image = np.random.default_rng(6).standard_normal((2, 9, QFORMER_3.encoder_hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = hf(input_ids=None, query_embeds=queries.expand(2, -1, -1),
                  encoder_hidden_states=torch.from_numpy(image)).last_hidden_state.numpy()
    got = model.apply({"params": params}, jnp.asarray(image))
    assert got.shape == (2, NUM_QUERIES, QFORMER_3.hidden_size)
    assert max_diff(got, want) <= TOL


def test_blip2_qformer_matches_hf():
    cfg = replace(QFORMER_3, use_text_input=False)
    hf, queries, model, params = qformer_pair(cfg, seed=7)
    # layers 0-1 are one scanned group, layer 2 (the last) stands alone
    assert "embeddings" not in params
    assert all("text_ffn" not in layer for layer in (params["layers"]["layer_0"], params["layers"]["layer_1"],
                                                      params["layers_2"]))
    image = np.random.default_rng(8).standard_normal((2, 13, cfg.encoder_hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = hf(query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=torch.from_numpy(image),
                  encoder_attention_mask=torch.ones(2, 13, dtype=torch.long)).last_hidden_state.numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(image))
    d = max_diff(got, want)
    print(f"blip2 qformer max|d|={d:.2e}")
    assert got.shape == want.shape == (2, NUM_QUERIES, cfg.hidden_size)
    assert d <= TOL
    with pytest.raises(ValueError, match="takes no text"):
        model.apply({"params": params}, jnp.asarray(image), jnp.zeros((2, 3), jnp.int32))


# --------------------------------------------------------------------------- full-size layouts

def meta_state_shapes(model_cls, config) -> dict:
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("image_size,want", [(224, 985_952_256), (364, 986_543_616)])
def test_full_vision_param_count_and_table(image_size, want):
    cfg = VisionConfig(image_size=image_size)
    abstract = abstract_params(VisionTransformer(cfg), jnp.zeros((1, image_size, image_size, 3)))
    assert count(abstract) == want
    # every HF key lands on a param of the right shape, and every param is filled
    assignment = plan(meta_state_shapes(InstructBlipVisionModel, hf_vision_config(cfg)),
                      vision_table.RULES, flatten(abstract))
    assert len(assignment) == len(per_layer_specs(flatten(abstract)))  # the stack counts once per layer


@pytest.mark.parametrize("use_text,want", [(True, 185_660_160), (False, 105_137_664)])
def test_full_qformer_param_count_and_table(use_text, want):
    cfg = QFormerConfig(use_text_input=use_text, vocab_size=30523)
    abstract = abstract_params(QFormer(cfg, 32), jnp.zeros((1, 257, cfg.encoder_hidden_size)))
    assert abstract["query_tokens"].shape == (32, 768)
    assert count(abstract) == want + 24_576
    hf_cls = InstructBlipQFormerModel if use_text else Blip2QFormerModel
    table = qformer_table.INSTRUCT_RULES if use_text else qformer_table.BLIP2_RULES
    targets = flatten(abstract)
    plan(meta_state_shapes(hf_cls, hf_qformer_config(cfg)), table, targets, optional=["query_tokens"])


# --------------------------------------------------------------------------- separate q/v biases

def split_qv(state: dict, key_map=lambda k: k) -> dict:
    out = {}
    for k, v in state.items():
        if k.endswith("qkv.bias"):
            q, _, vb = np.split(v, 3)
            prefix = key_map(k[: -len(".qkv.bias")])
            out[prefix + ".q_bias"], out[prefix + ".v_bias"] = q, vb
        else:
            out[k] = v
    return out


def test_fuse_qv_bias_gives_the_fused_params(vision_pair):
    hf, model, params = vision_pair
    fused = state_dict_numpy(hf)
    for k in fused:
        if k.endswith("qkv.bias"):
            n = fused[k].shape[0] // 3
            fused[k][n:2 * n] = 0.0  # checkpoints never carry a key bias
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    want = convert_params(DictSource(fused), vision_table.RULES, abstract)

    split = split_qv(fused)
    source = FuseQVBias(DictSource(split))
    assert sorted(source.keys()) == sorted(fused)
    got = convert_params(source, vision_table.RULES, abstract)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)

    # without the wrapper the separate biases are reported, not silently skipped
    with pytest.raises(ValueError, match="q_bias"):
        convert_params(DictSource(split), vision_table.RULES, abstract)


def test_fuse_qv_bias_keeps_bfloat16_and_lavis_names():
    q = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
    v = (np.arange(6, dtype=np.float32) + 10).astype(ml_dtypes.bfloat16)
    w = np.ones((18, 6), ml_dtypes.bfloat16)
    source = FuseQVBias(DictSource({"blocks.0.attn.qkv.weight": w, "blocks.0.attn.q_bias": q,
                                    "blocks.0.attn.v_bias": v, "blocks.1.attn.q_bias": q}))
    assert source.keys() == ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.1.attn.q_bias"]
    key = "blocks.0.attn.qkv.bias"
    assert source.shape(key) == (18,) and source.dtype(key) == ml_dtypes.bfloat16
    fused = source.read(key)
    assert fused.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(fused.astype(np.float32),
                                  np.concatenate([np.arange(6), np.zeros(6), np.arange(6) + 10]))
