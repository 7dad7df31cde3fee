"""Already-quantised jblip checkpoints: quantise a model once, save it, load it as it is.

A folder holds `config.json` (the HF config plus a `jblip_quantization` field: mode,
group_size, towers) and `model.safetensors` with every param under its jblip path,
stacked layers whole: a quantised kernel as `<path>/qvalue` and `<path>/scale`, float
params as they are. int8 values are stored as I8; int4 values two per byte (U8, the low
nibble first along the last axis, which is padded to an even length). safetensors has
no 4-bit dtype, hence the packing.

Reading checks every tensor against the model the config describes (names, shapes,
dtypes) before placing any, and gives one error listing every difference.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from jblip.config import ModelConfig
from jblip.convert.errors import CheckpointError
from jblip.convert.export import _prepare_dir
from jblip.convert.hf_config import hf_config_dict
from jblip.convert.readers import open_checkpoint
from jblip.convert.rules import flatten, unflatten
from jblip.convert.safetensors_writer import write_safetensors
from jblip.quantization import CONFIG_KEY, QArray, is_quantized

FILE = "model.safetensors"
INT4 = np.dtype(jax.numpy.int4)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values -> uint8, two per byte along the last axis (low nibble first)."""
    nibbles = q.astype(np.int8).view(np.uint8) & 0x0F
    if nibbles.shape[-1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros(nibbles.shape[:-1] + (1,), np.uint8)], axis=-1)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray, last: int) -> np.ndarray:
    """The inverse of `pack_int4`, for an original last axis of `last` values."""
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :last]
    return ((both.astype(np.int8) ^ 8) - 8).astype(INT4)  # sign-extend the nibble


def _stored(shape, dtype) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a tensor as written."""
    if np.dtype(dtype) == INT4:
        return tuple(shape[:-1]) + (-(-shape[-1] // 2),), np.dtype(np.uint8)
    return tuple(shape), np.dtype(dtype)


def _fits(have: tuple, want: tuple) -> bool:
    """Same shape, and the same dtype, except that float tensors load in any float precision."""
    (hs, hd), (ws, wd) = have, want
    return hs == ws and (hd == wd or (hd.kind in "fV" and wd.kind in "fV" and wd != np.uint8))


def tensor_layout(abstract) -> dict[str, tuple[tuple, np.dtype]]:
    """File key -> (stored shape, stored dtype) for abstract params (unpadded, as in the file)."""
    out = {}
    for path, leaf in flatten(abstract).items():
        parts = {"qvalue": leaf.qvalue, "scale": leaf.scale} if is_quantized(leaf) else {"": leaf}
        for name, part in parts.items():
            out[f"{path}/{name}" if name else path] = _stored(part.shape, part.dtype)
    return out


def save_quantized(model_or_config, out_dir: str, params=None, overwrite: bool = False) -> str:
    """Write a quantised `VisionLanguageModel` (or a ModelConfig with its `params`; on a mesh
    each param is gathered when written) as an already-quantised checkpoint; tokenizer files
    travel separately. Returns the weights file's path."""
    from jblip.model import abstract_params

    if isinstance(model_or_config, ModelConfig):
        config = model_or_config
    else:
        config, params = model_or_config.config, model_or_config.params
    if config.quantization is None:
        raise ValueError("save_quantized needs a quantised model: load it with quantize='int8' or 'int4'")
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, padded_vocab_size=None))
    layout = tensor_layout(abstract_params(config))
    params = flatten(params)
    shapes = {p: a.shape for p, a in flatten(abstract_params(config)).items()}

    def produce(key):
        path, _, part = key.rpartition("/")
        leaf = params.get(path)
        if is_quantized(leaf):
            x = np.asarray(jax.device_get(getattr(leaf, part)))
        else:
            path, x = key, np.asarray(jax.device_get(params[key]))
        x = x[tuple(slice(0, n) for n in shapes[path])]  # vocab rows padded for a mesh
        return pack_int4(x) if x.dtype == INT4 else np.ascontiguousarray(x)

    _prepare_dir(out_dir, overwrite)
    target = os.path.join(out_dir, FILE)
    write_safetensors(target, [(k, s, d) for k, (s, d) in layout.items()], produce,
                      metadata={"format": "jblip", CONFIG_KEY: config.quantization.mode})
    hf = hf_config_dict(config)
    hf[CONFIG_KEY] = dataclasses.asdict(config.quantization)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return target


def read_quantized(path: str, abstract, place) -> dict:
    """Params of an already-quantised checkpoint at `path` (a folder), each placed with
    `place(param path, value)` as it is read; `abstract` gives the model's (unpadded) params."""
    expected = tensor_layout(abstract)
    with open_checkpoint(path) as source:
        have = {k: (tuple(source.shape(k)), np.dtype(source.dtype(k))) for k in source.keys()}
        problems = [f"missing: {k} {s} {d}" for k, (s, d) in expected.items() if k not in have]
        problems += [f"unexpected: {k} {s} {d}" for k, (s, d) in have.items() if k not in expected]
        problems += [f"mismatch: {k} is {have[k][1]}{have[k][0]}, the model needs {d}{s}"
                     for k, (s, d) in expected.items() if k in have and not _fits(have[k], (s, d))]
        if problems:
            shown = "\n    ".join(problems[:50]) + ("\n    ..." if len(problems) > 50 else "")
            raise CheckpointError(f"{path}: the quantised checkpoint does not fit the model its config.json "
                                  f"describes ({len(problems)} problem(s); re-save it from the float "
                                  f"checkpoint with `jblip convert SRC DST --quantize MODE`):\n    {shown}")
        out = {}
        for p, leaf in flatten(abstract).items():
            if is_quantized(leaf):
                q = source.read(f"{p}/qvalue")
                if leaf.qvalue.dtype == INT4:
                    q = unpack_int4(q, leaf.qvalue.shape[-1])
                scale = source.read(f"{p}/scale").astype(leaf.scale.dtype, copy=False)
                value = QArray(q, scale, None, np.dtype(leaf.qvalue.dtype))
            else:
                value = source.read(p).astype(leaf.dtype, copy=False)
            out[p] = place(p, value)
    return unflatten(out)
