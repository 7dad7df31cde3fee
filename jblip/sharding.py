"""Device meshes, the logical-axis rules table, and param/activation/cache shardings.

Mesh axes (outermost first):
  data    pure data parallelism: batch split, params replicated.
  fsdp    fully sharded data parallelism: batch split *and* params split
          (each weight is all-gathered just before use).
  tensor  Megatron-style tensor parallelism: heads / MLP width / vocab split,
          the residual stream replicated.

Every param is created with logical axis names (`jblip.layers.logical_param`);
`LOGICAL_RULES` maps each name to mesh axes. One table serves params (through
`param_shardings`, which is shape-aware) and activations (through flax's
`nn.with_logical_constraint` inside `activation_rules`).

Dimensions that do not divide their mesh axes:
  * params: the mesh axis is dropped for that dimension (it is replicated
    instead), except the language model's vocabulary, which the loader pads
    (`pad_vocab`) so the embedding and head stay sharded; the LM modules slice
    the padded logits back to `vocab_size`, so outputs are unchanged.
  * inputs/outputs of the jitted entry points: same rule (batch 3 on data=2
    is replicated rather than split).
  * activations: XLA accepts uneven constraints (it pads internally), e.g. the
    257 ViT tokens or a batch of 3; nothing to do.

Recipes (spec strings for `make_mesh`; weights per device at bf16 from the
param counts, `per_device_bytes`):
  one accelerator     "fsdp=1"             InstructBLIP-Vicuna-13B: 26.4 GiB, 7B: 14.7 GiB
  TPU v4-8 (4 chips)  "fsdp=4"             13B: 6.6 GiB per chip
  8 GPUs / TPU v5e-8  "fsdp=8"             13B: 3.3 GiB per device; or "fsdp=4,tensor=2"
                                           (3.35 GiB, fewer all-gathers per decode step)
  many hosts          jax.distributed.initialize() on every host, then e.g.
                      "data=<hosts>,fsdp=-1" (jax.devices() spans all processes):
                      params split within a host, replicated across hosts.

Loading (`jblip.load_pretrained(path, mesh=...)`) places each tensor as it is
read: one host tensor alive at a time. On many hosts every process reads each
tensor (one at a time) and keeps only the slices its own devices hold.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from jblip import kv_cache
from jblip.quantization import dtype_bits
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Order matters only for readability; each name appears once.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations and inputs: batch over every data-parallel axis; hidden stream replicated,
    # MLP width split like the MLP kernels (flax `with_logical_constraint` in the LMs)
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    # KV cache: batch split like activations, heads like the K/V kernels (CACHE_AXES)
    ("cache_length", None),
    # scanned layer stacks (jblip.scan): the stacked axis stays whole on every device
    ("layers", None),
    # language models (LLaMA, OPT, T5): FSDP over the model width, tensor parallel
    # over heads, MLP width and vocabulary (vocab padded at load time to divide it)
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("pos", None),
    ("rel_buckets", None),
    # EVA ViT: FSDP over its width, tensor parallel over heads and MLP width
    ("vis_embed", "fsdp"),
    ("vis_heads", "tensor"),
    ("vis_mlp", "tensor"),
    ("vis_qkv", None),
    ("vis_kv", None),
    ("vis_patch_h", None),
    ("vis_patch_w", None),
    ("vis_channel", None),
    ("vis_pos", None),
    ("vis_norm", None),
    # Q-Former (~0.19B params): FSDP only, no tensor parallelism (small matmuls stay
    # local). Sharded rather than replicated so that "fsdp=N" holds every weight
    # once across the N devices (on CPU, where devices share host memory, a
    # replicated Q-Former alone would take 8 x 0.7 GB in float32). Replicate it
    # with `override_rules(qf_embed=None)`. Its cross-attention K/V kernels read
    # the ViT output (input dim "vis_embed"); the projection's output dim is the
    # LLM's "embed".
    ("qf_embed", "fsdp"),
    ("qf_heads", None),
    ("qf_kv", None),
    ("qf_mlp", None),
    ("qf_vocab", None),
    ("qf_pos", None),
    ("qf_norm", None),
    ("qf_queries", None),
    ("qf_proj", None),  # retrieval heads: the 256-d ITC space and the 2 ITM logits (tiny)
)

CACHE_AXES = kv_cache.AXES  # stacked cache leaves [L, B, N, S, H]
LOGITS_AXES = ("batch", "length", "vocab")

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]


def override_rules(rules: Rules = LOGICAL_RULES, **changes) -> tuple:
    """A copy of `rules` with some names remapped, e.g. `override_rules(qf_embed="fsdp")`."""
    known = {name for name, _ in rules}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"override_rules: unknown logical axis name(s) {unknown}; known: {sorted(known)}")
    return tuple((name, changes.get(name, axes)) for name, axes in rules)


# ----------------------------------------------------------------------------- meshes

def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """"data=2,fsdp=-1,tensor=2" -> sizes per axis; missing axes are 1, one -1 takes the rest."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"bad mesh spec {spec!r}: {part!r} is not <axis>=<size> with axis in {MESH_AXES}")
        if name in seen:
            raise ValueError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: size {value!r} of {name!r} is not an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} must be positive or -1 (the rest)")
    rest = [a for a, n in sizes.items() if n == -1]
    if len(rest) > 1:
        raise ValueError(f"bad mesh spec {spec!r}: only one axis may be -1, got {rest}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: the fixed axes ({fixed} devices) do not divide the "
                             f"{num_devices} available devices")
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh spec {spec!r} needs {fixed} devices but {num_devices} are available "
                         "(use -1 for the axis that takes the rest)")
    return sizes


