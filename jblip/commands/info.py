"""`jblip info --model M`: family, tower sizes, parameter count and weight memory, without loading weights.

Parameter shapes come from `jax.eval_shape` of the model built from config.json
(no weights are read; only the checkpoint's tensor names, to tell a tied Flan-T5
head from an untied one). --model may also name a preset (see `jblip.config.PRESETS`).
"""
from __future__ import annotations

import os

from jblip import families

TOWERS = (("vision", "vision"), ("qformer", "Q-Former"), ("projection", "projection"), ("llm", "language model"))


def add_arguments(parser):
    parser.add_argument("--model", default=None, metavar="PATH_OR_HUB_ID_OR_PRESET",
                        help="checkpoint directory, hub id or preset name (default: the bundled demo model)")


def _config(model: str | None):
    from jblip.config import PRESETS, from_hf_config, untie_if_present
    from jblip.pipeline import resolve_model

    if model in PRESETS:
        return PRESETS[model], f"preset {model}"
    path = resolve_model(model)
    if not os.path.isdir(path):
        path = _hub_config_dir(path)  # only a hub id gets there; local paths are refused
    config = from_hf_config(path, name=os.path.basename(os.path.normpath(path)))
    try:
        from jblip.convert.readers import CheckpointError, open_checkpoint
        with open_checkpoint(path) as source:
            config = untie_if_present(config, source.keys())
    except (CheckpointError, OSError):
        pass  # config only (no weights next to it): counts assume the config's tying
    return config, path


def _hub_config_dir(model_id: str) -> str:
    from jblip.pretrained import _local_problem, is_hub_id
    if os.path.isfile(model_id):
        raise FileNotFoundError(f"{model_id} is a file; --model wants a checkpoint directory, hub id or preset name")
    if not is_hub_id(model_id):
        raise FileNotFoundError(f"{_local_problem(model_id)} (and not a preset name)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError(f"{model_id!r} is not a local path; to read it from the HF hub install "
                                "huggingface_hub (pip install 'jblip[hub]')") from None
    return os.path.dirname(hf_hub_download(model_id, "config.json"))


def describe(config) -> list[tuple[str, str]]:
    v, q, t = config.vision, config.qformer, config.text
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    if families.family(config).encoder_decoder:
        lm = (f"flan-t5: {t.num_layers}+{t.num_decoder_layers} layers, width {t.d_model}, {t.num_heads} heads, "
              f"ffn {t.d_ff}, vocab {t.vocab_size}")
    else:
        lm = (f"{config.family}: {t.num_layers} layers, width {t.hidden_size}, {t.num_heads} heads, "
              f"vocab {t.vocab_size}, context {t.max_position_embeddings}")
    return [
        ("vision", f"EVA ViT: {v.num_layers} layers, width {v.hidden_size}, {v.num_heads} heads, "
                   f"patch {v.patch_size}, image {v.image_size}x{v.image_size} -> {tokens} tokens"),
        ("Q-Former", f"{q.num_layers} layers, width {q.hidden_size}, {q.num_heads} heads, "
                     f"{config.num_query_tokens} queries, "
                     f"reads the instruction: {'yes' if q.use_text_input else 'no'}"),
        ("projection", f"{q.hidden_size} -> {t.hidden_size}"),
        ("language model", lm),
    ]


def _size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1000


def run(args) -> int:
    from jblip.model import abstract_params, count_params
    from jblip.quantization import memory_by_dtype, weight_bytes

    config, where = _config(args.model)
    params = abstract_params(config)  # jax.eval_shape: shapes only, nothing allocated
    counts = {key: count_params(params.get(key, {})) for key, _ in TOWERS}
    total = count_params(params)
    token = "<video>" if config.video else "<image>"  # InstructBLIP-Video: T * Q `<video>` placeholders
    layout = f"{token} placeholders" if config.image_token_index is not None else "queries prepended (legacy)"
    rows = [("model", f"{config.name} ({where})"), ("type", f"{config.model_type}, {layout}"),
            ("family", config.family)]
    for (key, _), (label, text) in zip(TOWERS, describe(config)):
        rows.append((label, f"{text}; {counts[key]:,} parameters"))
    rows.append(("parameters", f"{total:,}"))
    memory = memory_by_dtype(config)
    rows.append(("memory", ", ".join(f"{name} {_size(n)}" for name, n in memory.items())
                 + " (weights only; int8/int4: the language model's kernels, the rest bfloat16)"))
    if config.quantization is not None:
        q = config.quantization
        rows.append(("quantised", f"{q.mode} ({', '.join(q.towers)}; int4 groups of {q.group_size}): "
                                  f"{_size(weight_bytes(params))} as stored"))
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  {text}")
    return 0
