"""benchmarks/accelerator.py --small runs here and prints every measurement line with sane values."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from benchmarks import accelerator  # noqa: E402


def parse(text: str) -> list[tuple[str, dict]]:
    rows = []
    for raw in text.strip().splitlines():
        kind, *fields = raw.split()
        rows.append((kind, dict(f.split("=", 1) for f in fields)))
    return rows


# ten compiles of the tiny model (generate at two lengths x two batch sizes, float and int8; two train steps):
# ~40 s on 2 idle cores; fewer once max_new_tokens is traced (no recompile per length)
@pytest.mark.slow
def test_small_run_prints_device_decode_and_train_lines(capsys):
    accelerator.main(["--small", "--new", "3", "--repeats", "1", "--steps", "1"])
    rows = parse(capsys.readouterr().out)
    assert [k for k, _ in rows] == ["device"] + ["decode"] * 4 + ["train", "train"]
    device, decodes, trains = rows[0][1], [r for k, r in rows if k == "decode"], [r for k, r in rows if k == "train"]
    assert device["platform"] == "cpu" and float(device["copy_bandwidth_gb_s"]) > 0
    assert [d["case"] for d in decodes] == ["greedy_b1", "greedy_b8", "greedy_b1_int8", "greedy_b8_int8"]
    for d in decodes:
        assert float(d["tokens_s"]) > 0 and float(d["floor_ms"]) > 0 and float(d["measured_over_floor"]) > 0
        assert float(d["kv_mb"]) > 0 and float(d["compile_s"]) >= 0
    assert [t["set"] for t in trains] == ["qformer", "all"]
    assert int(trains[0]["trainable_params"]) < int(trains[1]["trainable_params"])
    for t in trains:
        assert 0 < float(t["mfu"]) < 1 and float(t["step_s"]) > 0
