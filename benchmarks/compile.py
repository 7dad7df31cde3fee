"""Compile time of the decode program against model depth (narrow widths, random weights).

    python benchmarks/compile.py [--depths 0.25,0.5,1] [--new 8] [--layer-loops scan,unrolled] [--json out.json]

Builds InstructBLIP-Vicuna-shaped models at a fraction of the released depths
(ViT 39, Q-Former 12, LLaMA 32 layers at 1.0) with narrow widths (64), so that
compilation, not arithmetic, is what the first call costs; then times the first
sampling `generate` call (trace + compile + one run), a second identical call, and a third
with a new temperature and max_new_tokens (a recompile when sampler knobs are static).
A program whose layer stacks are scanned compiles in time independent of depth. Each
`--layer-loops` entry (`jblip.scan.LAYER_LOOPS`) times the decode loop walking the LLM that
way: "scan" is what accelerators compile, "unrolled" (per-layer weight buffers) what CPU
programs compile by default, so its decode loop grows with the LLM's depth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL_DEPTH = dict(vision=39, qformer=12, llm=32)


def narrow_config(depth: float):
    from jblip.config import LlamaConfig, ModelConfig, QFormerConfig, VisionConfig
    layers = {k: max(1, round(v * depth)) for k, v in FULL_DEPTH.items()}
    layers["qformer"] += layers["qformer"] % 2  # cross-attention every 2nd layer: whole groups
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_layers=layers["vision"], num_heads=4,
                          patch_size=14, image_size=224)
    qformer = QFormerConfig(hidden_size=64, num_layers=layers["qformer"], num_heads=4, intermediate_size=128,
                            encoder_hidden_size=64, vocab_size=30523)
    llm = LlamaConfig(vocab_size=32001, hidden_size=64, intermediate_size=128, num_layers=layers["llm"],
                      num_heads=4, num_kv_heads=4, max_position_embeddings=512, pad_token_id=0)
    return ModelConfig(vision, qformer, llm, num_query_tokens=32, name=f"narrow-depth-{depth}"), layers


def measure(depth: float, new_tokens: int, layer_loop: str) -> dict:
    import jax

    from jblip.model import init_params
    from jblip.pretrained import VisionLanguageModel
    config, layers = narrow_config(depth)
    model = VisionLanguageModel(config, init_params(config), layer_loop=layer_loop)
    r = np.random.default_rng(0)
    pixels = r.standard_normal((1, 224, 224, 3)).astype(np.float32)
    ids = np.concatenate([np.full((1, 32), 32000), r.integers(3, 1000, (1, 8))], axis=1).astype(np.int32)
    qids = r.integers(3, 1000, (1, 8)).astype(np.int32)
    options = dict(strategy="sample", temperature=0.8, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def call(**extra):
        start = time.perf_counter()
        out = model.generate(pixels, ids, np.ones_like(ids), qids, np.ones_like(qids), **{**options, **extra})
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - start

    first = call()
    again = call()
    knob = call(temperature=0.7, max_new_tokens=new_tokens - 1, min_new_tokens=new_tokens - 1)
    return dict(depth=depth, layer_loop=layer_loop, layers=layers, first_call_s=first, cached_call_s=again, new_knobs_call_s=knob)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="0.25,0.5,1")
    parser.add_argument("--new", type=int, default=8, help="new tokens per call")
    parser.add_argument("--layer-loops", default="scan,unrolled", help="decode layer loops to time")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    for loop in args.layer_loops.split(","):
        for depth in (float(d) for d in args.depths.split(",")):
            rows.append(measure(depth, args.new, loop))
            print_row(rows[-1])
        loop_rows = [r for r in rows if r["layer_loop"] == loop]
        if len(loop_rows) > 1:
            growth = loop_rows[-1]["first_call_s"] / loop_rows[0]["first_call_s"]
            print(f"{loop}: first-call growth from depth {loop_rows[0]['depth']} to {loop_rows[-1]['depth']}: "
                  f"{growth:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def print_row(row: dict):
    depth, l = row["depth"], row["layers"]
    print(f"{row['layer_loop']:8} depth {depth:4}: ViT {l['vision']:2} / Q-Former {l['qformer']:2} / LLaMA {l['llm']:2} layers: "
              f"first call {row['first_call_s']:6.1f} s, cached {row['cached_call_s']:5.2f} s, "
              f"new temperature + max_new_tokens {row['new_knobs_call_s']:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
