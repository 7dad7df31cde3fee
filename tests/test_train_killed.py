"""Kill-anywhere: `jblip train --recipe demo` (shrunk) is SIGKILLed at several points, each time
rerun with the same command, and the model it finally exports is byte-identical to the one an
uninterrupted run exports. The points: while the dataset is written, while the stage-1 model is
written, between optimizer updates, and while an asynchronous checkpoint is being saved."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

STEPS = 6
COMMAND = ["-m", "jblip.cli", "train", "--recipe", "demo", "--steps", str(STEPS), "--batch-size", "8",
           "--no-progress", "--set", "checkpoint_every=2", "--set", "eval_at_start=false",
           "--set", "eval_batch_size=8", "--set", "demo_data={train: 600, eval: 8}",
           "--set", "demo_vision_pretrain={steps: 2, scenes: 64}"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user runs it
    env.update(JBLIP_CACHE_DIR=cache, PYTHONPATH=ROOT)
    return env


def _train(out: str, cache: str, kill_when=None, timeout: float = 300.0) -> str:
    """Run the command; with `kill_when(out)`, SIGKILL the process the moment it returns true
    (polled every 2 ms) and return what was seen; else wait for success."""
    proc = subprocess.Popen([sys.executable, *COMMAND, "--output", out], cwd=ROOT, env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        if kill_when is None:
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, stderr[-2000:]
            return stdout
        while time.monotonic() < deadline:
            seen = kill_when(out)
            if seen:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return seen
            assert proc.poll() is None, f"finished before the kill point: {proc.stderr.read()[-2000:]}"
            time.sleep(0.002)
        raise AssertionError("kill point never reached")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _exists(name):
    return lambda out: name if os.path.exists(os.path.join(out, name)) else None


def _after_update(step: int):
    def seen(out):
        try:
            with open(os.path.join(out, "log.jsonl")) as f:
                lines = [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return None
        return f"after update {step}" if any(r.get("step") == step and "loss" in r for r in lines) else None
    return seen


def _saving(out):
    folder = os.path.join(out, "checkpoints")
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if "tmp" in name and not name.startswith("2"):  # a save after the first resume point
                return f"while saving {name}"
    return None


def test_killed_anywhere_the_rerun_exports_the_same_model(tmp_path):
    cache = str(tmp_path / "xla-cache")
    straight = str(tmp_path / "straight")
    _train(straight, cache)
    killed = str(tmp_path / "killed")
    seen = [_train(killed, cache, _exists("data.partial")),
            _train(killed, cache, _exists(os.path.join("data", "initial_model.partial"))),
            _train(killed, cache, _after_update(3)),
            _train(killed, cache, _saving)]
    print("killed:", seen)
    assert not os.path.exists(os.path.join(killed, "model"))
    summary = json.loads(_train(killed, cache).strip().splitlines()[-1])
    assert summary["step"] == STEPS
    with open(os.path.join(straight, "model", "model.safetensors"), "rb") as a, \
            open(os.path.join(killed, "model", "model.safetensors"), "rb") as b:
        assert a.read() == b.read(), f"killed at {seen}: the exported models differ"
