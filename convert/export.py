"""jblip params -> a HF-format checkpoint directory (config.json + safetensors shards + index).

Every param goes back through the same table that loads it (`convert.hf.hf_rules`):
the key comes from inverting the rule (`convert.inverse`), the values from the
rule's `Transform.to_torch`. Tied copies are not written, as in HF's own
`save_pretrained` (OPT's `lm_head`, T5's `encoder/decoder.embed_tokens`);
fused biases are written fused (`qkv.bias`). Tensors are produced and written
one at a time, in their own dtype unless `dtype` asks for a cast: bfloat16
stays bit-exact. Vocab rows padded for a mesh (`sharding.pad_vocab`) are cut off.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from collections import Counter
from typing import Callable, Mapping

import jax
import ml_dtypes
import numpy as np

from jblip.convert import stacking
from jblip.convert.chunked import convert_one
from jblip.convert.hf import hf_rules
from jblip.convert.hf_config import hf_config_dict
from jblip.convert.inverse import KeyInverter
from jblip.convert.rules import ConversionError, flatten, plan
from jblip.convert.safetensors_writer import nbytes, write_safetensors
from jblip.config import ModelConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default "5GB"
INDEX_NAME = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB or a byte count)")
    unit = (m.group(2) or "b").lower()
    base = 1024 if "i" in unit else 1000
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def is_float(dtype) -> bool:
    """numpy and ml_dtypes (bfloat16, float8) floating types."""
    try:
        ml_dtypes.finfo(np.dtype(dtype))
        return True
    except ValueError:
        return False


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    """Floating tensors to `dtype` (None: as they are); integer tensors stay."""
    if dtype is None or not is_float(x.dtype) or x.dtype == np.dtype(dtype):
        return x
    return x.astype(dtype)


class LazyParams(Mapping):
    """Flat {param path: array} read from a TensorSource only when asked for, one tensor at a time.

    Lets a checkpoint be converted to another layout without ever holding the
    whole model in memory. `dtype=None` keeps each tensor's stored dtype.
    """

    def __init__(self, source, rules, abstract_params, dtype=None, optional=()):
        self.source = source
        self.targets = stacking.per_layer_specs(flatten(abstract_params))
        self.assignment = plan({k: source.shape(k) for k in source.keys()}, rules, self.targets, optional)
        self.dtype = None if dtype is None else np.dtype(dtype)

    def __getitem__(self, path):
        key, rule = self.assignment[path]
        return _cast(convert_one(self.source.read(key), tuple(self.targets[path].shape), rule, None), self.dtype)

    def __iter__(self):
        return iter(self.assignment)

    def __len__(self):
        return len(self.assignment)

    def meta(self, path) -> tuple[tuple, np.dtype]:
        key, _ = self.assignment[path]
        stored = np.dtype(self.source.dtype(key))
        return tuple(self.targets[path].shape), (self.dtype if self.dtype is not None and is_float(stored) else stored)


@dataclasses.dataclass
class ExportSummary:
    out_dir: str
    tensors: int
    bytes: int
    files: list[str]
    seconds: float
    dtypes: dict[str, int]
    warnings: list[str] = dataclasses.field(default_factory=list)

    def __str__(self):
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        lines = [f"wrote {self.tensors} tensors ({dtypes}), {self.bytes / 1e6:.1f} MB, in "
                 f"{len(self.files)} file(s) to {self.out_dir} in {self.seconds:.1f} s"]
        lines += [f"  {name}" for name in self.files]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _shards(entries, max_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for entry in entries:
        n = nbytes(entry[1], entry[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    return shards + [current] if current else shards


def _prepare_dir(out_dir: str, overwrite: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    ours = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json)$")
    existing = sorted(f for f in os.listdir(out_dir)
                      if ours.match(f) or f.startswith("pytorch_model") and f.endswith((".bin", ".json")))
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a checkpoint ({', '.join(existing[:5])}); "
                              "choose an empty folder or pass overwrite=True (--overwrite)")
    for f in existing:  # stale shards of an earlier export would be picked up by from_pretrained
        os.remove(os.path.join(out_dir, f))


@functools.lru_cache(maxsize=8)
def param_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Flat param path -> shape of the (unpadded) model, without allocating."""
    from jblip.model import abstract_params
    return {p: tuple(a.shape) for p, a in stacking.per_layer_specs(flatten(abstract_params(config))).items()}


def torch_shape_of(transform, shape) -> tuple:
    """The shape `transform.to_torch` gives a param of `shape`, run on a zero-stride stand-in (no memory)."""
    stand_in = np.broadcast_to(np.zeros((), np.int8), shape)
    return tuple(transform.to_torch(stand_in).shape)


