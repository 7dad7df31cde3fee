"""Decoding speed: jblip against HF `generate` on the same random InstructBLIP-Vicuna model.

    python benchmarks/generate.py [--quick] [--threads N] [--json results.json]

Builds a ~100M-parameter InstructBLIP-Vicuna-shaped model with random weights
(224 px ViT, 32 queries, Q-Former, LLaMA 8 layers x 512, vocab 32001, the
`<image>` placeholder layout), saves it with `save_pretrained`, loads it in
jblip (fp32) and keeps the PyTorch model (fp32, eval). Both get the same inputs
and exactly `--new` new tokens (min_new_tokens = max_new_tokens, so EOS never
stops a row). Per case: warm-up (jblip's first call includes compilation,
reported separately), then the median of `--repeats` calls, jblip and HF
interleaved so that machine noise hits both alike.

`--threads N` pins the process to N cores (both libraries; default all). On a
shared machine use fewer threads than idle cores: PyTorch's OpenMP barriers
stall badly when a thread is preempted (measured here: HF's per-step time grew
5-8x from 1 to 2 threads on 2 busy cores), which flatters jblip.

Batch 1 also gets a roofline: a decode step must read every LLM weight it
uses (all but the input-embedding table, of which one row is gathered) plus
the KV cache; that many bytes over the measured memory copy bandwidth is the
floor per token. The measured time per decode step comes from two runs
(N and 1 new tokens), so prefill and the image towers cancel out.
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

VOCAB = 32001
IMAGE_TOKEN = 32000   # the last row, as in the hub files that use the placeholder layout
EOS, PAD, BOS = 2, 0, 1
NUM_QUERIES = 32

FULL = dict(
    vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                patch_size=14, image_size=224, layer_norm_eps=1e-6, qkv_bias=True),
    qformer=dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
                 encoder_hidden_size=384, cross_attention_frequency=2, max_position_embeddings=512),
    text=dict(model_type="llama", vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, rms_norm_eps=1e-6,
              bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False),
    new_tokens=64, repeats=3, copy_bytes=1 << 30,
)
# Smoke test: same code paths, tiny shapes.
QUICK = dict(
    vision=dict(FULL["vision"], hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=56),
    qformer=dict(FULL["qformer"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 encoder_hidden_size=64),
    text=dict(FULL["text"], hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4),
    new_tokens=8, repeats=2, copy_bytes=1 << 26,
)
CASES = (  # name, batch, decoding options shared by both libraries
    ("greedy_b1", 1, dict(num_beams=1)),
    ("greedy_b2", 2, dict(num_beams=1)),
    ("greedy_b8", 8, dict(num_beams=1)),
    ("beam5_b1", 1, dict(num_beams=5)),
)


# ----------------------------------------------------------------------------- model and inputs

def hf_config(quick: bool = False) -> dict:
    """The benchmark model's HF config.json content (what `build_hf_model` saves, defaults aside)."""
    shapes = QUICK if quick else FULL
    return dict(model_type="instructblip", vision_config=shapes["vision"], qformer_config=shapes["qformer"],
                text_config=shapes["text"], num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN)


def build_hf_model(path: str, shapes: dict, seed: int = 0):
    import torch
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration
    torch.manual_seed(seed)
    config = InstructBlipConfig(vision_config=shapes["vision"], qformer_config=shapes["qformer"],
                                text_config=shapes["text"], num_query_tokens=NUM_QUERIES,
                                image_token_index=IMAGE_TOKEN)
    model = InstructBlipForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return model


