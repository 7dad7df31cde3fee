"""Where a param is put together from the pieces the loader reads (`convert/chunked.py`): one
layer of a stacked param, a chunk of rows of a large tensor, or the whole tensor.

`HostFill` assembles the param in one preallocated host array and hands it to `place` whole.
`DeviceFill` (the loader's) allocates the param once where it will live, with its sharding,
and writes each piece into it by a donated `dynamic_update_slice`, which XLA does in place:
besides the param, only one piece is ever alive, on the host and on the devices. With the
stacks assembled on the host, a stack existed twice for a moment (three times when the
per-layer slices were kept for `np.stack`): for a 7B LLaMA's int8 MLP kernel, 1.4 GB each.
A piece along an axis the sharding splits is not written that way (XLA would gather the
whole param on every device to update it): such chunks are put together on the host first.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jblip import sharding
from jblip.convert.chunked import empty_like, write_piece


class HostFill:
    """A param assembled on the host, then `place(path, value)`d whole (when a `place` is given)."""

    def __init__(self, path: str, leaf, stacked: bool, place=None):
        self.path, self.leaf, self.stacked, self.place = path, leaf, stacked, place
        self.value = None

    def chunks_along(self, axis: int) -> bool:
        return True

    def write(self, layer: int | None, axis: int | None, start: int, piece) -> None:
        if not self.stacked and axis is None:
            self.value = piece  # the whole param, as read: no copy
            return
        if self.value is None:
            self.value = empty_like(self.leaf)
        write_piece(self.value, piece, axis, start, lead=() if layer is None else (layer,))

    def result(self):
        value, self.value = self.value, None
        return value if self.place is None else self.place(self.path, value)


@functools.lru_cache(maxsize=256)
def _zeros(shape: tuple, dtype: str, target):
    # made by XLA on the devices: from numpy, zeros would be one host allocation of the whole param
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=target)


@functools.partial(jax.jit, donate_argnums=0)
def _write(value, piece, starts):
    return jax.tree_util.tree_map(lambda v, x: jax.lax.dynamic_update_slice(v, x, starts), value, piece)


def _splits(target, axis: int) -> bool:
    """Whether the sharding `target` divides `axis` over more than one device."""
    if not isinstance(target, jax.sharding.NamedSharding) or axis >= len(target.spec) or target.spec[axis] is None:
        return False
    names = (target.spec[axis],) if isinstance(target.spec[axis], str) else target.spec[axis]
    return any(target.mesh.shape[n] > 1 for n in names)


class DeviceFill:
    """A param filled in place on its devices. `leaf`: its abstract value (its dtypes); `shardings`
    and `shapes`: where it lives and its shape there (vocab-padded where the mesh pads it), pytrees
    like `leaf` for a quantised kernel; `place(path, value)` places a whole unstacked param
    (zero-padding it); `check(path, piece)` sees each host piece first."""

    def __init__(self, path: str, leaf, stacked: bool, shardings, shapes, place, check=None):
        self.path, self.stacked, self.shardings, self.place, self.check = path, stacked, shardings, place, check
        self.leaf = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(tuple(s.shape), a.dtype), leaf, shapes)
        self.lead = 1 if stacked else 0
        self.value = None

    def chunks_along(self, axis: int) -> bool:
        return not any(_splits(t, axis + self.lead) for t in jax.tree_util.tree_leaves(self.shardings))

    def write(self, layer: int | None, axis: int | None, start: int, piece) -> None:
        if self.check is not None:
            self.check(self.path, piece)
        if not self.stacked and axis is None:
            self.value = self.place(self.path, piece)
            return
        if self.value is None:
            self.value = jax.tree_util.tree_map(
                lambda a, t: _zeros(tuple(a.shape), str(np.dtype(a.dtype)), t)(), self.leaf, self.shardings)
        # the piece with the param's sharding (a layer axis is never split, nor a chunked one here)
        placed = jax.tree_util.tree_map(
            lambda x, t: sharding.place(np.asarray(x)[None] if self.stacked else np.asarray(x), t), piece, self.shardings)
        ndim = len(jax.tree_util.tree_leaves(self.leaf)[0].shape)
        starts = [0] * ndim
        if layer is not None:
            starts[0] = layer
        if axis is not None:
            starts[axis + self.lead] = start
        self.value = _write(self.value, placed, tuple(np.int32(s) for s in starts))

    def result(self):
        value, self.value = self.value, None
        return value
