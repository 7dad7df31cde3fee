"""Read PyTorch checkpoints (`torch.save` files, HF `pytorch_model.bin`, LAVIS `.pth`) without torch.

Zip format (torch >= 1.6): `<any folder>/data.pkl` holds the pickled object,
`<folder>/data/<key>` the raw bytes of each storage, `<folder>/byteorder` their
byte order. Legacy format (< 1.6): magic/protocol/sys-info pickles, the object
pickle, the list of storage keys, then each storage as an 8-byte element count
and its little-endian bytes. The pickle is read by `RestrictedUnpickler`
(torch_pickle.py), which never runs code from the file; each tensor is then
read on demand as exactly the bytes it spans and rebuilt with numpy strides.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

from jblip.convert.errors import CheckpointError
from jblip.convert.sharded import ShardedSource
from jblip.convert.tensor_source import PositionalFile, SourceBase, bytes_as
from jblip.convert.torch_pickle import LazyTensor, RestrictedUnpickler

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STATE_DICT_KEYS = ("model", "state_dict")  # where training scripts (LAVIS: "model") nest the weights


class _ZipStorages:
    """Storage key -> (file offset, byte length) of its record, for the uncompressed records torch writes."""

    def __init__(self, path: str, file: PositionalFile):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt zip checkpoint ({e})") from None
        with zf:
            names = zf.namelist()
            pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names):
                raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a state dict checkpoint")
            if len(pkls) != 1:
                raise CheckpointError(f"{path}: a zip file but not a torch.save checkpoint "
                                      f"(wants exactly one <folder>/data.pkl, found {pkls or 'none'})")
            self.prefix = pkls[0][: -len("data.pkl")]
            try:
                self.pickle = zf.read(pkls[0])
                has_order = self.prefix + "byteorder" in names  # absent in early zip checkpoints: little
                order = zf.read(self.prefix + "byteorder").decode().strip() if has_order else "little"
            except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: truncated or corrupt zip checkpoint ({e})") from None
            if order not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder record {order!r}")
            self.byteorder = order
            self._infos = {i.filename: i for i in zf.infolist() if i.filename.startswith(self.prefix + "data/")}
        self.path, self._file = path, file
        self._size = os.path.getsize(path)
        self._spans: dict[str, tuple[int, int]] = {}

    def check(self, storages) -> None:
        """One error listing every storage whose record is missing or too short."""
        problems = []
        for ref in storages.values():
            info = self._infos.get(f"{self.prefix}data/{ref.key}")
            if info is None:
                problems.append(f"record {self.prefix}data/{ref.key} is missing")
            elif info.file_size < ref.nbytes:
                problems.append(f"record {self.prefix}data/{ref.key} has {info.file_size} bytes, needs {ref.nbytes}")
        if problems:
            raise CheckpointError(f"{self.path}: corrupt checkpoint: " + "; ".join(problems))

    def read(self, key: str, start: int, nbytes: int, what: str) -> np.ndarray:
        info = self._infos[f"{self.prefix}data/{key}"]
        if info.compress_type != zipfile.ZIP_STORED:  # re-zipped with compression: inflate this one record
            with zipfile.ZipFile(self.path) as zf, zf.open(info) as f:
                f.seek(start)
                raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise CheckpointError(f"{self.path}: record {info.filename} ends early while reading {what}")
            return np.frombuffer(raw, np.uint8).copy()
        if key not in self._spans:
            local = self._file.read(info.header_offset, 30, f"the zip header of {info.filename}").tobytes()
            if local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: corrupt zip: no local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            data_start = info.header_offset + 30 + name_len + extra_len
            if data_start + info.file_size > self._size:
                raise CheckpointError(f"{self.path}: truncated file: record {info.filename} runs past the end")
            self._spans[key] = (data_start, info.file_size)
        data_start, _ = self._spans[key]
        return self._file.read(data_start + start, nbytes, what)


class _LegacyStorages:
    """The pre-1.6 single-stream format: storages follow the pickles back to back."""

    byteorder = "little"  # legacy storage bytes are always written little-endian

    def __init__(self, path: str, file: PositionalFile):
        self.path, self._file = path, file
        self._start = None
        self._offsets: dict[str, int] = {}

    def unpickle(self):
        """-> the top object; leaves the storage table ready."""
        with open(self.path, "rb") as f:
            try:
                header = [RestrictedUnpickler(f, self.path).load() for _ in range(3)]
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{self.path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
            if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL:
                raise CheckpointError(f"{self.path}: not a PyTorch checkpoint (bad legacy magic number/protocol)")
            if isinstance(header[2], dict) and header[2].get("little_endian") is False:
                raise CheckpointError(
                    f"{self.path}: legacy checkpoint written on a big-endian machine is not supported")
            unpickler = RestrictedUnpickler(f, self.path)
            obj = _load(unpickler, self.path)
            keys = _load(RestrictedUnpickler(f, self.path), self.path)
            self._start = f.tell()
        self.storages = unpickler.storages
        if not isinstance(keys, list) or set(keys) != set(self.storages):
            raise CheckpointError(
                f"{self.path}: corrupt legacy checkpoint (storage key list does not match the pickle)")
        self._keys = keys
        return obj

    def check(self, storages) -> None:
        # walk the (count, bytes) records to find each storage; only 8 bytes are read per storage
        size, pos = os.path.getsize(self.path), self._start
        for key in self._keys:
            ref = storages[key]
            if pos + 8 > size:
                raise CheckpointError(f"{self.path}: truncated file: storage {key!r} is missing")
            (count,) = struct.unpack("<q", self._file.read(pos, 8, f"the size of storage {key!r}").tobytes())
            if count != ref.numel:
                raise CheckpointError(f"{self.path}: corrupt legacy checkpoint: storage {key!r} has {count} elements, "
                                      f"the pickle says {ref.numel}")
            self._offsets[key] = pos + 8
            pos += 8 + ref.nbytes
        if pos > size:
            raise CheckpointError(f"{self.path}: truncated file: storage data runs {pos - size} bytes past the end")

    def read(self, key: str, start: int, nbytes: int, what: str) -> np.ndarray:
        return self._file.read(self._offsets[key] + start, nbytes, what)


def _load(unpickler, path):
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # a pickle cut short or garbled: report it, never guess
        raise CheckpointError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from None


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


MAX_NESTING = 64  # containers inside containers; state dicts nest a handful of levels
MAX_TENSOR_KEYS = 1_000_000  # dotted keys a checkpoint may flatten to


def _flatten(obj, path: str) -> dict:
    """Tensors of nested dicts (and lists, tuples) under dotted keys; non-tensor leaves (epoch,
    config strings) are dropped. A pickle is a graph (its memo lets one container appear many
    times), so each container is flattened once and its result reused: a chain of tuples each
    holding the previous one twice costs its length, not 2**length. Nesting deeper than
    MAX_NESTING (or a cycle) and more than MAX_TENSOR_KEYS keys are refused with one error."""
    done: dict[int, list] = {}  # id(container) -> [(relative key, tensor)], kept alive by `obj`
    count = 0

    def walk(node, depth):
        nonlocal count
        if id(node) in done:
            return done[id(node)]
        if depth > MAX_NESTING:
            raise CheckpointError(f"{path}: the pickled object nests containers more than {MAX_NESTING} levels "
                                  "deep (or contains itself); not a state dict")
        items = node.items() if isinstance(node, Mapping) else enumerate(node)
        flat = []
        for k, v in items:
            if isinstance(v, LazyTensor):
                flat.append((str(k), v))
            elif isinstance(v, (Mapping, list, tuple)):
                flat.extend((f"{k}.{sub}", t) for sub, t in walk(v, depth + 1))
            count += 1
            if len(flat) > MAX_TENSOR_KEYS or count > 50 * MAX_TENSOR_KEYS:
                raise CheckpointError(f"{path}: the pickled object flattens to more than {MAX_TENSOR_KEYS:,} "
                                      "tensor keys (shared containers repeated); not a state dict")
        done[id(node)] = flat
        return flat

    out: dict = {}
    if isinstance(obj, (Mapping, list, tuple)):
        for key, tensor in walk(obj, 1):
            if key in out:
                raise CheckpointError(f"{path}: two tensors flatten to the same key {key!r}")
            out[key] = tensor
    return out


class TorchCheckpoint(SourceBase):
    """TensorSource over one PyTorch checkpoint file.

    subkey: read the state dict nested under this key ("model" in LAVIS .pth
    files; dots descend further). With subkey=None, a top-level dict that holds
    no tensors itself but a dict under "model" or "state_dict" is descended into
    automatically; `self.subkey` says which key was used (None: the top object).
    """

    def __init__(self, path, subkey: str | None = None):
        self.path = os.fspath(path)
        try:
            self._file = PositionalFile(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open checkpoint ({e})") from None
        try:
            self._open(subkey)
        except BaseException:
            self._file.close()
            raise

    def _open(self, subkey):
        magic = self._file.read(0, 4, "the magic number").tobytes() if os.path.getsize(self.path) >= 4 else b""
        if magic.startswith(b"PK"):
            self._storages = _ZipStorages(self.path, self._file)
            unpickler = RestrictedUnpickler(io.BytesIO(self._storages.pickle), self.path)
            obj = _load(unpickler, self.path)
            storages = unpickler.storages
            self._storages.pickle = None
            self.format = "zip"
        elif magic[:1] == b"\x80":
            self._storages = _LegacyStorages(self.path, self._file)
            obj = self._storages.unpickle()
            storages = self._storages.storages
            self.format = "legacy"
        else:
            size = os.path.getsize(self.path)
            tar = size > 262 and self._file.read(257, 5, "tar magic").tobytes() == b"ustar"
            raise CheckpointError(
                f"{self.path}: the ancient tar-based torch format is not supported; load it with torch and re-save "
                f"with torch.save(state_dict, path)" if tar else
                f"{self.path}: not a PyTorch checkpoint (neither a torch.save zip nor a legacy pickle)")
        self._storages.check(storages)
        self.subkey, obj = self._descend(obj, subkey)
        if isinstance(obj, LazyTensor):
            raise CheckpointError(f"{self.path}: holds a single tensor, not a state dict")
        self._tensors: dict[str, LazyTensor] = _flatten(obj, self.path)

    def _descend(self, obj, subkey):
        if subkey is not None:
            node = obj
            for part in subkey.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    have = sorted(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
                    raise CheckpointError(f"{self.path}: no {part!r} in the checkpoint (subkey {subkey!r}); "
                                          f"available: {have}")
                node = node[part]
            return subkey, node
        if isinstance(obj, Mapping) and not any(isinstance(v, LazyTensor) for v in obj.values()):
            for k in STATE_DICT_KEYS:
                if isinstance(obj.get(k), Mapping):
                    return k, obj[k]
        return None, obj

    def keys(self):
        return list(self._tensors)

    def __contains__(self, key):
        return key in self._tensors

    def _tensor(self, key) -> LazyTensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a tensor in {self.path}") from None

    def shape(self, key) -> tuple:
        return self._tensor(key).shape

    def dtype(self, key) -> np.dtype:
        return self._tensor(key).dtype

    def is_parameter(self, key) -> bool:
        return self._tensor(key).is_parameter

    def read(self, key) -> np.ndarray:
        """A fresh contiguous array, bit-exact, reading only the bytes this tensor spans."""
        return self._read(self._tensor(key), f"tensor {key!r}")

    def read_rows(self, key, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of the leading axis, reading only the bytes they span."""
        t = self._tensor(key)
        start, stop, _ = slice(start, stop).indices(t.shape[0])
        rows = dataclasses.replace(t, offset=t.offset + start * t.stride[0], shape=(max(stop - start, 0), *t.shape[1:]))
        return self._read(rows, f"rows {start}:{stop} of tensor {key!r}")

    def _read(self, t: LazyTensor, what: str) -> np.ndarray:
        size = t.dtype.itemsize
        if t.span == 0:
            return np.empty(t.shape, t.dtype)
        first = t.storage.base * t.storage.dtype.itemsize + t.offset * size
        raw = self._storages.read(t.storage.key, first, t.span * size, what)
        flat = bytes_as(raw, t.dtype, self._storages.byteorder)
        if t.span == math.prod(t.shape) and t.stride == _contiguous_strides(t.shape):
            return flat.reshape(t.shape)  # already a fresh buffer in the right order
        view = np.lib.stride_tricks.as_strided(flat, t.shape, [st * size for st in t.stride], writeable=False)
        return view.copy()  # transposes, slices, expanded dims -> own contiguous array

    def close(self):
        self._file.close()


class TorchIndex(ShardedSource):
    """Sharded `pytorch_model.bin.index.json` + the .bin shards it names, opened lazily."""

    def __init__(self, index_path):
        super().__init__(index_path, TorchCheckpoint)
