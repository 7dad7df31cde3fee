"""The script to run when a GPU or TPU is lent: decode speed against the HBM floor, and training MFU.

    python benchmarks/accelerator.py [--small] [--new N] [--repeats N] [--steps N] [--all-llm-layers N]

An InstructBLIP-Vicuna-7B-shaped model (`instructblip-vicuna-7b` preset) with random bf16
weights drawn on the device (no checkpoint, nothing through host memory). Prints one
`key=value` line per measurement:

  device    platform, device kind, measured copy bandwidth (bytes read + written per
            second of a large elementwise pass, STREAM "copy" convention) and measured bf16
            matmul throughput.
  decode    greedy B=1 and B=8 through `VisionLanguageModel.generate` (exactly `--new`
            tokens per row). The time per decode step comes from two runs (`--new` and
            1 new tokens), so prefill and the image towers cancel out. Floor: the bytes a
            step must read (every LLM weight but the input-embedding table, of which one
            row per token is gathered, plus the KV cache at its final length) over the
            copy bandwidth. Compile time (first call minus a steady call) apart. The same
            again with the LLM's kernels weight-only int8 (`--quantize`, cases `_int8`):
            half the weight bytes per step, so up to ~2x on a memory-bound decode.
  train     one training step (`train.step.make_train_step`: forward, backward, AdamW) at
            batch 8, trainable sets `qformer` (InstructBLIP's recipe) and `all`. Model
            FLOPs, counted from the param counts (2 per param per token in a matmul pass;
            the ViT runs forward only where it is frozen, the LLM forward and backward to
            its activations where it is frozen, 3 passes where a tower trains; attention
            scores left out), over the step time and the peak (the device's nominal
            bf16 peak where known, else the measured matmul throughput). `all` keeps float32
            master weights and AdamW moments (16 bytes a param): a 7B model does not fit
            one device, so its LLM is cut to `--all-llm-layers` layers (said in the line).

`--small`: the tiny test preset, a few tokens, on whatever device is there (CPU in seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense bf16 peaks (FLOP/s) of the devices this is meant for, by `device_kind`.
NOMINAL_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
FULL = dict(preset="instructblip-vicuna-7b", new=128, repeats=3, steps=5, copy_bytes=1 << 31, matmul=8192,
            prompt=32, instruction=16, all_llm_layers=16)
SMALL = dict(preset="tiny-instructblip-vicuna", new=6, repeats=2, steps=2, copy_bytes=1 << 24, matmul=256,
             prompt=8, instruction=6, all_llm_layers=0)
TRAIN_BATCH = 8


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def line(kind: str, row: dict):
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
    print(f"{kind} {text}", flush=True)


# ----------------------------------------------------------------------------- device

def copy_bandwidth(nbytes: int) -> float:
    import jax
    import jax.numpy as jnp
    x = jnp.ones((nbytes // 4,), jnp.float32)
    touch = jax.jit(lambda x: x * 1.0001)
    jax.block_until_ready(touch(x))
    best = min(timed(lambda: jax.block_until_ready(touch(x)))[0] for _ in range(5))
    return 2 * nbytes / best


def matmul_flops(n: int) -> float:
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    best = min(timed(lambda: jax.block_until_ready(mm(a)))[0] for _ in range(5))
    return 2 * n ** 3 / best


def random_params(config, seed: int = 0, std: float = 0.02):
    """N(0, std) weights, unit norm scales, zero biases, drawn on the default device leaf by leaf
    (one small jitted draw per distinct shape; a model init would compile the whole model)."""
    import jax
    import jax.numpy as jnp
    from jblip.model import abstract_params
    from jblip.train.trainable import map_with_path
    draw = jax.jit(lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
                   static_argnums=(1, 2))
    keys = iter(jax.random.split(jax.random.key(seed), 10_000))

    def leaf(path: str, x):
        name = path.rsplit("/", 1)[-1]
        if name == "scale":
            return jnp.ones(x.shape, x.dtype)
        if name == "bias":
            return jnp.zeros(x.shape, x.dtype)
        return draw(next(keys), x.shape, x.dtype)
    return map_with_path(leaf, abstract_params(config))


# ----------------------------------------------------------------------------- decode

def decode_inputs(config, batch: int, prompt: int, instruction: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = config.vision.image_size
    vocab, q_vocab = config.text.vocab_size, config.qformer.vocab_size
    return dict(pixel_values=rng.standard_normal((batch, s, s, config.vision.num_channels)).astype(np.float32),
                input_ids=rng.integers(3, vocab - 1, (batch, prompt)).astype(np.int32),
                attention_mask=np.ones((batch, prompt), np.int32),
                qformer_input_ids=rng.integers(3, q_vocab - 1, (batch, instruction)).astype(np.int32),
                qformer_attention_mask=np.ones((batch, instruction), np.int32))


def decode_case(model, batch: int, shapes: dict, bandwidth: float) -> dict:
    import jax
    import jax.numpy as jnp
    from jblip.quantization import weight_bytes
    new, repeats = shapes["new"], shapes["repeats"]
    inputs = decode_inputs(model.config, batch, shapes["prompt"], shapes["instruction"])

    def runner(n):
        def run():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, eos_token_ids=(2,), pad_token_id=0)
            return jax.block_until_ready(out.tokens)
        return run
    run_n, run_1 = runner(new), runner(1)
    first_s, _ = timed(run_n)
    timed(run_1)
    times = {"n": [], "1": []}
    for _ in range(repeats):
        times["n"].append(timed(run_n)[0])
        times["1"].append(timed(run_1)[0])
    t_n, t_1 = statistics.median(times["n"]), statistics.median(times["1"])
    step = max(t_n - t_1, 1e-9) / (new - 1)

    text, llm = model.config.text, model.params["llm"]
    weights = weight_bytes(llm) - weight_bytes(llm["embed_tokens"])
    slots = model.config.num_query_tokens + shapes["prompt"] + new
    kv = 2 * text.num_layers * batch * slots * text.num_kv_heads * text.head_dim * jnp.dtype(text_dtype(model)).itemsize
    floor = (weights + kv) / bandwidth
    quantized = model.config.quantization
    return dict(case=f"greedy_b{batch}" + (f"_{quantized.mode}" if quantized else ""), tokens_s=batch / step, step_ms=1e3 * step, floor_ms=1e3 * floor,
                measured_over_floor=step / floor, weight_mb=weights / 1e6, kv_mb=kv / 1e6,
                compile_s=max(first_s - t_n, 0.0), new_tokens=new)


def text_dtype(model):
    return model.config.precision.text


# ----------------------------------------------------------------------------- train

def model_flops_per_step(config, params, trainable_set: str, batch: int, prompt: int, instruction: int) -> float:
    """Matmul FLOPs of one step from the towers' param counts (see the module doc)."""
    from jblip.train.trainable import count
    towers = {k: count(v) for k, v in params.items()}
    image_tokens = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    tokens = dict(vision=image_tokens, qformer=config.num_query_tokens + instruction,
                  projection=config.num_query_tokens, llm=config.num_query_tokens + prompt)
    # passes over each tower: forward 1; backward 2 (weights + activations) where it trains,
    # 1 (activations only) where a gradient passes through it frozen, 0 before the first trained tower
    if trainable_set == "all":
        passes = dict(vision=3, qformer=3, projection=3, llm=3)
    else:
        passes = dict(vision=1, qformer=3, projection=3, llm=2)
    return sum(2.0 * towers[k] * tokens[k] * batch * passes[k] for k in towers)


