"""BLIP-2 retrieval checkpoints: HF-format directory <-> jblip RetrievalModel params.

Loading reads `Blip2ForImageTextRetrieval` files (and the `...WithProjection` halves,
whose absent parts keep their initial values when `partial=True`); export writes the HF
key set back, with the LAVIS training heads (`temp`, `cls.predictions.*`) only when asked.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jblip.convert import stacking
from jblip.convert.export import torch_shape_of
from jblip.convert.fuse import FuseQVBias
from jblip.convert.hf_config import _qformer, _vision
from jblip.convert.inverse import KeyInverter
from jblip.convert.load import NonFiniteWatch
from jblip.convert.readers import open_checkpoint
from jblip.convert.rules import ConversionError, convert_params, flatten, unflatten
from jblip.convert.safetensors_writer import write_safetensors
from jblip.convert.tables.retrieval import RULES, TRAINING_PATHS, TRAINING_RULES
from jblip.retrieval.config import RetrievalConfig, from_hf_config
from jblip.retrieval.model import abstract_params


def retrieval_rules():
    return [*RULES, *TRAINING_RULES]


def hf_config_dict(config: RetrievalConfig) -> dict:
    """config.json of a HF `Blip2ForImageTextRetrieval` (read back by `from_hf_config`)."""
    vision = dict(_vision(config.vision), model_type="blip_2_vision_model")
    qformer = dict(_qformer(config.qformer), model_type="blip_2_qformer")
    return dict(architectures=["Blip2ForImageTextRetrieval"], model_type="blip-2",
                num_query_tokens=config.num_query_tokens, image_text_hidden_size=config.embed_dim,
                vision_config=vision, qformer_config=qformer)


def load_retrieval_params(path: str, precision="float32", partial: bool = False, place=None):
    """(config, params) of the retrieval checkpoint at `path`. The training heads HF lacks start at
    their initial values; `partial=True` also accepts a file holding only some towers (a
    `Blip2TextModelWithProjection` / `Blip2VisionModelWithProjection`), the rest initialised."""
    config = from_hf_config(path, name=os.path.basename(os.path.normpath(path))).with_precision(precision)
    abstract = abstract_params(config)
    watch = NonFiniteWatch(place or (lambda _, x: jnp.asarray(x)))
    targets = stacking.per_layer_specs(flatten(abstract))
    optional = set(targets) if partial else set(TRAINING_PATHS)
    with open_checkpoint(path) as source:
        loaded = flatten(convert_params(FuseQVBias(source), retrieval_rules(), abstract, optional=optional,
                                        place=watch))
    watch.warn(path)
    return config, with_initial_values(config, loaded, abstract)


def with_initial_values(config: RetrievalConfig, loaded: dict, abstract) -> dict:
    """The nested params: `loaded` (flat) plus the initial value of every param it lacks."""
    abstract, rng = flatten(abstract), np.random.default_rng(0)
    loaded = dict(loaded)
    loaded.update({p: jnp.asarray(initial_value(config, p, abstract[p].shape, rng), abstract[p].dtype)
                   for p in abstract if p not in loaded})
    return unflatten(loaded)


def initial_value(config: RetrievalConfig, path: str, shape, rng) -> np.ndarray:
    """A param's initial value as `RetrievalModel.init` draws it (norm scales 1, biases 0, the
    temperature from the config, weights N(0, 0.02)), without running the model's init."""
    leaf = path.rsplit("/", 1)[-1]
    if path == "temp":
        return np.full(shape, config.temperature, np.float32)
    if leaf == "scale":
        return np.ones(shape, np.float32)
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    return rng.normal(0.0, 0.02, shape).astype(np.float32)


def export_retrieval(config: RetrievalConfig, params, out_dir: str, training_heads: bool = False,
                     overwrite: bool = False) -> list[str]:
    """Write `params` as a HF `Blip2ForImageTextRetrieval` checkpoint (model.safetensors + config.json)
    that transformers' `from_pretrained` loads. Returns the keys written."""
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "model.safetensors")
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; choose an empty folder or pass overwrite=True")
    invert = KeyInverter(RULES + (TRAINING_RULES if training_heads else []))
    flat = stacking.PerLayerView(flatten(params))
    entries, sources = [], {}
    for path in flat:
        hit = invert(path)
        if hit is None:
            if path in TRAINING_PATHS:
                continue
            raise ConversionError(f"{path}: no rule of the retrieval table produces it")
        key, rule = hit
        shape, dtype = flat.meta(path)
        sources[key] = (path, rule)
        entries.append((key, torch_shape_of(rule.transform, shape), dtype))
    entries.sort()

    def produce(key):  # one tensor on the host at a time
        path, rule = sources[key]
        return np.array(rule.transform.to_torch(np.asarray(jax.device_get(flat[path]))), order="C")  # 0-d stays 0-d
    write_safetensors(target, entries, produce)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f, indent=2)
    return [e[0] for e in entries]
