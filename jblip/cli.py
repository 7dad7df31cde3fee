"""`jblip` command line: one subcommand per module, each with `add_arguments(parser)` and `run(args)`."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": ("jblip.commands.generate", "answer a prompt about an image"),
    "caption": ("jblip.commands.caption", "caption a folder of images into a JSONL file"),
    "serve": ("jblip.commands.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "eval": ("jblip.commands.eval", "score a model on a benchmark (VQAv2, GQA, ..., COCO captions) with its paper protocol"),
    "index": ("jblip.commands.index", "embed a folder of images into a retrieval index (BLIP-2 ITC)"),
    "search": ("jblip.commands.search", "search an index by text, or rank captions for an image (ITC, ITM re-rank)"),
    "info": ("jblip.commands.info", "describe a checkpoint: family, sizes, parameters, memory"),
    "convert": ("jblip.convert.cli", "convert HF / PyTorch / LAVIS weights to a HF-format safetensors directory"),
    "train": ("jblip.train.cli", "fine-tune a model from a YAML/JSON config or a named recipe"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jblip", description="InstructBLIP and BLIP-2 in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # subcommand not available in this build
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, OSError) as e:  # user errors: one line, no traceback
        print(f"jblip {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
