"""Two processes x 4 CPU devices joined with jax.distributed over 127.0.0.1: one mesh across
both gives the same logits as one process, and each process holds only its own shards; training
on it (each process reading its share of every batch) gives one process's losses and a
checkpoint that restores in one process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

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


def run_processes(module: str, args, count: int = 2):
    """`python -m module PROCESS_ID count PORT *args(i)` in `count` processes of 4 CPU devices each;
    fails with the log of any process that does not exit cleanly."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, str(i), str(count), str(port), *args(i)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(count)]
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


def test_two_processes_match_one(tmp_path):
    checkpoint = tmp_path / "ckpt"
    text = {**TINY_LLAMA, "hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 6,
            "intermediate_size": 100, "num_hidden_layers": 1}
    tiny_instructblip(checkpoint, seed=21, text=text, vision=dict(num_hidden_layers=1),
                      qformer=dict(num_hidden_layers=1))
    reference = np.asarray(jblip.load_pretrained(str(checkpoint)).forward(**inputs()))

    outs = [tmp_path / f"out{i}.npz" for i in range(2)]
    run_processes("tests.multihost_worker", lambda i: [str(checkpoint), SPEC, str(outs[i])])

    for i, out in enumerate(outs):
        got = np.load(out)
        assert (int(got["global_devices"]), int(got["local_devices"])) == (8, 4)
        # q_proj (72, 6, 12) split over fsdp x tensor: a process holds 4 of the 8 shards, i.e. half its rows
        assert str(got["q_spec"]) == "P(None, 'fsdp', 'tensor', None)"  # the stacked layers axis is whole
        assert int(got["q_layers"]) == 1
        assert int(got["q_local_shards"]) == 4 and tuple(got["q_shard_shape"]) == (18, 3, 12)
        assert list(got["q_rows"]) == list(range(36 * i, 36 * (i + 1)))
        delta = max_diff(got["logits"], reference)
        print(f"process {i}: max |delta| logits vs one process {delta:.2e}")
        assert got["logits"].shape == reference.shape and delta <= 1e-5


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    from jblip.train.checkpoint import Checkpointer
    from jblip.train.config import TrainConfig
    from jblip.train.loop import train
    from jblip.train.synthetic import make_dataset

    data = make_dataset(str(tmp_path / "data"), train=48, eval=8, size=32, seed=0)
    base = dict(model="tiny-instructblip-vicuna", train_data=data["train"], tokenizer=data["tokenizer"],
                trainable="qformer", mesh="fsdp=4,data=2", batch_size=8, steps=3, log_every=1, progress=False,
                max_input_len=16, max_output_len=4, max_qformer_len=16,
                optim=dict(lr=1e-3, warmup_lr=0.0, warmup_steps=1, total_steps=3))
    one = train(TrainConfig.from_dict(dict(base, log_file=str(tmp_path / "one.jsonl"))))

    two = dict(base, log_file=str(tmp_path / "two.jsonl"), checkpoint_dir=str(tmp_path / "ckpt"))
    (tmp_path / "two.json").write_text(json.dumps(two))
    run_processes("tests.multihost_train_worker", lambda i: [str(tmp_path / "two.json")])

    def losses(name):
        return [r["loss"] for r in map(json.loads, open(tmp_path / name)) if r.get("event") == "train"]
    print("losses, one process:", losses("one.jsonl"), "two:", losses("two.jsonl"))
    np.testing.assert_allclose(losses("two.jsonl"), losses("one.jsonl"), rtol=1e-5)

    # the checkpoint both processes wrote together restores here, on one process's 8 devices
    state = jax.device_get(one["state"])
    ckpt = Checkpointer(two["checkpoint_dir"])
    restored, _, _ = ckpt.restore(jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), one["state"]))
    ckpt.close()
    assert int(restored.step) == 3
    delta = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree_util.tree_leaves(restored.params), jax.tree_util.tree_leaves(state.params)))
    print(f"params after 3 updates, two processes vs one: max |delta| {delta:.2e}")
    assert delta <= 1e-5
