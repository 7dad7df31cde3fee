"""From a TrainConfig to the pieces of a run: model config, params on the mesh, tokenizers, layout.

Params are read straight into their training dtypes: the trainable set in
float32 (master weights), frozen towers in their compute dtype (bf16 for the
ViT and LM with `precision: bfloat16`), each tensor placed on its mesh slot as
it is read (`jblip.convert.load.load_params`, the load path `load_pretrained` uses too).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jblip import sharding
from jblip.config import PRESETS, ModelConfig, Precision
from jblip.model import abstract_params
from jblip.quantization import Quantization, is_quantized, quantize_params
from jblip.train import trainable as tr
from jblip.train.config import TrainConfig
from jblip.text_processing import TextTokenizer
from jblip.train.labels import TextLayout
from jblip.train.state import TOWER_DTYPE


def initial_params(config: ModelConfig, seed: int = 0, std: float = 0.02):
    """Random params for a preset (demos, tests): N(0, std) weights, unit norm scales, zero biases.

    Drawn with numpy from the abstract shapes: compiling Flax's init (hundreds
    of threefry draws) costs far more than these tiny models' training steps.
    """
    rng = np.random.default_rng(seed)

    def draw(path: str, leaf):
        name = path.rsplit("/", 1)[-1]
        if name == "scale":
            value = np.ones(leaf.shape)
        elif name == "bias":
            value = np.zeros(leaf.shape)
        else:
            value = rng.normal(0.0, std, leaf.shape)
        return jnp.asarray(value.astype(leaf.dtype))
    return tr.map_with_path(draw, abstract_params(config))


def training_precision(name: str) -> Precision:
    """Compute dtypes; storage is decided per subtree (float32 masters, see module doc)."""
    if name == "float32":
        return Precision()
    return Precision(vision="bfloat16", qformer="float32", text="bfloat16", param_dtype="float32")


def _storage_dtypes(config: ModelConfig, trainable_set):
    """Abstract params with the dtype each leaf is kept in during training."""
    as_dtype = lambda dtype: (lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype) if jnp.issubdtype(
        x.dtype, jnp.floating) else x.dtype))
    trainable, frozen = tr.split(abstract_params(config), trainable_set)
    frozen = {name: jax.tree_util.tree_map(as_dtype(TOWER_DTYPE.get(name, lambda p: "float32")(config.precision)), sub)
              for name, sub in frozen.items()}
    return tr.merge(jax.tree_util.tree_map(as_dtype("float32"), trainable), frozen)


def check_frozen_quantized(config: ModelConfig, trainable_set):
    """Quantised kernels have no gradient: they must lie outside the trainable set."""
    trainable, _ = tr.split(abstract_params(config), trainable_set)
    if any(is_quantized(leaf) for leaf in tr._flat(trainable).values()):
        raise ValueError(f"quantize={config.quantization.mode} quantises the language model, which the "
                         f"trainable set {trainable_set!r} would train; quantise only a frozen LM "
                         "(e.g. trainable: qformer)")


def load_params(cfg: TrainConfig, mesh, rules=None):
    """(ModelConfig, params) for the run, placed on `mesh` (vocab padded to divide it)."""
    rules = tuple(sharding.LOGICAL_RULES if rules is None else rules)
    precision = training_precision(cfg.precision)
    quantization = Quantization.parse(cfg.quantize)
    if cfg.model in PRESETS:  # random init: demos and tests
        config = PRESETS[cfg.model].with_precision(precision)
        # unpadded, so the values do not depend on the mesh
        params = initial_params(config, cfg.init_seed, cfg.init_std)
        if quantization is not None:
            config = dataclasses.replace(config, quantization=quantization)
            check_frozen_quantized(config, cfg.trainable)
            params = quantize_params(params, abstract_params(config))
        params = jax.tree_util.tree_map(lambda x, a: x.astype(a.dtype), params,
                                        _storage_dtypes(config, cfg.trainable))
        if mesh is not None:
            config = sharding.pad_vocab(config, mesh, rules)
            params = _place_all(params, config, mesh, rules)
        return config, params
    return _load_checkpoint(cfg, mesh, rules, precision, quantization)


def _place_all(params, config: ModelConfig, mesh, rules):
    """Each leaf onto its mesh slot, zero-padded where the config pads the vocabulary."""
    from jblip.convert.rules import flatten, unflatten
    targets = flatten(sharding.param_shardings(abstract_params(config, boxed=True), mesh, rules))
    shapes = flatten(abstract_params(config))
    place = lambda x, target, shape: sharding.place(np.asarray(x), target, shape.shape)
    return unflatten({p: jax.tree_util.tree_map(place, x, targets[p], shapes[p])  # a QArray: per part
                      for p, x in flatten(params).items()})


def _load_checkpoint(cfg: TrainConfig, mesh, rules, precision, quantization=None):
    from jblip.convert.load import load_params

    def storage(config):
        if config.quantization is not None:
            check_frozen_quantized(config, cfg.trainable)
        return _storage_dtypes(config, cfg.trainable)
    return load_params(model_dir(cfg), precision, mesh, rules, storage=storage, quantization=quantization)


def model_dir(cfg: TrainConfig) -> str | None:
    """The local checkpoint directory (hub ids are fetched), None for a preset."""
    if cfg.model in PRESETS:
        return None
    from jblip.pretrained import resolve_path
    return resolve_path(cfg.model)


def load_tokenizers(cfg: TrainConfig, config: ModelConfig):
    """(LM tokenizer, Q-Former tokenizer): from the config's paths, else the model directory.
    None where nothing is found (then the data must carry token ids)."""
    def find(path):
        if path is None:
            return None
        file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        return TextTokenizer.from_dir(file) if os.path.isfile(file) else None
    base = model_dir(cfg)
    lm = find(cfg.tokenizer) or find(base)
    if cfg.tokenizer and lm is None:
        raise FileNotFoundError(f"tokenizer: no tokenizer.json at {cfg.tokenizer}")
    if not config.qformer.use_text_input:
        return lm, None
    qf = find(cfg.qformer_tokenizer)
    if cfg.qformer_tokenizer and qf is None:
        raise FileNotFoundError(f"qformer_tokenizer: no tokenizer.json at {cfg.qformer_tokenizer}")
    for directory in (cfg.tokenizer, base):
        if qf is None and directory and os.path.isdir(directory):
            qf = find(os.path.join(directory, "qformer_tokenizer"))
    if qf is None and lm is not None:
        # one shared tokenizer only where its ids fit the Q-Former's vocabulary (small custom vocabularies);
        # a real LLM tokenizer would feed the BERT Q-Former meaningless ids
        if lm.vocab_size > config.qformer.vocab_size:
            raise FileNotFoundError("InstructBLIP needs the Q-Former's BERT tokenizer: set qformer_tokenizer "
                                    "(a qformer_tokenizer/ folder next to the model is found automatically)")
        qf = lm
    return lm, qf


def text_layout(cfg: TrainConfig, config: ModelConfig, qformer_tokenizer: TextTokenizer | None) -> TextLayout:
    """Token layout for this model; the Q-Former's [CLS]/[SEP] ids from its tokenizer when it has them."""
    special = {}
    if qformer_tokenizer is not None:
        for name, token in (("qformer_cls", "[CLS]"), ("qformer_sep", "[SEP]")):
            tid = qformer_tokenizer.token_id(token)
            if tid is not None:
                special[name] = tid
    return TextLayout.for_model(config, max_input_len=cfg.max_input_len, max_output_len=cfg.max_output_len,
                                max_qformer_len=cfg.max_qformer_len, **special)
