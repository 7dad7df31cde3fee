"""`jblip index` / `jblip search` with the bundled demo retrieval model on generated scenes:
resumable without duplicates, a corrupt image skipped, the right scenes found both ways."""
import json
import os

import numpy as np
import pytest

from jblip.cli import main
from jblip.retrieval.index_store import EMBEDDINGS, PATHS, read_index
from jblip.train import retrieval_demo

# 12 held-out scenes: every colour x shape once, sides and backgrounds mixed
PICKS = [(c, s, side, b) for k, (c, s) in enumerate([(c, s) for c in ("red", "green", "blue", "yellow")
                                                     for s in ("circle", "square", "triangle")])
         for side, b in [(("left", "right")[k % 2], ("white", "grey", "black")[k % 3])]]


def draw_scenes(root, picks=PICKS, seed: int = 99) -> dict[str, str]:
    """Each pick drawn at 64 px into `root` as colour_shape_side_background.png: {file name: caption}."""
    rng = np.random.default_rng(seed)
    names = {}
    for combo in picks:
        scene = retrieval_demo.scene_for(*combo, 64, rng)
        name = "_".join(combo) + ".png"
        retrieval_demo.synthetic.draw_scene(scene, 64).save(root / name)
        names[name] = retrieval_demo.caption(scene, 64)
    return names


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    names = draw_scenes(root)
    (root / "broken.png").write_bytes(b"not a png at all")
    return root, names


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_index_resumes_without_duplicates_and_skips_a_corrupt_image(scenes, tmp_path, capsys, private_xla_cache):
    root, names = scenes
    index = tmp_path / "index"
    code, _, err = run_cli(capsys, "index", "--images", str(root / "red_*.png"), "--out", str(index), "--batch-size", "4")
    assert code == 0 and len(read_index(index)[1]) == 3
    # an interrupted append: embedding rows written, their paths not (and a partial paths line)
    with open(index / EMBEDDINGS, "ab") as f:
        f.write(b"\0" * 2 * 8 * 64 * 2)
    with open(index / PATHS, "a") as f:
        f.write('{"image": "/half')
    code, _, err = run_cli(capsys, "index", "--images", str(root), "--out", str(index), "--batch-size", "4")
    assert code == 0
    assert "skipped" in err and "broken.png" in err
    meta, paths, emb = read_index(index)
    assert len(paths) == len(set(paths)) == 12 and emb.shape == (12, 8, 64) and emb.dtype == np.float16
    assert np.load(index / EMBEDDINGS).shape == (12, 8, 64)  # a plain .npy
    code, _, err = run_cli(capsys, "index", "--images", str(root), "--out", str(index))
    assert code == 0 and len(read_index(index)[1]) == 12  # nothing new, no duplicates


def test_search_finds_the_scene_for_its_caption(scenes, tmp_path, capsys, private_xla_cache):
    root, names = scenes
    index = tmp_path / "index"
    assert run_cli(capsys, "index", "--images", str(root), "--out", str(index), "--batch-size", "4")[0] == 0
    for k, (name, text) in enumerate(list(names.items())[1::6]):  # each call loads the model: two suffice
        rerank = ["--rerank", "4"] if k % 2 else []
        code, out, _ = run_cli(capsys, "search", "--index", str(index), "--text", text, "--top", "3",
                               "--batch-size", "4", *rerank)
        hits = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and [h["rank"] for h in hits] == [1, 2, 3]
        assert os.path.basename(hits[0]["image"]) == name, (text, hits)
    code, out, _ = run_cli(capsys, "search", "--index", str(index), "--text", "blue square", "--top", "1", "--batch-size", "4")
    assert "blue_square" in json.loads(out)["image"]


def test_search_ranks_captions_for_an_image(scenes, tmp_path, capsys, private_xla_cache):
    root, names = scenes
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(names.values()) + "\n")
    name = "green_triangle_right_black.png" if "green_triangle_right_black.png" in names else sorted(names)[0]
    code, out, _ = run_cli(capsys, "search", "--image", str(root / name), "--captions", str(captions),
                           "--top", "2", "--rerank", "3", "--batch-size", "4")
    hits = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and hits[0]["caption"] == names[name]


def test_search_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "search", "--index", str(tmp_path), "--text", "x")
    assert code == 2 and "index.json" in err
    code, _, err = run_cli(capsys, "search", "--text", "x")
    assert code == 2 and "--index" in err


def test_bundled_model_recall_on_held_out_scenes():
    """The bundled model on 72 new scenes (one per caption, a seed training never saw): ITC recall."""
    from jblip.commands.retrieval_common import DEMO_RETRIEVAL_MODEL
    from jblip.retrieval.engine import RetrievalEngine
    from jblip.retrieval.metrics import retrieval_metrics
    from jblip.retrieval.model import itc_similarity
    engine = RetrievalEngine.from_pretrained(DEMO_RETRIEVAL_MODEL, batch_size=24)
    images, texts = retrieval_demo.held_out(64, seed=777)
    sim = np.asarray(itc_similarity(engine.image_embeddings(images), engine.text_embeddings(texts)))
    truth = list(range(len(texts)))
    m = retrieval_metrics(sim, sim.T, truth, [[i] for i in truth])
    print({k: round(v, 1) for k, v in m.items()})
    assert m["img_r1"] >= 90 and m["txt_r1"] >= 90


@pytest.mark.slow
def test_retrieval_demo_training_resumes_from_its_checkpoints(tmp_path):
    """Stopped after 2 of 4 steps (checkpoint every 2) and rerun, the recipe writes the same model
    as an uninterrupted run: the batches and keys depend only on the seed and the step."""
    retrieval_demo.train(str(tmp_path / "straight"), steps=4, log=lambda line: None)
    ckpt = str(tmp_path / "ckpt")
    stopped = retrieval_demo.train(str(tmp_path / "resumed"), steps=4, log=lambda line: None, checkpoint_dir=ckpt,
                                   checkpoint_every=2, stop_after=2)
    assert stopped == {"stopped": 2}
    lines = []
    retrieval_demo.train(str(tmp_path / "resumed"), steps=4, log=lines.append, checkpoint_dir=ckpt,
                         checkpoint_every=2)
    assert any("resumed from the checkpoint of step 2" in line for line in lines)
    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "model.safetensors").read_bytes()
