"""`jblip index` on several processes: each embeds a disjoint share into its part `OUT.p<i>of<n>`, process 0
merges once. The part mechanics (shared with `caption`) on simulated processes; then 2 real processes x 4
CPU devices over 127.0.0.1: the same index as one process, and a killed + rerun job with every image once."""
import json
import os

import numpy as np
import pytest

from jblip.cli import main
from jblip.commands.caption_output import CaptionFiles
from jblip.commands.index import IndexFiles
from jblip.commands.process_outputs import ProcessOutputs, part_files
from jblip.evaluation.hosts import Hosts
from jblip.retrieval.index_store import read_index


class Sequential(Hosts):
    """Process `index` of `count`, run one after another in this test: nobody to wait for."""

    def barrier(self, name):
        pass


def row(k: int) -> np.ndarray:
    return np.full((2, 3), k, np.float16)


def test_index_parts_are_merged_once_whatever_the_process_count(tmp_path):
    out = str(tmp_path / "photos.index")
    names = [f"/img/{k:02d}.png" for k in range(10)]
    store = IndexFiles("m", 2, 3)
    # a 2-process run: process 1 wrote a share and was killed; process 0 wrote its share, then waited
    with ProcessOutputs(out, Sequential(1, 2), store, "index") as p1:
        p1.write([(names[k], row(k)) for k in (1, 3)])
    with ProcessOutputs(out, Sequential(0, 2), store, "index") as p0:
        p0.write([(names[k], row(k)) for k in (0, 2, 4)])
    assert len(part_files(out)) == 2 and read_index(out)[1] == []
    # the rerun on one process skips what the parts hold, then merges them into OUT and removes them
    with ProcessOutputs(out, Sequential(0, 1), store, "index") as again:
        assert again.done == {names[k] for k in (0, 1, 2, 3, 4)}
        again.write([(names[k], row(k)) for k in range(5, 10)])
        again.merge(names)
    _, paths, emb = read_index(out)
    assert paths == names[5:] + names[:5]  # OUT's rows, then the parts' in the images' order
    assert [int(e[0, 0]) for e in emb] == [int(p[5:7]) for p in paths]
    assert not part_files(out)


def test_caption_parts_left_by_a_multiprocess_run_reach_a_one_process_rerun(tmp_path):
    out = str(tmp_path / "captions.jsonl")
    with ProcessOutputs(out, Sequential(1, 2), CaptionFiles, "caption") as p1:
        p1.write([("/img/b.png", "two")])
    with ProcessOutputs(out, Sequential(0, 1), CaptionFiles, "caption") as one:
        assert one.done == {"/img/b.png"}
        one.write([("/img/a.png", "one")])
        one.merge(["/img/a.png", "/img/b.png"])
    with open(out) as f:
        assert [json.loads(line)["image"] for line in f] == ["/img/a.png", "/img/b.png"]
    assert not part_files(out)


# ---------------------------------------------------------------------- 2 processes x 4 devices

@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from jblip.train import retrieval_demo
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(3)
    table = retrieval_demo.combos()
    for k in range(24):
        scene = retrieval_demo.scene_for(*table[(5 * k) % len(table)], 64, rng)
        retrieval_demo.synthetic.draw_scene(scene, 64).save(root / f"{k:02d}.png")
    (root / "zz-broken.png").write_bytes(b"not a png")  # reported and skipped by whichever process reads it
    return root


def index_args(images, out):
    return ["--images", str(images), "--out", str(out), "--batch-size", "2", "--workers", "2"]


@pytest.mark.slow
def test_two_processes_index_like_one_and_resume(scenes, tmp_path, private_xla_cache):
    from tests.test_eval_multihost import finish_all, kill_second_once_written, spawn
    assert main(["index", *index_args(scenes, tmp_path / "one")]) == 0
    _, one_paths, one_emb = read_index(tmp_path / "one")
    assert len(one_paths) == 24

    finish_all(spawn(index_args(scenes, tmp_path / "two"), tmp_path / "logs-two", command="index"),
               tmp_path / "logs-two")
    _, paths, emb = read_index(tmp_path / "two")
    assert paths == one_paths  # the same images, in the same order
    np.testing.assert_allclose(np.asarray(emb, np.float32), np.asarray(one_emb, np.float32), atol=1e-5)
    assert not part_files(str(tmp_path / "two"))
    for i in range(2):  # disjoint shares: 13 files each, the broken one in one of them
        log = (tmp_path / "logs-two" / f"process{i}.log").read_text()
        assert f"index (process {i} of 2): wrote 12 embeddings" in log, log[-2000:]

    out = tmp_path / "killed"
    kill_second_once_written(spawn(index_args(scenes, out), tmp_path / "logs-killed", command="index"),
                             tmp_path / "killed.p1of2" / "paths.jsonl")
    written = sum(len(read_index(part)[1]) for part in part_files(str(out)))
    assert 0 < written < 24, "the kill came before the first or after the last batch"

    finish_all(spawn(index_args(scenes, out), tmp_path / "logs-resumed", command="index"),
               tmp_path / "logs-resumed")
    _, paths, emb = read_index(out)
    assert len(paths) == len(set(paths)) == 24  # every image exactly once
    assert sorted(paths) == one_paths
    order = [one_paths.index(p) for p in paths]
    np.testing.assert_allclose(np.asarray(emb, np.float32), np.asarray(one_emb, np.float32)[order], atol=1e-5)
    assert not part_files(str(out)) and sorted(os.listdir(out)) == ["embeddings.npy", "index.json", "paths.jsonl"]
