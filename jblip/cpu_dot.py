"""Matrix products with few rows on one CPU core: the decode steps of batched and beam search.

With 2-16 rows (batch x beams, one token each) a product is bound by streaming the
kernel from memory, and XLA:CPU streams a large kernel poorly in one piece. Summing
the products of contiguous slabs of kernel rows (blocks of the contracted axis, each
at most `SLAB_BYTES`) runs faster: on one core of an EPYC, fp32, 5 rows, kernels cold
in cache: 512 x 32001 7.7 -> 5.8 ms, 512 x 1376 0.27 -> 0.22 ms, 4096 x 4096 6.4 -> 4.9 ms.
One row (a GEMV) and many rows (prefill, training) keep the plain product, which
is faster there; so do meshes, where a loop over a sharded axis would regather it,
and processes that give XLA more than one core: there the plain product streams
the kernel on every core at once (measured on two cores, a decode-like loop at 5
and 8 rows: slabs 12% and 2% slower; on one core 25% and 20% faster).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

MAX_ROWS = 16
MAX_CORES = 1
SLAB_BYTES = 4 << 20
MIN_KERNEL_BYTES = 1 << 20
# Each slab's product writes an [M, N] partial sum that the next one adds to: slabs of
# fewer than ~64 rows spend more on that than they save (a 32001-wide vocabulary head
# ran best at 64 rows, 8 MiB); below 16 rows there is no gain at all.
GOOD_SLAB_ROWS, MIN_SLAB_ROWS = 64, 16


def on_one_cpu_device() -> bool:
    if jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def cores() -> int:
    """Cores this process may run on (XLA:CPU sizes its thread pool from them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def slab_rows(rows: int, kernel_shape: tuple[int, int], itemsize: int) -> int | None:
    """Kernel rows per slab for `rows` input rows, or None for the plain product."""
    k, n = kernel_shape
    if not 2 <= rows <= MAX_ROWS or k * n * itemsize < MIN_KERNEL_BYTES:
        return None
    if cores() > MAX_CORES or not on_one_cpu_device():
        return None
    cap = min(k // 2, max(SLAB_BYTES // (n * itemsize), GOOD_SLAB_ROWS))
    return max((r for r in range(MIN_SLAB_ROWS, cap + 1) if k % r == 0), default=None)


def matmul(x, kernel):
    """x [M, K] @ kernel [K, N], slab by slab when `slab_rows` says so."""
    r = slab_rows(x.shape[0], kernel.shape, kernel.dtype.itemsize)
    return x @ kernel if r is None else slab_product(x, kernel, r)


def slab_product(x, kernel, r: int):
    """x [M, K] @ kernel [K, N] as the sum over slabs of `r` kernel rows (r divides K)."""
    (m, k), n = x.shape, kernel.shape[1]
    x_slabs = x.reshape(m, k // r, r).transpose(1, 0, 2)
    kernel_slabs = kernel.reshape(k // r, r, n)
    # partial sums in float32 (as one product of bf16 inputs accumulates), rounded once at the end
    add_slab = lambda i, acc: acc + jnp.dot(x_slabs[i], kernel_slabs[i], preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, k // r, add_slab, jnp.zeros((m, n), jnp.float32))
    return acc.astype(jnp.result_type(x, kernel))
