"""HF-format InstructBLIP / BLIP-2 checkpoints: the full key table per family."""
from __future__ import annotations

import importlib

from jblip.convert.rules import IDENTITY, LINEAR, Rule, leading_ones, prefixed
from jblip import families
from jblip.config import ModelConfig


def _tower(name: str, attr: str = "RULES"):
    return getattr(importlib.import_module(f"jblip.convert.tables.{name}"), attr)


def _llm_rules(config: ModelConfig):
    return families.family(config).hf_rules(config.text)


def hf_rules(config: ModelConfig) -> list[Rule]:
    qformer = _tower("qformer", "INSTRUCT_RULES" if config.qformer.use_text_input else "BLIP2_RULES")
    return [
        *prefixed("vision_model.", "vision/", _tower("vision")),
        Rule(r"query_tokens", "qformer/query_tokens", leading_ones(1)),
        *prefixed("qformer.", "qformer/", qformer),
        Rule(r"language_projection\.weight", "projection/kernel", LINEAR),
        Rule(r"language_projection\.bias", "projection/bias", IDENTITY),
        *prefixed("language_model.", "llm/", _llm_rules(config)),
    ]