def train_case(config, trainable_set: str, shapes: dict, peak: float, llm_layers: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jblip.train import trainable as tr
    from jblip.train.build import training_precision
    from jblip.train.optim import OptimConfig, make_optimizer
    from jblip.train.state import TOWER_DTYPE, init_state
    from jblip.train.step import make_train_step
    config = config.with_precision(training_precision("bfloat16"))
    if llm_layers:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=llm_layers))
    params = random_params(config)
    trainable, frozen = tr.split(params, trainable_set)
    frozen = {name: tr.cast(sub, TOWER_DTYPE[name](config.precision)) for name, sub in frozen.items()}
    optim = OptimConfig(lr=1e-5, warmup_lr=1e-5, warmup_steps=0, total_steps=10 ** 6)
    tx = make_optimizer(optim)
    state = init_state(trainable, tx)
    del params, trainable
    step = make_train_step(config, tx, optim, prepend_queries=config.image_token_index is None)
    b, p, q = TRAIN_BATCH, shapes["prompt"] + 16, shapes["instruction"]
    inputs = decode_inputs(config, b, p, q, seed=1)
    labels = inputs["input_ids"].copy()
    labels[:, : p // 2] = -100  # loss on the answer half
    batch = {"pixel_values": inputs["pixel_values"], "input_ids": inputs["input_ids"],
             "attention_mask": inputs["attention_mask"], "labels": labels,
             "qformer_ids": inputs["qformer_input_ids"], "qformer_mask": inputs["qformer_attention_mask"]}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    holder = dict(state=state)

    def run():
        holder["state"], metrics = step(holder["state"], frozen, batch)
        return float(jax.block_until_ready(metrics["loss"]))
    first_s, _ = timed(run)
    times = [timed(run)[0] for _ in range(shapes["steps"])]
    dt = statistics.median(times)
    all_params = tr.merge(holder["state"].params, frozen)
    flops = model_flops_per_step(config, all_params, trainable_set, b, p, q)
    return dict(set=trainable_set, step_s=dt, tflops=flops / dt / 1e12, mfu=flops / dt / peak,
                compile_s=max(first_s - dt, 0.0), batch=b, llm_layers=config.text.num_layers,
                trainable_params=tr.count(holder["state"].params))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model, few tokens (CPU smoke test)")
    parser.add_argument("--new", type=int, help="new tokens per row")
    parser.add_argument("--repeats", type=int, help="timed decode calls per case (median)")
    parser.add_argument("--steps", type=int, help="timed train steps per set (median)")
    parser.add_argument("--all-llm-layers", type=int, help="LLM depth for the `all` train step (0: full)")
    parser.add_argument("--skip", default="", help="comma-separated: decode, train")
    parser.add_argument("--quantize", default="int8", help="decode cases also with these weight-only modes "
                                                           "(comma-separated: int8, int4; '' for none)")
    args = parser.parse_args(argv)
    shapes = dict(SMALL if args.small else FULL)
    for key in ("new", "repeats", "steps", "all_llm_layers"):
        if getattr(args, key) is not None:
            shapes[key] = getattr(args, key)
    if shapes["new"] < 2:
        parser.error("--new must be >= 2 (the step time is the difference of two runs)")

    import jax
    from jblip.config import preset
    from jblip.model import abstract_params
    from jblip.pretrained import VisionLanguageModel
    from jblip.quantization import Quantization, quantize_params
    device = jax.devices()[0]
    bandwidth = copy_bandwidth(shapes["copy_bytes"])
    measured_peak = matmul_flops(shapes["matmul"])
    nominal = NOMINAL_BF16_PEAK.get(device.device_kind)
    peak = nominal or measured_peak
    line("device", dict(platform=device.platform, kind=device.device_kind.replace(" ", "_"), jax=jax.__version__,
                        copy_bandwidth_gb_s=bandwidth / 1e9, matmul_bf16_tflops=measured_peak / 1e12,
                        peak_tflops=peak / 1e12, peak_from="nominal" if nominal else "measured"))

    base = preset(shapes["preset"])
    skip = set(filter(None, args.skip.split(",")))
    if "decode" not in skip:
        config = base.with_precision("bfloat16")
        params = random_params(config)
        model = VisionLanguageModel(config, params)
        for batch in (1, 8):
            line("decode", decode_case(model, batch, shapes, bandwidth))
        del model
        for mode in filter(None, args.quantize.split(",")):
            quantized = dataclasses.replace(config, quantization=Quantization(mode))
            model = VisionLanguageModel(quantized, quantize_params(params, abstract_params(quantized)))
            for batch in (1, 8):
                line("decode", decode_case(model, batch, shapes, bandwidth))
            del model
        del params
    if "train" not in skip:
        for trainable_set in ("qformer", "all"):
            layers = shapes["all_llm_layers"] if trainable_set == "all" else 0
            line("train", train_case(base, trainable_set, shapes, peak, layers))


if __name__ == "__main__":
    main()
