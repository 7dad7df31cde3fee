"""Write safetensors files with numpy, one tensor at a time, bit-exact for every dtype (bfloat16 too).

The format (see safetensors_reader.py): 8-byte little-endian header length,
a JSON header {key: {dtype, shape, data_offsets}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the raw little-endian bytes of
each tensor in header order. The header is built from shapes and dtypes
alone, so the tensors themselves can be produced lazily while writing.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from typing import Callable, Iterable

import numpy as np

from jblip.convert.safetensors_reader import DTYPES

DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def dtype_name(dtype) -> str:
    try:
        return DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no safetensors name; supported: "
                         f"{sorted(str(d) for d in DTYPE_NAMES)}") from None


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _little_endian_bytes(array: np.ndarray) -> memoryview:
    array = np.ascontiguousarray(array)
    if sys.byteorder != "little" and array.dtype.itemsize > 1:
        array = array.byteswap()
    return memoryview(array.reshape(-1).view(np.uint8))


def write_safetensors(path: str, entries: Iterable[tuple[str, tuple, np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write `entries` (key, shape, dtype), calling `produce(key)` for each tensor's values just in
    time. Returns the bytes of tensor data written."""
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, shape, dtype in entries:
        size = nbytes(shape, dtype)
        header[key] = {"dtype": dtype_name(dtype), "shape": [int(d) for d in shape],
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in entries:
            array = np.asarray(produce(key))
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{path}: tensor {key!r} is {array.dtype}{tuple(array.shape)}, "
                                 f"but the header promised {np.dtype(dtype)}{tuple(shape)}")
            f.write(_little_endian_bytes(array))
    return offset
