"""The per-platform attention kernels behind `jblip.attention.attention`, and when each fits.

Each kernel takes what `xla_attention` takes (q [B,T,N,H], k/v [B,K,S,H], bias, key_mask)
and returns the same [B,T,N,H]; `attention` hands them to `jax.lax.platform_dependent`,
so they are traced on any host but only lowered for their own platform.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# ----------------------------------------------------------------------------- cpu: blocked

def unpartitioned() -> bool:
    """No mesh (or a one-device mesh) partitions the program being traced."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


# Below ~128 x 128 scores per head the whole score tensor stays in cache anyway.
BLOCK_MIN_SCORES = 128 * 128


def blocked_fits(q, k, bias, key_mask, causal: bool) -> bool:
    """Long unmasked attention (the ViT's) in a program that no mesh partitions: a loop over
    the batch and heads of a sharded array would make the partitioner gather it."""
    unmasked = bias is None and key_mask is None and not causal
    return unmasked and q.shape[1] * k.shape[2] >= BLOCK_MIN_SCORES and unpartitioned()


def blocked_attention(reference, q, k, v, bias, key_mask):
    """`reference` on one (batch, kv head) pair per loop step (its G query heads together)."""
    b, t, n, h = q.shape
    kv_heads, s, hv = k.shape[1], k.shape[2], v.shape[-1]
    g = n // kv_heads
    qs = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b * kv_heads, 1, t, g, h)
    ks, vs = k.reshape(b * kv_heads, 1, 1, s, h), v.reshape(b * kv_heads, 1, 1, s, hv)
    out = jax.lax.map(lambda qkv: reference(*qkv), (qs, ks, vs))  # [b*K, 1, t, g, hv]
    return out.reshape(b, kv_heads, t, g, hv).transpose(0, 2, 1, 3, 4).reshape(b, t, n, hv)


# ----------------------------------------------------------------------------- cuda: cuDNN

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds on every cuDNN-9 GPU


def cudnn_fits(q, k, v, bias, key_mask, options) -> bool:
    """cuDNN's fused kernel: half-precision compute, head dim <= 128 and a multiple of 8, even
    sequence lengths where there is a bias (its backward pass needs them), and more than one
    query (a decode step reads the heads-major cache in place with XLA; cuDNN wants it
    sequence-major, a transposed copy of the whole cache per step).

    cuDNN checks its library version while tracing, so a host without cuDNN (exporting for
    cuda from a CPU machine) cannot trace it: such programs keep XLA on cuda.
    """
    t, h, s = q.shape[1], q.shape[3], k.shape[2]
    dtype = jnp.dtype(options["dtype"])
    if dtype not in CUDNN_DTYPES or t == 1 or h > CUDNN_MAX_HEAD_DIM or h % 8:
        return False
    masked = bias is not None or key_mask is not None
    if masked and (t % 2 or s % 2):
        return False
    shape = lambda x: None if x is None else jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    return _cudnn_traces(*(shape(x) for x in (q, k, v, bias, key_mask)), tuple(sorted(options.items())))


@functools.lru_cache(maxsize=256)
def _cudnn_traces(q, k, v, bias, key_mask, options) -> bool:
    try:
        jax.eval_shape(functools.partial(cudnn_attention, **dict(options)), q, k, v, bias, key_mask)
    except (RuntimeError, NotImplementedError, ValueError):  # no cuDNN here, or shapes it rejects
        return False
    return True


def cudnn_attention(q, k, v, bias, key_mask, *, causal: bool, scale: float, dtype):
    from jblip.attention import full_bias
    t, s = q.shape[1], k.shape[2]
    bias = full_bias(bias, key_mask, False, t, s)  # the causal part goes as cuDNN's own mask
    if bias is not None:  # half-precision bias: -1e30 would overflow float16 to -inf
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (t, s))
        bias = jnp.maximum(bias, jnp.finfo(dtype).min).astype(dtype)
    seq_major = lambda x: jnp.swapaxes(x, 1, 2).astype(dtype)  # [B,S,K,H], GQA handled by cuDNN
    return jax.nn.dot_product_attention(q.astype(dtype), seq_major(k), seq_major(v), bias=bias,
                                        is_causal=causal, scale=scale, implementation="cudnn")


# ----------------------------------------------------------------------------- tpu: Pallas flash

# Below ~1k tokens a head's float32 scores ([T, S] <= 4 MiB) are cheap for XLA's fused
# softmax, and the kernel's 128-token blocks would pad short or odd lengths (the ViT's
# 257 tokens, prompts of tens of tokens, T = 1 decode steps) for nothing.
FLASH_MIN_LEN = 1024
FLASH_BLOCK = 128


def flash_fits(q, k, bias) -> bool:
    """Long sequences in whole 128-token blocks, head dim a multiple of 64, and masks given as
    `key_mask` / `causal` only: the kernel takes an additive bias only as a full [B,N,T,S]
    array, the very memory it exists to avoid."""
    t, s, h = q.shape[1], k.shape[2], q.shape[3]
    return (bias is None and min(t, s) >= FLASH_MIN_LEN and t % FLASH_BLOCK == 0 and s % FLASH_BLOCK == 0
            and h % 64 == 0)


def flash_attention(q, k, v, bias, key_mask, *, causal: bool, scale: float, dtype):
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
    del bias  # flash_fits: none
    b, t, n, _ = q.shape
    g = n // k.shape[1]
    heads_major = lambda x: x.astype(dtype)
    # the kernel wants as many kv heads as query heads; on sequences this long the copy
    # (S x N x H) is small next to the attention itself (T x S x N x H)
    kh, vh = (heads_major(jnp.repeat(x, g, axis=1) if g > 1 else x) for x in (k, v))
    qh = heads_major(jnp.swapaxes(q, 1, 2))
    if key_mask is None:
        key_mask = jnp.ones((b, k.shape[2]), bool)
    kv_segment = key_mask.astype(jnp.int32)  # 1 = valid key, 0 = padding
    # causal queries sit at slots 0..T-1: a padded query (segment 0) then sees padded keys
    # only, never a row with nothing to attend to
    q_segment = kv_segment[:, :t] if causal else jnp.ones((b, t), jnp.int32)

    def run(qh, kh, vh, q_segment, kv_segment):
        ids = pallas_flash.SegmentIds(q=q_segment, kv=kv_segment)
        return pallas_flash.flash_attention(qh, kh, vh, segment_ids=ids, causal=causal, sm_scale=scale)

    mesh = jax.sharding.get_abstract_mesh()
    if not (mesh.empty or mesh.size == 1):  # a custom kernel is not partitioned by XLA: map it over shards
        batch, heads = _mesh_axes(mesh, b, n)
        run = jax.shard_map(run, mesh=mesh, in_specs=(P(batch, heads),) * 3 + (P(batch),) * 2,
                            out_specs=P(batch, heads), check_vma=False)
    return jnp.swapaxes(run(qh, kh, vh, q_segment, kv_segment), 1, 2)


def _mesh_axes(mesh, batch: int, heads: int):
    """Mesh axes of the batch and head dims under the active logical rules, each kept only
    where it divides the dim (else that dim is whole on every shard)."""
    names = nn.logical_to_mesh_axes(("batch", "heads"))

    def divides(axes, size):
        if axes is None:
            return None
        group = axes if isinstance(axes, tuple) else (axes,)
        return axes if size % math.prod(mesh.shape[a] for a in group) == 0 else None
    return divides(names[0], batch), divides(names[1], heads)
