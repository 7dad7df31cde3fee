"""Declarative PyTorch-key -> Flax-param tables and the engine that applies them.

A table is a list of `Rule(source_regex, target_template, transform)`. The
source regex must match a whole PyTorch key; the target is a '/'-separated
param path where `\\1`, `\\2`... are the regex groups (None = known key that is
dropped, e.g. tied copies or buffers). The same tables drive export back to
PyTorch through each transform's inverse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from jblip import quantization
from jblip.convert import stacking
from jblip.convert.chunked import pieces
from jblip.convert.fill import HostFill


class ConversionError(ValueError):
    pass


@dataclass(frozen=True)
class Transform:
    """PyTorch array -> Flax array given the target shape, and back."""
    name: str
    to_flax: Callable[[np.ndarray, tuple], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple], tuple | None] = lambda shape: None  # None: only sizes must agree
    # the param axis that torch's leading axis runs along, given the param's shape (None: no
    # such axis); a tensor can then be converted a chunk of rows at a time (convert/chunked.py)
    rows_axis: Callable[[tuple], int | None] = lambda shape: None


def _reshape(x, shape):
    return x.reshape(shape)


IDENTITY = Transform("identity", _reshape, lambda x: x, rows_axis=lambda shape: 0)
# Same values, but the torch tensor is 1-D: per-head biases (N, H) or fused qkv biases (3, N, H).
FLAT = Transform("flat", _reshape, lambda x: x.reshape(-1))


def leading_ones(n: int) -> Transform:
    """torch keeps `n` leading size-1 dims that jblip drops (class/position embeddings, query tokens)."""
    return Transform(f"unsqueeze{n}", _reshape, lambda x: x.reshape((1,) * n + tuple(x.shape)))


def linear(n_in: int = 1) -> Transform:
    """nn.Linear weight (out, in) -> kernel (*in_dims, *out_dims); `n_in` kernel dims are inputs."""
    def to_torch(k):
        n_out = int(np.prod(k.shape[n_in:]))
        return k.reshape(-1, n_out).T
    def torch_shape(shape):
        return (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
    # torch rows are the output channels: they run along the kernel's first output axis
    return Transform(f"linear{n_in}", lambda x, shape: x.T.reshape(shape), to_torch, torch_shape,
                     rows_axis=lambda shape: n_in)


LINEAR = linear(1)
LINEAR_HEADS_IN = linear(2)  # attention output projection: kernel (N, H, D)
# Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)
CONV = Transform("conv", lambda x, shape: x.transpose(2, 3, 1, 0).reshape(shape),
                 lambda k: k.transpose(3, 2, 0, 1), lambda s: (s[3], s[2], s[0], s[1]))


@dataclass(frozen=True)
class Rule:
    source: str
    target: str | None
    transform: Transform = IDENTITY
    alias: bool = False   # a second copy of a tensor another rule already fills (tied weights)

    def compiled(self):
        return re.compile(self.source)


def prefixed(src_prefix: str, dst_prefix: str, rules: Iterable[Rule]) -> list[Rule]:
    return [Rule(re.escape(src_prefix) + r.source,
                 None if r.target is None else dst_prefix + r.target, r.transform, r.alias)
            for r in rules]


def flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


class Matcher:
    def __init__(self, rules: Iterable[Rule]):
        self.rules = [(r, r.compiled()) for r in rules]

    def match(self, key: str):
        """-> (rule, target path or None) or None when no rule knows the key."""
        for rule, rx in self.rules:
            m = rx.fullmatch(key)
            if m:
                return rule, (None if rule.target is None else m.expand(rule.target))
        return None


def _shape_dtype(x):
    return tuple(x.shape), np.dtype(x.dtype)


def plan(keys_shapes: Mapping[str, tuple], rules: Iterable[Rule], targets: Mapping[str, object],
         optional: Iterable[str] = ()) -> dict[str, tuple]:
    """Check a checkpoint against the model without reading any tensor.

    keys_shapes: source key -> torch shape; targets: flat param path -> abstract
    leaf (with .shape), stacked layers included (seen per layer, see `convert.stacking`).
    Returns per-layer target path -> (source key, rule). Raises one ConversionError
    listing every missing, unexpected and mis-shaped tensor.
    """
    targets = stacking.per_layer_specs(targets)
    matcher = Matcher(rules)
    assignment: dict[str, tuple] = {}
    unexpected, mismatched, bad_rule = [], [], []
    for key, shape in keys_shapes.items():
        hit = matcher.match(key)
        if hit is None:
            unexpected.append(f"{key} {tuple(shape)}")
            continue
        rule, target = hit
        if target is None:
            continue
        if target not in targets:
            bad_rule.append(f"{key} -> {target}")
            continue
        if target in assignment:
            if rule.alias or assignment[target][1].alias:
                if rule.alias:
                    continue
            else:
                bad_rule.append(f"{key} and {assignment[target][0]} both -> {target}")
                continue
        want = tuple(targets[target].shape)
        expected = rule.transform.torch_shape(want)
        if (tuple(shape) != expected) if expected is not None else (int(np.prod(shape)) != int(np.prod(want))):
            needed = f"{expected}" if expected is not None else f"{int(np.prod(want))} elements"
            mismatched.append(f"{key}: checkpoint {tuple(shape)}, but {target} {want} needs {needed}")
            continue
        assignment[target] = (key, rule)
    optional = set(optional)
    missing = [f"{t} {tuple(targets[t].shape)}" for t in targets if t not in assignment and t not in optional]
    problems = []
    for title, items in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                         ("shape mismatch", mismatched), ("conversion table error", bad_rule)):
        if items:
            shown = "\n    ".join(items[:200]) + ("\n    ..." if len(items) > 200 else "")
            problems.append(f"  {len(items)} {title}:\n    {shown}")
    if problems:
        raise ConversionError("checkpoint does not fit the model:\n" + "\n".join(problems))
    return assignment


class DictSource:
    """A TensorSource over an in-memory {key: array} dict (tests, torch state dicts)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        return self.tensors[key].dtype

    def read(self, key):
        return self.tensors[key]

    def read_rows(self, key, start, stop):
        return self.tensors[key][start:stop]


