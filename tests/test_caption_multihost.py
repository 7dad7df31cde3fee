"""`jblip caption` on 2 processes x 4 CPU devices (joined over 127.0.0.1): the same captions as one
process; one process killed mid-run, then a rerun: every image in the output exactly once."""
import json
import os
import shutil

import pytest

from jblip.cli import main
from tests.test_eval_multihost import MESH, finish_all, kill_second_once_written, spawn
from tests.test_demo import EXAMPLES

pytestmark = pytest.mark.slow


def caption_args(images, out):
    return ["--images", str(images), "--out", str(out), "--prompt", "What colour is the shape?", "--mesh", MESH,
            "--batch-size", "4", "--workers", "2", "--max-new-tokens", "3"]


def captions(out) -> list[tuple[str, str]]:
    with open(out) as f:
        return [(r["image"], r["caption"]) for r in map(json.loads, f)]


def test_two_processes_caption_like_one_and_resume(tmp_path, private_xla_cache):
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(EXAMPLES)):
        if name.endswith(".png"):
            shutil.copy(os.path.join(EXAMPLES, name), images / name)
    (images / "zz-broken.png").write_bytes(b"not a png")  # reported and skipped by whichever process reads it
    count = len(os.listdir(images)) - 1
    assert main(["caption", *caption_args(images, tmp_path / "one.jsonl")]) == 0
    one = captions(tmp_path / "one.jsonl")
    assert len(one) == count

    out = tmp_path / "killed.jsonl"
    kill_second_once_written(spawn(caption_args(images, out), tmp_path / "logs-killed", command="caption"),
                             tmp_path / "killed.jsonl.p1of2")
    written = sum(len(captions(tmp_path / f)) for f in os.listdir(tmp_path) if ".jsonl.p" in f)
    assert 0 < written < count, "the kill came before the first or after the last batch"

    finish_all(spawn(caption_args(images, out), tmp_path / "logs-resumed", command="caption"),
               tmp_path / "logs-resumed")
    resumed = captions(out)
    assert len(resumed) == len({k for k, _ in resumed}) == count  # every image exactly once
    assert sorted(resumed) == sorted(one)
    assert not [f for f in os.listdir(tmp_path) if ".jsonl.p" in f]  # the parts were merged and removed
