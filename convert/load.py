"""The one load path: a HF-format checkpoint directory -> (config, params placed on a mesh).

`jblip.load_pretrained` (inference) and `jblip.train.build` (fine-tuning, with its own
storage dtypes per tower) both read checkpoints through `load_params`.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from jblip import sharding
from jblip.config import ModelConfig, Precision, from_hf_config, untie_if_present
from jblip.convert import chunked
from jblip.convert.fill import DeviceFill, HostFill
from jblip.convert.fuse import FuseQVBias
from jblip.convert.hf import hf_rules
from jblip.convert.quantized import read_quantized
from jblip.convert.readers import open_checkpoint
from jblip.convert.rules import convert_params, flatten
from jblip.model import abstract_params
from jblip.quantization import Quantization, weight_bytes


class NonFiniteWeightsWarning(RuntimeWarning):
    """A loaded checkpoint holds NaN or infinite weights: its outputs will be meaningless."""


class NonFiniteWatch:
    """A `place` function that also notes every tensor holding NaN or inf, on the host copy the
    loader has anyway (one pass per tensor, nothing kept)."""

    def __init__(self, place):
        self.place, self.bad = place, []

    def __call__(self, path, x):
        self.check(path, x)
        return self.place(path, x)

    def check(self, path, x):
        leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(x)]  # a quantised kernel: its scale
        if any(a.dtype.kind in "fcV" and a.size and not np.isfinite(a).all() for a in leaves):  # V: bfloat16
            if path not in self.bad:  # a stack is checked layer by layer
                self.bad.append(path)

    def warn(self, where: str):
        if self.bad:
            shown = ", ".join(self.bad[:5]) + (f" and {len(self.bad) - 5} more" if len(self.bad) > 5 else "")
            warnings.warn(f"{where}: {len(self.bad)} weight tensor(s) hold NaN or infinite values ({shown}); "
                          "the model's outputs will be meaningless", NonFiniteWeightsWarning, stacklevel=4)


def load_params(path: str, precision: Precision | str = "float32", mesh=None, rules=None,
                storage: Callable[[ModelConfig], dict] | None = None,
                progress: Callable[[int, int, str], None] | None = None,
                quantization: Quantization | None = None) -> tuple[ModelConfig, dict]:
    """Read the checkpoint at `path` (a local directory) into params.

    Each param goes from the file to where it lives as it is read: a large one (a stack, a big
    tensor) is allocated there once and filled in place a layer or a chunk of rows at a time,
    a small one is put together on the host and placed whole (`convert/fill.py`), so host
    memory holds the placed params plus about one piece. With a `mesh`, every process keeps only
    the slices its devices hold, and the LM vocabulary is zero-padded to divide its mesh axes.
    `storage(config)` gives the abstract params (shapes and the dtype each leaf is stored in);
    default: the config's param dtype. With `quantization`, the kernels it names are quantised
    as each tensor is read (`jblip.quantization`). Returns (config, params), the config
    vocab-padded as placed.
    """
    config = from_hf_config(path, name=os.path.basename(os.path.normpath(path))).with_precision(precision)
    stored = config.quantization  # set when the checkpoint is already quantised (convert/quantized.py)
    if stored is not None and quantization not in (None, stored):
        raise ValueError(f"{path} is already quantised ({stored.mode}, group_size {stored.group_size}, towers "
                         f"{list(stored.towers)}); load it without quantize= or with the same settings")
    if quantization is not None:
        config = dataclasses.replace(config, quantization=quantization)
    with open_checkpoint(path) as source:
        if stored is None:
            config = untie_if_present(config, source.keys())
        abstract = (storage or abstract_params)(config)  # the checkpoint's shapes
        if mesh is not None:
            rules = tuple(sharding.LOGICAL_RULES if rules is None else rules)
            config = sharding.pad_vocab(config, mesh, rules)
            boxed = abstract_params(config, boxed=True)
            targets = flatten(sharding.param_shardings(boxed, mesh, rules))
            shapes = flatten(nn.unbox(boxed))  # padded where the vocab is
        else:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shapes = flatten(abstract)
            targets = {p: jax.tree_util.tree_map(lambda _: device, a) for p, a in shapes.items()}
        place = lambda p, x: jax.tree_util.tree_map(lambda a, t, s: sharding.place(a, t, s.shape),
                                                    x, targets[p], shapes[p])
        watch = NonFiniteWatch(place)
        if stored is not None:
            params = read_quantized(path, abstract, watch)
        else:
            def fill(p, leaf, stacked):
                # a large param is filled where it lives; a small one is put together on the host and
                # placed whole (a host copy of it costs less than compiling its in-place updates)
                if weight_bytes(leaf) <= chunked.CHUNK_BYTES:
                    return HostFill(p, leaf, stacked, watch)
                return DeviceFill(p, leaf, stacked, targets[p], shapes[p], place, watch.check)
            params = convert_params(FuseQVBias(source), hf_rules(config), abstract, progress=progress, fill=fill)
    watch.warn(path)
    return config, params
