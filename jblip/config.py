"""Model configuration: frozen, hashable dataclasses (usable as static jit args).

`from_hf_config(dict)` reads a HF `config.json` of an InstructBLIP / BLIP-2
checkpoint (old and new hub revisions); `PRESETS` holds every released
checkpoint's configuration plus tiny ones for tests.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, replace
from typing import Any, Union

from jblip import bounded_json
from jblip.config_checks import ConfigError, check_shapes, checked_fields
from jblip.quantization import CONFIG_KEY as QUANTIZATION_KEY, Quantization


def _from_dict(cls, d: dict, what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) for {what}: {unknown}; known fields: {sorted(names)}")
    return cls(**d)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_layers: int = 39
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224          # the checkpoint's; other input sizes interpolate positions
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    post_layernorm_eps: float = 1e-6  # LAVIS `ln_vision` uses 1e-5
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    use_text_input: bool = True    # InstructBLIP: instruction text enters the Q-Former
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class _LanguageModelConfig:
    """What the three language-model configs share (fields stay in each dataclass)."""

    @property
    def vocab_rows(self) -> int:
        """Embedding/head rows: vocab_size, or more when padded to divide the mesh (zero rows,
        their logits sliced off by the model)."""
        return self.padded_vocab_size or self.vocab_size


@dataclass(frozen=True)
class LlamaConfig(_LanguageModelConfig):
    vocab_size: int = 32001
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 2          # LAVIS Vicuna: `</s>` is BOS, EOS and UNK
    eos_token_id: int = 2
    pad_token_id: int = 32000
    family: str = "llama"
    padded_vocab_size: int | None = None  # set by jblip.sharding.pad_vocab; see vocab_rows

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class T5Config(_LanguageModelConfig):
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_decoder_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu"
    is_gated_act: bool = True
    tie_word_embeddings: bool = False  # the head is the shared embedding (no lm_head param)
    scale_decoder_outputs: bool | None = None  # d_model**-0.5 before the head; None: = tie_word_embeddings
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    family: str = "t5"
    padded_vocab_size: int | None = None  # set by jblip.sharding.pad_vocab; see vocab_rows

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def rescales_output(self) -> bool:
        return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs


@dataclass(frozen=True)
class OPTConfig(_LanguageModelConfig):
    vocab_size: int = 50272
    hidden_size: int = 2560
    ffn_dim: int = 10240
    num_layers: int = 32
    num_heads: int = 32
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 2560
    do_layer_norm_before: bool = True
    activation_function: str = "relu"
    layer_norm_eps: float = 1e-5
    enable_bias: bool = True
    bos_token_id: int = 2
    pad_token_id: int = 1
    eos_token_id: int = 50118      # BLIP-2 stops on "\n"
    family: str = "opt"
    padded_vocab_size: int | None = None  # set by jblip.sharding.pad_vocab; see vocab_rows

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


TextConfig = Union[LlamaConfig, T5Config, OPTConfig]
TEXT_CONFIGS = {"llama": LlamaConfig, "t5": T5Config, "opt": OPTConfig}


@dataclass(frozen=True)
class Precision:
    """Compute dtypes per tower; params are stored in `param_dtype`."""
    vision: str = "float32"
    qformer: str = "float32"
    text: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def named(cls, name: str) -> "Precision":
        if name == "float32":
            return cls()
        if name == "bfloat16":
            return cls("bfloat16", "float32", "bfloat16", "bfloat16")
        raise ConfigError(f"unknown precision {name!r}; use 'float32' or 'bfloat16'")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: TextConfig = field(default_factory=LlamaConfig)
    num_query_tokens: int = 32
    image_token_index: int | None = None   # the query placeholder id; None: legacy layout, queries prepended
    video: bool = False  # an InstructBLIP-Video checkpoint: its placeholder (image_token_index) is `<video>`
    precision: Precision = field(default_factory=Precision)
    name: str = "custom"
    quantization: Quantization | None = None  # weight-only int8/int4 kernels (jblip.quantization)

    def __post_init__(self):
        # The projection writes the queries at the language model's hidden width; a model whose
        # token embeddings are narrower (OPT's word_embed_proj_dim, only OPT-350m) would need
        # them at the embedding width instead, and HF scrambles such inputs silently.
        embed_width = getattr(self.text, "word_embed_proj_dim", self.text.hidden_size)
        if embed_width != self.text.hidden_size:
            raise ConfigError(f"the language model's token embeddings are {embed_width} wide "
                              f"(word_embed_proj_dim) but its hidden size is {self.text.hidden_size}: "
                              "BLIP-2 projects the queries to the hidden size, so the two must be equal")

    @property
    def family(self) -> str:
        return self.text.family

    @property
    def model_type(self) -> str:
        return "instructblip" if self.qformer.use_text_input else "blip2"

    def with_precision(self, precision: Precision | str) -> "ModelConfig":
        if isinstance(precision, str):
            precision = Precision.named(precision)
        return replace(self, precision=precision)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        text = dict(d.pop("text", {}))
        family = text.get("family", "llama")
        if family not in TEXT_CONFIGS:
            raise ConfigError(f"unknown language-model family {family!r}; known: {sorted(TEXT_CONFIGS)}")
        parts = dict(
            vision=_from_dict(VisionConfig, d.pop("vision", {}), "vision"),
            qformer=_from_dict(QFormerConfig, d.pop("qformer", {}), "qformer"),
            text=_from_dict(TEXT_CONFIGS[family], text, f"text ({family})"),
            precision=_from_dict(Precision, d.pop("precision", {}), "precision"),
            quantization=Quantization.parse(d.pop("quantization", None)),
        )
        return _from_dict(cls, {**d, **parts}, "model")


# --------------------------------------------------------------------------- HF config.json

def _pick(src: dict, mapping: dict[str, str], defaults: Any) -> dict:
    """Take jblip field <- HF field for the HF fields that are present."""
    out = {}
    for ours, theirs in mapping.items():
        if theirs in src and src[theirs] is not None:
            out[ours] = src[theirs]
    return out


_VISION_KEYS = dict(hidden_size="hidden_size", intermediate_size="intermediate_size",
                    num_layers="num_hidden_layers", num_heads="num_attention_heads",
                    patch_size="patch_size", image_size="image_size", num_channels="num_channels",
                    layer_norm_eps="layer_norm_eps", hidden_act="hidden_act")
_QFORMER_KEYS = dict(hidden_size="hidden_size", num_layers="num_hidden_layers",
                     num_heads="num_attention_heads", intermediate_size="intermediate_size",
                     cross_attention_frequency="cross_attention_frequency",
                     encoder_hidden_size="encoder_hidden_size", vocab_size="vocab_size",
                     max_position_embeddings="max_position_embeddings",
                     layer_norm_eps="layer_norm_eps", hidden_act="hidden_act",
                     use_text_input="use_qformer_text_input", pad_token_id="pad_token_id")
_LLAMA_KEYS = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                   intermediate_size="intermediate_size", num_layers="num_hidden_layers",
                   num_heads="num_attention_heads", num_kv_heads="num_key_value_heads",
                   rms_norm_eps="rms_norm_eps", rope_theta="rope_theta",
                   max_position_embeddings="max_position_embeddings", hidden_act="hidden_act",
                   tie_word_embeddings="tie_word_embeddings")
_T5_KEYS = dict(vocab_size="vocab_size", d_model="d_model", d_kv="d_kv", d_ff="d_ff",
                num_layers="num_layers", num_decoder_layers="num_decoder_layers", num_heads="num_heads",
                relative_attention_num_buckets="relative_attention_num_buckets",
                relative_attention_max_distance="relative_attention_max_distance",
                layer_norm_epsilon="layer_norm_epsilon", dense_act_fn="dense_act_fn",
                is_gated_act="is_gated_act", tie_word_embeddings="tie_word_embeddings",
                scale_decoder_outputs="scale_decoder_outputs",
                pad_token_id="pad_token_id", eos_token_id="eos_token_id",
                decoder_start_token_id="decoder_start_token_id")
_OPT_KEYS = dict(vocab_size="vocab_size", hidden_size="hidden_size", ffn_dim="ffn_dim",
                 num_layers="num_hidden_layers", num_heads="num_attention_heads",
                 max_position_embeddings="max_position_embeddings",
                 word_embed_proj_dim="word_embed_proj_dim", do_layer_norm_before="do_layer_norm_before",
                 activation_function="activation_function", enable_bias="enable_bias",
                 bos_token_id="bos_token_id", pad_token_id="pad_token_id", eos_token_id="eos_token_id")


def _text_family(text: dict) -> str:
    model_type = str(text.get("model_type", "")).lower()
    archs = " ".join(text.get("architectures") or []).lower()
    for family in ("llama", "t5", "opt"):
        if model_type == family or family in archs:
            return family
    if model_type in ("mistral", "vicuna"):
        return "llama"
    raise ConfigError(f"unknown language-model family in text_config: model_type={model_type!r}, "
                      f"architectures={text.get('architectures')!r}; jblip supports llama, t5, opt")


def _t5_activation(text: dict) -> tuple[str, bool]:
    act = text.get("dense_act_fn")
    ffp = text.get("feed_forward_proj", "gated-gelu")
    gated = ffp.startswith("gated-")
    if act is None:  # HF: "gated-gelu" alone means the tanh approximation
        act = ffp.split("-")[-1]
        act = "gelu_new" if act == "gelu" and gated else act
    return act, text.get("is_gated_act", gated)


def read_config_json(cfg: dict | str | os.PathLike) -> dict:
    """A HF config as a dict: given as one, or read (bounded) from a config.json or its folder."""
    if not isinstance(cfg, dict):
        path = os.fspath(cfg)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"no config.json at {path}")
        with open(path) as f:
            try:
                cfg = bounded_json.load(f, path)
            except ValueError as e:
                raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config.json must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def from_hf_config(cfg: dict | str | os.PathLike, name: str = "custom") -> ModelConfig:
    """Build a ModelConfig from a HF InstructBLIP/BLIP-2 config (dict, file or directory)."""
    cfg = read_config_json(cfg)
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type not in ("instructblip", "instructblipvideo", "blip-2", "blip_2", "blip2"):
        raise ConfigError(f"unknown model family {model_type!r}: expected an InstructBLIP(-Video) or BLIP-2 config.json")
    video = model_type == "instructblipvideo"
    instruct = model_type in ("instructblip", "instructblipvideo")
    text = text_config_from_hf(_section(cfg, "text_config"))
    vcfg, qcfg = _section(cfg, "vision_config"), _section(cfg, "qformer_config", required=False)

    vision = VisionConfig(**checked_fields(VisionConfig, _pick(vcfg, _VISION_KEYS, None), "vision_config",
                                           _VISION_KEYS))
    # HF has one eps for blocks and post_layernorm; jblip's exports of LAVIS models record ln_vision's apart
    post_eps = dict(post_layernorm_eps=vcfg.get("post_layernorm_eps", vision.layer_norm_eps))
    vision = replace(vision, **checked_fields(VisionConfig, post_eps, "vision_config",
                                              dict(post_layernorm_eps="post_layernorm_eps")))
    q = checked_fields(QFormerConfig, _pick(qcfg, _QFORMER_KEYS, None), "qformer_config", _QFORMER_KEYS)
    q.setdefault("use_text_input", instruct)
    qformer = QFormerConfig(**q)

    top = checked_fields(ModelConfig, _pick(cfg, _TOP_KEYS, None), "", _TOP_KEYS)
    # the video model's placeholder (`<video>`) plays the image one's part: same field here
    spellings = ("video_token_index", "video_token_id") if video else ("image_token_id",)
    for key in spellings:
        if "image_token_index" not in top and cfg.get(key) is not None:
            top.update(checked_fields(ModelConfig, dict(image_token_index=cfg[key]), "",
                                      dict(image_token_index=key)))
    quantization = Quantization.parse(cfg.get(QUANTIZATION_KEY))  # set in already-quantised jblip checkpoints
    config = ModelConfig(vision=vision, qformer=qformer, text=text, name=name, video=video,
                         quantization=quantization, **top)
    check_shapes(config)
    return config


def text_config_from_hf(tcfg: dict) -> TextConfig:
    """The language model's config from a HF `text_config` (LLaMA, OPT or T5) alone; also for an
    LM used without the image towers (e.g. OPT-350m's narrow embeddings, which BLIP-2 refuses)."""
    family = _text_family(tcfg)
    if family == "llama":
        t = checked_fields(LlamaConfig, _pick(tcfg, _LLAMA_KEYS, None), "text_config", _LLAMA_KEYS)
        rope = tcfg.get("rope_parameters") or {}  # transformers 5 keeps rope_theta in here
        if "rope_theta" not in t and isinstance(rope, dict) and isinstance(rope.get("rope_theta"), (int, float)):
            t["rope_theta"] = float(rope["rope_theta"])
            checked_fields(LlamaConfig, dict(rope_theta=t["rope_theta"]), "text_config",
                           dict(rope_theta="rope_parameters.rope_theta"))
        # BOS/EOS stay at LAVIS' `</s>`=2 (the HF Vicuna text configs carry LLaMA-1's 0/1; LAVIS trains and stops on 2)
        pad = tcfg.get("pad_token_id")
        t["pad_token_id"] = pad if type(pad) is int and 0 <= pad < t.get("vocab_size", 32001) else 0
        text = LlamaConfig(**t)
        if "num_key_value_heads" not in tcfg:
            text = replace(text, num_kv_heads=text.num_heads)
    elif family == "t5":
        t = checked_fields(T5Config, _pick(tcfg, _T5_KEYS, None), "text_config", _T5_KEYS)
        if not isinstance(tcfg.get("feed_forward_proj", ""), str):
            raise ConfigError(f"text_config.feed_forward_proj must be a string, got {tcfg['feed_forward_proj']!r}")
        t["dense_act_fn"], t["is_gated_act"] = _t5_activation(tcfg)
        # T5 defaults to a tied head; transformers 5.x writes tie_word_embeddings=true for every T5
        # and keeps the rescale decision in scale_decoder_outputs. Whether a separate
        # lm_head exists is settled by the checkpoint itself at load time (see untie_if_present).
        t.setdefault("tie_word_embeddings", True)
        if "scale_decoder_outputs" not in tcfg:
            t["scale_decoder_outputs"] = t["tie_word_embeddings"]
        text = T5Config(**t)
    else:
        t = checked_fields(OPTConfig, _pick(tcfg, _OPT_KEYS, None), "text_config", _OPT_KEYS)
        text = OPTConfig(**t)
        if "word_embed_proj_dim" not in tcfg:
            text = replace(text, word_embed_proj_dim=text.hidden_size)
    return text


_TOP_KEYS = dict(num_query_tokens="num_query_tokens", image_token_index="image_token_index")


def _section(cfg: dict, key: str, required: bool = True) -> dict:
    """A sub-config; an absent Q-Former one means the standard Q-Former (BERT-base sized)."""
    if key not in cfg:
        if not required:
            return {}
        raise ConfigError(f"the config has no {key} (every InstructBLIP / BLIP-2 config.json has one)")
    if not isinstance(cfg[key], dict):
        raise ConfigError(f"{key} must be a JSON object, got {cfg[key]!r}")
    return cfg[key]


def untie_if_present(config: ModelConfig, checkpoint_keys) -> ModelConfig:
    """A T5 checkpoint that carries its own `lm_head.weight` is untied, whatever its config says."""
    text = config.text
    if isinstance(text, T5Config) and text.tie_word_embeddings and "language_model.lm_head.weight" in checkpoint_keys:
        return replace(config, text=replace(text, tie_word_embeddings=False,
                                            scale_decoder_outputs=text.rescales_output))
    return config


# --------------------------------------------------------------------------- presets

_VIT_364 = VisionConfig(image_size=364)
_BLIP2_QFORMER = QFormerConfig(use_text_input=False)
_VICUNA_7B = LlamaConfig()
_VICUNA_13B = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)
_T5_XL = T5Config()
_T5_XXL = T5Config(d_model=4096, d_ff=10240, num_heads=64)
_OPT_27 = OPTConfig()
_OPT_67 = OPTConfig(hidden_size=4096, ffn_dim=16384, word_embed_proj_dim=4096)


