"""LAVIS checkpoint sets -> a jblip model, through the HF tables.

A LAVIS InstructBLIP / BLIP-2 model is spread over up to three sources:
  model  the trained `.pth` (state dict under "model"): Q-Former, query_tokens, ln_vision,
         llm_proj / t5_proj / opt_proj; full checkpoints may also hold the ViT or the LLM
  vit    EVA's `eva_vit_g.pth`: the ViT without the `visual_encoder.` prefix, 40 blocks
         of which LAVIS builds 39
  llm    the language model as a HF folder (LlamaForCausalLM / T5ForConditionalGeneration /
         OPTForCausalLM: `model.layers.*`, `shared.*`, ...)
Their keys are renamed to the HF InstructBLIP / BLIP-2 layout by the ordered
string rules that HF's own LAVIS conversion scripts apply (`LAVIS_RENAMES`),
q_bias/v_bias are fused into qkv.bias (`FuseQVBias`), and then `convert.hf.hf_rules`
converts them: there is no second param table.

Precedence, as in LAVIS itself (ViT and LLM built first, then the checkpoint loaded
over them): for a key present in several sources, model > llm > vit. Overrides are
listed in the report. LAVIS builds `ln_vision` (HF's `post_layernorm`) with eps 1e-5,
while the ViT blocks use 1e-6, so the config gets `vision.post_layernorm_eps = 1e-5`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from typing import Callable

from jblip.convert.combine import MergedSource, PadRows, RenamedSource
from jblip.convert.fuse import FuseQVBias
from jblip.convert.hf import hf_rules
from jblip.convert.readers import open_checkpoint
from jblip.convert.rules import ConversionError, convert_params, flatten, plan
from jblip.convert.tensor_source import SourceBase
from jblip.config import ModelConfig, from_hf_config, preset, untie_if_present

LAVIS_LN_VISION_EPS = 1e-5


def lavis_renames(instruct: bool) -> list[tuple[str, str]]:
    """(regex, replacement) pairs applied to every LAVIS key in this order (each with re.sub)."""
    ln = "qformer.embeddings.layernorm." if instruct else "qformer.layernorm."
    vit, hf = r"^visual_encoder\.blocks\.(\d+)\.", r"vision_model.encoder.layers.\1."
    return [
        (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
        (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
        (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
        (r"^ln_vision\.", "vision_model.post_layernorm."),
        (vit + r"norm([12])\.", hf + r"layer_norm\2."),
        (vit + r"attn\.proj\.", hf + "self_attn.projection."),
        (vit + r"attn\.", hf + "self_attn."),                 # qkv.weight, q_bias, v_bias
        (vit + r"mlp\.", hf + "mlp."),
        (r"^Qformer\.bert\.embeddings\.LayerNorm\.", ln),
        (r"^Qformer\.bert\.", "qformer."),
        (r"attention\.self\.", "attention.attention."),      # also crossattention.self.
        (r"^(llm|t5|opt)_proj\.", "language_projection."),
        (r"^(llm|t5|opt)_model\.", "language_model."),
    ]


def lavis_drops(config: ModelConfig) -> list[tuple[str, str]]:
    """(regex over the whole LAVIS key, reason): known tensors a generation model does not use."""
    drops = [
        (r"Qformer\.cls\..+", "Q-Former masked-LM head (pre-training only)"),
        (r".+\.position_ids", "buffer, recomputed"),
        (r".+\.rotary_emb\.inv_freq", "RoPE buffer, recomputed"),
        (r"(vision_proj|text_proj|itm_head)\..+|temp", "stage-1 contrastive/matching heads, unused for generation"),
    ]
    if not config.qformer.use_text_input:
        drops += [(r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight|"
                   r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..+",
                   "text embeddings / text FFN, removed from BLIP-2's Q-Former (LAVIS sets them to None)")]
    return drops


class LavisKeys:
    """LAVIS key -> (HF key, None) or (None, reason it is dropped)."""

    def __init__(self, config: ModelConfig):
        self.renames = [(re.compile(p), r) for p, r in lavis_renames(config.qformer.use_text_input)]
        self.drops = [(re.compile(p), why) for p, why in lavis_drops(config)]
        self.vit_layers = config.vision.num_layers

    def __call__(self, key: str) -> tuple[str | None, str | None]:
        for rx, why in self.drops:
            if rx.fullmatch(key):
                return None, why
        block = re.match(r"visual_encoder\.blocks\.(\d+)\.", key)
        if block and int(block.group(1)) >= self.vit_layers:
            return None, f"ViT block past the {self.vit_layers} LAVIS builds (EVA's last block is unused)"
        for rx, replacement in self.renames:
            key = rx.sub(replacement, key)
        return key, None


@dataclasses.dataclass
class LavisReport:
    files: dict[str, str]                          # label -> path
    used: dict[str, int]                           # label -> tensors converted from it
    dropped: dict[str, dict[str, str]]             # label -> {original key: reason}
    overridden: list[tuple[str, str, str]]         # (HF key, label that lost, label that won)
    padded: dict[str, tuple[int, int]]             # HF key -> (rows in the file, rows in the model)
    unused: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # label -> keys the table ignores

    def __str__(self):
        lines = ["LAVIS checkpoint set:"]
        for label, path in self.files.items():
            lines.append(f"  {label:5s} {path}: {self.used.get(label, 0)} tensors used, "
                         f"{len(self.dropped.get(label, {}))} dropped")
            for why, n in Counter(self.dropped.get(label, {}).values()).items():
                example = next(k for k, w in self.dropped[label].items() if w == why)
                lines.append(f"          dropped {n} x {why} (e.g. {example})")
            if self.unused.get(label):
                lines.append(f"          ignored {len(self.unused[label])} known-unused: {self.unused[label][:3]}")
        if self.overridden:
            lines.append(f"  {len(self.overridden)} tensors present in several files (later file wins, "
                         "model > llm > vit):")
            lines += [f"    {k}: {lost} overridden by {won}" for k, lost, won in self.overridden[:20]]
            lines += ["    ..."] if len(self.overridden) > 20 else []
        for key, (have, rows) in self.padded.items():
            lines.append(f"  {key}: {have} rows in the file padded to the model's {rows} "
                         "with the mean row (like resize_token_embeddings; e.g. Vicuna's added [PAD])")
        return "\n".join(lines)


def resolve_config(config: ModelConfig | str, ln_vision_eps: float = LAVIS_LN_VISION_EPS) -> ModelConfig:
    """A ModelConfig, a preset name, or a HF config.json / folder -> the config with LAVIS' ln_vision eps."""
    if isinstance(config, str):
        config = from_hf_config(config) if os.path.exists(config) else preset(config)
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, post_layernorm_eps=ln_vision_eps))