def make_inputs(batch: int, image_size: int, qformer_vocab: int, seed: int = 0):
    """[<image>*32 | pad... | bos | prompt] ids of 12..20 text tokens, left padded; Q-Former instructions."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 21, size=batch)
    width = int(lengths.max()) + 1
    ids, mask, q_ids, q_mask = [], [], [], []
    for n in lengths:
        body = [BOS] + rng.integers(3, VOCAB - 1, size=n).tolist()
        pad = width - len(body)
        ids.append([IMAGE_TOKEN] * NUM_QUERIES + [PAD] * pad + body)
        mask.append([1] * NUM_QUERIES + [0] * pad + [1] * len(body))
        q_body = [101] + rng.integers(1000, qformer_vocab, size=n).tolist() + [102]
        q_pad = width + 1 - len(q_body)
        q_ids.append(q_body + [0] * q_pad)
        q_mask.append([1] * len(q_body) + [0] * q_pad)
    pixels = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    return dict(pixel_values=pixels, input_ids=np.array(ids), attention_mask=np.array(mask),
                qformer_input_ids=np.array(q_ids), qformer_attention_mask=np.array(q_mask))


# ----------------------------------------------------------------------------- runners

def jblip_runner(model, inputs, new: int, num_beams: int):
    import jax
    options = dict(max_new_tokens=new, min_new_tokens=new, eos_token_ids=(EOS,), pad_token_id=PAD)
    if num_beams > 1:
        options.update(strategy="beam", num_beams=num_beams, early_stopping=False, length_penalty=1.0)

    def run():
        out = model.generate(**inputs, **options)
        return np.asarray(jax.block_until_ready(out.tokens))
    return run


def hf_runner(model, inputs, new: int, num_beams: int):
    import torch
    tensors = {k: torch.tensor(v) for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]

    def run():
        with torch.inference_mode():
            out = model.generate(**tensors, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 num_beams=num_beams, eos_token_id=EOS, pad_token_id=PAD)
        return out[:, prompt_len:].numpy()
    return run


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved_medians(runners: dict, repeats: int) -> dict:
    """Median seconds per runner; each round runs every runner once, in alternating order."""
    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(runners[name])[0])
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- roofline

def copy_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Memory traffic of a large `np.copyto`, bytes read + written per second (STREAM "copy"
    convention), best of `repeats`."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = min(timed(lambda: np.copyto(dst, src))[0] for _ in range(repeats))
    return 2 * nbytes / best


def decode_bytes_per_step(model, batch: int, cache_slots: int) -> tuple[int, int]:
    """(LLM weight bytes a decode step reads, KV-cache bytes it reads at `cache_slots` slots)."""
    import jax
    llm = model.params["llm"]
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(llm))
    weights -= llm["embed_tokens"]["embedding"].nbytes  # one row gathered per token
    text = model.config.text
    kv = 2 * text.num_layers * batch * cache_slots * text.num_kv_heads * text.head_dim * 4
    return weights, kv


# ----------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few tokens (smoke test)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--repeats", type=int, help="timed calls per case (median is reported)")
    parser.add_argument("--new", type=int, help="new tokens per row")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU cores for both libraries (process affinity + torch threads); default: all")
    parser.add_argument("--cases", help="comma-separated subset of " + ",".join(c[0] for c in CASES))
    parser.add_argument("--quantize", default="", help="also time weight-only quantised copies of the jblip "
                                                      "model in the same run: int8, int4 or int8,int4")
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else FULL
    new = args.new or shapes["new_tokens"]
    repeats = args.repeats or shapes["repeats"]
    cases = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]

    # Pin before JAX and torch start: XLA sizes its thread pool from the affinity mask, and
    # torch (OpenMP) must not run more threads than cores (oversubscribed barriers stall).
    threads = args.threads
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    import jax
    import torch
    import jblip
    from jblip.model import count_params
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as path:
        hf = build_hf_model(path, shapes)
        model = jblip.load_pretrained(path, precision="float32")
        quantized = {mode: jblip.load_pretrained(path, precision="float32", quantize=mode)
                     for mode in filter(None, args.quantize.split(","))}
    n_params = count_params(model.params)
    n_llm = count_params(model.params["llm"])
    bandwidth = copy_bandwidth(shapes["copy_bytes"])
    header = dict(params=n_params, llm_params=n_llm, new_tokens=new, repeats=repeats, threads=threads,
                  jax=jax.__version__, torch=torch.__version__, backend=jax.default_backend(),
                  copy_bandwidth_gb_s=bandwidth / 1e9)
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in header.items()), flush=True)

    results = []
    for name, batch, opts in cases:
        inputs = make_inputs(batch, shapes["vision"]["image_size"], hf.config.qformer_config.vocab_size)
        beams = opts["num_beams"]
        ours, ref = jblip_runner(model, inputs, new, beams), hf_runner(hf, inputs, new, beams)
        first_s, ours_tokens = timed(ours)  # compiles
        _, ref_tokens = timed(ref)          # warm-up
        runners = {"jblip": ours, "hf": ref}
        q_tokens = {}
        for mode, qmodel in quantized.items():  # timed interleaved with the float runs
            runners[mode] = jblip_runner(qmodel, inputs, new, beams)
            q_tokens[mode] = runners[mode]()  # compiles
        if batch == 1:  # one-token runs isolate the per-step cost
            runners.update(jblip_1=jblip_runner(model, inputs, 1, beams), hf_1=hf_runner(hf, inputs, 1, beams))
            runners.update({f"{mode}_1": jblip_runner(qmodel, inputs, 1, beams) for mode, qmodel in quantized.items()})
            for key in ["jblip_1", "hf_1", *(f"{mode}_1" for mode in quantized)]:
                runners[key]()
        med = interleaved_medians(runners, repeats)
        tokens = batch * new  # beam search returns one sequence per input
        row = dict(case=name, jblip_tok_s=tokens / med["jblip"], hf_tok_s=tokens / med["hf"],
                   ratio=med["hf"] / med["jblip"], jblip_compile_s=max(first_s - med["jblip"], 0.0),
                   jblip_s=med["jblip"], hf_s=med["hf"],
                   same_tokens=float(np.mean(np.all(ours_tokens == ref_tokens, axis=-1))))
        for mode in quantized:
            row.update({f"{mode}_tok_s": tokens / med[mode], f"{mode}_speedup": med["jblip"] / med[mode],
                        f"{mode}_same_tokens_as_fp32": float(np.mean(np.all(q_tokens[mode] == ours_tokens, axis=-1)))})
            if batch == 1:
                row[f"{mode}_step_ms"] = 1e3 * (med[mode] - med[f"{mode}_1"]) / (new - 1)
        if batch == 1:
            step_ours = (med["jblip"] - med["jblip_1"]) / (new - 1)
            step_ref = (med["hf"] - med["hf_1"]) / (new - 1)
            rows = beams
            slots = inputs["input_ids"].shape[1] + new  # HF's cache length at the end; jblip's is >= it
            weight_bytes, kv_bytes = decode_bytes_per_step(model, rows, slots)
            floor = (weight_bytes + kv_bytes) / bandwidth
            row.update(jblip_step_ms=1e3 * step_ours, hf_step_ms=1e3 * step_ref, floor_ms_per_tok=1e3 * floor,
                       jblip_measured_over_floor=step_ours / floor, hf_measured_over_floor=step_ref / floor,
                       step_weight_mb=weight_bytes / 1e6, step_kv_mb=kv_bytes / 1e6)
        results.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header, cases=results), f, indent=2)
    return results


if __name__ == "__main__":
    main()
