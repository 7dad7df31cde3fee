"""Compile time of the ViT and the Q-Former forward passes against depth (narrow widths).

    python benchmarks/tower_compile.py [--vision 4,13,39] [--qformer 4,12,36] [--repeats 2]

Width 64 (4 heads, MLP 128) on a 224x224 image (257 tokens) and 32 queries with an
8-token instruction, so that the XLA compile, not the arithmetic, is what is timed.
Each depth runs in a fresh process (no in-process caches); the best of `repeats`
runs is printed, split into trace+lower and compile. With scanned layer stacks
both stay flat as depth grows; an unrolled layer loop grows linearly.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(tower: str, layers: int) -> dict:
    import time

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jblip.config import QFormerConfig, VisionConfig
    from jblip.qformer import QFormer
    from jblip.vision import VisionTransformer

    if tower == "vision":
        model = VisionTransformer(VisionConfig(hidden_size=64, intermediate_size=128, num_layers=layers,
                                               num_heads=4, patch_size=14, image_size=224))
        args = (jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),)
        kwargs = {}
    else:
        model = QFormer(QFormerConfig(hidden_size=64, num_layers=layers, num_heads=4, intermediate_size=128,
                                      encoder_hidden_size=64, vocab_size=30523), 32)
        args = (jax.ShapeDtypeStruct((1, 257, 64), jnp.float32), jax.ShapeDtypeStruct((1, 8), jnp.int32),
                jax.ShapeDtypeStruct((1, 8), jnp.int32))
        kwargs = dict(queries_only=True)
    params = jax.eval_shape(lambda *a: nn.unbox(model.init(jax.random.key(0), *a))["params"], *args)
    forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kwargs))
    start = time.perf_counter()
    lowered = forward.lower(params, *args)
    traced = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return dict(tower=tower, layers=layers, lower_s=traced - start, compile_s=done - traced)


def in_fresh_process(tower: str, layers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", tower, str(layers)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="4,13,39", help="ViT depths")
    parser.add_argument("--qformer", default="4,12,36", help="Q-Former depths")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("TOWER", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    for tower, depths in (("vision", args.vision), ("qformer", args.qformer)):
        rows = []
        for layers in (int(d) for d in depths.split(",") if d):
            runs = [in_fresh_process(tower, layers) for _ in range(args.repeats)]
            row = min(runs, key=lambda r: r["lower_s"] + r["compile_s"])
            rows.append(row)
            print(f"{tower:7} {layers:3} layers: trace+lower {row['lower_s']:6.2f} s, "
                  f"compile {row['compile_s']:6.2f} s", flush=True)
        if len(rows) > 1:
            first, last = (r["lower_s"] + r["compile_s"] for r in (rows[0], rows[-1]))
            print(f"{tower}: {rows[-1]['layers']} vs {rows[0]['layers']} layers: {last / first:.2f}x the time")


if __name__ == "__main__":
    main()
