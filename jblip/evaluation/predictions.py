"""The predictions files of an evaluation run: one JSON line per example, appended and flushed
one batch at a time, so that a rerun skips what is already there and never writes an example
twice. A partial last line (a run killed mid-write) is dropped before appending.

One process writes `predictions.jsonl`. On several processes each writes its own
`predictions.p<index>.jsonl`; a run reads them all (whatever process count wrote
them), and at the end process 0 merges them into `predictions.jsonl`, one line per
example, and removes the per-process files.
"""
from __future__ import annotations

import glob
import json
import os
import sys

MERGED = "predictions.jsonl"


def process_file(out_dir: str, index: int, count: int) -> str:
    return os.path.join(out_dir, MERGED if count == 1 else f"predictions.p{index}.jsonl")


def read_all(out_dir: str) -> dict[str, dict]:
    """key -> record over every predictions file in `out_dir`."""
    records = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "predictions*.jsonl"))):
        records.update(read_predictions(path))
    return records


def merge(out_dir: str, records: dict[str, dict], order) -> str:
    """Write `records` (in the order of the keys in `order`) as the one predictions.jsonl and
    remove the per-process files; the replacement is atomic, so a crash leaves either state."""
    path = os.path.join(out_dir, MERGED)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(records[k], ensure_ascii=False) + "\n" for k in order if k in records))
    os.replace(path + ".tmp", path)
    for part in glob.glob(os.path.join(glob.escape(out_dir), "predictions.p*.jsonl")):
        os.remove(part)
    return path


def read_predictions(path: str) -> dict[str, dict]:
    """key -> record of the lines in `path` (empty when it does not exist)."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"eval: dropped an incomplete last line of {path} (interrupted write)", file=sys.stderr)
        data = data[:keep]
    records = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[str(record["key"])] = record
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} line {number} is not a jblip eval prediction ({line[:60]!r}); "
                             "fix or remove it, or choose another --out") from None
    return records


class PredictionWriter:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]):
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
