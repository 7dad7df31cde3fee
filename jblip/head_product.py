"""The vocabulary head's product, with a CPU form for the few rows of a decode step.

A decode step multiplies a few rows (the batch, or the beams) by the head kernel [D, V], the
largest matrix of a small LM, streamed from memory once per step. XLA:CPU takes one row with
its own GEMV, but 2-7 rows with a general matrix product that streams the same kernel 3-4x
slower. Measured on one core (fp32 [M, 512] x [512, 32001], 65 MB; ms per product, YNNPACK off
as in the CPU decode program, `jblip.compiler_options`; ranges over runs):

    rows  one product   a GEMV per row   sum over 64-row slabs of the kernel
    1     2.1           -                4.9
    2     8.5-10.3      3.7              7.6-9.4
    3     9.4           6.8              9.5
    4     9.5           8.2              11.9
    5     9.5-9.7       10.7-11.1        7.3-7.9
    6     9.7           12.5             8.0
    7-8   8.7-8.9       15.4-16.5        8.9-10.2

So in programs compiled for CPU (`jax.lax.platform_dependent`: an export for accelerators
carries only the plain product) that no mesh partitions (a loop over a sharded axis would
gather it), 2-4 rows take a GEMV each and 5-6 rows sum slab products; kernels under
`MIN_KERNEL_BYTES` stay in cache and keep the plain product, as do all other row counts.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jblip.attention_kernels import unpartitioned

MIN_KERNEL_BYTES = 4 << 20
GEMV_ROWS = range(2, 5)
SLAB_ROWS = range(5, 7)
SLAB = 64  # kernel rows per slab (of 16-256 measured, 64 was best for a 32001-wide head)


def plain_product(x, kernel, dtype):
    """x [..., D] @ kernel [D, V] in `dtype`, accumulated in float32."""
    return jnp.einsum("...d,dv->...v", x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


def cpu_form(rows: int, kernel) -> str | None:
    """"gemv", "slabs" or None (the plain product) for `rows` rows against `kernel` on CPU."""
    d, v = kernel.shape
    if d * v * jnp.dtype(kernel.dtype).itemsize < MIN_KERNEL_BYTES or not unpartitioned():
        return None
    if rows in GEMV_ROWS:
        return "gemv"
    if rows in SLAB_ROWS and d % SLAB == 0 and d > SLAB:
        return "slabs"
    return None


def gemv_rows(x, kernel, dtype):
    """x [M, D] @ kernel [D, V], one row at a time."""
    return jnp.stack([plain_product(row, kernel, dtype) for row in x])


def slab_sum(x, kernel, dtype):
    """x [M, D] @ kernel [D, V] as the float32 sum of the products of `SLAB`-row kernel slabs."""
    (m, d), v = x.shape, kernel.shape[1]
    x_slabs = x.reshape(m, d // SLAB, SLAB).swapaxes(0, 1)
    kernel_slabs = kernel.reshape(d // SLAB, SLAB, v)
    add_slab = lambda i, acc: acc + plain_product(x_slabs[i], kernel_slabs[i], dtype)
    return jax.lax.fori_loop(0, d // SLAB, add_slab, jnp.zeros((m, v), jnp.float32))


def head_product(x, kernel, dtype):
    """x [..., D] @ kernel [D, V] in `dtype` with float32 logits; the CPU form above where it fits."""
    lead = x.shape[:-1]
    form = cpu_form(math.prod(lead), kernel)
    if form is None:
        return plain_product(x, kernel, dtype)
    few = gemv_rows if form == "gemv" else slab_sum
    cpu = lambda x, kernel: few(x.reshape(-1, x.shape[-1]), kernel, dtype).reshape(lead + kernel.shape[-1:])
    return jax.lax.platform_dependent(x, kernel, default=lambda x, k: plain_product(x, k, dtype), cpu=cpu)