def make_mesh(spec: str = "data=1,fsdp=-1,tensor=1", devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types over `devices` (default: all of them,
    across every process after `jax.distributed.initialize()`).

    Auto (not Explicit, the default of `jax.make_mesh`) so that logical sharding
    constraints and jit in/out shardings drive the partitioner.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware order on TPU/GPU; plain order on CPU
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------- logical -> mesh

def _mesh_sizes(mesh) -> Mapping[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh, rules: Rules = LOGICAL_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims carry logical `names`.

    `mesh` is a Mesh or a {axis: size} dict (to plan without devices). Each dim
    takes the mesh axes of its rule, in order, skipping size-1 axes, axes an
    earlier dim already uses, and axes that would not divide the dim (that
    part is then replicated). Unknown logical names are an error, so a new
    param cannot be silently replicated.
    """
    if len(shape) != len(names):
        raise ValueError(f"shape {tuple(shape)} and logical names {tuple(names)} differ in length")
    sizes = _mesh_sizes(mesh)
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to the rules "
                             f"(None replicates). Known: {sorted(table)}")
        axes = table[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        chosen, split = [], 1
        for axis in axes:
            n = sizes.get(axis, 1)
            if n == 1 or axis in used or dim % (split * n):
                continue
            chosen.append(axis)
            split *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*out)


def logical_to_sharding(shape, names, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(shape, names, mesh, rules))


def _is_boxed(x) -> bool:
    return isinstance(x, nn.Partitioned)


def param_specs(boxed_abstract, mesh, rules: Rules = LOGICAL_RULES):
    """Tree of PartitionSpecs (same structure as the unboxed params) from boxed abstract params."""
    def one(leaf):
        if _is_boxed(leaf):
            return spec_for(leaf.value.shape, leaf.names, mesh, rules)
        return P()  # a param without names: replicated
    return jax.tree_util.tree_map(one, boxed_abstract, is_leaf=_is_boxed)


def param_shardings(boxed_abstract, mesh: Mesh, rules: Rules = LOGICAL_RULES):
    """Tree of NamedShardings for params, e.g. from `jblip.model.abstract_params(config, boxed=True)`."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(boxed_abstract, mesh, rules),
                                  is_leaf=lambda x: isinstance(x, P))


def batch_spec(batch: int, mesh, rules: Rules = LOGICAL_RULES) -> P:
    """Spec of an array with the batch on axis 0: split where the batch divides, else replicated."""
    return spec_for((batch,), ("batch",), mesh, rules)


def cache_shardings(cache, mesh: Mesh, rules: Rules = LOGICAL_RULES, axes: Sequence[str] = CACHE_AXES):
    """Shardings for a KV cache tree (stacked leaves [L, B, N, S, H], see jblip.kv_cache), e.g. for
    `jax.lax.with_sharding_constraint` in a decode loop."""
    return jax.tree_util.tree_map(lambda x: logical_to_sharding(x.shape, axes, mesh, rules), cache)


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, rules: Rules = LOGICAL_RULES):
    """Make `nn.with_logical_constraint` inside the models take effect (use around jitted calls:
    constraints are resolved when the function is traced). A no-op without a mesh."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


# ----------------------------------------------------------------------------- padding and placement

def vocab_multiple(mesh, rules: Rules = LOGICAL_RULES) -> int:
    """How many ways the "vocab" dim is split on this mesh (its padded size must be a multiple)."""
    axes = dict(rules).get("vocab")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    sizes = _mesh_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in axes)


def pad_vocab(config, mesh, rules: Rules = LOGICAL_RULES):
    """The ModelConfig with `text.padded_vocab_size` set so the LM's embedding/head rows divide
    the mesh axes "vocab" is split over (None when no padding is needed). Idempotent."""
    text = config.text
    m = vocab_multiple(mesh, rules)
    rows = -(-text.vocab_size // m) * m
    padded = rows if rows != text.vocab_size else None
    if padded == text.padded_vocab_size:
        return config
    return dataclasses.replace(config, text=dataclasses.replace(text, padded_vocab_size=padded))


def _padded_slice(array: np.ndarray, index: tuple, shape: tuple) -> np.ndarray:
    """array zero-padded (at the end of each dim) to `shape`, then [index], without padding the whole."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
    out = np.zeros([stop - start for start, stop in bounds], array.dtype)
    real = tuple(slice(start, min(stop, have)) for (start, stop), have in zip(bounds, array.shape))
    filled = tuple(slice(0, max(0, r.stop - r.start)) for r in real)
    out[filled] = array[real]
    return out