def _preset(name, text, qformer=QFormerConfig(), vision=VisionConfig(), image_token=None):
    return ModelConfig(vision=vision, qformer=qformer, text=text, image_token_index=image_token, name=name)


PRESETS: dict[str, ModelConfig] = {
    "instructblip-vicuna-7b": _preset("instructblip-vicuna-7b", _VICUNA_7B),
    "instructblip-vicuna-7b-hub": _preset("instructblip-vicuna-7b-hub", replace(_VICUNA_7B, vocab_size=32064), image_token=32001),
    "instructblip-vicuna-13b": _preset("instructblip-vicuna-13b", _VICUNA_13B),
    "instructblip-vicuna-13b-hub": _preset("instructblip-vicuna-13b-hub", replace(_VICUNA_13B, vocab_size=32064), image_token=32001),
    "instructblip-flan-t5-xl": _preset("instructblip-flan-t5-xl", _T5_XL),
    "instructblip-flan-t5-xxl": _preset("instructblip-flan-t5-xxl", _T5_XXL),
    "blip2-opt-2.7b": _preset("blip2-opt-2.7b", _OPT_27, _BLIP2_QFORMER),
    "blip2-opt-6.7b": _preset("blip2-opt-6.7b", _OPT_67, _BLIP2_QFORMER),
    "blip2-opt-2.7b-coco": _preset("blip2-opt-2.7b-coco", _OPT_27, _BLIP2_QFORMER, _VIT_364),
    "blip2-opt-6.7b-coco": _preset("blip2-opt-6.7b-coco", _OPT_67, _BLIP2_QFORMER, _VIT_364),
    "blip2-flan-t5-xl": _preset("blip2-flan-t5-xl", _T5_XL, _BLIP2_QFORMER),
    "blip2-flan-t5-xl-coco": _preset("blip2-flan-t5-xl-coco", _T5_XL, _BLIP2_QFORMER, _VIT_364),
    "blip2-flan-t5-xxl": _preset("blip2-flan-t5-xxl", _T5_XXL, _BLIP2_QFORMER),
}

