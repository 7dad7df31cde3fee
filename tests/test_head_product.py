"""The head product's CPU form for two or three rows (a GEMV each) equals the plain product, and
is chosen only for CPU programs that no mesh partitions (the tiny test models' heads are too
small for it)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jblip.head_product import gemv_fits, head_product, plain_product
from jblip.sharding import activation_rules, make_mesh

D, V = 512, 4099  # an 8 MB kernel, an odd vocabulary


@pytest.fixture(scope="module")
def kernel():
    return jnp.asarray(np.random.default_rng(0).standard_normal((D, V), np.float32) / np.sqrt(D))


@pytest.mark.parametrize("rows, fits", [(1, False), (2, True), (3, True), (4, False), (5, False), (64, False)])
def test_gemv_by_rows(kernel, rows, fits):
    assert gemv_fits(rows, kernel) == fits


def test_small_kernels_and_partitioned_programs_keep_the_plain_product(kernel):
    assert not gemv_fits(2, kernel[:, :512])  # 1 MB: stays in cache
    decisions = []

    def probe(x):
        decisions.append(gemv_fits(2, kernel))
        return x

    with activation_rules(make_mesh("data=2,tensor=4")):
        jax.jit(probe)(jnp.zeros(3))
    assert decisions == [False]


@pytest.mark.parametrize("lead", [(2,), (1, 3), (3, 1, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemv_form_equals_the_plain_product(kernel, lead, dtype):
    x = jnp.asarray(np.random.default_rng(1).standard_normal(lead + (D,), np.float32))
    got = jax.jit(lambda x, k: head_product(x, k, dtype))(x, kernel)
    want = plain_product(x, kernel, dtype)
    assert got.shape == lead + (V,) and got.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16 inputs, float32 sums in another order
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=0)


def test_gemv_form_is_only_in_cpu_programs(kernel):
    x = jnp.ones((3, D))
    lowered = lambda platforms: jax.export.export(jax.jit(lambda x, k: head_product(x, k, jnp.float32)),
                                                  platforms=platforms)(x, kernel).mlir_module()
    per_row = f"-> tensor<{V}xf32>"  # a row's product
    assert lowered(("cpu",)).count(per_row) == 3
    assert per_row not in lowered(("tpu", "cuda"))
