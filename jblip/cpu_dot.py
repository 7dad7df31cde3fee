"""Matrix products with few rows on CPU: the decode steps of batched and beam search.

With 2-16 rows (batch x beams, one token each) a product is bound by streaming the
kernel from memory, and XLA:CPU streams a large kernel poorly in one piece. Summing
the products of contiguous slabs of kernel rows (blocks of the contracted axis, each
at most `SLAB_BYTES`) runs faster: on one core of an EPYC, fp32, 5 rows, kernels cold
in cache: 512 x 32001 7.7 -> 5.8 ms, 512 x 1376 0.27 -> 0.22 ms, 4096 x 4096 6.4 -> 4.9 ms.
One row (a GEMV) and many rows (prefill, training) keep the plain product, which
is faster there; so do meshes, where a loop over a sharded axis would regather it.

The slab loop is only the CPU branch of `jax.lax.platform_dependent` (`or_slabs`): the
program compiled for a GPU or TPU holds the plain product alone, whatever host traced it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_ROWS = 16
SLAB_BYTES = 4 << 20
MIN_KERNEL_BYTES = 1 << 20
# Each slab's product writes an [M, N] partial sum that the next one adds to: slabs of
# fewer than ~64 rows spend more on that than they save (a 32001-wide vocabulary head
# ran best at 64 rows, 8 MiB); below 16 rows there is no gain at all.
GOOD_SLAB_ROWS, MIN_SLAB_ROWS = 64, 16


def unpartitioned() -> bool:
    """No mesh (or a one-device mesh) partitions the program being traced."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def slab_rows(rows: int, kernel_shape: tuple[int, int], itemsize: int) -> int | None:
    """Kernel rows per slab for `rows` input rows, or None for the plain product."""
    k, n = kernel_shape
    if not 2 <= rows <= MAX_ROWS or k * n * itemsize < MIN_KERNEL_BYTES or not unpartitioned():
        return None
    cap = min(k // 2, max(SLAB_BYTES // (n * itemsize), GOOD_SLAB_ROWS))
    return max((r for r in range(MIN_SLAB_ROWS, cap + 1) if k % r == 0), default=None)


def or_slabs(plain, x, kernel, n_in: int = 1):
    """`plain(x, kernel)` (x's last `n_in` axes against kernel's first `n_in`), with the slab
    loop as its CPU branch where `slab_rows` says so."""
    batch_shape, out_shape = x.shape[:x.ndim - n_in], kernel.shape[n_in:]
    k, n = math.prod(kernel.shape[:n_in]), math.prod(out_shape)
    r = slab_rows(math.prod(batch_shape), (k, n), kernel.dtype.itemsize)
    if r is None:
        return plain(x, kernel)

    def slabs(x, kernel):
        return slab_product(x.reshape(-1, k), kernel.reshape(k, n), r).reshape(batch_shape + out_shape)
    return jax.lax.platform_dependent(x, kernel, cpu=slabs, default=plain)


def matmul(x, kernel):
    """x [M, K] @ kernel [K, N], slab by slab on CPU when `slab_rows` says so."""
    return or_slabs(jnp.matmul, x, kernel)


def slab_product(x, kernel, r: int):
    """x [M, K] @ kernel [K, N] as the sum over slabs of `r` kernel rows (r divides K)."""
    (m, k), n = x.shape, kernel.shape[1]
    x_slabs = x.reshape(m, k // r, r).transpose(1, 0, 2)
    kernel_slabs = kernel.reshape(k // r, r, n)
    # partial sums in float32 (as one product of bf16 inputs accumulates), rounded once at the end
    add_slab = lambda i, acc: acc + jnp.dot(x_slabs[i], kernel_slabs[i], preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, k // r, add_slab, jnp.zeros((m, n), jnp.float32))
    return acc.astype(jnp.result_type(x, kernel))
