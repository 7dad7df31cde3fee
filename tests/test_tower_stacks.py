"""The ViT and Q-Former layer stacks: scanned layout, depth-independent programs, remat policies."""
from dataclasses import replace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jblip.config import TINY_QFORMER, TINY_VISION
from jblip.qformer import QFormer
from jblip.vision import VisionTransformer

NUM_QUERIES = 3
PIXELS = jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32)
IMAGE = jax.ShapeDtypeStruct((2, 5, TINY_QFORMER.encoder_hidden_size), jnp.float32)
TEXT = jax.ShapeDtypeStruct((2, 4), jnp.int32)


def abstract(module, *args):
    return jax.eval_shape(lambda *a: nn.unbox(module.init(jax.random.key(0), *a))["params"], *args)


def init(module, *args):
    return nn.unbox(jax.jit(module.init)(jax.random.key(0), *args))["params"]


def program_size(module, *args, **kwargs) -> int:
    """Equations of the traced forward pass: grows with depth for an unrolled layer loop."""
    params = abstract(module, *args)
    jaxpr = jax.make_jaxpr(lambda p, *a: module.apply({"params": p}, *a, **kwargs))(params, *args)
    return len(jaxpr.eqns)


def qformer(num_layers, frequency=2, **kwargs):
    return QFormer(replace(TINY_QFORMER, num_layers=num_layers, cross_attention_frequency=frequency),
                   NUM_QUERIES, **kwargs)


def max_grad_diff(f, g, params) -> float:
    a, b = jax.jit(jax.grad(f))(params), jax.jit(jax.grad(g))(params)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_vision_blocks_are_one_stack():
    cfg = replace(TINY_VISION, num_layers=5)
    params = abstract(VisionTransformer(cfg), PIXELS)
    assert sorted(params) == ["class_embedding", "layers", "patch_embedding", "position_embedding",
                              "post_layernorm"]
    assert params["layers"]["mlp"]["fc1"]["kernel"].shape == (5, cfg.hidden_size, cfg.intermediate_size)
    assert params["layers"]["self_attn"]["qkv"]["bias"].shape == (5, 3, cfg.num_heads, cfg.head_dim)


def test_vision_program_does_not_grow_with_depth():
    sizes = [program_size(VisionTransformer(replace(TINY_VISION, num_layers=n)), PIXELS) for n in (2, 13)]
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("num_layers,frequency,groups,separate", [
    (12, 2, 5, [10, 11]),   # released layout: the last group stays out with the last layer
    (3, 2, 1, [2]),         # layer 2 cross-attends (2 % 2 == 0)
    (2, 2, 0, [0, 1]),      # no whole group before the last layer: nothing to scan
    (4, 1, 3, [3]),
])
def test_qformer_scans_groups_before_the_last_layer(num_layers, frequency, groups, separate):
    params = abstract(qformer(num_layers, frequency), IMAGE, TEXT)
    separate_names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
    assert separate_names == [f"layers_{m}" for m in separate]
    for m in separate:
        assert ("cross_attn" in params[f"layers_{m}"]) == (m % frequency == 0)
    if not groups:
        assert "layers" not in params
        return
    stacked = params["layers"]
    assert sorted(stacked) == [f"layer_{j}" for j in range(frequency)]
    assert "cross_attn" in stacked["layer_0"] and all("cross_attn" not in stacked[f"layer_{j}"]
                                                      for j in range(1, frequency))
    width = TINY_QFORMER.hidden_size
    assert stacked["layer_0"]["text_ffn"]["output"]["kernel"].shape == (groups, TINY_QFORMER.intermediate_size, width)


def test_qformer_program_does_not_grow_with_depth():
    # 5 and 11 layers: 2 and 5 scanned groups, then the last layer alone
    sizes = [program_size(qformer(n), IMAGE, TEXT, None, queries_only=True) for n in (5, 11)]
    assert sizes[0] == sizes[1]


@pytest.fixture(scope="module")
def qformer_inputs():
    image = jax.random.normal(jax.random.key(1), IMAGE.shape)
    ids = jax.random.randint(jax.random.key(2), TEXT.shape, 1, TINY_QFORMER.vocab_size)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    return image, ids, mask, init(qformer(5), image, ids, mask)


def squares(model, *inputs, **kwargs):
    return lambda p: jnp.sum(model.apply({"params": p}, *inputs, **kwargs) ** 2)


def test_queries_only_gives_the_query_rows_and_their_gradients(qformer_inputs):
    *inputs, params = qformer_inputs
    model = qformer(5)
    full = jax.jit(lambda p: model.apply({"params": p}, *inputs)[:, :NUM_QUERIES])
    only = jax.jit(lambda p: model.apply({"params": p}, *inputs, queries_only=True))
    assert only(params).shape == (2, NUM_QUERIES, TINY_QFORMER.hidden_size)
    np.testing.assert_allclose(only(params), full(params), atol=1e-6)
    want = jax.jit(jax.grad(lambda p: jnp.sum(full(p) ** 2)))(params)
    got = jax.jit(jax.grad(squares(model, *inputs, queries_only=True)))(params)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))) <= 1e-5
    # the last layer's text feed-forward only serves text outputs: no gradient reaches it
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(got["layers_4"]["text_ffn"]))


def test_remat_keeps_the_gradients(qformer_inputs):
    # "full" recomputes every activation of a block in the backward pass; the other policies
    # only choose which of them to keep
    *inputs, params = qformer_inputs
    assert max_grad_diff(squares(qformer(5), *inputs, queries_only=True),
                         squares(qformer(5, remat="full"), *inputs, queries_only=True), params) <= 1e-5

    cfg = replace(TINY_VISION, num_layers=3)
    pixels = jax.random.normal(jax.random.key(3), PIXELS.shape)
    params = init(VisionTransformer(cfg), pixels)
    assert max_grad_diff(squares(VisionTransformer(cfg), pixels),
                         squares(VisionTransformer(cfg, remat="full"), pixels), params) <= 1e-5


def test_unknown_remat_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown remat policy 'everything'"):
        abstract(VisionTransformer(TINY_VISION, remat="everything"), PIXELS)
    with pytest.raises(ValueError, match="unknown remat policy"):
        abstract(qformer(5, remat="everything"), IMAGE)
