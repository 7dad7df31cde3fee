"""Read HF safetensors checkpoints with numpy, one tensor at a time.

Parses the format directly (8-byte little-endian header length, JSON header,
raw little-endian data) so that bfloat16 stays bit-exact via ml_dtypes and a
corrupt file gives one clear error. Tensors are read with positional reads of
exactly their own bytes; the file is never read as a whole.
"""
from __future__ import annotations

import math
import os
import struct

import ml_dtypes
import numpy as np

from jblip import bounded_json
from jblip.convert.errors import CheckpointError  # also importable from here, as before
from jblip.convert.sharded import ShardedSource
from jblip.convert.tensor_source import PositionalFile, SourceBase, bytes_as

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


def _parse_header(path: str, raw: bytes, size: int) -> tuple[dict, dict]:
    """-> (entries, metadata); every entry checked for dtype, shape and offsets."""
    not_st = f"{path}: not a safetensors file"
    try:
        header = bounded_json.loads(raw, "its header")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{not_st} (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_st} (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - len(raw)
    spans = []
    for key, e in header.items():
        ok = (isinstance(e, dict) and e.get("dtype") in DTYPES
              and isinstance(e.get("shape"), list) and all(type(d) is int and d >= 0 for d in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(type(o) is int for o in e["data_offsets"]))
        if not ok:
            raise CheckpointError(
                f"{path}: bad header entry for tensor {key!r}: {e!r} (wants dtype in {sorted(DTYPES)}, "
                f"shape as a list of ints, data_offsets as [start, end])")
        start, end = e["data_offsets"]
        nbytes = math.prod(e["shape"]) * np.dtype(DTYPES[e["dtype"]]).itemsize
        if start < 0 or end - start != nbytes:
            raise CheckpointError(
                f"{path}: header lies about tensor {key!r}: data_offsets {start}..{end} span {end - start} bytes "
                f"but shape {e['shape']} {e['dtype']} needs {nbytes} (corrupt header)")
        spans.append((start, end, key))
    spans.sort()
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(
                f"{path}: header lies about offsets: tensors {k0!r} ({s0}..{e0}) and {k1!r} ({s1}..{e1}) overlap")
    needed = max((end for _, end, _ in spans), default=0)
    if needed > data_len:
        raise CheckpointError(
            f"{path}: truncated file: its header describes {needed} data bytes but only {data_len} are present")
    return header, metadata


class SafetensorsFile(SourceBase):
    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._file = PositionalFile(self.path)
            size = os.fstat(self._file._file.fileno()).st_size
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open safetensors file ({e})") from None
        try:
            if size < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes long)")
            (n,) = struct.unpack("<Q", self._file.read(0, 8, "the header length").tobytes())
            if n > min(size - 8, MAX_HEADER_BYTES):
                is_zip = self._file.read(0, 2, "magic").tobytes() == b"PK"
                hint = " (it looks like a PyTorch zip checkpoint)" if is_zip else ""
                raise CheckpointError(
                    f"{self.path}: not a safetensors file{hint}: its first 8 bytes claim a {n}-byte header "
                    f"but the file has {size} bytes (or it is truncated)")
            raw = self._file.read(8, n, "the JSON header").tobytes()
            if not raw.lstrip().startswith(b"{"):
                raise CheckpointError(f"{self.path}: not a safetensors file (no JSON header after the length)")
            self._entries, self.metadata = _parse_header(self.path, raw, size)
        except BaseException:
            self._file.close()
            raise
        self._data_start = 8 + n

    def keys(self):
        return list(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def _entry(self, key):
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a tensor in {self.path}") from None

    def shape(self, key) -> tuple:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key) -> np.dtype:
        return np.dtype(DTYPES[self._entry(key)["dtype"]])

    def read(self, key) -> np.ndarray:
        start, end = self._entry(key)["data_offsets"]
        raw = self._file.read(self._data_start + start, end - start, f"tensor {key!r}")
        return bytes_as(raw, self.dtype(key), "little").reshape(self.shape(key))

    def read_rows(self, key, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of the leading axis: only their bytes are read."""
        shape = self.shape(key)
        row = math.prod(shape[1:]) * self.dtype(key).itemsize
        begin = self._entry(key)["data_offsets"][0]
        start, stop, _ = slice(start, stop).indices(shape[0])
        raw = self._file.read(self._data_start + begin + start * row, max(stop - start, 0) * row,
                              f"rows {start}:{stop} of tensor {key!r}")
        return bytes_as(raw, self.dtype(key), "little").reshape((max(stop - start, 0), *shape[1:]))

    def close(self):
        self._file.close()


class SafetensorsIndex(ShardedSource):
    """Sharded safetensors: `model.safetensors.index.json` + the shards it names, opened lazily."""

    def __init__(self, index_path):
        super().__init__(index_path, SafetensorsFile)
