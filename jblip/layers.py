"""Shared building blocks.

Einsum axis letters used throughout jblip:
  B batch, T query length, S key length, D model width, N heads, H head dim,
  F feed-forward width, V vocabulary, K kv-input width (cross-attention source).

Every parameter is created with logical axis names so that `jblip.sharding`
can map them onto a device mesh; every module takes `dtype` (compute) and
`param_dtype` (storage). Norms, softmax and logits are computed in float32.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jblip import cpu_dot

Dtype = jnp.dtype
NEG_INF = -1e30  # large finite value: avoids NaN for fully masked rows


def init_normal(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


def logical_param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """Dense layer over the last `len(in_shape)` axes, kernel `in_shape + out_shape`.

    `axes` names every kernel dimension (inputs first, then outputs); the bias
    takes the output axes' names.
    """
    in_shape: Sequence[int]
    out_shape: Sequence[int]
    axes: Sequence[str]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = init_normal()

    @nn.compact
    def __call__(self, x):
        in_shape, out_shape = tuple(self.in_shape), tuple(self.out_shape)
        assert len(self.axes) == len(in_shape) + len(out_shape), self.axes
        kernel = logical_param(self, "kernel", self.kernel_init, in_shape + out_shape,
                               tuple(self.axes), self.param_dtype)
        n_in = len(in_shape)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        batch_shape, k, n = x.shape[:x.ndim - n_in], math.prod(in_shape), math.prod(out_shape)
        slab = cpu_dot.slab_rows(math.prod(batch_shape), (k, n), kernel.dtype.itemsize)
        if slab:
            y = cpu_dot.slab_product(x.reshape(-1, k), kernel.reshape(k, n), slab).reshape(batch_shape + out_shape)
        else:
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if self.use_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros, out_shape,
                                 tuple(self.axes[n_in:]), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = logical_param(self, "embedding", init_normal(),
                                       (self.num_embeddings, self.features), self.axes, self.param_dtype)

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x):
        """Tied output head: x @ embedding^T."""
        return jnp.einsum("BTD,VD->BTV", x.astype(self.dtype), self.embedding.astype(self.dtype))


class LayerNorm(nn.Module):
    """LayerNorm (or RMSNorm with `rms=True`) computed in float32, output in `dtype`."""
    eps: float
    rms: bool = False
    use_bias: bool = True
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = logical_param(self, "scale", nn.initializers.ones, (d,), (self.axis_name,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        if self.rms:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32)
        if self.use_bias and not self.rms:
            bias = logical_param(self, "bias", nn.initializers.zeros, (d,), (self.axis_name,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def attention(q, k, v, bias=None, scale: float | None = None, dtype=jnp.float32, heads_major: bool = False):
    """Multi-head attention core; softmax in float32.

    q: [B,T,N,H]; k/v: [B,S,N,H], or [B,N,S,H] with `heads_major` (the KV-cache layout:
    the contractions then read the cache in place instead of copying a transposed one every
    decode step). bias: additive, broadcastable to [B,N,T,S] (see `mask_to_bias`).
    Returns [B,T,N,H].
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q = q.transpose(0, 2, 1, 3)
    if not heads_major:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if bias is None and _block_on_cpu(q, k):
        out = _blocked_attention(q, k, v, scale, dtype)
    else:
        out = _attention_heads_major(q, k, v, bias, scale, dtype)
    return out.transpose(0, 2, 1, 3)


def _attention_heads_major(q, k, v, bias, scale: float, dtype):
    """q [B,N,T,H], k/v [B,N,S,H] -> [B,N,T,H]."""
    scores = jnp.einsum("BNTH,BNSH->BNTS", q, k).astype(jnp.float32)
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("BNTS,BNSH->BNTH", probs, v.astype(dtype))


# XLA:CPU writes the whole [B,N,T,S] score tensor to memory and reads it back three times;
# at ViT sizes (257 x 257 per head) attention in one piece ran 2.3x slower than one
# (batch, head) pair at a time, whose scores stay in cache.
_BLOCK_MIN_SCORES = 128 * 128


def _block_on_cpu(q, k) -> bool:
    """Blocked attention only on one CPU device: on a mesh, looping over the (sharded)
    batch and head dims would make the partitioner regather them."""
    return q.shape[2] * k.shape[2] >= _BLOCK_MIN_SCORES and cpu_dot.on_one_cpu_device()


def _blocked_attention(q, k, v, scale: float, dtype):
    """`_attention_heads_major` without bias, one (batch, head) pair per loop step."""
    b, n, t, _ = q.shape
    flat = lambda x: x.reshape(b * n, 1, 1, x.shape[2], x.shape[3])
    out = jax.lax.map(lambda qkv: _attention_heads_major(*qkv, None, scale, dtype), (flat(q), flat(k), flat(v)))
    return out.reshape(b, n, t, v.shape[-1])


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


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
