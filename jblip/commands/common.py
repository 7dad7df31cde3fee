"""Arguments shared by the `generate` and `caption` commands: model, precision, decoding."""
from __future__ import annotations

import argparse
import os

from jblip.processing import DEFAULT_MAX_LENGTH
from jblip.sampling import PRESETS


def add_model_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default=None, metavar="PATH_OR_HUB_ID",
                        help="HF-format checkpoint directory or hub id (default: the bundled demo model)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="float32 everywhere, or bfloat16 for the ViT and the language model "
                             "with the Q-Former kept in float32 (default: float32)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="weight-only quantisation of the language model's kernels as they load "
                             "(int4: groups of 128 along the contracted axis)")


def add_decoding_arguments(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("decoding")
    g.add_argument("--preset", choices=sorted(PRESETS), default="greedy",
                   help="starting settings: greedy, or LAVIS' InstructBLIP defaults "
                        "(5 beams, up to 256 new tokens, repetition penalty 1.5)")
    g.add_argument("--max-new-tokens", type=int, help="most tokens to generate (greedy preset: 30)")
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--beams", type=int, dest="num_beams", help="beam search with this many beams")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--seed", type=int, default=0, help="random seed for --sample")
    g.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help=f"longest prompt in tokens (default {DEFAULT_MAX_LENGTH}, as LAVIS); "
                        "longer ones keep their end")
    g.add_argument("--no-truncation", action="store_true",
                   help="reject prompts longer than --max-length instead of cutting them")


def decoding_options(args) -> dict:
    """Keyword arguments for `jblip.pipeline.answer`."""
    options = dict(preset=args.preset, seed=args.seed, max_length=args.max_length, truncation=not args.no_truncation)
    for name in ("max_new_tokens", "min_new_tokens", "num_beams", "top_p", "top_k", "temperature",
                 "repetition_penalty", "length_penalty"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.sample:
        if (args.num_beams or 1) > 1:
            raise ValueError("--sample and --beams cannot be combined (beam sampling is not supported)")
        options["do_sample"] = True
    return options


def planned_new_tokens(options: dict) -> int:
    """The max_new_tokens that `decoding_options` will decode with (the preset's unless given)."""
    return options.get("max_new_tokens", PRESETS[options.get("preset") or "greedy"].max_new_tokens)


def checkpoint_path(args) -> str:
    """Local directory of --model (the demo model when absent; a hub id is downloaded)."""
    from jblip.pipeline import resolve_model
    from jblip.pretrained import resolve_path
    return resolve_path(resolve_model(args.model))


def enable_compilation_cache():
    """Keep compiled XLA programs on disk, so the next run of a command with the same model and
    shapes skips compilation (seconds for tiny models, minutes for large ones). The folder is
    $JBLIP_CACHE_DIR (default ~/.cache/jblip/xla); JBLIP_CACHE_DIR="" turns this off."""
    import jax
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.environ.get("JBLIP_CACHE_DIR", os.path.join(base, "jblip", "xla"))
    if folder and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", folder)


def quantize_option(args) -> str | None:
    """--quantize, or None for a command that has no such option."""
    return getattr(args, "quantize", None)


def load_model(path: str, args, processor=None, mesh=None):
    """The weights at `path`, at --precision (and --quantize), on `mesh` (None: one device);
    `processor` (already built) is kept with the model."""
    from jblip.pretrained import load_pretrained
    enable_compilation_cache()
    model = load_pretrained(path, precision=args.precision, mesh=mesh, quantize=quantize_option(args))
    if processor is not None:
        model._jblip_processor = processor
    return model
