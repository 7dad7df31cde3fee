"""benchmarks/keras_hub.py --quick against a KerasHub venv named by $JBLIP_KERAS_PYTHON (skipped
without one: KerasHub is not a test dependency; the script's doc says how to make the venv)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "keras_hub.py")


def keras_python_or_skip() -> str:
    python = os.environ.get("JBLIP_KERAS_PYTHON")
    if not python:
        pytest.skip("JBLIP_KERAS_PYTHON is not set (a python with keras-hub; see benchmarks/keras_hub.py)")
    probe = subprocess.run([python, "-c", "import keras_hub"], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, KERAS_BACKEND="jax"))
    if probe.returncode:
        pytest.skip(f"JBLIP_KERAS_PYTHON={python} cannot import keras_hub: {probe.stderr.strip()[-300:]}")
    return python


def parse(text: str) -> list[dict]:
    return [dict(f.split("=", 1) for f in line.split()) for line in text.splitlines() if line.startswith("case=")]


# two model builds per side (KerasHub's take ~25 s each here) and eight compiles: minutes on 2 cores
@pytest.mark.slow
def test_quick_run_prints_every_case_with_equal_towers():
    python = keras_python_or_skip()
    out = subprocess.run([sys.executable, SCRIPT, "--quick", "--keras-python", python, "--repeats", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    towers = [line for line in out.stdout.splitlines() if line.startswith("towers ")]
    assert len(towers) == 2 and all("/keras=" not in t for t in towers)  # equal counts per tower
    rows = parse(out.stdout)
    assert [r["case"] for r in rows] == ["opt_greedy_b1", "opt_greedy_b8", "t5_greedy_b1", "t5_greedy_b8"]
    for r in rows:
        assert float(r["jblip_tok_s"]) > 0 and float(r["keras_tok_s"]) > 0 and float(r["ratio"]) > 0
        assert float(r["jblip_compile_s"]) >= 0 and float(r["keras_compile_s"]) >= 0
        assert r["new_tokens"] == "6" and int(r["params"]) > 0


def test_missing_keras_python_names_the_venv_recipe():
    env = {k: v for k, v in os.environ.items() if k != "JBLIP_KERAS_PYTHON"}
    out = subprocess.run([sys.executable, SCRIPT, "--quick"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "JBLIP_KERAS_PYTHON" in out.stderr and "pip install --no-deps keras-hub" in out.stderr


def test_hf_config_builds_the_issue_shapes_in_jblip():
    sys.path.insert(0, ROOT)
    from benchmarks.keras_hub import hf_config, t5_hf_config
    from jblip.config import from_hf_config
    from jblip.model import abstract_params, count_params
    assert count_params(abstract_params(from_hf_config(hf_config()))) == 71_474_048
    t5 = from_hf_config(t5_hf_config(quick=True))
    assert t5.family == "t5" and t5.text.num_layers == t5.text.num_decoder_layers
