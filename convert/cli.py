"""`jblip convert SRC DST`: any supported checkpoint -> a HF-format safetensors folder.

    jblip convert ./instructblip-vicuna-7b-bin ./out                  # HF folder (.bin or safetensors)
    jblip convert --lavis instruct_blip_vicuna7b_trimmed.pth --vit eva_vit_g.pth \\
                  --llm ./vicuna-7b-v1.1 --preset instructblip-vicuna-7b ./out
    jblip convert ./instructblip-vicuna-13b ./vicuna-13b-int8 --quantize int8   # quantise once
Tensors stream one at a time from the source files to the output shards, in
their stored dtype unless --dtype asks for a cast. With --quantize the output is an
already-quantised jblip checkpoint (`jblip.convert.quantized`; jblip loads it, transformers
does not), tokenizer files copied along.
"""
from __future__ import annotations

import os
import sys
import time

DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16"}


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="SRC DST: a HF checkpoint folder, .bin/.safetensors file or *.index.json, and the "
                             "output folder; with --lavis only DST")
    parser.add_argument("--lavis", metavar="MODEL.pth", help="LAVIS InstructBLIP / BLIP-2 checkpoint (.pth)")
    parser.add_argument("--vit", metavar="EVA.pth", help="with --lavis: EVA ViT weights (eva_vit_g.pth)")
    parser.add_argument("--llm", metavar="DIR", help="with --lavis: the language model as a HF folder")
    parser.add_argument("--preset", help="model config preset (needed for --lavis unless --config is given)")
    parser.add_argument("--config", help="a HF config.json (or folder with one) describing the model; "
                                         "default for SRC: its config.json")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                        help="dtype of floating tensors in the output (keep: as stored, bit-exact)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DST")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--quantize", choices=("int8", "int4"),
                        help="write an already-quantised jblip checkpoint (weight-only; from a HF folder)")
    parser.add_argument("--group-size", type=int, default=128, help="with --quantize int4: values per scale")
    parser.add_argument("--quantize-towers", default="llm", help="with --quantize: llm, vision or llm,vision")


class Progress:
    """One in-place line on stderr: tensors done/total and MB written."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled, self.stream, self.last = enabled, stream or sys.stderr, 0.0

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        now = time.monotonic()
        if not self.enabled or (done < total and now - self.last < 0.1):
            return
        self.last = now
        self.stream.write(f"\rconverting: {done}/{total} tensors, {nbytes / 1e6:.1f} MB")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _hf_source(src: str, args):
    """-> (config, source, rules) for a HF-layout checkpoint."""
    from jblip.convert.fuse import FuseQVBias
    from jblip.convert.hf import hf_rules
    from jblip.convert.readers import open_checkpoint
    from jblip.config import from_hf_config, preset, untie_if_present

    if args.config:
        config = from_hf_config(args.config)
    elif args.preset:
        config = preset(args.preset)
    else:
        folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"no config.json next to {src}; pass --config or --preset")
        config = from_hf_config(folder)
    source = FuseQVBias(open_checkpoint(src))
    config = untie_if_present(config, source.keys())
    return config, source, hf_rules(config)


WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt", ".index.json")


def run_quantize(args) -> int:
    """SRC (a HF folder) -> DST, an already-quantised jblip checkpoint plus SRC's tokenizer files."""
    import shutil

    from jblip.convert.quantized import save_quantized
    from jblip.pretrained import load_pretrained

    if args.lavis or len(args.paths) != 2 or not os.path.isdir(args.paths[0]):
        raise ValueError("--quantize converts a HF checkpoint folder: jblip convert SRC_DIR DST --quantize int8")
    src, dst = args.paths
    towers = tuple(t.strip() for t in args.quantize_towers.split(",") if t.strip())
    model = load_pretrained(src, "bfloat16" if args.dtype == "bfloat16" else "float32", quantize=args.quantize,
                            quantize_towers=towers, group_size=args.group_size)
    target = save_quantized(model, dst, overwrite=args.overwrite)
    for name in sorted(os.listdir(src)):  # tokenizers and the like, never weights or the config
        if name == "config.json" or name.endswith(WEIGHT_FILES):
            continue
        here, there = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(here):
            shutil.copytree(here, there, dirs_exist_ok=True)
        else:
            shutil.copy2(here, there)
    print(f"wrote {target}: {os.path.getsize(target) / 1e6:.1f} MB, {args.quantize} ({', '.join(towers)})")
    return 0


def run(args) -> int:
    if args.quantize:
        return run_quantize(args)
    from jblip.convert.export import LazyParams, export_hf
    from jblip.convert.lavis import LavisCheckpoint
    from jblip.model import abstract_params

    if args.lavis:
        if len(args.paths) != 1:
            raise ValueError(f"with --lavis give only DST (got {len(args.paths)} paths: {args.paths})")
        if not (args.config or args.preset):
            raise ValueError("--lavis needs the model's config: --preset NAME (e.g. instructblip-vicuna-7b) "
                             "or --config")
        source = LavisCheckpoint(args.lavis, args.vit, args.llm, args.config or args.preset)
        config, rules = source.config, source.rules
    else:
        if args.vit or args.llm:
            raise ValueError("--vit and --llm only apply together with --lavis MODEL.pth")
        if len(args.paths) != 2:
            raise ValueError(f"expected SRC DST (got {len(args.paths)} paths: {args.paths})")
        config, source, rules = _hf_source(args.paths[0], args)
    dtype = DTYPES[args.dtype]
    try:
        abstract = abstract_params(config)
        if isinstance(source, LavisCheckpoint):
            _, report = source.plan(abstract)
            print(report)
        summary = export_hf(config, args.paths[-1], params=LazyParams(source, rules, abstract, dtype),
                            max_shard_bytes=args.max_shard_size, dtype=dtype, overwrite=args.overwrite,
                            progress=Progress(not args.quiet))
    finally:
        source.close()
    print(summary)
    return 0
