"""The evaluation loop: examples in batches -> prompts + images -> generated text -> answers,
appended to `predictions.jsonl` as they come; then the benchmark's results file, the metrics
file and a one-line summary.

Images are decoded by a thread pool one batch ahead of the model. An unreadable
image is reported and its example left out of the file (a rerun retries it);
scoring counts an example without a prediction as wrong and says how many.
Every batch has the same size (a short last batch is filled with copies of its
last example, dropped afterwards), so the model compiles once per prompt-length bucket.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from jblip.evaluation.predictions import PredictionWriter, read_predictions
from jblip.evaluation.task import Example, Task

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"

# (pixels [B, S, S, 3], prompts [B]) -> generated texts [B]
Generate = Callable[[np.ndarray, list], list]


class Progress:
    """A status line on stderr: done/total, examples per second and the time left."""

    def __init__(self, total: int):
        self.total, self.done, self.bad = total, 0, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self):
        took = time.perf_counter() - self.start
        rate = self.done / max(took, 1e-9)
        left = (self.total - self.done - self.bad) / rate if rate > 0 else float("nan")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if np.isfinite(left) else "?"
        line = (f"eval: {self.done + self.bad}/{self.total} examples, {rate:.2f}/s, ETA {eta}"
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


def _load(image_processor, path):
    try:
        return image_processor.preprocess_one(path, path), None
    except (ValueError, OSError) as e:
        return None, str(e)
    except Exception as e:  # an odd decoder failure must not stop a long run either
        return None, f"cannot read image {path}: {type(e).__name__}: {e}"


def predict(task: Task, examples: Sequence[Example], template: str, generate: Generate, image_processor,
            out_dir: str, batch_size: int, workers: int = 4) -> dict[str, dict]:
    """Generate answers for the examples not yet in `out_dir/predictions.jsonl`; returns every
    prediction record there (key -> record)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    path = os.path.join(out_dir, PREDICTIONS)
    done = read_predictions(path)
    known = {e.key for e in examples}
    stray = sorted(set(done) - known)
    if stray:
        raise ValueError(f"{path} has predictions for {len(stray)} examples that are not in this data "
                         f"(e.g. {stray[0]!r}); was it written for another task or file? choose another --out")
    todo = [e for e in examples if e.key not in done]
    if not todo:
        print(f"eval: all {len(examples)} examples are already in {path}", file=sys.stderr)
        return done
    print(f"eval: {len(todo)} examples to run, {len(done)} already in {path}", file=sys.stderr)
    prompts = {e.key: task.prompt(e, template) for e in todo}  # template errors before any work
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    progress = Progress(len(todo))
    with PredictionWriter(path) as out, ThreadPoolExecutor(max(1, workers)) as pool:
        submit = lambda batch: [pool.submit(_load, image_processor, e.image) for e in batch]  # noqa: E731
        ahead = submit(batches[0])
        try:
            for i, batch in enumerate(batches):
                loaded = [f.result() for f in ahead]
                if i + 1 < len(batches):
                    ahead = submit(batches[i + 1])  # decode the next images while the model runs
                good = []
                for e, (pixels, error) in zip(batch, loaded):
                    if error is None:
                        good.append((e, pixels))
                    else:
                        progress.bad += 1
                        print(f"eval: skipped {e.key}: {error}", file=sys.stderr)
                if good:
                    fill = [good[-1]] * (batch_size - len(good))
                    texts = generate(np.stack([p for _, p in good + fill]), [prompts[e.key] for e, _ in good + fill])
                    records = [{"key": e.key, "id": e.id, "output": t, "answer": task.answer(t, e)}
                               for (e, _), t in zip(good, texts)]
                    out.write(records)
                    done.update((r["key"], r) for r in records)
                    progress.done += len(good)
                progress.update()
        except KeyboardInterrupt:
            for f in ahead:
                f.cancel()
            progress.finish()
            print(f"eval: interrupted after {progress.done} examples; run the same command again to continue",
                  file=sys.stderr)
            raise
    progress.finish()
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