# The updated hub files (transformers >= 4.47) use `<image>` placeholders: OPT gained 32 rows
# (<image> = 50265), Flan-T5 reuses row 32100 of its 32128-row table.
for _name, _cfg in list(PRESETS.items()):
    if _cfg.family == "opt":
        PRESETS[_name + "-hub"] = replace(_cfg, name=_name + "-hub", image_token_index=50265,
                                          text=replace(_cfg.text, vocab_size=50304))
    elif _cfg.family == "t5":
        PRESETS[_name + "-hub"] = replace(_cfg, name=_name + "-hub", image_token_index=32100)

# Tiny shapes for tests: odd widths on purpose (not powers of two).
TINY_VISION = VisionConfig(hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                           patch_size=4, image_size=28)
TINY_QFORMER = QFormerConfig(hidden_size=40, num_layers=2, num_heads=4, intermediate_size=72,
                             encoder_hidden_size=48, vocab_size=99, max_position_embeddings=64)
TINY_LLAMA = LlamaConfig(vocab_size=131, hidden_size=56, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=4, max_position_embeddings=128, pad_token_id=0)
PRESETS["tiny-instructblip-vicuna"] = ModelConfig(TINY_VISION, TINY_QFORMER, TINY_LLAMA,
                                                  num_query_tokens=6, name="tiny-instructblip-vicuna")

# The bundled demo model's shapes (`jblip train --recipe demo`, trained from random init on the
# synthetic shapes of `train.synthetic`): 64 px images in 8 px patches, a word-level vocabulary.
DEMO_VOCAB = 40
DEMO_VISION = VisionConfig(hidden_size=96, intermediate_size=256, num_layers=4, num_heads=4,
                           patch_size=8, image_size=64)
DEMO_QFORMER = QFormerConfig(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256,
                             cross_attention_frequency=1, encoder_hidden_size=96, vocab_size=DEMO_VOCAB,
                             max_position_embeddings=32)
DEMO_LLAMA = LlamaConfig(vocab_size=DEMO_VOCAB, hidden_size=96, intermediate_size=256, num_layers=2,
                         num_heads=4, num_kv_heads=4, max_position_embeddings=64, pad_token_id=0)
PRESETS["demo-instructblip-vicuna"] = ModelConfig(DEMO_VISION, DEMO_QFORMER, DEMO_LLAMA, num_query_tokens=8,
                                                  name="demo-instructblip-vicuna")


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
