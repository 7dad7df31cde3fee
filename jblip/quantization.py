"""Weight-only int8 / int4 quantisation of the dense kernels, with qwix doing the numbers.

A quantised kernel is a `qwix.QArray` in the params tree, in place of the float kernel:
`qvalue` (int8 or int4, the kernel's shape and logical axis names) and `scale` (float, the
param dtype; size 1 along the reduced axes). Activations stay in the compute dtype: the
kernel is dequantised inside the matmul (`qwix.dot_general`), which XLA fuses on TPU/GPU.

  int8  one scale per output channel (absmax over every contracted axis)
  int4  one scale per output channel and per group of `group_size` consecutive values of
        the innermost contracted axis (other contracted axes: one scale per index); where
        `group_size` does not divide that axis, the largest divisor below it

qwix's own PTQ route (`qwix.quantize_model` + `PtqProvider`) intercepts calls per method and
learns the quantised shapes from a float init; jblip's `Linear` reads the quantisation from
the model config instead, so abstract shapes, scanned stacks, logical sharding and the
streaming loader all see the quantised layout. The scale of a QArray says how it was made
(`how_from_shapes`), so the loader and the checkpoint reader need no other record.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jblip.config_checks import ConfigError

CONFIG_KEY = "jblip_quantization"  # the config.json field of an already-quantised checkpoint
MODES = {"int8": jnp.int8, "int4": jnp.int4}
TOWERS = ("llm", "vision")


def _qwix():
    """qwix, imported when a quantised model is first built (an optional extra)."""
    try:
        import qwix
    except ImportError:
        raise ImportError("int8 / int4 weights need qwix: pip install 'jblip[quant]'") from None
    return qwix


def _qarray_module():
    from qwix._src.core import qarray  # HowToQuantize, quantize, get_scale_shape: not in qwix's top level
    return qarray


def QArray(qvalue, scale, zero_point=None, qtype=None):
    """A `qwix.QArray`."""
    return _qwix().QArray(qvalue, scale, zero_point, qtype)


@dataclass(frozen=True)
class Quantization:
    """How the weights of some towers are quantised (a `ModelConfig.quantization` field)."""
    mode: str = "int8"
    group_size: int = 128
    towers: tuple[str, ...] = ("llm",)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"unknown quantisation {self.mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"quantisation group_size must be a positive integer, got {self.group_size!r}")
        towers = tuple(self.towers)
        bad = sorted(set(towers) - set(TOWERS))
        if bad or not towers:
            raise ConfigError(f"quantize_towers must name some of {TOWERS}, got {list(self.towers)}")
        object.__setattr__(self, "towers", towers)
        _qwix()  # a missing qwix fails here, with the install hint, not at the first matmul

    @property
    def qtype(self) -> np.dtype:
        return np.dtype(MODES[self.mode])

    def for_tower(self, tower: str) -> "Quantization | None":
        return self if tower in self.towers else None

    def how(self, shape: Sequence[int], n_in: int):
        """qwix's recipe for a kernel whose first `n_in` axes are contracted."""
        out_axes = list(range(n_in, len(shape)))
        qwix_qarray = _qarray_module()
        if self.mode == "int8":
            return qwix_qarray.HowToQuantize(qtype=self.qtype, channelwise_axes=out_axes)
        inner = n_in - 1
        group = max(g for g in range(1, min(self.group_size, shape[inner]) + 1) if shape[inner] % g == 0)
        tiles = {a: 1 for a in range(inner)} | {inner: group}
        return qwix_qarray.HowToQuantize(qtype=self.qtype, channelwise_axes=out_axes, tiled_axes=tiles)

    def scale_shape(self, shape: Sequence[int], n_in: int) -> tuple[int, ...]:
        return tuple(_qarray_module().get_scale_shape(tuple(shape), self.how(shape, n_in)))

    @classmethod
    def parse(cls, value, group_size: int | None = None, towers: Sequence[str] | None = None):
        """None, "int8"/"int4", a dict (config.json) or a Quantization -> Quantization or None."""
        if value is None or value == "none":
            return None
        if isinstance(value, dict):
            fields = {f.name for f in dataclasses.fields(cls)}
            if set(value) - fields:
                raise ConfigError(f"unknown quantisation field(s) {sorted(set(value) - fields)}; known: {sorted(fields)}")
            value = cls(**{**value, "towers": tuple(value.get("towers", ("llm",)))})
        elif isinstance(value, str):
            value = cls(value)
        elif not isinstance(value, cls):
            raise ConfigError(f"quantize must be 'int8', 'int4' or None, got {value!r}")
        changes = {k: v for k, v in (("group_size", group_size), ("towers", towers)) if v is not None}
        return dataclasses.replace(value, **{k: tuple(v) if k == "towers" else v for k, v in changes.items()})


def how_from_shapes(qvalue_shape: Sequence[int], scale_shape: Sequence[int], qtype):
    """The recipe a QArray of these shapes was made with (scale == axis: per index; 1: reduced;
    else groups of axis // scale)."""
    channelwise, tiles = [], {}
    for axis, (n, s) in enumerate(zip(qvalue_shape, scale_shape)):
        if s == n and n > 1:
            channelwise.append(axis)
        elif s != 1:
            tiles[axis] = n // s
    return _qarray_module().HowToQuantize(qtype=qtype, channelwise_axes=channelwise, tiled_axes=tiles)


