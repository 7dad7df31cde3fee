"""Checks on a HF config.json as it is read: every field's type and range, and the shapes that
must agree, so a broken config gives one ConfigError naming its field (`vision_config.num_hidden_layers
must be a positive integer, got -2`), not a wrong model or an error deep inside a layer."""
from __future__ import annotations

import dataclasses
import math

TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "image_token_index")


class ConfigError(ValueError):
    pass


def _kind(annotation: str) -> tuple[str, bool]:
    """('int' | 'float' | 'str' | 'bool', None allowed) from a field annotation string."""
    parts = [p.strip() for p in str(annotation).split("|")]
    return parts[0], "None" in parts


def checked_fields(cls, picked: dict, section: str, mapping: dict) -> dict:
    """`picked` (jblip field -> value taken from HF field `mapping[field]` of `section`), each
    value checked against the dataclass field's type: sizes positive, epsilons positive and finite."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for ours, value in picked.items():
        kind, optional = _kind(types[ours])
        where = f"{section}.{mapping[ours]}" if section else mapping[ours]
        if value is None and optional:
            continue
        if kind == "int":
            if type(value) is not int:
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            if ours in TOKEN_IDS:
                continue
            if value < 1:
                raise ConfigError(f"{where} must be a positive integer, got {value}")
        elif kind == "float":
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{where} must be a positive finite number, got {value!r}")
        elif kind == "bool":
            if type(value) is not bool:
                raise ConfigError(f"{where} must be true or false, got {value!r}")
        elif kind == "str" and not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    return picked


def divides(section: str, width_name: str, width: int, heads_name: str, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"{section}.{width_name} {width} is not divisible by {section}.{heads_name} {heads}")


def check_shapes(config) -> None:
    """The sizes that must agree with one another (each already positive)."""
    v, q, t = config.vision, config.qformer, config.text
    divides("vision_config", "hidden_size", v.hidden_size, "num_attention_heads", v.num_heads)
    if v.patch_size > v.image_size:
        raise ConfigError(f"vision_config.patch_size {v.patch_size} is larger than vision_config.image_size "
                          f"{v.image_size}")
    divides("qformer_config", "hidden_size", q.hidden_size, "num_attention_heads", q.num_heads)
    if t.family in ("llama", "opt"):
        divides("text_config", "hidden_size", t.hidden_size, "num_attention_heads", t.num_heads)
    if t.family == "llama":
        divides("text_config", "num_attention_heads", t.num_heads, "num_key_value_heads", t.num_kv_heads)