def export_layout(config: ModelConfig, metas: Mapping[str, tuple[tuple, np.dtype]], dtype=None) -> list[tuple]:
    """The HF tensors a model's params become, without touching any value.

    metas: param path -> (shape, dtype) as held (vocab rows may be padded). Returns
    (HF key, torch shape, dtype, param path, rule, model shape) per tensor, in key order.
    Raises one ConversionError naming every param that cannot be exported.
    """
    shapes = param_shapes(config)
    invert = KeyInverter(hf_rules(config))
    entries, problems = [], []
    for path, (have_shape, have_dtype) in metas.items():
        if path not in shapes:
            problems.append(f"{path}: not a parameter of this {config.model_type}-{config.family} model")
            continue
        hit = invert(path)
        if hit is None:
            problems.append(f"{path}: no rule of the HF table produces it")
            continue
        key, rule = hit
        shape = shapes[path]
        if len(have_shape) != len(shape) or any(h < s for h, s in zip(have_shape, shape)):
            problems.append(f"{path}: array {tuple(have_shape)} does not fit the model's {shape}")
            continue
        out_dtype = np.dtype(dtype if dtype is not None and is_float(have_dtype) else have_dtype)
        torch_shape = torch_shape_of(rule.transform, shape)
        entries.append((key, torch_shape, out_dtype, path, rule, shape))
    problems += [f"{p}: missing from the params" for p in shapes if p not in metas]
    if problems:
        raise ConversionError(f"cannot export to HF layout, {len(problems)} problem(s):\n    "
                              + "\n    ".join(problems[:200]))
    return sorted(entries, key=lambda e: _natural(e[0]))


def export_hf(model_or_config, out_dir: str, params=None, max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
              dtype=None, overwrite: bool = False,
              progress: Callable[[int, int, int], None] | None = None) -> ExportSummary:
    """Write a HF-format InstructBLIP / BLIP-2 checkpoint that transformers' `from_pretrained` loads.

    model_or_config: a `VisionLanguageModel` (its params are used), or a ModelConfig with `params`
    (a nested params dict, or a flat `LazyParams`). dtype: None keeps every tensor's dtype, or a
    float dtype ("float32", "bfloat16", ...) to cast floating tensors to. progress(done, total,
    bytes_done) is called after each tensor. Returns an ExportSummary (printable).
    """
    start = time.perf_counter()
    if isinstance(model_or_config, ModelConfig):
        config = model_or_config
        if params is None:
            raise ValueError("export_hf(config, out_dir, params=...): params are required with a config")
    else:
        config, params = model_or_config.config, model_or_config.params if params is None else params
    if config.quantization is not None:
        raise ValueError("a quantised model has no HF layout: save it with jblip.convert.quantized.save_quantized "
                         "(or `jblip convert SRC DST --quantize MODE` from the float checkpoint)")
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, padded_vocab_size=None))
    dtype = None if dtype is None else np.dtype(dtype)
    flat = params if isinstance(params, LazyParams) else stacking.PerLayerView(flatten(params))
    metas = {p: flat.meta(p) for p in flat}
    entries = export_layout(config, metas, dtype)
    sources = {key: (path, rule, shape) for key, _, _, path, rule, shape in entries}
    entries = [e[:3] for e in entries]

    done = [0, 0]

    def produce(key):
        path, rule, shape = sources[key]
        x = np.asarray(jax.device_get(flat[path]))
        if x.shape != shape:  # vocab rows padded for the mesh
            x = x[tuple(slice(0, n) for n in shape)]
        y = np.ascontiguousarray(rule.transform.to_torch(_cast(x, dtype)))
        done[0] += 1
        done[1] += y.nbytes
        if progress is not None:
            progress(done[0], len(entries), done[1])
        return y

    out_dir = os.fspath(out_dir)
    _prepare_dir(out_dir, overwrite)
    shards = _shards(entries, parse_size(max_shard_bytes))
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = 0
    for name, shard in zip(names, shards):
        total += write_safetensors(os.path.join(out_dir, name), shard, produce)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key, _, _ in shard}}
        with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
        names.append(INDEX_NAME)

    dtypes = Counter(str(np.dtype(d)) for _, _, d in entries)
    main_dtype = max((d for d in dtypes if "float" in d), key=lambda d: dtypes[d], default=None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(config, main_dtype), f, indent=2)
    names.append("config.json")

    warnings = []
    v = config.vision
    if v.post_layernorm_eps != v.layer_norm_eps:
        warnings.append(f"transformers applies layer_norm_eps={v.layer_norm_eps} to post_layernorm too; this "
                        f"model uses {v.post_layernorm_eps} there (LAVIS ln_vision), recorded as "
                        "vision_config.post_layernorm_eps, which only jblip reads")
    return ExportSummary(out_dir, len(entries), total, names, time.perf_counter() - start, dict(dtypes), warnings)
