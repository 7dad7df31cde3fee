"""Shared building blocks.

Einsum axis letters used throughout jblip:
  B batch, T query length, S key length, D model width, N heads, H head dim,
  F feed-forward width, V vocabulary, K kv heads (grouped-query attention), G query
  heads per kv head (N = K x G).

The attention op lives in `jblip.attention` (re-exported here with its mask helpers).

Every parameter is created with logical axis names so that `jblip.sharding`
can map them onto a device mesh; every module takes `dtype` (compute) and
`param_dtype` (storage). Norms, softmax and logits are computed in float32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jblip.attention import (NEG_INF, attention, causal_bias, full_bias, key_padding_bias,  # noqa: F401
                             mask_to_bias, xla_attention)
from jblip.quantization import Quantization, dense, kernel_param

Dtype = jnp.dtype


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
    quant: Quantization | None = None  # weight-only int8/int4 kernel (jblip.quantization)

    @nn.compact
    def __call__(self, x):
        in_shape, out_shape = tuple(self.in_shape), tuple(self.out_shape)
        assert len(self.axes) == len(in_shape) + len(out_shape), self.axes
        n_in = len(in_shape)
        kernel = kernel_param(self, "kernel", self.kernel_init, in_shape + out_shape, self.axes, n_in,
                              self.param_dtype, self.quant)
        y = dense(x, kernel, n_in, self.dtype)
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
