"""A stacked param assembled on its devices one layer at a time.

`stacking.HostStack` holds the whole stack on the host and then copies it to the devices, so
for a moment a stack exists twice (three times before, with the per-layer slices kept for
`np.stack`): for a 7B LLaMA's int8 MLP kernel, 1.4 GB each. Here the stack is allocated once
where it will live, with its sharding, and each layer is placed (only the slices of this
process's devices) and written into it by a donated `dynamic_update_slice`, which XLA does
in place: besides the stack, only one layer is ever alive, on the host and on the devices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jblip import sharding


@functools.lru_cache(maxsize=256)
def _zeros(shape: tuple, dtype: str, target) -> callable:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=target)


@functools.partial(jax.jit, donate_argnums=0)
def _write(stack, layer, index):
    return jax.tree_util.tree_map(
        lambda s, x: jax.lax.dynamic_update_slice(s, x, (index,) + (0,) * (s.ndim - 1)), stack, layer)


class DeviceStack:
    """`convert_params`' stack protocol (`set(i, layer)`, `result()`) on devices: `shardings`
    (the param's sharding, or a pytree of them for a quantised kernel) and `leaf` (its abstract
    value) give where and what; `check(path, layer)` sees each host layer first."""

    def __init__(self, path: str, leaf, shardings, check=None):
        self.path, self.shardings, self.check = path, shardings, check
        self.value = jax.tree_util.tree_map(
            lambda a, t: _zeros(tuple(a.shape), str(np.dtype(a.dtype)), t)(), leaf, shardings)

    def set(self, index: int, layer) -> None:
        if self.check is not None:
            self.check(self.path, layer)
        # one layer as a [1, ...] array with the stack's own sharding (the layer axis is never split)
        piece = jax.tree_util.tree_map(lambda x, t: sharding.place(np.asarray(x)[None], t), layer, self.shardings)
        self.value = _write(self.value, piece, np.int32(index))

    def result(self):
        value, self.value = self.value, None
        return value
