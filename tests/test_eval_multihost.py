"""`jblip eval` on 2 processes x 4 CPU devices joined over 127.0.0.1: one process is killed
mid-run, and the rerun on 2 processes ends with every question exactly once, merged into one
file, with the same records (as a set) and score as one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jblip.cli import main
from jblip.pipeline import DEFAULT_MODEL
from tests.test_eval_demo import write_vqav2
from tests.test_multihost import ROOT, TIMEOUT_S, free_port

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")),
                                reason="demo model not bundled")

MESH = "data=2,fsdp=4"  # the model and the batch over both processes' devices


def eval_args(data, out):
    files, _ = data
    return ["--task", "vqav2", "--data", *files, "--images", os.path.dirname(files[0]), "--out", str(out),
            "--prompt", "{question}", "--mesh", MESH, "--batch-size", "4", "--workers", "2",
            "--beams", "1", "--max-new-tokens", "3"]  # greedy, short: one-word answers, cheap compiles


def spawn(args, logs, command: str = "eval") -> list[subprocess.Popen]:
    """Two `jblip COMMAND` processes of 4 CPU devices each, joined over 127.0.0.1 (the test suite's cheaper
    XLA backend pass pipeline, as tests/conftest.py sets for in-process tests)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    os.makedirs(logs, exist_ok=True)
    procs = []
    for i in range(2):
        with open(os.path.join(logs, f"process{i}.log"), "w") as log:  # a file: a full pipe would block it
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.multihost_cli_worker", str(i), "2",
                                           str(port), command, *args], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


def finish_all(procs, logs):
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        if p.returncode != 0:
            with open(os.path.join(logs, f"process{i}.log")) as f:
                raise AssertionError(f"process {i} failed:\n{f.read()[-4000:]}")


def kill_second_once_written(procs, part, lines: int = 2):
    """SIGKILL process 1 once its output `part` has `lines` records (a batch); process 0 then
    waits on it in a collective, and is killed too."""
    deadline = time.time() + TIMEOUT_S
    try:
        while time.time() < deadline and not (part.exists() and part.read_text().count("\n") >= lines):
            assert procs[1].poll() is None, "process 1 ended before it could be killed"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def records(out) -> list[tuple[str, str]]:
    with open(os.path.join(out, "predictions.jsonl")) as f:
        return [(r["key"], r["answer"]) for r in map(json.loads, f)]


@pytest.mark.slow
def test_two_processes_evaluate_like_one_and_resume(tmp_path, capsys, private_xla_cache):
    data = write_vqav2(str(tmp_path / "data"))
    truth = data[1]
    assert main(["eval", *eval_args(data, tmp_path / "one")]) == 0
    one = records(tmp_path / "one")
    last_line = capsys.readouterr().out.strip().splitlines()[-1]

    # kill process 1 once it has written a batch; process 0 then waits on it in a collective
    out = tmp_path / "killed"
    kill_second_once_written(spawn(eval_args(data, out), tmp_path / "logs-killed"), out / "predictions.p1.jsonl")
    written = sum(1 for f in os.listdir(out) if f.startswith("predictions.p")
                  for _ in open(out / f))
    assert 0 < written < len(truth), "the kill came before the first or after the last batch"
    assert not (out / "predictions.jsonl").exists()

    # the rerun on 2 processes: what was written is kept, the rest done, the shares merged
    finish_all(spawn(eval_args(data, out), tmp_path / "logs-resumed"), tmp_path / "logs-resumed")
    resumed = records(out)
    assert len(resumed) == len({k for k, _ in resumed}) == len(truth)  # every question exactly once
    assert sorted(resumed) == sorted(one)  # the same records as one process
    assert sorted(os.listdir(out)) == ["metrics.json", "predictions.jsonl", "vqa_results.json"]
    with open(tmp_path / "one" / "metrics.json") as a, open(out / "metrics.json") as b:
        assert json.load(a)["overall"] == json.load(b)["overall"]
    assert last_line.startswith("vqav2: VQA accuracy")
