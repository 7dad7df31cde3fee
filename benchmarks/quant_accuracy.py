"""Accuracy of weight-only int8 / int4 against float32 on the tiny HF-parity models.

    python benchmarks/quant_accuracy.py [--group-size 16] [--steps 32]

For each family (InstructBLIP-Vicuna, BLIP-2 OPT, InstructBLIP-T5: the tiny random
models of the parity tests) and each mode, the same inputs go through the float32
model and the quantised one: max |d| of the logits, the mean KL(fp32 || quantised) of
the next-token distributions over every position, and the agreement rate of `--steps`
greedy tokens (position by position). Prints one table row per case.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.hf_models import TINY_T5, NUM_QUERIES, IMAGE_TOKEN, tiny_blip2, tiny_instructblip  # noqa: E402

BUILDERS = {
    "instructblip-vicuna": lambda p: tiny_instructblip(p, seed=1),
    "blip2-opt": lambda p: tiny_blip2(p, seed=4),
    "instructblip-t5": lambda p: tiny_instructblip(p, seed=3, text=TINY_T5),
}


def inputs_for(model, batch: int = 2, prompt: int = 5, seed: int = 0) -> dict:
    """Random pixels and prompts in the placeholder layout (queries then text)."""
    rng = np.random.default_rng(seed)
    c = model.config
    size = c.vision.image_size
    ids = np.concatenate([np.full((batch, NUM_QUERIES), IMAGE_TOKEN),
                          rng.integers(3, c.text.vocab_size - 2, (batch, prompt))], axis=1)
    out = dict(pixel_values=rng.standard_normal((batch, size, size, 3)).astype(np.float32), input_ids=ids,
               attention_mask=np.ones_like(ids))
    if c.qformer.use_text_input:
        out["qformer_input_ids"] = rng.integers(1, c.qformer.vocab_size, (batch, 4))
    return out


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(reference, quantised, inputs: dict, steps: int) -> dict:
    """max |d| and mean KL of the logits, greedy agreement over `steps` tokens (none for 0)."""
    forward = dict(inputs)
    if reference.config.family == "t5":
        forward["decoder_input_ids"] = np.zeros((inputs["input_ids"].shape[0], 3), np.int32)
    a, b = (np.asarray(m.forward(**forward), np.float64) for m in (reference, quantised))
    la, lb = log_softmax(a), log_softmax(b)
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    out = dict(max_abs=float(np.abs(a - b).max()), kl=kl)
    if steps:
        greedy = dict(max_new_tokens=steps, min_new_tokens=steps)
        ta, tb = (np.asarray(m.generate(**inputs, **greedy).tokens) for m in (reference, quantised))
        out["agreement"] = float((ta == tb).mean())
    return out


def measure(group_size: int = 16, steps: int = 32, families=tuple(BUILDERS), modes=("int8", "int4")) -> list[dict]:
    import jblip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            path = os.path.join(tmp, family)
            BUILDERS[family](path)
            reference = jblip.load_pretrained(path)
            inputs = inputs_for(reference)
            for mode in modes:
                quantised = jblip.load_pretrained(path, quantize=mode, group_size=group_size)
                rows.append(dict(family=family, mode=mode, **compare(reference, quantised, inputs, steps)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    print(f"{'model':22} {'mode':5} {'max |d| logits':>15} {'KL':>10} {'greedy agree':>13}")
    for r in measure(args.group_size, args.steps):
        print(f"{r['family']:22} {r['mode']:5} {r['max_abs']:15.4g} {r['kl']:10.3g} {r['agreement']:13.3f}")


if __name__ == "__main__":
    main()