def is_quantized(x) -> bool:
    qwix = sys.modules.get("qwix")  # not imported: nothing can be quantised
    return qwix is not None and isinstance(x, qwix.QArray)


_CPU = None


def _host_device():
    global _CPU
    if _CPU is None:
        _CPU = jax.devices("cpu")[0]
    return _CPU


@functools.lru_cache(maxsize=64)
def _quantizer(qvalue_shape: tuple, scale_shape: tuple, qtype: str, scale_dtype: str):
    """qwix's quantisation of one layout as one jitted program: XLA fuses the element-wise
    steps, so fewer kernel-sized float temporaries are alive on the host than op by op."""
    how = how_from_shapes(qvalue_shape, scale_shape, np.dtype(qtype))

    def run(x):
        q = _qarray_module().quantize(x.astype(jnp.float32), how)
        return q.qvalue, q.scale.astype(scale_dtype)
    return jax.jit(run)


def quantize_host(x: np.ndarray, like: QArray) -> QArray:
    """Quantise one host array to the layout of the abstract QArray `like` (shapes of qvalue
    and scale, qvalue and scale dtypes); computed by qwix on the host CPU, returned as numpy."""
    fn = _quantizer(tuple(like.qvalue.shape), tuple(like.scale.shape), str(np.dtype(like.qvalue.dtype)),
                    str(np.dtype(like.scale.dtype)))
    with jax.default_device(_host_device()):
        qvalue, scale = fn(jax.device_put(x, _host_device()))
        return QArray(np.asarray(qvalue), np.asarray(scale), None, np.dtype(like.qvalue.dtype))


def quantize_params(params, quantized_abstract):
    """Float params (nested dicts, where they are: host or device) -> the same with every kernel
    the abstract tree holds as a QArray quantised to that layout, on the kernel's device (stacked
    kernels as a whole: the layer axis gets its own scales, as if each layer were quantised alone)."""
    def one(x, like):
        if not is_quantized(like):
            return x
        how = how_from_shapes(like.qvalue.shape, like.scale.shape, like.qvalue.dtype)
        q = jax.jit(lambda a: _qarray_module().quantize(a.astype(jnp.float32), how))(x)
        return QArray(q.qvalue, q.scale.astype(like.scale.dtype), None, np.dtype(like.qvalue.dtype))
    return jax.tree_util.tree_map(one, params, quantized_abstract)


def slice_like(like: QArray) -> QArray:
    """The abstract QArray of one layer of a stacked one (leading axis dropped)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype), like)


def _boxed(value, axes):
    return nn.LogicallyPartitioned(value, tuple(axes))


def kernel_param(module: nn.Module, name: str, init, shape, axes, n_in: int, param_dtype,
                 quant: Quantization | None):
    """A dense kernel: a float param, or (with `quant`) a QArray whose qvalue and scale carry
    the kernel's logical axis names (a size-1 scale axis is never split by the sharding rules)."""
    shape = tuple(shape)
    if quant is None:
        return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, param_dtype)
    how = quant.how(shape, n_in)

    def quantized_init(key):
        q = _qarray_module().quantize(init(key, shape, jnp.float32), how)
        return QArray(_boxed(q.qvalue, axes), _boxed(q.scale.astype(param_dtype), axes), None, quant.qtype)
    return module.param(name, quantized_init)


def dense(x, kernel, n_in: int, dtype, preferred_element_type=None):
    """x [..., *in] @ kernel [*in, *out] in `dtype`; a QArray kernel is dequantised in `dtype`."""
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    dims = (contract, ((), ()))
    if is_quantized(kernel):
        return _qwix().dot_general(x, kernel, dims, preferred_element_type=preferred_element_type)
    return jax.lax.dot_general(x, kernel, dims, preferred_element_type=preferred_element_type)


def dtype_bits(dtype) -> int:
    dtype = np.dtype(dtype)
    return 4 if dtype in (np.dtype(jnp.int4), np.dtype(jnp.uint4)) else dtype.itemsize * 8  # numpy: 1 byte


def weight_bytes(tree) -> int:
    """Bytes of a params tree (arrays or shapes), int4 at half a byte, scales included."""
    return sum(int(np.prod(x.shape)) * dtype_bits(x.dtype) // 8 for x in jax.tree_util.tree_leaves(tree))


def memory_by_dtype(config, group_size: int = 128) -> dict[str, int]:
    """Weight bytes of `config`'s model stored in float32, bfloat16, and with the language model
    in int8 / int4 (the rest, and the scales, in bfloat16); from abstract shapes."""
    from jblip.model import abstract_params
    plain = dataclasses.replace(config, quantization=None)
    out = {name: weight_bytes(abstract_params(plain.with_precision(name))) for name in ("float32", "bfloat16")}
    for mode in MODES:
        quantized = dataclasses.replace(plain.with_precision("bfloat16"), quantization=Quantization(mode, group_size))
        out[mode] = weight_bytes(abstract_params(quantized))
    return out
