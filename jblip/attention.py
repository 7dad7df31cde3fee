"""One attention op; the kernel is picked for the platform of the program being compiled.

    attention(q, k, v, bias=None, *, key_mask=None, causal=False, scale=None, dtype, heads_major)

q [B,T,N,H]; k/v [B,K,S,H] with `heads_major` (the KV-cache layout, read in place) or
[B,S,K,H]. K kv heads divide the N query heads: grouped-query attention contracts each
kv head with its N/K query heads (a grouped einsum), never repeating the cache.
Masking: an additive `bias` broadcastable to [B,N,T,S], and/or the structured masks
`key_mask` [B,S] (True = a valid key) and `causal` (query t, at slot t, sees slots <= t).
Structured masks let fused kernels skip masked blocks without a [B,N,T,S] bias in memory.
Softmax in float32; the probabilities meet v in `dtype`.

Kernels, chosen for the platform of the compiled program (so a program exported for TPU
from a CPU host carries the TPU kernel and no CPU loop): `jax.lax.platform_dependent` for
the CPU branch (plain XLA ops), `jblip.platform_kernel.per_platform` for the custom GPU
and TPU kernels (which `platform_dependent` would try to lower for every platform):
  every platform  XLA dot-product attention (`xla_attention`), the reference.
  cpu             one (batch, kv head) pair per loop step for long unmasked sequences
                  (ViT sizes) when no mesh partitions the program: XLA:CPU writes the
                  whole score tensor to memory and reads it back three times, one pair's
                  scores stay in cache (ViT 257 x 257: 2.3x faster on one CPU device).
  cuda            cuDNN fused attention for bf16/fp16 prefill and training (see
                  `jblip.attention_kernels.cudnn_fits`); decode steps (T = 1) stay on XLA.
  tpu             Pallas flash attention for long sequences (`flash_fits`); XLA below.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jblip import attention_kernels as kernels
from jblip.platform_kernel import per_platform

NEG_INF = -1e30  # large finite value: avoids NaN for fully masked rows


def mask_to_bias(mask):
    """Boolean mask (True = attend) -> additive float32 bias."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def key_padding_bias(key_mask):
    """[B,S] validity mask -> [B,1,1,S] additive bias."""
    return mask_to_bias(key_mask.astype(bool))[:, None, None, :]


def causal_bias(q_positions, key_mask):
    """Causal + padding bias for cache slots.

    q_positions: [B,T] slot index of each query in the key buffer; key_mask: [B,S].
    Query t sees key slot s iff s <= q_positions[t] and key_mask[s].
    """
    s = jnp.arange(key_mask.shape[-1])
    allowed = (s[None, None, :] <= q_positions[:, :, None]) & key_mask.astype(bool)[:, None, :]
    return mask_to_bias(allowed)[:, None, :, :]


def full_bias(bias, key_mask, causal: bool, t: int, s: int):
    """Every mask as one additive float32 bias of rank 4 (broadcastable to [B,N,T,S]), or None.
    The structured masks join as booleans first: a key both padded and in the future costs
    NEG_INF once, as in `causal_bias`."""
    allowed = None
    if key_mask is not None:
        allowed = key_mask.astype(bool)[:, None, None, :]
    if causal:
        future_free = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None]
        allowed = future_free if allowed is None else allowed & future_free
    parts = [] if allowed is None else [mask_to_bias(allowed)]
    if bias is not None:
        parts.append(jnp.asarray(bias, jnp.float32).reshape((1,) * (4 - jnp.ndim(bias)) + jnp.shape(bias)))
    return functools.reduce(jnp.add, parts) if parts else None


def xla_attention(q, k, v, bias=None, key_mask=None, *, causal: bool = False, scale: float, dtype):
    """The reference: q [B,T,N,H], k/v [B,K,S,H] -> [B,T,N,H]. With G = N/K > 1 the scores are
    [B,K,G,T,S] (each kv head meets its G query heads); with G = 1 plain [B,N,T,S]."""
    b, t, n, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    bias = full_bias(bias, key_mask, causal, t, s)
    if g == 1:
        q, spec_in, spec_out = jnp.swapaxes(q, 1, 2), "BNTH,BNSH->BNTS", "BNTS,BNSH->BNTH"
    else:
        q, spec_in, spec_out = q.reshape(b, t, kv_heads, g, h), "BTKGH,BKSH->BKGTS", "BKGTS,BKSH->BTKGH"
        bias = None if bias is None else _grouped(bias, kv_heads)
    scores = jnp.einsum(spec_in, q, k).astype(jnp.float32)
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum(spec_out, probs, v.astype(dtype))
    out = jnp.swapaxes(out, 1, 2) if g == 1 else out
    return out.reshape(b, t, n, v.shape[-1])


def _grouped(bias, kv_heads: int):
    """Bias [b, n, t, s] (n = N or 1) -> [b, K, G, t, s] matching the grouped scores."""
    b, n, t, s = bias.shape
    return bias[:, :, None] if n == 1 else bias.reshape(b, kv_heads, n // kv_heads, t, s)


def attention(q, k, v, bias=None, *, key_mask=None, causal: bool = False, scale: float | None = None,
              dtype=jnp.float32, heads_major: bool = False):
    """Multi-head / grouped-query attention (see the module doc). Returns [B,T,N,H]."""
    if not heads_major:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    n, kv_heads = q.shape[2], k.shape[1]
    if n % kv_heads:
        raise ValueError(f"{kv_heads} kv heads do not divide {n} query heads")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    options = dict(causal=causal, scale=scale, dtype=dtype)
    reference = functools.partial(xla_attention, **options)
    custom = {}
    if kernels.cudnn_fits(q, k, v, bias, key_mask, options):
        custom["cuda"] = functools.partial(kernels.cudnn_attention, **options)
    if kernels.flash_fits(q, k, bias):
        custom["tpu"] = functools.partial(kernels.flash_attention, **options)
    main = _with_kernels(reference, custom, bias is not None, key_mask is not None) if custom else reference
    if kernels.blocked_fits(q, k, bias, key_mask, causal):  # plain XLA ops: platform_dependent suits it
        return jax.lax.platform_dependent(q, k, v, bias, key_mask, default=main,
                                          cpu=functools.partial(kernels.blocked_attention, reference))
    return main(q, k, v, bias, key_mask)


def _with_kernels(reference, custom: dict, has_bias: bool, has_mask: bool):
    """`reference` with custom kernels for some platforms (`jblip.platform_kernel`), called with
    (q, k, v, bias, key_mask) like it; q, k, v and a bias are differentiated."""
    def flat(fn):
        def run(q, k, v, *rest):
            rest = list(rest)
            bias = rest.pop(0) if has_bias else None
            key_mask = rest.pop(0) if has_mask else None
            return (fn(q, k, v, bias, key_mask),)
        return run
    call = per_platform(flat(reference), 3 + has_bias, **{p: flat(fn) for p, fn in custom.items()})
    return lambda q, k, v, bias, key_mask: call(q, k, v, *(x for x in (bias, key_mask) if x is not None))[0]
