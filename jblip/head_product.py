"""The vocabulary head's product, with a CPU form for the two or three rows of a decode step.

A decode step multiplies a few rows (the batch, or the beams) by the head kernel [D, V], the
largest matrix of a small LM, streamed from memory once per step. XLA:CPU takes one row with
its own GEMV, but 2-7 rows with a general matrix product that streams the same kernel 3-4x
slower. For two or three rows a GEMV per row, reading the kernel two or three times, still
wins. Measured on one core (the 94M LLaMA of benchmarks/generate.py, head [512, 32001] fp32,
65 MB; decode step in ms, the CPU decode program of `jblip.compiler_options`):

    rows (batch x beams)     one product   a GEMV per row
    2 (batch 2; 2 beams)     21.7; 22.4    17.8; 17.7
    3 (batch 3)              24.2          20.5
    4 (batch 4)              22.4          23.5
    5 (5 beams)              25.8          (sums over 64-row kernel slabs: 25.7-26.3)

Alone, [5, 512] x [512, 32001] summed over 64-row slabs took 7.3-7.9 ms against 9.5 ms for one
product, but inside the decode step the slabs gained nothing (above), so five or more rows keep
the plain product. The GEMV form is used in programs compiled for CPU
(`jax.lax.platform_dependent`: an export for accelerators carries only the plain product) that
no mesh partitions, for kernels of at least `MIN_KERNEL_BYTES` (smaller ones stay in cache).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jblip.attention_kernels import unpartitioned
from jblip.quantization import dense, is_quantized

MIN_KERNEL_BYTES = 4 << 20
GEMV_ROWS = range(2, 4)


def plain_product(x, kernel, dtype):
    """x [..., D] @ kernel [D, V] in `dtype` (a quantised kernel dequantised), accumulated in float32."""
    return dense(x, kernel, 1, dtype, preferred_element_type=jnp.float32)


def gemv_fits(rows: int, kernel) -> bool:
    """Whether `rows` rows against `kernel` take a GEMV each in a CPU program (see above);
    quantised kernels keep their own product."""
    if is_quantized(kernel):
        return False
    big = math.prod(kernel.shape) * jnp.dtype(kernel.dtype).itemsize >= MIN_KERNEL_BYTES
    return rows in GEMV_ROWS and big and unpartitioned()


def gemv_rows(x, kernel, dtype):
    """x [M, D] @ kernel [D, V], one row at a time."""
    return jnp.stack([plain_product(row, kernel, dtype) for row in x])


def head_product(x, kernel, dtype):
    """x [..., D] @ kernel [D, V] in `dtype` with float32 logits; a GEMV per row on CPU where it fits."""
    lead = x.shape[:-1]
    if not gemv_fits(math.prod(lead), kernel):
        return plain_product(x, kernel, dtype)
    cpu = lambda x, kernel: gemv_rows(x.reshape(-1, x.shape[-1]), kernel, dtype).reshape(lead + kernel.shape[-1:])
    return jax.lax.platform_dependent(x, kernel, default=lambda x, k: plain_product(x, k, dtype), cpu=cpu)
