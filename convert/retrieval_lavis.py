"""LAVIS `blip2` / `blip2_feature_extractor` / `blip2_image_text_matching` checkpoints (stage 1)
-> jblip RetrievalModel params, through the HF retrieval table.

The `.pth` (state dict under "model": `Qformer.*`, `query_tokens`, `ln_vision`, `vision_proj`,
`text_proj`, `itm_head`, `temp`, optionally `visual_encoder.*`) and, when the ViT is not in it,
EVA's `eva_vit_g.pth` (no `visual_encoder.` prefix; 40 blocks, of which LAVIS builds 39) are
renamed to the HF `Blip2ForImageTextRetrieval` layout with the generation converter's rules
(`convert.lavis.lavis_renames`) plus the stage-1 names; the model file wins over the ViT file.
LAVIS builds `ln_vision` with eps 1e-5, so the config records `post_layernorm_eps = 1e-5`.
"""
from __future__ import annotations

import dataclasses
import os
import re

import jax.numpy as jnp

from jblip.convert.combine import MergedSource, RenamedSource
from jblip.convert.fuse import FuseQVBias
from jblip.convert.lavis import LAVIS_LN_VISION_EPS, lavis_renames
from jblip.convert.readers import open_checkpoint
from jblip.convert.retrieval import retrieval_rules, with_initial_values
from jblip.convert.rules import convert_params, flatten
from jblip.convert.tables.retrieval import TRAINING_PATHS
from jblip.retrieval.config import RetrievalConfig, retrieval_preset
from jblip.retrieval.model import abstract_params

STAGE1_RENAMES = [
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
    (r"^Qformer\.cls\.", "cls."),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
]


def lavis_retrieval_key(config: RetrievalConfig):
    renames = [(re.compile(p), r) for p, r in STAGE1_RENAMES + lavis_renames(instruct=False)]
    block = re.compile(r"^visual_encoder\.blocks\.(\d+)\.")

    def rename(key: str):
        if key.endswith("position_ids"):
            return None, "buffer, recomputed"
        m = block.match(key)
        if m and int(m.group(1)) >= config.vision.num_layers:
            return None, f"ViT block {m.group(1)}: LAVIS builds {config.vision.num_layers} blocks"
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        return key, None
    return rename


def load_lavis_retrieval(model_pth, vit_pth=None, config: RetrievalConfig | str = "blip2-itm-vit-g",
                         ln_vision_eps: float = LAVIS_LN_VISION_EPS):
    """(config, params) from LAVIS stage-1 files; every tensor of the model must be found."""
    config = retrieval_preset(config) if isinstance(config, str) else config
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, post_layernorm_eps=ln_vision_eps))
    rename = lavis_retrieval_key(config)
    parts = []
    if vit_pth is not None:
        parts.append(("vit", RenamedSource(open_checkpoint(vit_pth), lambda k: rename("visual_encoder." + k))))
    model_file = os.fspath(model_pth)
    parts.append(("model", RenamedSource(open_checkpoint(model_file, None if model_file.endswith(".safetensors")
                                                         else "model"), rename)))
    source = FuseQVBias(MergedSource(parts))
    abstract = abstract_params(config)
    try:  # the LM head is optional: feature-extractor files may leave it out
        params = convert_params(source, retrieval_rules(), abstract, place=lambda _, x: jnp.asarray(x),
                                optional=[p for p in TRAINING_PATHS if p != "temp"])
    finally:
        source.close()
    return config, with_initial_values(config, flatten(params), abstract)