class LavisCheckpoint(SourceBase):
    """A LAVIS checkpoint set presented as one HF-layout TensorSource (nothing is read until asked).

    `.config` is the model config to convert into, `.rules` the HF table, and
    `.report(used_keys)` says where each tensor comes from.
    """

    def __init__(self, model_pth, vit_pth=None, llm_dir=None, config: ModelConfig | str = "instructblip-vicuna-7b",
                 ln_vision_eps: float = LAVIS_LN_VISION_EPS):
        config = resolve_config(config, ln_vision_eps)
        lavis_key = LavisKeys(config)
        sources = [("vit", vit_pth, lambda k: lavis_key("visual_encoder." + k)),
                   ("llm", llm_dir, lambda k: lavis_key("language_model." + k)),
                   ("model", model_pth, lavis_key)]  # later wins
        self.files, self._renamed = {}, []
        try:
            for label, path, rename in sources:
                if path is not None:
                    self.files[label] = os.fspath(path)
                    self._renamed.append((label, RenamedSource(open_checkpoint(path), rename)))
            self.merged = MergedSource(self._renamed)
            # LAVIS adds [PAD] to Vicuna's 32000 tokens (resize_token_embeddings), so the LLM folder has a row less
            vocab_keys = ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight"]
            self._padded = PadRows(self.merged, vocab_keys if config.family == "llama" else [],
                                   config.text.vocab_size)
            self.source = FuseQVBias(self._padded)
        except BaseException:
            self.close()
            raise
        self.config = untie_if_present(config, self.source.keys())
        self.rules = hf_rules(self.config)

    def keys(self):
        return self.source.keys()

    def shape(self, key):
        return self.source.shape(key)

    def dtype(self, key):
        return self.source.dtype(key)

    def read(self, key):
        return self.source.read(key)

    def close(self):
        for _, source in getattr(self, "_renamed", []):
            source.close()

    def origin(self, key: str) -> str:
        """Label of the file a (possibly fused) HF key is read from."""
        if key not in self.merged.origin and key.endswith(".qkv.bias"):
            key = key[: -len("qkv.bias")] + "q_bias"
        return self.merged.origin[key]

    def report(self, used_keys=(), unused_keys=()) -> LavisReport:
        unused: dict[str, list[str]] = {}
        for key in unused_keys:
            unused.setdefault(self.origin(key), []).append(key)
        return LavisReport(
            files=dict(self.files), used=dict(Counter(self.origin(k) for k in used_keys)),
            dropped={label: dict(s.dropped) for label, s in self._renamed if s.dropped},
            overridden=list(self.merged.overridden),
            padded={k: (have, self._padded.rows) for k, have in self._padded.padded.items()},
            unused=unused)

    def plan(self, abstract):
        """-> (assignment target -> (key, rule), report); one ConversionError naming every problem."""
        shapes = {k: self.shape(k) for k in self.keys()}
        try:
            assignment = plan(shapes, self.rules, flatten(abstract))
        except ConversionError as e:
            read = ", ".join(f"{label} {self.files[label]} ({len(s.keys())} tensors)" for label, s in self._renamed)
            hint = [f"files read: {read}"]
            if "vit" not in self.files:
                hint.append("vision weights usually come from EVA's eva_vit_g.pth (vit_pth / --vit)")
            if "llm" not in self.files:
                hint.append("language-model weights come from a HF folder (llm_dir / --llm)")
            raise ConversionError(f"{e}\n  " + "\n  ".join(hint)) from None
        used = {key for key, _ in assignment.values()}
        unused = [k for k in shapes if k not in used]
        return assignment, self.report(sorted(used), unused)