def place(array: np.ndarray, sharding: jax.sharding.Sharding, shape: Sequence[int] | None = None) -> jax.Array:
    """A host array -> a global jax.Array with `sharding`, zero-padded up to `shape` if given.

    Only the slices this process's devices hold are materialised (on many
    hosts each process keeps only its own part).
    """
    array = np.asarray(array)
    shape = tuple(array.shape) if shape is None else tuple(shape)
    if len(shape) != array.ndim or any(s < a for s, a in zip(shape, array.shape)):
        raise ValueError(f"cannot place an array of shape {array.shape} into shape {shape}")
    if shape == array.shape:
        return jax.make_array_from_callback(shape, sharding, lambda index: array[index])
    return jax.make_array_from_callback(shape, sharding, lambda index: _padded_slice(array, index, shape))


def per_device_bytes(boxed_abstract, mesh, rules: Rules = LOGICAL_RULES) -> int:
    """Bytes of params one device holds (max over devices = the even split; no devices needed)."""
    sizes = _mesh_sizes(mesh)
    total = 0
    for leaf in jax.tree_util.tree_leaves(boxed_abstract, is_leaf=_is_boxed):
        value = leaf.value if _is_boxed(leaf) else leaf
        spec = param_specs(leaf, sizes, rules) if _is_boxed(leaf) else P()
        split = 1
        for entry in spec:
            for axis in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
                split *= sizes[axis]
        total += math.prod(value.shape) * dtype_bits(value.dtype) // 8 // split  # int4: half a byte
    return total
