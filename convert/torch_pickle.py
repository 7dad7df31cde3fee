"""Unpickle a `torch.save` pickle without torch and without running anything from the file.

`find_class` answers only the globals a tensor state dict needs, each with a
harmless stand-in defined here (tensors become `LazyTensor` descriptions of
where their bytes are); any other global raises `UnsafeCheckpointError` before
it is looked up, so no code from the file ever runs. Storages arrive through
`persistent_load` as `StorageRef`s; their bytes are read later by the caller.
"""
from __future__ import annotations

import collections
import dataclasses
import pickle
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from jblip.convert.errors import CheckpointError, UnsafeCheckpointError

# legacy typed-storage class names (torch.FloatStorage ...) -> element dtype
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128, "ComplexFloatStorage": np.complex64,
    "UntypedStorage": np.uint8,  # newer dtypes: raw bytes + a dtype argument to _rebuild_tensor_v3
}
UNSUPPORTED_STORAGES = ("QInt8Storage", "QInt32Storage", "QUInt8Storage", "QUInt4x2Storage", "QUInt2x4Storage")
# torch.<dtype> globals (arguments of _rebuild_tensor_v3) -> numpy dtype
TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


@dataclass(frozen=True)
class StorageType:
    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class TorchDType:
    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class StorageRef:
    """Storage `key` (record data/<key>): `numel` elements of `dtype`, starting `base` elements in (legacy views)."""
    key: str
    dtype: np.dtype
    numel: int
    base: int = 0

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class LazyTensor:
    """A tensor as (storage, element offset, size, stride); nothing read yet."""
    storage: StorageRef
    offset: int
    shape: tuple
    stride: tuple
    dtype: np.dtype
    is_parameter: bool = False

    @property
    def span(self) -> int:
        """Elements of `dtype` from `offset` up to and including the last one the tensor touches."""
        if any(s == 0 for s in self.shape):
            return 0
        return 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))


def _int_tuple(x, what) -> tuple:
    if not isinstance(x, (tuple, list)) or not all(type(v) is int and v >= 0 for v in x):
        raise CheckpointError(f"corrupt tensor record: {what} {x!r} is not a tuple of non-negative ints")
    return tuple(x)


def _tensor(storage, storage_offset, size, stride, dtype=None, metadata=None) -> LazyTensor:
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"corrupt tensor record: expected a storage, got {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise CheckpointError(f"corrupt tensor record: storage offset {storage_offset!r}")
    shape, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(stride):
        raise CheckpointError(f"corrupt tensor record: size {shape} and stride {stride} differ in rank")
    if metadata:  # conj / neg bits: the stored bytes are not the values
        raise CheckpointError(f"tensors with lazy conjugate/negation bits are not supported ({metadata!r})")
    dtype = np.dtype(storage.dtype if dtype is None else dtype)
    t = LazyTensor(storage, storage_offset, shape, stride, dtype)
    capacity = storage.nbytes // dtype.itemsize
    if t.span and t.offset + t.span > capacity:
        raise CheckpointError(
            f"corrupt tensor record: shape {shape} stride {stride} at offset {storage_offset} reaches element "
            f"{t.offset + t.span} of storage {storage.key!r}, which holds {capacity} {dtype} elements")
    return t


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, TorchDType):
        raise CheckpointError(f"corrupt tensor record: dtype {dtype!r}")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype, metadata)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, LazyTensor):
        raise CheckpointError(f"corrupt parameter record: expected a tensor, got {type(data).__name__}")
    return dataclasses.replace(data, is_parameter=True)


def _get_layout(name):
    return str(name)


def _device(kind, index=None):
    return str(kind) if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding="utf-8"):
    # how pickle protocol 2 writes `bytes` values; only the latin-1 form it produces is accepted
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


class StandIn:
    """A callable the pickle may call but not modify (BUILD cannot touch its defaults or attributes)."""
    __slots__ = ("_name", "_fn")

    def __init__(self, name, fn):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, key, value):
        raise UnsafeCheckpointError(f"the pickle tried to set {key!r} on {self._name}")

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self):
        return f"<stand-in for {self._name}>"


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(module, name): StandIn(f"{module}.{name}", fn) for module, name, fn in (
        ("torch._utils", "_rebuild_tensor", _rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3", _rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter", _rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state", _rebuild_parameter),
        ("torch.serialization", "_get_layout", _get_layout),
        ("torch", "device", _device),
        ("_codecs", "encode", _codecs_encode),
    )},
}
for _name, _dt in STORAGE_DTYPES.items():
    for _module in ("torch", "torch.storage", "torch.cuda"):  # torch.cuda.*Storage: very old GPU saves
        ALLOWED[(_module, _name)] = StorageType(_name, np.dtype(_dt))
for _name, _dt in TORCH_DTYPES.items():
    ALLOWED[("torch", _name)] = TorchDType(_name, np.dtype(_dt))


class RestrictedUnpickler(pickle.Unpickler):
    """`where` names the file in errors; `storages` collects every StorageRef by key."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module, name):
        hit = ALLOWED.get((module, name))
        if hit is not None:
            return hit
        if module.startswith("torch") and name in UNSUPPORTED_STORAGES:
            raise CheckpointError(f"{self.where}: quantized tensors ({module}.{name}) are not supported")
        raise UnsafeCheckpointError(
            f"{self.where}: refused to unpickle the global {module}.{name}: only the torch tensor/state-dict "
            f"globals are allowed (nothing from the file was executed). If you trust this file, load it with "
            f"torch and re-save its state dict with safetensors or torch.save(model.state_dict()).")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointError(f"{self.where}: unknown persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            raise CheckpointError(
                f"{self.where}: this file pickles a whole nn.Module, not a state dict; "
                f"re-save it with torch.save(model.state_dict(), path)")
        if kind != "storage" or len(pid) not in (5, 6):
            raise CheckpointError(f"{self.where}: unknown persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{self.where}: corrupt storage record {pid!r}")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(key, storage_type.dtype, numel)
        elif ref.dtype != storage_type.dtype:
            raise CheckpointError(
                f"{self.where}: storage {key!r} is used with two dtypes ({ref.dtype}, {storage_type.dtype})")
        if view is None:
            return ref
        # legacy (pre-1.6) storage views: (view key, element offset, element count) into the root storage
        view_key, offset, size = view
        if not (type(offset) is int and type(size) is int and 0 <= offset and offset + size <= numel):
            raise CheckpointError(f"{self.where}: corrupt storage view {view!r} of storage {key!r}")
        return StorageRef(key, ref.dtype, size, base=offset)
