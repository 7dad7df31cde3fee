"""`jblip eval --task TASK --data FILES... --images DIR --out DIR`: a benchmark with its paper protocol.

Reads the benchmark's own files, prompts and decodes as LAVIS and the
InstructBLIP / BLIP-2 papers do for the model's family (see
jblip/evaluation/<task>.py and protocols.py), writes predictions as they come
to OUT/predictions.jsonl (a rerun resumes where it stopped), then
OUT/<benchmark>_results.json in the benchmark's official format and
OUT/metrics.json with a per-type breakdown, and prints the score as the last line.

On several processes (`--distributed`, or a program that has called
`jax.distributed.initialize` before `jblip.cli.main`), every process runs the
same command on the same files: each reads the images of its share of every
batch, the model is sharded over --mesh across all of them, each appends its
share's predictions to its own file in OUT (which must be shared storage), and
process 0 merges them and scores. A rerun with any process count resumes.

The retrieval tasks (flickr30k, coco-retrieval) take a BLIP-2 retrieval checkpoint as --model
(default: the bundled demo retrieval model) and run on one process
(jblip/evaluation/retrieval_runner.py).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from jblip.commands.common import add_model_arguments, checkpoint_path, enable_compilation_cache
from jblip.processing import DEFAULT_MAX_LENGTH


def add_arguments(parser):
    from jblip.evaluation import TASKS
    add_model_arguments(parser)
    model = next(a for a in parser._actions if a.dest == "model")
    model.help += ("; for the retrieval tasks a BLIP-2 retrieval checkpoint (default: the bundled demo "
                   "retrieval model)")
    parser.add_argument("--task", required=True, choices=list(TASKS),
                        help="; ".join(f"{n}: {t.summary}" for n, t in TASKS.items()))
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE",
                        help="the benchmark's files in their official format (see the task's --task help)")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder with the benchmark's images")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder; resumed from if it holds predictions of an earlier run")
    parser.add_argument("--split", help="split to evaluate for files holding several (scienceqa, coco-karpathy, "
                                        "Karpathy files for the retrieval tasks; default test)")
    parser.add_argument("--mesh", metavar="SPEC", help="shard the model over a device mesh, e.g. data=2,fsdp=4 "
                                                       "(default: one device)")
    parser.add_argument("--distributed", action="store_true",
                        help="join the other processes of a multi-host run (jax.distributed.initialize with "
                             "the cluster's auto-detection, e.g. on a TPU pod); every process runs this same "
                             "command and reads its share of each batch")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="global batch (a multiple of the process count; default 8)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding images ahead of the model")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples (a quick check)")
    g = parser.add_argument_group("protocol overrides (default: the task's published settings)")
    g.add_argument("--prompt", help="prompt template with the task's fields in braces, e.g. "
                                    "'Question: {question} Answer:'")
    g.add_argument("--beams", type=int, dest="num_beams")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help=f"longest prompt in tokens, longer ones keep their end (default {DEFAULT_MAX_LENGTH}, as LAVIS)")
    g.add_argument("--k-test", type=int, help="retrieval tasks: candidates per query re-ranked with the ITM head "
                                              "(default 128, as LAVIS)")

GENERATION_ONLY = {"prompt": "--prompt", "num_beams": "--beams", "max_new_tokens": "--max-new-tokens",
                   "min_new_tokens": "--min-new-tokens", "length_penalty": "--length-penalty",
                   "repetition_penalty": "--repetition-penalty", "quantize": "--quantize"}


def run(args) -> int:
    from jblip.evaluation import make_task
    from jblip.evaluation.hosts import Hosts
    from jblip.evaluation.retrieval import RetrievalTask
    from jblip.evaluation.runner import check_unique, finish, predict
    from jblip.processing import Processor

    if args.distributed:
        import jax
        jax.distributed.initialize()
    hosts = Hosts.current()

    task = make_task(args.task, args.split)
    if isinstance(task, RetrievalTask):
        return _run_retrieval(args, task, hosts)
    if args.k_test is not None:
        raise ValueError(f"--k-test applies to the retrieval tasks, not to {task.name}")
    examples = task.load(args.data, args.images)
    if args.limit is not None:
        examples = examples[:max(args.limit, 0)]
    if not examples:
        raise ValueError("no examples to evaluate")
    check_unique(examples)
    path = checkpoint_path(args)
    processor = Processor.from_pretrained(path)
    config = processor.config
    protocol = task.protocol(config.model_type, config.family)
    template = protocol.prompt if args.prompt is None else args.prompt
    decoding = protocol.decoding.replace(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                         min_new_tokens=args.min_new_tokens, length_penalty=args.length_penalty,
                                         repetition_penalty=args.repetition_penalty)
    if hosts.index == 0:
        print(f"eval: {task.name}, {len(examples)} examples, {config.model_type}/{config.family}; prompt "
              f"{template!r}; {decoding}" + (f"; {hosts.count} processes" if hosts.count > 1 else ""),
              file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    widths = _prompt_widths(processor, [task.prompt(e, template) for e in examples], args.max_length)
    generate = _generator(path, args, processor, decoding, hosts, widths)
    try:
        records = predict(task, examples, template, generate, processor.image_processor, args.out,
                          args.batch_size, args.workers, hosts)
    except KeyboardInterrupt:
        return 130
    if hosts.index != 0:
        return 0  # process 0 writes the results and the score
    metrics, summary = finish(task, examples, records, args.out)
    for note in (metrics or {}).get("notes", []):
        print(f"eval: note: {note}", file=sys.stderr)
    print(summary)
    return 0


def _run_retrieval(args, task, hosts) -> int:
    from jblip.commands.retrieval_common import load_engine
    from jblip.evaluation.retrieval import MAX_TEXT_TOKENS
    from jblip.evaluation.retrieval_runner import evaluate_retrieval
    given = [flag for name, flag in GENERATION_ONLY.items() if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do not apply to the retrieval task {task.name}")
    if hosts.count > 1:
        raise ValueError(f"the retrieval task {task.name} runs on one process (--mesh shards it over that "
                         "process's devices)")
    k_test = task.k_test if args.k_test is None else args.k_test
    if k_test < 1:
        raise ValueError(f"--k-test must be >= 1, got {k_test}")
    data = task.load(args.data, args.images)
    if args.limit is not None:
        data = data.first(args.limit)
    if not data.images:
        raise ValueError("no images to evaluate")
    mesh = None
    if args.mesh:
        from jblip.sharding import make_mesh
        mesh = make_mesh(args.mesh)
    engine = load_engine(args.model, args.batch_size, precision=args.precision, mesh=mesh)
    engine.max_text_length = min(MAX_TEXT_TOKENS, engine.config.qformer.max_position_embeddings)
    try:
        metrics, summary = evaluate_retrieval(task, data, engine, args.out, k_test, args.workers)
    except KeyboardInterrupt:
        print("eval: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    for note in metrics.get("notes", []):
        print(f"eval: note: {note}", file=sys.stderr)
    print(summary)
    return 0


def _prompt_widths(processor, prompts, max_length, chunk: int = 4096) -> dict[str, int]:
    """The widest token arrays (language model, Q-Former) over every prompt of the run: each
    batch is padded to them, so that the model compiles once per run, not once per width."""
    widths = {}
    for i in range(0, len(prompts), chunk):
        text = processor.text_inputs(prompts[i:i + chunk], None, max_length, True)
        for name in ("input_ids", "qformer_input_ids"):
            if text[name] is not None:
                widths[name] = max(widths.get(name, 0), text[name].shape[1])
    return widths


def _pad_to(text: dict, widths: dict, left: bool, pad_ids: dict) -> dict:
    """Masked padding up to `widths`: the language model's on the side generation pads it
    (left for decoder-only models, right for Flan-T5), the Q-Former's on the right."""
    out = dict(text)
    for ids, mask, side in (("input_ids", "attention_mask", left), ("qformer_input_ids", "qformer_attention_mask", False)):
        if text[ids] is None or text[ids].shape[1] >= widths[ids]:
            continue
        extra = widths[ids] - text[ids].shape[1]
        spec = ((0, 0), (extra, 0)) if side else ((0, 0), (0, extra))
        out[ids] = np.pad(text[ids], spec, constant_values=pad_ids[ids])
        out[mask] = np.pad(text[mask], spec, constant_values=0)
    return out


def _generator(path, args, processor, decoding, hosts, widths):
    """(pixels, prompts) -> texts for the global batch, with the model loaded on first use (a
    finished run never loads it)."""
    config = processor.config
    pad_ids = {"input_ids": max(getattr(config.text, "pad_token_id", 0) or 0, 0),
               "qformer_input_ids": config.qformer.pad_token_id or 0}
    state = {}

    def generate(pixels, prompts):
        if "model" not in state:
            from jblip.pipeline import sampler_for
            from jblip.pretrained import load_pretrained
            enable_compilation_cache()
            mesh = None
            if args.mesh:
                from jblip.sharding import make_mesh
                mesh = make_mesh(args.mesh)
            model = load_pretrained(path, precision=args.precision, mesh=mesh, quantize=args.quantize)
            model._jblip_processor = processor
            state["model"], state["sampler"] = model, sampler_for(model, **decoding.sampler_options())
        text = _pad_to(processor.text_inputs(prompts, len(prompts), args.max_length, True), widths,
                       config.family != "t5", pad_ids)
        output = state["model"].generate(pixel_values=pixels, **text, sampler=state["sampler"], seed=0)
        return processor.decode(hosts.fetch(output.tokens), hosts.fetch(output.lengths))
    return generate
