"""Products with few rows on CPU (decode steps) go slab by slab: same values as the plain product;
the plain product for one row, many rows, small kernels and meshes, and in every program
compiled for another platform."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jblip import cpu_dot
from jblip.layers import Linear
from jblip.sharding import activation_rules, make_mesh


def arrays(m, k, n, seed=0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.standard_normal((m, k)), jnp.float32), jnp.asarray(r.standard_normal((k, n)), jnp.float32)


def test_slab_rule():
    f32 = 4
    assert cpu_dot.slab_rows(5, (512, 32001), f32) == 64        # vocabulary head: 64-row slabs
    assert cpu_dot.slab_rows(8, (512, 1376), f32) == 256        # halves of a small kernel
    assert cpu_dot.slab_rows(5, (1376, 512), f32) == 688
    assert cpu_dot.slab_rows(5, (4096, 4096), f32) == 256       # 4 MiB slabs
    assert cpu_dot.slab_rows(1, (512, 32001), f32) is None      # a GEMV streams well already
    assert cpu_dot.slab_rows(17, (512, 32001), f32) is None     # enough rows to be compute bound
    assert cpu_dot.slab_rows(5, (256, 256), f32) is None        # fits in cache
    assert cpu_dot.slab_rows(5, (4099, 512), f32) is None       # prime: no slab of >= 16 rows


def test_slab_product_equals_plain_product():
    for m, k, n in [(5, 512, 4000), (8, 1376, 512), (2, 512, 1024)]:
        x, w = arrays(m, k, n)
        assert cpu_dot.slab_rows(m, (k, n), 4)
        got = jax.jit(cpu_dot.matmul)(x, w)
        ref = jnp.dot(x, w, precision="highest")
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_bfloat16_slab_sums_stay_in_float32():
    x, w = arrays(5, 4096, 4096, seed=4)
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert cpu_dot.slab_rows(5, (4096, 4096), 2) == 512  # 8 slabs
    got = jax.jit(cpu_dot.matmul)(x, w)
    assert got.dtype == jnp.bfloat16
    exact = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    ulp = jnp.abs(exact) * 2.0 ** -8  # one bfloat16 rounding of the exact sum, at most
    assert bool(jnp.all(jnp.abs(got.astype(jnp.float32) - exact) <= ulp + 1e-3))


def test_linear_uses_slabs_for_multi_axis_kernels():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 1, 16, 64)), jnp.float32)  # [B, T, N, H]
    layer = Linear((16, 64), (1024,), ("heads", "kv", "embed"), use_bias=True)
    params = layer.init(jax.random.key(0), x)
    assert cpu_dot.slab_rows(3, (1024, 1024), 4)
    got = jax.jit(layer.apply)(params, x)
    p = nn.unbox(params)["params"]
    ref = jnp.einsum("btnh,nhd->btd", x, p["kernel"], precision="highest") + p["bias"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_slabs_are_the_cpu_branch_only():
    x, w = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays(5, 512, 32001))
    lowered = lambda platforms: jax.export.export(jax.jit(cpu_dot.matmul), platforms=platforms)(x, w).mlir_module()
    assert "while" in lowered(("cpu",))              # the slab loop
    assert "while" not in lowered(("tpu", "cuda"))   # one dot_general
    x1 = jax.ShapeDtypeStruct((1, 512), jnp.float32)  # a GEMV: no branch at all
    assert "case" not in jax.jit(cpu_dot.matmul).lower(x1, w).as_text()


def test_meshes_use_the_plain_product():
    decisions = []

    def probe(x):
        decisions.append(cpu_dot.slab_rows(5, (512, 32001), 4))
        return x

    with activation_rules(make_mesh("data=2,tensor=4")):
        jax.jit(probe)(jnp.zeros(3))
    assert decisions == [None]


def test_slab_product_gradients_equal_plain_ones():
    # training with short answers can put few rows through a large head: the loop must differentiate
    x, w = arrays(4, 512, 2048, seed=2)
    c = jnp.asarray(np.random.default_rng(3).standard_normal((4, 2048)), jnp.float32)
    loss = lambda f: lambda x, w: jnp.sum(c * f(x, w)) + 0.01 * jnp.sum(f(x, w) ** 2)
    got = jax.jit(jax.grad(loss(cpu_dot.matmul), argnums=(0, 1)))(x, w)
    ref = jax.grad(loss(lambda x, w: jnp.dot(x, w, precision="highest")), argnums=(0, 1))(x, w)
    for a, b in zip(got, ref):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-5