def convert_params(source, rules: Iterable[Rule], abstract_params: Mapping, optional: Iterable[str] = (),
                   place: Callable[[str, np.ndarray], object] | None = None, progress=None,
                   fill: Callable[[str, object, bool], object] | None = None) -> dict:
    """Read every tensor a table assigns and return the nested Flax params dict.

    source: TensorSource (keys/shape/dtype/read, and read_rows); abstract_params: nested dict
    of leaves with .shape/.dtype (e.g. from jax.eval_shape). Each param is put together in
    `fill(path, leaf, stacked)` from the pieces read (`convert/fill.py`): by default on the host
    and then `place(path, array)`d whole (e.g. moved to its device/sharding); the loader fills
    it on its devices instead. A stacked param is read one layer at a time, a large tensor a
    chunk of rows at a time (`convert/chunked.py`), and a leaf that is a quantised kernel
    (`jblip.quantization`) is quantised as it is read, so neither a whole float stack nor a
    large float tensor next to its converted form is ever held.
    """
    fill = fill or (lambda path, leaf, stacked: HostFill(path, leaf, stacked, place))
    targets = flatten(abstract_params)
    assignment = plan({k: source.shape(k) for k in source.keys()}, rules, targets, optional)
    slots = stacking.per_layer_slots({p: tuple(a.shape) for p, a in targets.items()})
    out, done = {}, 0
    for group in stacking.reading_order(assignment, slots):
        slot = slots[group[0]]
        path = group[0] if slot is None else slot.stacked
        leaf = targets[path]
        if slot is not None and len(group) != leaf.shape[0]:
            raise ConversionError(f"{path}: the checkpoint fills {len(group)} of its {leaf.shape[0]} layers")
        shape = tuple(leaf.shape[1:] if slot else leaf.shape)
        quantized = quantization.is_quantized(leaf)
        like = (quantization.slice_like(leaf) if slot else leaf) if quantized else None  # one layer's layout
        target = fill(path, leaf, slot is not None)
        for index, member in enumerate(group):
            key, rule = assignment[member]
            for axis, start, piece in pieces(source, key, rule, shape, None if quantized else np.dtype(leaf.dtype),
                                             like, target.chunks_along):
                target.write(index if slot else None, axis, start, piece)
                del piece
            done += 1
            if progress is not None:
                progress(done, len(assignment), member)
        out[path] = target.result()
    return unflatten(out)
