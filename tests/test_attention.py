"""The attention op: every kernel that can run here agrees with the XLA reference (values and
gradients), grouped-query attention equals attention over repeated kv heads, structured masks
equal their additive bias, and each platform's program holds its own kernel only."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jblip import attention_kernels as kernels
from jblip.attention import attention, causal_bias, xla_attention
from jblip.sharding import activation_rules, make_mesh


def qkv(t=130, s=140, b=2, n=6, kv=2, h=8, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, t, n, h))
    k, v = (r.standard_normal((b, s, kv, h)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def grads(fn, *args):
    return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args))))(*args)


def close(a, b, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol)


def repeated_reference(q, k, v, bias=None, scale=0.3):
    """Plain multi-head attention with every kv head repeated for its query heads."""
    g = q.shape[2] // k.shape[2]
    k, v = (jnp.swapaxes(jnp.repeat(x, g, axis=2), 1, 2) for x in (k, v))
    return xla_attention(q, k, v, bias, scale=scale, dtype=jnp.float32)


def test_grouped_query_attention_equals_repeated_kv_heads():
    q, k, v = qkv(t=5, s=7)
    bias = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 5, 7)), jnp.float32)  # per head
    for b in (None, bias, bias[:, :1]):
        got = jax.jit(lambda q, k, v: attention(q, k, v, b, scale=0.3))(q, k, v)
        close(got, repeated_reference(q, k, v, b), 1e-6)
        close(grads(lambda *a: attention(*a, b, scale=0.3), q, k, v),
              grads(lambda *a: repeated_reference(*a, b), q, k, v), 1e-5)
    heads_major = attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), scale=0.3, heads_major=True)
    close(heads_major, repeated_reference(q, k, v), 1e-6)
    with pytest.raises(ValueError, match="do not divide"):
        attention(*qkv(n=5, kv=2))


def test_structured_masks_equal_their_bias():
    q, k, v = qkv(t=9, s=9)
    key_mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [3]]))  # second row left-padded
    got = attention(q, k, v, key_mask=key_mask, causal=True, scale=0.3)
    slots = jnp.broadcast_to(jnp.arange(9), (2, 9))
    close(got, repeated_reference(q, k, v, causal_bias(slots, key_mask)), 1e-6)


def test_cpu_blocked_kernel_equals_reference():
    q, k, v = qkv()
    assert kernels.blocked_fits(q, jnp.swapaxes(k, 1, 2), None, None, False)  # the path under test
    blocked = jax.jit(lambda q, k, v: attention(q, k, v, scale=0.3))
    assert "while" in blocked.lower(q, k, v).as_text()
    close(blocked(q, k, v), repeated_reference(q, k, v), 1e-6)
    close(jax.jit(functools.partial(grads, lambda *a: attention(*a, scale=0.3)))(q, k, v),
          grads(repeated_reference, q, k, v), 1e-5)


def test_short_masked_or_partitioned_attention_is_not_blocked():
    q, k, v = qkv()
    kh = jnp.swapaxes(k, 1, 2)
    assert not kernels.blocked_fits(q[:, :8], kh[:, :, :8], None, None, False)
    assert not kernels.blocked_fits(q, kh, None, jnp.ones((2, 140), bool), False)
    decisions = []

    def probe(q, kh):  # the decision as made while tracing under a mesh
        decisions.append(kernels.blocked_fits(q, kh, None, None, False))
        return q

    with activation_rules(make_mesh("data=2,tensor=4")):
        jax.jit(probe)(q, kh)
    assert decisions == [False]


def test_tpu_flash_kernel_equals_reference_in_interpret_mode():
    # Pallas' TPU interpreter runs the kernel itself on CPU (small blocks' worth of tokens)
    q, k, v = qkv(t=256, s=256, b=1, n=2, kv=1, h=64)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    key_mask = jnp.asarray(np.arange(256)[None, :] >= 40)  # 40 left-padding slots
    opts = dict(causal=True, scale=0.125, dtype=jnp.float32)
    flash = lambda q, k, v: kernels.flash_attention(q, k, v, None, key_mask, **opts)
    ref = lambda q, k, v: xla_attention(q, k, v, None, key_mask, **opts)
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(flash)(q, kh, vh)
        got_grads = jax.jit(lambda q, k, v: jax.grad(lambda *a: jnp.sum(jnp.sin(flash(*a))[:, 40:]),
                                                     argnums=(0, 1, 2))(q, k, v))(q, kh, vh)
    close(got[:, 40:], ref(q, kh, vh)[:, 40:], 2e-5)  # padded query rows are don't-cares
    want = jax.grad(lambda *a: jnp.sum(jnp.sin(ref(*a))[:, 40:]), argnums=(0, 1, 2))(q, kh, vh)
    close(got_grads, want, 1e-4)


def test_kernel_choice_by_shape():
    long = qkv(t=1024, s=1024, b=1, n=4, kv=2, h=128, dtype=jnp.bfloat16)
    kh = jnp.swapaxes(long[1], 1, 2)
    assert kernels.flash_fits(long[0], kh, None)
    assert not kernels.flash_fits(long[0], kh, jnp.zeros((1, 1, 1024, 1024)))  # a bias: XLA
    assert not kernels.flash_fits(long[0][:, :512], kh, None)                    # short: XLA
    assert not kernels.flash_fits(long[0][:, :1000], kh, None)                   # not whole blocks
    fp32 = dict(causal=False, scale=1.0, dtype=jnp.float32)
    assert not kernels.cudnn_fits(long[0], kh, kh, None, None, fp32)             # cuDNN: half precision only
    step = dict(fp32, dtype=jnp.bfloat16)
    assert not kernels.cudnn_fits(long[0][:, :1], kh, kh, None, None, step)      # decode step: XLA


def exported(fn, *args, platforms=("tpu", "cuda")):
    return jax.export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


@pytest.mark.parametrize("mesh", [None, "data=2,tensor=4"])
def test_each_platform_lowers_its_own_kernel(mesh):
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((2, 1024, 8, 128), (2, 4, 1024, 128), (2, 4, 1024, 128))]
    mask = jax.ShapeDtypeStruct((2, 1024), jnp.bool_)
    fn = functools.partial(attention, causal=True, dtype=jnp.bfloat16, heads_major=True)
    loss = lambda q, k, v, m: jnp.sum(fn(q, k, v, key_mask=m).astype(jnp.float32))
    with activation_rules(None if mesh is None else make_mesh(mesh)):
        for f in (lambda q, k, v, m: fn(q, k, v, key_mask=m), jax.grad(loss, argnums=(0, 1, 2))):
            both = exported(f, *shapes, mask)
            assert "tpu_custom_call" in both and "while" not in both  # Pallas on tpu, no CPU loop
            assert "tpu_custom_call" not in exported(f, *shapes, mask, platforms=("cuda",))
            cpu = exported(f, *shapes, mask, platforms=("cpu",))
            assert "tpu_custom_call" not in cpu and "custom_call" not in cpu.replace("Sharding", "")
    vit = [jax.ShapeDtypeStruct((2, 257, 16, 88), jnp.float32)] * 3  # ViT-sized, unmasked
    assert "while" in exported(attention, *vit, platforms=("cpu",))   # blocked on one CPU device
    assert "while" not in exported(attention, *vit)                   # not on TPU / GPU


def test_kernel_choice_runs_the_reference_on_cpu_values_and_gradients():
    # shapes that take the per-platform kernel choice (flash on TPU): here it runs the reference
    q, k, v = qkv(t=1024, s=1024, b=1, n=2, kv=1, h=64)
    key_mask = jnp.asarray(np.arange(1024)[None, :] >= 3)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    assert kernels.flash_fits(q, kh, None)
    fn = lambda q, k, v: attention(q, k, v, key_mask=key_mask, causal=True, heads_major=True)
    ref = lambda q, k, v: xla_attention(q, k, v, None, key_mask, causal=True, scale=0.125, dtype=jnp.float32)
    close(jax.jit(fn)(q, kh, vh), ref(q, kh, vh), 1e-6)
    close(jax.jit(functools.partial(grads, fn))(q, kh, vh), grads(ref, q, kh, vh), 1e-5)
