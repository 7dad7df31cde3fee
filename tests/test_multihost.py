"""Two processes x 4 CPU devices joined with jax.distributed over 127.0.0.1: one mesh across
both gives the same logits as one process, and each process holds only its own shards."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import jblip
from tests.hf_models import TINY_LLAMA, max_diff, tiny_instructblip
from tests.multihost_worker import inputs

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a hung rendezvous or collective fails the test instead of blocking CI
SPEC = "fsdp=4,tensor=2"  # params split across the two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    checkpoint = tmp_path / "ckpt"
    text = {**TINY_LLAMA, "hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 6,
            "intermediate_size": 100, "num_hidden_layers": 1}
    tiny_instructblip(checkpoint, seed=21, text=text, vision=dict(num_hidden_layers=1),
                      qformer=dict(num_hidden_layers=1))
    reference = np.asarray(jblip.load_pretrained(str(checkpoint)).forward(**inputs()))

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    port, outs = free_port(), [tmp_path / f"out{i}.npz" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), "2", str(port),
                               str(checkpoint), SPEC, str(outs[i])], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:] if i < len(logs) else ''}"

    for i, out in enumerate(outs):
        got = np.load(out)
        assert (int(got["global_devices"]), int(got["local_devices"])) == (8, 4)
        # q_proj (72, 6, 12) split over fsdp x tensor: a process holds 4 of the 8 shards, i.e. half its rows
        assert str(got["q_spec"]) == "P('fsdp', 'tensor', None)"
        assert int(got["q_local_shards"]) == 4 and tuple(got["q_shard_shape"]) == (18, 3, 12)
        assert list(got["q_rows"]) == list(range(36 * i, 36 * (i + 1)))
        delta = max_diff(got["logits"], reference)
        print(f"process {i}: max |delta| logits vs one process {delta:.2e}")
        assert got["logits"].shape == reference.shape and delta <= 1e-5
