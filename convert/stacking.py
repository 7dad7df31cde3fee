"""Stacked (scanned) params <-> per-layer param paths, so conversion tables stay per-layer.

jblip scans every layer stack (`jblip.scan`): the params of a stack live under a
module named `layers` with a leading `[L]` axis, e.g. `llm/layers/mlp/fc1/kernel`
`[L, D, F]`. Checkpoints and the HF tables speak of one layer at a time
(`llm/layers_3/mlp/fc1/kernel`). This module is the one place that knows how
the two correspond:

- `<parent>/layers/<path>` `[L, ...]` is `<parent>/layers_{i}/<path>` for i < L;
- a stack scanned over groups of k unlike layers names its block's members
  `layer_0 .. layer_{k-1}`: `<parent>/layers/layer_{j}/<path>` `[G, ...]` is
  `<parent>/layers_{g*k + j}/<path>`.

Everything else (including layers kept outside a stack) passes through unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

_STACK = re.compile(r"^(?P<parent>(?:.*/)?)layers/(?P<rest>.*)$")
_MEMBER = re.compile(r"^layer_(?P<j>\d+)/(?P<rest>.*)$")


class Slot(NamedTuple):
    stacked: str   # path of the stacked param
    index: int     # position along its leading axis


class SliceSpec(NamedTuple):
    """Shape/dtype of one layer's slice of a stacked param (what the tables see)."""
    shape: tuple
    dtype: object


def _group_size(stacked_paths) -> dict[str, int | None]:
    """Stack prefix -> members per group (None for a plain stack)."""
    members: dict[str, set] = {}
    for path in stacked_paths:
        m = _STACK.match(path)
        if m is None:
            continue
        key = m["parent"] + "layers"
        member = _MEMBER.match(m["rest"])
        members.setdefault(key, set()).add(None if member is None else int(member["j"]))
    sizes = {}
    for key, js in members.items():
        if None in js and len(js) > 1:
            raise ValueError(f"{key}: a stack must be all grouped (layer_j members) or not at all")
        sizes[key] = None if None in js else max(js) + 1
    return sizes


def per_layer_slots(stacked_shapes: Mapping[str, tuple]) -> dict[str, Slot | None]:
    """Per-layer path -> Slot in a stacked param (None: the path is not stacked, same name).

    stacked_shapes: flat param path -> shape (of the stacked model).
    """
    sizes = _group_size(stacked_shapes)
    out: dict[str, Slot | None] = {}
    for path, shape in stacked_shapes.items():
        m = _STACK.match(path)
        if m is None:
            out[path] = None
            continue
        k = sizes[m["parent"] + "layers"]
        if k is None:
            k, j, rest = 1, 0, m["rest"]
        else:
            member = _MEMBER.match(m["rest"])
            j, rest = int(member["j"]), member["rest"]
        for g in range(shape[0]):
            out[f"{m['parent']}layers_{g * k + j}/{rest}"] = Slot(path, g)
    return out


def per_layer_specs(stacked: Mapping[str, object]) -> dict[str, object]:
    """Flat abstract params (leaves with .shape/.dtype) -> the per-layer view the tables convert."""
    slots = per_layer_slots({p: tuple(a.shape) for p, a in stacked.items()})
    return {path: stacked[path] if slot is None else
            SliceSpec(tuple(stacked[slot.stacked].shape[1:]), stacked[slot.stacked].dtype)
            for path, slot in slots.items()}


class PerLayerView(Mapping):
    """Flat stacked params seen as per-layer paths; slices are taken only when asked for."""

    def __init__(self, stacked: Mapping[str, object]):
        self.stacked = stacked
        self.slots = per_layer_slots({p: tuple(x.shape) for p, x in stacked.items()})

    def __getitem__(self, path):
        slot = self.slots[path]
        return self.stacked[path] if slot is None else self.stacked[slot.stacked][slot.index]

    def __iter__(self):
        return iter(self.slots)

    def __len__(self):
        return len(self.slots)

    def meta(self, path) -> tuple[tuple, np.dtype]:
        """(shape, dtype) of a per-layer param without slicing it."""
        slot = self.slots[path]
        x = self.stacked[path if slot is None else slot.stacked]
        return tuple(x.shape) if slot is None else tuple(x.shape[1:]), np.dtype(x.dtype)


def reading_order(per_layer_paths, slots: Mapping[str, Slot | None]) -> list[list[str]]:
    """Per-layer paths grouped by the param they fill, each group in stack order, so a stacked
    param can be assembled and placed as soon as its slices are read."""
    groups: dict[str, list] = {}
    for path in per_layer_paths:
        slot = slots[path]
        key = path if slot is None else slot.stacked
        groups.setdefault(key, []).append(path)
    return [sorted(g, key=lambda p: slots[p].index) if slots[g[0]] is not None else g for g in groups.values()]
