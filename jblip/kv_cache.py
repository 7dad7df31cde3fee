"""The static-shape KV cache shared by every decoder (LLaMA, OPT, Flan-T5's decoder).

One stacked dict {"k", "v"} per layer stack, leaves [L, B, N, S, H] (layers,
batch, heads, slots, head dim). The scanned stack carries the whole cache
through its loop: layer i writes only its new slots (`write_layer`, an in-place
dynamic_update_slice on the loop carry) and reads its own [B, N, S, H] slice
for attention (`read_layer`), so a decode step never copies the whole cache.
Heads-major: the attention contractions read a layer's k/v in place; with
[B, S, N, H] XLA copies a transposed cache on every step (CPU, 8 layers x 8
heads x 64, 128 slots, batch 5: 7 ms per step against 0.6 ms).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_AXES = ("batch", "kv_heads", "cache_length", "kv")  # logical names of one layer's k or v
AXES = ("layers",) + LAYER_AXES                           # logical names of a stacked cache leaf


def batch_axis(leaf) -> int:
    """The rows axis of a cache leaf (beam reorder, repeat): 1 of a stacked [L, B, N, S, H]
    leaf, 0 of a per-layer [B, N, S, H] buffer."""
    return leaf.ndim - len(LAYER_AXES)


def init(num_layers: int, batch: int, heads: int, max_len: int, head_dim: int, dtype=jnp.float32,
         per_layer: bool = False):
    """Zeroed cache. `per_layer` (the CPU layer loop, `jblip.scan.LAYER_LOOPS`): a tuple of
    `[B, N, S, H]` buffers per k and v instead of one stacked array, so that a layer reads its
    K/V in place rather than a copy of its slice out of the stack (XLA:CPU copies dynamic slices
    before the attention products). Four dimensions, not [1, B, N, S, H]: XLA:CPU fused the
    update of such a buffer a second time into the reshape that the attention reads, and then
    copied every layer's cache four times a step (94M model, batch 8: 7 of 37 ms per step)."""
    shape = (num_layers, batch, heads, max_len, head_dim)
    if per_layer:
        layer = lambda: _placed(jnp.zeros(shape[1:], dtype), LAYER_AXES)  # noqa: E731
        return {"k": tuple(layer() for _ in range(num_layers)), "v": tuple(layer() for _ in range(num_layers))}
    return {"k": _placed(jnp.zeros(shape, dtype), AXES), "v": _placed(jnp.zeros(shape, dtype), AXES)}


def is_per_layer(cache) -> bool:
    return isinstance(cache["k"], (tuple, list))


def num_layers(cache) -> int:
    return len(cache["k"]) if is_per_layer(cache) else cache["k"].shape[0]


def _placed(buf, axes):
    """Pin a cache leaf to its sharding (batch and heads split as the activations and K/V kernels),
    also inside the decode loop, where nothing else would; a no-op outside
    `jblip.sharding.activation_rules`."""
    return nn.with_logical_constraint(buf, axes)


def num_slots(cache) -> int:
    return (cache["k"][0] if is_per_layer(cache) else cache["k"]).shape[-2]


def _layer_number(layer) -> int:
    """A per-layer cache is indexed by a Python int: the unrolled stack's layer number."""
    try:
        return int(layer)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError("a per-layer KV cache needs concrete layer numbers (an unrolled layer "
                         "stack, `jblip.scan.LAYER_LOOPS`), not a scanned index") from None


def write_layer(cache, layer, k, v, index):
    """Store layer `layer`'s k/v [B, T, N, H] at slots index..index+T-1; returns the new cache."""
    if is_per_layer(cache):  # layer i's own buffers: the unstacked form (`write`)
        i = _layer_number(layer)
        new = write({"k": cache["k"][i], "v": cache["v"][i]}, k, v, index)
        replace = lambda bufs, buf: tuple(bufs[:i]) + (buf,) + tuple(bufs[i + 1:])  # noqa: E731
        return {name: replace(cache[name], new[name]) for name in ("k", "v")}

    def put(buf, x):
        x = jnp.swapaxes(x, 1, 2).astype(buf.dtype)[None]         # [1, B, N, T, H]
        zero = jnp.zeros((), jnp.int32)
        start = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(index, jnp.int32), zero)
        return _placed(jax.lax.dynamic_update_slice(buf, x, start), AXES)
    return {"k": put(cache["k"], k), "v": put(cache["v"], v)}


def read_layer(cache, layer):
    """Layer `layer`'s (k, v), each [B, N, S, H]."""
    if is_per_layer(cache):
        i = _layer_number(layer)
        return cache["k"][i], cache["v"][i]

    def get(buf):
        return _placed(jax.lax.dynamic_index_in_dim(buf, layer, axis=0, keepdims=False), LAYER_AXES)
    return get(cache["k"]), get(cache["v"])


def write(layer_cache, k, v, index):
    """Unstacked form: one layer's {"k", "v"} [B, N, S, H]; store k/v [B, T, N, H] at slots index.."""
    def put(buf, x):
        x = jnp.swapaxes(x, 1, 2).astype(buf.dtype)
        return _placed(jax.lax.dynamic_update_slice_in_dim(buf, x, index, axis=2), LAYER_AXES)
    return {"k": put(layer_cache["k"], k), "v": put(layer_cache["v"], v)}
