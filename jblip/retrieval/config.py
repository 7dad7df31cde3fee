"""Configuration of the BLIP-2 retrieval model (HF `Blip2ForImageTextRetrieval`, LAVIS stage 1).

The model is the ViT and the InstructBLIP-variant Q-Former (text enters it: word and
position embeddings, a text feed-forward block per layer) plus three small heads:
`vision_projection` / `text_projection` to the `embed_dim`-wide contrastive space and
`itm_head` (2 logits). There is no language model. LAVIS also trains a temperature
(`temp`, initialised to 0.07) and a BERT LM head for its image-grounded text loss; HF
checkpoints carry neither, so loading one leaves them at their initial values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

from jblip.config import (_QFORMER_KEYS, _VISION_KEYS, DEMO_VISION, TINY_VISION, ConfigError, Precision,
                          QFormerConfig, VisionConfig, _from_dict, _pick, read_config_json)
from jblip.config_checks import checked_fields, divides


@dataclass(frozen=True)
class RetrievalConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_query_tokens: int = 32
    embed_dim: int = 256          # HF image_text_hidden_size
    temperature: float = 0.07     # initial value of the learned ITC temperature (LAVIS `temp`)
    precision: Precision = field(default_factory=Precision)
    name: str = "custom"

    model_type = "blip2-retrieval"

    def __post_init__(self):
        if not self.qformer.use_text_input:
            raise ConfigError("a retrieval model's Q-Former reads text: qformer.use_text_input must be true")

    def with_precision(self, precision: Precision | str) -> "RetrievalConfig":
        return replace(self, precision=Precision.named(precision) if isinstance(precision, str) else precision)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RetrievalConfig":
        d = dict(d)
        parts = dict(vision=_from_dict(VisionConfig, d.pop("vision", {}), "vision"),
                     qformer=_from_dict(QFormerConfig, d.pop("qformer", {}), "qformer"),
                     precision=_from_dict(Precision, d.pop("precision", {}), "precision"))
        return _from_dict(cls, {**d, **parts}, "retrieval model")


RETRIEVAL_ARCHITECTURES = ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection",
                           "Blip2VisionModelWithProjection")


def is_retrieval_config(cfg: dict) -> bool:
    """A BLIP-2 config.json of a retrieval checkpoint (architecture named, or the ITC width present
    without a language model)."""
    archs = cfg.get("architectures") or []
    return any(a in RETRIEVAL_ARCHITECTURES for a in archs)


def _read(cfg) -> dict:
    return read_config_json(cfg)


def _section(cfg: dict, key: str) -> dict:
    value = cfg.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got {value!r}")
    return value


def from_hf_config(cfg, name: str = "custom") -> RetrievalConfig:
    """A RetrievalConfig from a HF BLIP-2 retrieval config.json (dict, file or directory)."""
    cfg = _read(cfg)
    if str(cfg.get("model_type", "")).lower() not in ("blip-2", "blip_2", "blip2"):
        raise ConfigError(f"unknown model family {cfg.get('model_type')!r}: expected a BLIP-2 retrieval config.json")
    vcfg, qcfg = _section(cfg, "vision_config"), _section(cfg, "qformer_config")
    vision = VisionConfig(**checked_fields(VisionConfig, _pick(vcfg, _VISION_KEYS, None), "vision_config",
                                           _VISION_KEYS))
    q = checked_fields(QFormerConfig, _pick(qcfg, _QFORMER_KEYS, None), "qformer_config", _QFORMER_KEYS)
    q.setdefault("use_text_input", True)
    if q["use_text_input"] is not True:
        raise ConfigError("qformer_config.use_qformer_text_input must be true in a retrieval checkpoint "
                          "(its Q-Former encodes text)")
    keys = dict(num_query_tokens="num_query_tokens", embed_dim="image_text_hidden_size")
    top = checked_fields(RetrievalConfig, _pick(cfg, keys, None), "", keys)
    config = RetrievalConfig(vision=vision, qformer=QFormerConfig(**q), name=name, **top)
    check_retrieval_shapes(config)
    return config


def check_retrieval_shapes(config: RetrievalConfig) -> None:
    v, q = config.vision, config.qformer
    divides("vision_config", "hidden_size", v.hidden_size, "num_attention_heads", v.num_heads)
    divides("qformer_config", "hidden_size", q.hidden_size, "num_attention_heads", q.num_heads)
    if q.encoder_hidden_size != v.hidden_size:
        raise ConfigError(f"qformer_config.encoder_hidden_size {q.encoder_hidden_size} != vision_config.hidden_size "
                          f"{v.hidden_size}: the Q-Former cross-attends to the ViT output")


_ITM_QFORMER = QFormerConfig(use_text_input=True, vocab_size=30523)

RETRIEVAL_PRESETS: dict[str, RetrievalConfig] = {
    "blip2-itm-vit-g": RetrievalConfig(qformer=_ITM_QFORMER, name="blip2-itm-vit-g"),
    "blip2-itm-vit-g-coco": RetrievalConfig(vision=VisionConfig(image_size=364), qformer=_ITM_QFORMER,
                                            name="blip2-itm-vit-g-coco"),
    "tiny-blip2-itm": RetrievalConfig(
        TINY_VISION, QFormerConfig(hidden_size=40, num_layers=2, num_heads=4, intermediate_size=72,
                                   encoder_hidden_size=48, vocab_size=99, max_position_embeddings=64),
        num_query_tokens=6, embed_dim=24, name="tiny-blip2-itm"),
}
# The bundled demo retrieval model's shapes: the demo world's ViT and word vocabulary.
DEMO_RETRIEVAL = RetrievalConfig(
    DEMO_VISION, QFormerConfig(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256,
                               cross_attention_frequency=1, encoder_hidden_size=96, vocab_size=40,
                               max_position_embeddings=32),
    num_query_tokens=8, embed_dim=64, name="demo-blip2-retrieval")
RETRIEVAL_PRESETS["demo-blip2-retrieval"] = DEMO_RETRIEVAL


def retrieval_preset(name: str) -> RetrievalConfig:
    try:
        return RETRIEVAL_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown retrieval preset {name!r}; known: {sorted(RETRIEVAL_PRESETS)}") from None
