"""One checkpoint tensor converted into its param's layout a chunk of rows at a time.

A large float tensor (an LM head, an embedding, a wide MLP kernel) read whole and then cast
or quantised has, for a moment, several copies alive: the bytes read, a transposed copy, the
result. Here it is read `CHUNK_BYTES` at a time (`source.read_rows`), each chunk converted
alone to its final dtype (bfloat16, or int8/int4 values and scales) and handed on as one piece
of the param, which `convert/fill.py` writes where the param lives.

A torch tensor's rows run along one axis of the param (`Transform.rows_axis`): a linear
layer's output channels, an embedding's vocabulary. qwix quantises a kernel per output
channel (int4: per output channel and group of the contracted axis), so a chunk of output
channels quantised alone gives exactly the values and scales of the whole.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from jblip import quantization

CHUNK_BYTES = 16 * 2**20


def convert_one(x: np.ndarray, shape: tuple, rule, dtype) -> np.ndarray:
    """A whole tensor through its rule's transform into `shape`, cast to `dtype` (None: kept)."""
    y = rule.transform.to_flax(np.asarray(x), tuple(shape))
    return y.astype(dtype) if dtype is not None and y.dtype != dtype else y


def _chunk_axis(rule, torch_shape: tuple, shape: tuple, like) -> tuple[int, int] | None:
    """(param axis the rows run along, torch rows per index of it), or None: convert it whole."""
    axis = rule.transform.rows_axis(shape)
    if axis is None or not torch_shape or axis >= len(shape) or not shape[axis]:
        return None
    unit, rest = divmod(torch_shape[0], shape[axis])
    if rest or math.prod(torch_shape) != math.prod(shape):
        return None
    if like is not None and like.scale.shape[axis] != shape[axis]:
        return None  # the scales are not per index of that axis: chunks would not quantise alone
    return axis, unit


def _piece_like(like, axis: int, n: int):
    """The abstract QArray of `n` indices of `like` along `axis` (a per-index axis of its scale)."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape[:axis] + (n,) + a.shape[axis + 1:], a.dtype), like)


def write_piece(buffer, piece, axis: int | None, start: int, lead: tuple = ()) -> None:
    """Copy `piece` (an array or a QArray of them) into `buffer` at `lead` + `start` along `axis`."""
    def one(buf, x):
        x = np.asarray(x)
        where = lead if axis is None else lead + (slice(None),) * axis + (slice(start, start + x.shape[axis]),)
        buf[where] = x
    jax.tree_util.tree_map(one, buffer, piece)


def empty_like(abstract):
    """An uninitialised host array (or QArray of them) of `abstract`'s shapes and dtypes."""
    return jax.tree_util.tree_map(lambda a: np.empty(tuple(a.shape), np.dtype(a.dtype)), abstract)


def pieces(source, key: str, rule, shape: tuple, dtype, like=None, chunks_along=lambda axis: True):
    """The tensor `key` of `source` in the param layout `shape`, as (axis, start, piece): `piece` goes
    at `start` along `axis` of the param (axis None: it is the whole param). A piece is a numpy
    array of `dtype` or, with `like` (an abstract QArray), quantised to its layout (a QArray of
    numpy arrays). Read in row chunks when the tensor is larger than `CHUNK_BYTES` and its rows
    map onto one param axis; where `chunks_along(axis)` is False the chunks are put together
    here and yielded as one piece."""
    shape = tuple(shape)
    torch_shape = tuple(source.shape(key))
    row_bytes = math.prod(torch_shape[1:]) * np.dtype(source.dtype(key)).itemsize
    found = _chunk_axis(rule, torch_shape, shape, like) if torch_shape else None
    if found is None or torch_shape[0] * row_bytes <= CHUNK_BYTES:
        # a kernel to quantise keeps its stored precision until qwix has quantised it
        x = convert_one(source.read(key), shape, rule, None if like is not None else dtype)
        yield None, 0, quantization.quantize_host(x, like) if like is not None else x
        return
    axis, unit = found
    whole = None if chunks_along(axis) else empty_like(like if like is not None else jax.ShapeDtypeStruct(shape, dtype))
    step = max(1, CHUNK_BYTES // (unit * row_bytes))
    for start in range(0, shape[axis], step):
        stop = min(start + step, shape[axis])
        piece_shape = shape[:axis] + (stop - start,) + shape[axis + 1:]
        piece = convert_one(source.read_rows(key, start * unit, stop * unit), piece_shape, rule,
                            None if like is not None else dtype)
        if like is not None:
            piece = quantization.quantize_host(piece, _piece_like(like, axis, stop - start))
        if whole is None:
            yield axis, start, piece
        else:
            write_piece(whole, piece, axis, start)
        del piece
    if whole is not None:
        yield None, 0, whole


def read_converted(source, key: str, rule, shape: tuple, dtype, like=None):
    """`pieces` put together: the whole converted (or quantised) tensor on the host."""
    (_, _, whole), = pieces(source, key, rule, shape, dtype, like, chunks_along=lambda axis: False)
    return whole
