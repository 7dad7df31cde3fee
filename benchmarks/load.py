"""Sharded loading: peak host memory and time to load a ~2 GB checkpoint onto 8 CPU devices.

    python benchmarks/load.py [--size-gb 2] [--shape llm|towers] [--dir /tmp/jblip_load_bench] [--mesh fsdp=8]
                              [--keep | --reuse]

1. Writes a random InstructBLIP-Vicuna checkpoint in the HF layout (config.json,
   model-0000k-of-0000n.safetensors shards, model.safetensors.index.json): a
   ViT-g width vision tower, a Q-Former, and a LLaMA (width 2048, vocab 32001)
   with as many layers as fill `--size-gb` in float32. `--shape llm` (default):
   1 ViT layer, 2 Q-Former layers, 6 LLaMA layers = 85% of the parameters, as in
   the released checkpoints (Vicuna-7B 85%, 13B 92%); `--shape towers`: 4 ViT
   layers and the full 12-layer Q-Former, 2 LLaMA layers = 45%. The writer holds
   one shard (<= 512 MB) at a time.
2. In a fresh process with 8 emulated CPU devices, `load_pretrained(dir, mesh=...)`
   and reports the peak resident memory (VmHWM, which includes the loaded
   params: on CPU, device memory is host memory) against the checkpoint size,
   as it is and less the process baseline (python, jax and jblip imported).

Peak memory is the loader process's VmHWM (its own high-water mark; the writer
and this driver run in other processes, so nothing of theirs is counted). It
runs twice: with the default rules (every weight split over fsdp) and with the
Q-Former replicated (`override_rules(qf_embed=None)`: on 8 CPU "devices" that
holds it 8 times, which shows why the default shards it).
The goal is peak RSS <= 1.3x the checkpoint size.

`--quantize int8` (or int4) replaces the replicated-Q-Former case by a load that quantises
the language model as it reads it (`--quantize-towers llm,vision` the ViT too,
`--precision bfloat16` keeps the float params in bf16); goal peak RSS <= 0.8x the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_BYTES = 512 * 2**20
VISION = dict(hidden_size=1408, intermediate_size=6144, num_attention_heads=16, patch_size=14, image_size=224,
              qkv_bias=True)
# (ViT layers, Q-Former layers) of each checkpoint shape; the LLaMA's layers fill --size-gb.
# "llm": ~86% of the parameters in the language model, as in the real checkpoints (Vicuna-7B: 85%,
# 13B: 92%); "towers": the earlier shape, 4 ViT-g layers and the full Q-Former (LLM 45%).
SHAPES = {"llm": (1, 2), "towers": (4, 12)}
LLAMA = dict(model_type="llama", vocab_size=32001, hidden_size=2048, intermediate_size=5504,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
             bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _hf_config(layers: int, shape: str):
    from transformers import InstructBlipConfig
    vit, qformer = SHAPES[shape]
    return InstructBlipConfig(vision_config=dict(VISION, num_hidden_layers=vit),
                              qformer_config=dict(encoder_hidden_size=1408, num_hidden_layers=qformer),
                              text_config=dict(LLAMA, num_hidden_layers=layers), num_query_tokens=32)


def _shapes(config) -> dict[str, tuple]:
    """HF state-dict keys and shapes, from a model built on the meta device (no memory)."""
    import torch
    from transformers import InstructBlipForConditionalGeneration
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_checkpoint(path: str, size_gb: float, kind: str = "llm") -> int:
    """Random float32 weights in the HF sharded safetensors layout; returns the bytes written."""
    import numpy as np

    fixed = sum(int(np.prod(s)) for s in _shapes(_hf_config(0, kind)).values())
    d, f = LLAMA["hidden_size"], LLAMA["intermediate_size"]
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    layers = max(1, round((size_gb * 2**30 / 4 - fixed) / per_layer))
    total, shapes = write_random(path, _hf_config(layers, kind))
    params = sum(int(np.prod(s)) for s in shapes.values())
    llm = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("language_model."))
    print(f"wrote {total / 2**30:.2f} GiB: {params / 1e6:.0f}M params, "
          f"LLaMA {layers} layers = {llm / params:.0%} of them ({kind!r} shape)", flush=True)
    return total


def write_random(path: str, config, shard_bytes: int = SHARD_BYTES) -> tuple[int, dict]:
    """The checkpoint of HF `config` with random float32 weights (no model is built: shapes from
    the meta device), in safetensors shards of <= `shard_bytes`, one shard in memory at a time.
    Returns (bytes written, {key: shape})."""
    import numpy as np
    from safetensors.numpy import save_file

    shapes = _shapes(config)
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    groups, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    groups.append(current)

    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (rng.standard_normal(shapes[k], dtype=np.float32) * 0.02) for k in keys}
        save_file(tensors, os.path.join(path, name))
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
    return total, shapes


def _rss_gib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if line.startswith(("VmRSS", "VmHWM")))
    return tuple(int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))


def load_and_measure(path: str, spec: str, replicate_qformer: bool, quantize=None, towers="llm",
                     precision="float32"):
    """Runs in the fresh subprocess: import, load onto the mesh, print one JSON line."""
    import jax
    import jblip
    from jblip import sharding
    from jblip.quantization import dtype_bits
    rules = sharding.override_rules(qf_embed=None) if replicate_qformer else None
    mesh = sharding.make_mesh(spec)
    _, base_peak = _rss_gib()  # the process baseline: python, jax (its CPU backend started) and jblip
    start = time.perf_counter()
    model = jblip.load_pretrained(path, precision, mesh=mesh, rules=rules, quantize=quantize,
                                  quantize_towers=tuple(towers.split(",")))
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    current, peak = _rss_gib()
    held = sum(s.data.size * dtype_bits(s.data.dtype) // 8  # int4: half a byte
               for x in jax.tree_util.tree_leaves(model.params) for s in x.addressable_shards)
    print(json.dumps(dict(load_s=seconds, peak_rss_gib=peak, rss_after_gib=current, rss_before_load_gib=base_peak,
                          device_bytes_gib=held / 2**30,
                          ru_maxrss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))


def _child(*flags, env=None) -> str:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], env=env, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode:
        sys.exit(f"{flags[0]} failed:\n{out.stderr[-4000:]}")
    *notes, last = out.stdout.strip().splitlines()
    for line in notes:
        print(line, flush=True)
    return last


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="llm",
                        help="llm: LM-dominated like the real checkpoints; towers: the earlier ViT/Q-Former-heavy one")
    parser.add_argument("--dir", default="/tmp/jblip_load_bench")
    parser.add_argument("--mesh", default="fsdp=8")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--reuse", action="store_true", help="load the checkpoint already in --dir (kept)")
    parser.add_argument("--_load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_replicate_qformer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", choices=("int8", "int4"), help="also load with weight-only quantisation")
    parser.add_argument("--quantize-towers", default="llm")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="with --quantize: the float params' dtype")
    args = parser.parse_args()
    if args._load:
        return load_and_measure(args.dir, args.mesh, args._replicate_qformer, args.quantize, args.quantize_towers,
                                args.precision)
    if args._write:
        return print(write_checkpoint(args.dir, args.size_gb, args.shape))

    try:
        if args.reuse:
            with open(os.path.join(args.dir, "model.safetensors.index.json")) as fh:
                ckpt = json.load(fh)["metadata"]["total_size"] / 2**30
        else:
            ckpt = int(_child("--_write", "--dir", args.dir, "--size-gb", str(args.size_gb), "--shape", args.shape)) / 2**30
        print(f"checkpoint {ckpt:.2f} GiB (float32) in {args.dir}", flush=True)
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        quantized = ["--quantize", args.quantize, "--quantize-towers", args.quantize_towers,
                     "--precision", args.precision] if args.quantize else None
        for case in ([], ["--_replicate_qformer"]) if quantized is None else ([], quantized):
            flags = ["--_load", "--dir", args.dir, "--mesh", args.mesh, *case]
            r = json.loads(_child(*flags, env=env))
            label = ("qformer replicated" if case else "default rules     ") if quantized is None else (
                f"{args.quantize} ({args.quantize_towers}, {args.precision})" if case else "float32           ")
            goal = 0.8 if case and quantized else 1.3
            base = r["rss_before_load_gib"]
            print(f"load {label} mesh={args.mesh} checkpoint={ckpt:.2f}GiB peak_rss={r['peak_rss_gib']:.2f}GiB "
                  f"ratio={r['peak_rss_gib'] / ckpt:.2f} (goal <= {goal}; "
                  f"{(r['peak_rss_gib'] - base) / ckpt:.2f} above the {base:.2f}GiB process baseline) "
                  f"load_s={r['load_s']:.1f} params_on_devices={r['device_bytes_gib']:.2f}GiB "
                  f"rss_after={r['rss_after_gib']:.2f}GiB", flush=True)
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
