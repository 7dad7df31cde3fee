"""The evaluation loop: examples in batches -> prompts + images -> generated text -> answers,
appended to `predictions.jsonl` as they come; then the benchmark's results file, the metrics
file and a one-line summary.

Images are decoded on a grain pipeline (jblip/image_batches.py) ahead of the model. An unreadable
image is reported and its example left out of the file (its row of the batch is
zeros, its output dropped; a rerun retries it); scoring counts an example without
a prediction as wrong and says how many. Every batch has the same size (a short
last batch is filled with copies of its last example, never written), so the
model sees the same shapes from batch to batch.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from jblip.evaluation.hosts import Hosts
from jblip.evaluation.predictions import PredictionWriter, merge, process_file, read_all
from jblip.evaluation.task import Example, Task
from jblip.image_batches import ImageBatches

PREDICTIONS = "predictions.jsonl"  # the merged file
METRICS = "metrics.json"

# (pixels [B, S, S, 3], prompts [B]) -> generated texts [B]
Generate = Callable[[np.ndarray, list], list]


class Progress:
    """A status line on stderr: done/total, examples (or `what`) per second and the time left."""

    def __init__(self, total: int, what: str = "examples"):
        self.total, self.done, self.bad, self.what = total, 0, 0, what
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self):
        took = time.perf_counter() - self.start
        rate = self.done / max(took, 1e-9)
        left = (self.total - self.done - self.bad) / rate if rate > 0 else float("nan")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if np.isfinite(left) else "?"
        line = (f"eval: {self.done + self.bad}/{self.total} {self.what}, {rate:.2f}/s, ETA {eta}"
                + (f", {self.bad} unreadable images" if self.bad else ""))
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def finish(self):
        if self.tty:
            print(file=sys.stderr)


def check_unique(examples: Sequence[Example]):
    seen = set()
    for e in examples:
        if e.key in seen:
            raise ValueError(f"the data has example {e.key!r} twice")
        seen.add(e.key)


def _stack(loaded, image_size: int) -> np.ndarray:
    """This process's rows of pixels, zeros where an image could not be read."""
    blank = np.zeros((image_size, image_size, 3), np.float32)
    return np.stack([blank if pixels is None else pixels for pixels, _ in loaded])


def predict(task: Task, examples: Sequence[Example], template: str, generate: Generate, image_processor,
            out_dir: str, batch_size: int, workers: int = 4, hosts: Hosts | None = None) -> dict[str, dict]:
    """Generate answers for the examples not yet in the predictions files of `out_dir`; returns
    every prediction record there (key -> record). On several processes (`hosts`), each reads
    the images of its share of every batch and writes the records of that share."""
    hosts = hosts or Hosts()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    mine = hosts.share(batch_size)
    done = read_all(out_dir)
    stray = sorted(set(done) - {e.key for e in examples})
    if stray:
        raise ValueError(f"{out_dir} has predictions for {len(stray)} examples that are not in this data "
                         f"(e.g. {stray[0]!r}); was it written for another task or file? choose another --out")
    todo = [e for e in examples if e.key not in done]
    talk = hosts.index == 0
    if not todo:
        if talk:
            print(f"eval: all {len(examples)} examples are already in {out_dir}", file=sys.stderr)
        return done
    if talk:
        print(f"eval: {len(todo)} examples to run, {len(done)} already in {out_dir}", file=sys.stderr)
    prompts = {e.key: task.prompt(e, template) for e in todo}  # template errors before any work
    # every batch full: a short last one is filled with copies of its last example (never written)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    progress = Progress(len(todo))
    path = process_file(out_dir, hosts.index, hosts.count)
    full_batches = [batch + [batch[-1]] * (batch_size - len(batch)) for batch in batches]
    rows = list(range(batch_size))[mine]
    images = ImageBatches(image_processor, [[full[r].image for r in rows] for full in full_batches], workers)
    with PredictionWriter(path) as out:
        try:
            for batch, full, loaded in zip(batches, full_batches, images):
                for r, (_, error) in zip(rows, loaded):
                    if error is not None and r < len(batch):
                        print(f"eval: skipped {batch[r].key}: {error}", file=sys.stderr)
                ok = hosts.gather(np.asarray([error is None for _, error in loaded], np.int32))
                if not ok.any():
                    progress.bad += len(batch)
                    continue
                pixels = hosts.gather(_stack(loaded, image_processor.image_size))
                texts = generate(pixels, [prompts[e.key] for e in full])
                records = [{"key": full[r].key, "id": full[r].id, "output": texts[r],
                            "answer": task.answer(texts[r], full[r])}
                           for r in rows if r < len(batch) and ok[r]]
                out.write(records)
                done.update((rec["key"], rec) for rec in records)
                good = int(ok[:len(batch)].sum())
                progress.done += good
                progress.bad += len(batch) - good
                if talk:
                    progress.update()
        except KeyboardInterrupt:
            images.close()
            progress.finish()
            print(f"eval: interrupted after {progress.done} examples; run the same command again to continue",
                  file=sys.stderr)
            raise
    progress.finish()
    hosts.barrier("jblip-eval-predicted")
    done = read_all(out_dir)  # every process's records
    if hosts.count > 1:
        if hosts.index == 0:
            merge(out_dir, done, [e.key for e in examples])
        hosts.barrier("jblip-eval-merged")
    return done


def finish(task: Task, examples: Sequence[Example], records: dict[str, dict], out_dir: str) -> tuple[dict | None, str]:
    """Write the official results file and (when the data has annotations) metrics.json;
    returns (metrics or None, the summary line)."""
    answers = {k: r["answer"] for k, r in records.items()}
    results_path = os.path.join(out_dir, task.results_file)
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(task.official_results(examples, answers), f, ensure_ascii=False)
    missing = sum(e.key not in answers for e in examples)
    if any(e.reference is None for e in examples):
        return None, (f"{task.name}: {len(examples) - missing}/{len(examples)} predictions in {results_path} "
                      "(no annotations to score against: submit it to the benchmark's server)")
    metrics = task.score(examples, answers)
    metrics = dict(metrics, task=task.name, missing=missing)
    if missing:
        metrics.setdefault("notes", []).append(f"{missing} examples have no prediction (unreadable images) "
                                               "and are scored as wrong")
    with open(os.path.join(out_dir, METRICS), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1, ensure_ascii=False)
    return metrics, f"{task.name}: {task.headline(metrics)} over {len(examples)} examples"
