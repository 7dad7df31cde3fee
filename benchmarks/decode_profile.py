"""Where a decode step's time goes: step time per layer loop against the floor, and a profile breakdown.

    python benchmarks/decode_profile.py [--quick] [--threads 1] [--batches 1,8] [--new 64] [--family llama|opt]

The 94M InstructBLIP-Vicuna benchmark model of `benchmarks/generate.py` (or, with
`--family opt`, the BLIP-2 OPT shapes of `benchmarks/keras_hub.py`), random fp32 weights,
no PyTorch. For each layer loop (`jblip.scan.LAYER_LOOPS`: the stacked scan every platform
compiles by default, and the per-layer buffers CPU programs use) and batch size, one line
with the greedy decode step (from two timed runs, `--new` and 1 new tokens, so the image
towers and the prefill cancel out), the floor (the LLM weight bytes a step reads, all but the
input-embedding table, plus the KV cache at its final length, over the measured memory copy
bandwidth) and their ratio.

Then a breakdown of the step for the platform's own layer loop: the generate program runs
under `jax.profiler`, each executed HLO op is mapped to the JAX name stack it came from
(the optimised HLO dumped by XLA carries it as `op_name` metadata, e.g.
`.../while/body/llm.decode_step/llm.decode/layers/layer_3/mlp/up_proj/dot_general`), and the
op's time is booked to one of the categories below. The `--new`-token run minus the 1-token
run, over the extra steps, gives each category's ms per step; one line per category with its
share of the step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (category, pattern over the op_name of an op in the decode loop), first match wins.
CATEGORIES = (
    ("vocabulary head", r"llm\.head|lm_head|tied_logits"),
    ("kv-cache write", r"self_attn/.*dynamic_update_slice|kv_cache.*update"),
    ("kv-cache read copy", r"self_attn/.*dynamic_(index_in_dim|slice)"),
    ("weight slice copy", r"layers/(jit\(dynamic_index_in_dim\)|dynamic_slice|slice)|while/body/jit\(dynamic_index_in_dim\)"),
    ("layer matmuls (weights)", r"(proj|q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|"
                                r"\bq\b|\bk\b|\bv\b|\bo\b|wi_0|wi_1|wo)/dot_general"),
    ("attention", r"self_attn|EncDecAttention|attention"),
    ("norms, residuals, rope", r"layernorm|layer_norm|norm/|llm\.decode/layers|llm\.decode/(sin|cos|mul|add)"),
    ("embedding lookup", r"llm\.embed|embed_tokens"),
    ("other llm step", r"llm\.decode_step"),
    ("processors + sampling", r"while/body/"),
)


def program_name(model) -> str:
    """The jitted function that holds the decode loop: `VisionLanguageModel` compiles generate as
    one program, or on CPU as prefill + decode programs (`jblip.compiler_options`)."""
    return "run" if model.decode_options is None else "run_decode"


def loop_prefix(program: str) -> str:
    return f"jit({program})/while/body/"


def category(op_name: str, program: str) -> str | None:
    """The breakdown category of an op of the decode loop (None: outside the loop)."""
    if loop_prefix(program) not in op_name:
        return None
    tail = op_name.split(loop_prefix(program), 1)[1]
    for name, pattern in CATEGORIES:
        if re.search(pattern, tail):
            return name
    return "processors + sampling"


def hlo_op_names(dump_dir: str, vocab: int, program: str) -> dict[str, str]:
    """{instruction name: op_name} of the newest optimised `module` XLA dumped (as text).

    XLA drops the metadata of the dots it rewrites; a dot without one inherits the decode
    loop's prefix when the rest of its computation is in the loop, and a name by its shape:
    [.., vocab] outputs are the head, batched dots (heads as batch) attention, the others
    weight matmuls.
    """
    files = sorted(glob.glob(os.path.join(dump_dir, f"*.jit_{program}.*after_optimizations.txt")))
    names, in_loop, unnamed_dots = {}, set(), []
    computation = None
    for line in open(files[-1]):
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            computation = header.group(1)
            continue
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
        if not match:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        if op_name:
            names[match.group(1)] = op_name.group(1)
            if loop_prefix(program) in op_name.group(1):
                in_loop.add(computation)
        elif match.group(3) == "dot":
            shape = match.group(2)
            kind = ("llm.head" if re.search(rf"[\[,]{vocab}\]", shape) else
                    "self_attn/dot" if "lhs_batch_dims" in line else "layers/proj/dot_general")
            unnamed_dots.append((match.group(1), computation, kind))
    for name, computation, kind in unnamed_dots:
        if computation in in_loop:
            names[name] = loop_prefix(program) + kind
    return names


def op_times(trace_dir: str, module: str = "jit_run") -> collections.Counter:
    """Total ns per executed HLO op of `module` in the newest trace under `trace_dir`."""
    from jax.profiler import ProfileData
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    totals = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if stats.get("hlo_module") == module and "hlo_op" in stats:
                    totals[stats["hlo_op"]] += event.duration_ns
    return totals


def traced_ops(run, trace_dir: str, module: str) -> collections.Counter:
    import jax
    run()  # compiled and warm
    jax.profiler.start_trace(trace_dir)
    run()
    jax.profiler.stop_trace()
    return op_times(trace_dir, module)


def breakdown(model, inputs: dict, new: int, dump_dir: str, beams: int = 1) -> dict[str, float]:
    """ms per decode step per category (see CATEGORIES)."""
    program = program_name(model)
    with tempfile.TemporaryDirectory() as long_dir, tempfile.TemporaryDirectory() as short_dir:
        long_ops = traced_ops(runner(model, inputs, new, beams), long_dir, f"jit_{program}")
        short_ops = traced_ops(runner(model, inputs, 1, beams), short_dir, f"jit_{program}")
    op_names = hlo_op_names(dump_dir, model.config.text.vocab_size, program)
    per_step = collections.Counter()
    for op in set(long_ops) | set(short_ops):
        name = category(op_names.get(op, ""), program)
        if name is not None:
            per_step[name] += (long_ops[op] - short_ops[op]) / 1e6 / (new - 1)
    return dict(per_step)


# ----------------------------------------------------------------------------- model

def build(family: str, quick: bool):
    from jblip.config import from_hf_config
    from benchmarks.accelerator import random_params
    if family == "opt":
        from benchmarks.keras_hub import hf_config
    else:
        from benchmarks.generate import hf_config
    config = from_hf_config(hf_config(quick), name=f"bench-{family}")
    return config, random_params(config)


def step_bytes(model, batch: int, slots: int) -> tuple[int, int]:
    """(LLM weight bytes a decode step reads, KV-cache bytes at `slots` slots): every LLM weight
    but the gathered tables (token embeddings unless the head is tied to them, OPT's
    positions), of which one row per token is read."""
    import jax
    text, llm = model.config.text, model.params["llm"]
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    weights = nbytes(llm) - nbytes(llm.get("embed_positions", {}))
    if not getattr(text, "tie_word_embeddings", True) or text.family != "opt":
        weights -= nbytes(llm["embed_tokens"])
    heads = getattr(text, "num_kv_heads", text.num_heads)
    kv = 2 * text.num_layers * batch * slots * heads * text.head_dim * 4
    return weights, kv


def runner(model, inputs: dict, new: int, beams: int = 1):
    import jax
    beam = dict(strategy="beam", num_beams=beams, early_stopping=False, length_penalty=1.0) if beams > 1 else {}

    def run():
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, eos_token_ids=(2,), pad_token_id=0,
                             **beam)
        return jax.block_until_ready(out.tokens)
    return run


def step_ms(models: dict, inputs: dict, new: int, repeats: int, beams: int = 1) -> dict[str, float]:
    """ms per decode step of each model, all timed in one interleaved series (machine noise
    hits them alike)."""
    from benchmarks.generate import interleaved_medians
    runners = {}
    for name, model in models.items():
        runners[name, new], runners[name, 1] = runner(model, inputs, new, beams), runner(model, inputs, 1, beams)
    for run in runners.values():
        run()  # compile
    medians = interleaved_medians(runners, repeats)
    return {name: 1e3 * max(medians[name, new] - medians[name, 1], 1e-9) / (new - 1) for name in models}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few tokens (smoke test)")
    parser.add_argument("--family", choices=("llama", "opt"), default="llama")
    parser.add_argument("--threads", type=int, default=1, help="cores the process is pinned to (default 1)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--beams", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    parser.add_argument("--new", type=int)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args(argv)
    new = args.new or (6 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    dump_dir = tempfile.mkdtemp(prefix="jblip-hlo-")
    # the optimised HLO carries each op's JAX name stack: dump it for the breakdown (before JAX starts)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_module_re=jit_run")  # (and jit_run_decode)
    import jax
    from benchmarks.accelerator import decode_inputs
    from benchmarks.generate import copy_bandwidth
    from jblip.pretrained import VisionLanguageModel
    from jblip.scan import LAYER_LOOPS, layer_loop_for

    config, params = build(args.family, args.quick)
    bandwidth = copy_bandwidth(1 << (26 if args.quick else 30))
    own = layer_loop_for(jax.devices()[0].platform)
    print(f"family={args.family} backend={jax.default_backend()} threads={args.threads} new_tokens={new} "
          f"copy_bandwidth_gb_s={bandwidth / 1e9:.1f} platform_layer_loop={own}", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = decode_inputs(config, batch, prompt=16, instruction=8)
        if not config.qformer.use_text_input:  # BLIP-2: the Q-Former reads no instruction
            inputs.update(qformer_input_ids=None, qformer_attention_mask=None)
        models = {loop: VisionLanguageModel(config, params, layer_loop=loop) for loop in LAYER_LOOPS}
        steps = step_ms(models, inputs, new, repeats, args.beams)
        weights, kv = step_bytes(models[own], batch * args.beams, config.num_query_tokens + 16 + new)
        case = f"greedy_b{batch}" if args.beams == 1 else f"beam{args.beams}_b{batch}"
        floor = 1e3 * (weights + kv) / bandwidth
        for loop, ms in steps.items():
            print(f"case={case} layer_loop={loop} step_ms={ms:.2f} floor_ms={floor:.2f} "
                  f"over_floor={ms / floor:.2f} tok_s={1e3 * batch / ms:.1f} weight_mb={weights / 1e6:.0f} "
                  f"kv_mb={kv / 1e6:.1f}", flush=True)
        parts = breakdown(models[own], inputs, new, dump_dir, args.beams)
        total = sum(parts.values())
        for name, _ in CATEGORIES:
            if name in parts:
                print(f"  breakdown_b{batch} layer_loop={own} part={name.replace(' ', '_')} "
                      f"ms={parts[name]:.2f} share={parts[name] / max(total, 1e-9):.2f}", flush=True)
        print(f"  breakdown_b{batch} profiled_ms={total:.2f} (profiler overhead included) floor_ms={floor:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
