"""The TensorSource interface the converter reads through, and helpers shared by the readers.

A source maps string keys to tensors and reads one tensor at a time, so a
checkpoint never has to fit in host memory twice.
"""
from __future__ import annotations

import sys
import threading
from typing import Protocol

import numpy as np

from jblip.convert.errors import CheckpointError


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple: ...
    def dtype(self, key: str) -> np.dtype: ...
    def read(self, key: str) -> np.ndarray: ...
    def close(self) -> None: ...


class SourceBase:
    """Context manager and container sugar on top of keys()/close()."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __contains__(self, key) -> bool:
        return key in set(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


class PositionalFile:
    """A file opened once and read at explicit offsets (thread-safe), never as a whole."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb", buffering=0)
        self._lock = threading.Lock()

    def read(self, offset: int, nbytes: int, what: str) -> np.ndarray:
        """Exactly `nbytes` bytes at `offset` as a fresh, writable uint8 array."""
        out = np.empty(nbytes, np.uint8)
        view = memoryview(out)
        done = 0
        with self._lock:
            if self._file.closed:
                raise CheckpointError(f"{self.path}: read of {what} after close()")
            self._file.seek(offset)
            while done < nbytes:
                n = self._file.readinto(view[done:])
                if not n:
                    raise CheckpointError(
                        f"{self.path}: file ends after {done} of the {nbytes} bytes of {what} "
                        f"(truncated file?)")
                done += n
        return out

    def close(self) -> None:
        with self._lock:
            self._file.close()


def bytes_as(raw: np.ndarray, dtype, byteorder: str = "little") -> np.ndarray:
    """Reinterpret raw bytes stored in `byteorder` as native `dtype` (bit-exact: bfloat16 stays bfloat16)."""
    dtype = np.dtype(dtype)
    if byteorder != sys.byteorder and dtype.itemsize > 1:
        unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: swap each part
        stored = "<" if byteorder == "little" else ">"
        raw = raw.view(f"{stored}u{unit}").astype(f"=u{unit}").view(np.uint8)
    return raw.view(dtype)
