"""Training speed: one InstructBLIP instruction-tuning step, jblip against HF PyTorch.

    python benchmarks/train.py [--quick] [--threads N] [--steps N] [--json results.json]

Builds an InstructBLIP-Vicuna-shaped model with random weights (same shapes as
benchmarks/generate.py: 224 px ViT 6 x 384, 32 queries, Q-Former 4 x 384, LLaMA
8 x 512, vocab 32001, the `<image>` placeholder layout), saves it with
`save_pretrained` and loads it in jblip. Both train the InstructBLIP set
(Q-Former + query tokens + ln_vision + projection; ViT and LLM frozen) in
float32 with AdamW(0.9, 0.999, wd 0.05 off biases/norms), global-norm
clipping at 1.0, on the same batch of 8 (instruction + answer, loss on the
answer tokens only). One step = forward, backward, clip, AdamW update.
HF: `requires_grad=False` on frozen params, `loss.backward()`,
`clip_grad_norm_`, `torch.optim.AdamW.step()`, `zero_grad(set_to_none=True)`, in eval mode
(jblip has no dropout; the HF Q-Former config defaults to 0.1).
jblip: the jitted `train.step.make_train_step` on one device (donated state).
First calls are warm-up (jblip's includes compilation, reported apart); then
the median of `--steps` steps, the two libraries interleaved in rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.generate import FULL, QUICK, VOCAB, build_hf_model  # noqa: E402

BATCH = 8
LR, WD, CLIP = 1e-5, 0.05, 1.0


def make_batch(config, layout, image_size: int, seed: int = 0):
    """Instructions of 12..20 tokens, answers of 3..8 (+ EOS), through jblip's label builder."""
    from jblip.train.labels import collate, encode_example
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(BATCH):
        instruction = rng.integers(3, VOCAB - 2, rng.integers(12, 21)).tolist()
        answer = rng.integers(3, VOCAB - 2, rng.integers(3, 9)).tolist()
        q_instruction = rng.integers(1000, config.qformer.vocab_size, len(instruction)).tolist()
        examples.append(encode_example(instruction, answer, layout, q_instruction))
    batch = collate(examples, layout)
    batch["pixel_values"] = rng.standard_normal((BATCH, image_size, image_size, 3)).astype(np.float32)
    return batch


def hf_step_fn(model, batch):
    import torch
    from jblip.train.trainable import QFORMER_SET
    hf_prefixes = ("qformer.", "query_tokens", "vision_model.post_layernorm.", "language_projection.")
    assert len(hf_prefixes) == len(QFORMER_SET) + 1  # query tokens live under qformer/ in jblip
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(hf_prefixes))
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=WD), dict(params=no_decay, weight_decay=0.0)],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)
    model.eval()  # no dropout (the Q-Former config defaults to 0.1): the same computation as jblip's
    t = lambda k: torch.tensor(batch[k]).long()
    inputs = dict(pixel_values=torch.tensor(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous(),
                  input_ids=t("input_ids"), attention_mask=t("attention_mask"), labels=t("labels"),
                  qformer_input_ids=t("qformer_ids"), qformer_attention_mask=t("qformer_mask"))

    def step():
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, sum(p.numel() for p in decay + no_decay)


def jblip_step_fn(model, batch):
    import jax
    from jblip.train import trainable as tr
    from jblip.train.optim import OptimConfig, make_optimizer
    from jblip.train.state import init_state
    from jblip.train.step import make_train_step
    optim = OptimConfig(lr=LR, warmup_lr=LR, warmup_steps=0, total_steps=10**6, weight_decay=WD, clip_norm=CLIP)
    tx = make_optimizer(optim)
    trainable, frozen = tr.split(model.params, "qformer")
    holder = dict(state=init_state(jax.tree_util.tree_map(lambda x: x.copy(), trainable), tx))
    step = make_train_step(model.config, tx, optim, prepend_queries=False)
    inputs = {k: jax.device_put(v) for k, v in batch.items()}

    def run():
        holder["state"], metrics = step(holder["state"], frozen, inputs)
        return float(jax.block_until_ready(metrics["loss"]))
    return run, tr.count(trainable)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per library (median reported)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU cores for both libraries (process affinity + torch threads); default: all")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else FULL

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    import jax
    import torch
    import jblip
    from jblip.model import count_params
    from jblip.train.labels import TextLayout
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as path:
        hf = build_hf_model(path, shapes)
        model = jblip.load_pretrained(path, precision="float32")
    layout = TextLayout.for_model(model.config, bos=1, eos=2, pad=0)
    batch = make_batch(model.config, layout, shapes["vision"]["image_size"])
    ours, n_trainable = jblip_step_fn(model, batch)
    ref, n_ref = hf_step_fn(hf, batch)
    assert n_trainable == n_ref, (n_trainable, n_ref)

    compile_s, ours_loss = timed(ours)   # compiles
    _, ref_loss = timed(ref)             # warm-up
    header = dict(params=count_params(model.params), trainable=n_trainable, batch=BATCH,
                  seq=batch["input_ids"].shape[1], threads=args.threads, jax=jax.__version__,
                  torch=torch.__version__, backend=jax.default_backend(),
                  first_loss_jblip=ours_loss, first_loss_hf=ref_loss)
    print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in header.items()), flush=True)

    times = {"jblip": [], "hf": []}
    losses = {"jblip": [], "hf": []}
    for r in range(args.steps):
        for name, fn in ((("jblip", ours), ("hf", ref)) if r % 2 == 0 else (("hf", ref), ("jblip", ours))):
            dt, loss = timed(fn)
            times[name].append(dt)
            losses[name].append(loss)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = dict(jblip_steps_s=1 / med["jblip"], hf_steps_s=1 / med["hf"], ratio=med["hf"] / med["jblip"],
               jblip_step_s=med["jblip"], hf_step_s=med["hf"], jblip_compile_s=max(compile_s - med["jblip"], 0.0),
               max_loss_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(losses["jblip"], losses["hf"])))
    print(" ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header, **row, times=times, losses=losses), f, indent=2)
    return row


if __name__ == "__main__":
    main()