def load_lavis(model_pth, vit_pth=None, llm_dir=None, config: ModelConfig | str = "instructblip-vicuna-7b",
               precision="float32", ln_vision_eps: float = LAVIS_LN_VISION_EPS,
               progress: Callable[[int, int, str], None] | None = None):
    """Load a LAVIS checkpoint set into a `VisionLanguageModel`.

    config: a ModelConfig, a preset name (e.g. "instructblip-vicuna-7b", "blip2-opt-2.7b") or a HF
    config.json / folder. The model's `conversion_report` (a LavisReport, printable) lists what came
    from which file, what was dropped and what was padded. Missing or mis-shaped tensors raise one
    ConversionError naming all of them.
    """
    import jax.numpy as jnp

    from jblip.model import abstract_params
    from jblip.pretrained import VisionLanguageModel

    with LavisCheckpoint(model_pth, vit_pth, llm_dir, config, ln_vision_eps) as ckpt:
        config = ckpt.config.with_precision(precision)
        abstract = abstract_params(config)
        _, report = ckpt.plan(abstract)
        params = convert_params(ckpt, ckpt.rules, abstract, place=lambda _, x: jnp.asarray(x), progress=progress)
    model = VisionLanguageModel(config, params, os.fspath(model_pth))
    model.conversion_report = report
    return model
