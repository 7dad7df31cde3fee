"""`jblip eval` retrieval tasks (Flickr30K / COCO 5K test, BLIP-2 protocol): k_test re-ranking and LAVIS
recall on a hand-worked matrix, the annotation formats, and the bundled demo retrieval model end to end
on generated scenes, its recall equal to one computed independently from RetrievalEngine scores."""
import json
import os

import numpy as np
import pytest

from jblip.cli import main
from jblip.evaluation import make_task
from jblip.evaluation.retrieval import pre_caption
from jblip.retrieval.k_test import FILL, pairs_per_image, score_matrices, top_candidates
from jblip.retrieval.metrics import retrieval_metrics


def lavis_report_metrics(scores_i2t, scores_t2i, txt2img, img2txt):
    """LAVIS `RetrievalTask._report_metrics` line by line (the reference)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    out = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": sum(tr) / 3,
           "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": sum(ir) / 3}
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out


# 3 images with 2 captions each (image i: texts 2i, 2i+1)
SIMS = np.array([[0.9, 0.1, 0.8, 0.2, 0.3, 0.0],
                 [0.5, 0.4, 0.3, 0.7, 0.1, 0.2],
                 [0.2, 0.6, 0.1, 0.0, 0.4, 0.5]], np.float32)
ITM = np.array([[1.0, 5.0, 2.0, 0.5, -1.0, 0.0],
                [2.0, 0.0, 1.5, 1.0, 0.0, 3.0],
                [0.0, 2.0, 0.0, 0.0, 1.0, 3.0]], np.float32)
TXT2IMG, IMG2TXT = [0, 0, 1, 1, 2, 2], [[0, 1], [2, 3], [4, 5]]


def test_k_test_rerank_and_recall_by_hand():
    i2t, t2i = top_candidates(SIMS, 2)
    # each image's 2 best texts, each text's 2 best images (by ITC)
    assert i2t.tolist() == [[0, 2], [3, 0], [1, 5]]
    assert t2i.tolist() == [[0, 1], [2, 1], [0, 1], [1, 0], [2, 0], [2, 1]]
    pairs = pairs_per_image(i2t, t2i, 3)
    assert [p.tolist() for p in pairs] == [[0, 2, 3, 4], [0, 1, 2, 3, 5], [1, 4, 5]]
    pi = np.concatenate([np.full(len(p), i) for i, p in enumerate(pairs)])
    pt = np.concatenate(pairs)
    s_i2t, s_t2i = score_matrices(SIMS, i2t, t2i, pi, pt, ITM[pi, pt])
    # candidates: ITM logit + ITC; the rest -100
    np.testing.assert_allclose(s_i2t, [[1.9, FILL, 2.8, FILL, FILL, FILL],
                                       [2.5, FILL, FILL, 1.7, FILL, FILL],
                                       [FILL, 2.6, FILL, FILL, FILL, 3.5]], rtol=1e-6)
    np.testing.assert_allclose(s_t2i, [[1.9, 2.5, FILL], [FILL, 0.4, 2.6], [2.8, 1.8, FILL],
                                       [0.7, 1.7, FILL], [-0.7, FILL, 1.4], [FILL, 3.2, 3.5]], rtol=1e-6)
    m = retrieval_metrics(s_i2t, s_t2i, TXT2IMG, IMG2TXT)
    # image -> text ranks of the best own caption: image 0: t2, t0 -> 1; image 1: t0, t3 -> 1; image 2: t5 -> 0
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == m["txt_r10"] == 100
    # text -> image ranks: t0 1, t1 2 (image 0 not a candidate: after both), t2 1, t3 0, t4 0, t5 0
    assert m["img_r1"] == 50 and m["img_r5"] == m["img_r10"] == 100
    assert m["r_mean"] == pytest.approx(((100 / 3 + 200) / 3 + (50 + 200) / 3) / 2)
    assert m["agg_metrics"] == m["txt_r_mean"]
    # ITC alone ranks differently: images 0 and 1 find their caption first
    assert retrieval_metrics(SIMS, SIMS.T, TXT2IMG, IMG2TXT)["txt_r1"] == pytest.approx(200 / 3)
    with pytest.raises(KeyError, match="image 0, text 0"):
        score_matrices(SIMS, i2t, t2i, pi[1:], pt[1:], ITM[pi, pt][1:])


def test_recall_orders_ties_as_lavis():
    """Captions outside the re-ranked candidates tie at -100: their ranks are whatever LAVIS'
    `np.argsort(score)[::-1]` makes of the tie, here as in LAVIS' own code."""
    rng = np.random.default_rng(0)
    scores = np.full((2, 12), FILL, np.float32)
    scores[0, 5], scores[1, 1] = 3.0, 2.0
    t2i = rng.normal(size=(12, 2)).astype(np.float32)
    args = ([0] * 6 + [1] * 6, [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    assert retrieval_metrics(scores, t2i, *args) == lavis_report_metrics(scores, t2i, *args)
    one = ([0] + [1] * 11, [[0], list(range(1, 12))])
    m = retrieval_metrics(scores, t2i, *one)
    assert m == lavis_report_metrics(scores, t2i, *one)


def test_annotation_files_lavis_and_karpathy(tmp_path):
    (tmp_path / "flickr30k-images").mkdir()
    (tmp_path / "flickr30k-images" / "1.jpg").write_bytes(b"")
    lavis = tmp_path / "flickr30k_test.json"
    lavis.write_text(json.dumps([{"image": "flickr30k-images/1.jpg", "caption": ["A dog (brown)!", "Two  dogs."]},
                                 {"image": "flickr30k-images/2.jpg", "caption": ["a cat"], "image_id": 2}]))
    data = make_task("flickr30k").load([str(lavis)], str(tmp_path))
    assert data.texts == ["a dog brown", "two dogs", "a cat"]
    assert data.img2txt == [[0, 1], [2]] and data.txt2img == [0, 0, 1]
    assert data.images == [str(tmp_path / "flickr30k-images" / "1.jpg"), str(tmp_path / "flickr30k-images" / "2.jpg")]
    assert data.first(1).texts == ["a dog brown", "two dogs"] and data.first(1).txt2img == [0, 0]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "A man."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "val", "sentences": [{"raw": "x"}]}]}))
    data = make_task("coco-retrieval").load([str(karpathy)], str(tmp_path))
    assert data.names == ["val2014/a.jpg"] and data.texts == ["a man"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="not a retrieval annotation file"):
        make_task("coco-retrieval").load([str(bad)], str(tmp_path))
    assert pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


# ---------------------------------------------------------------------- end to end, bundled demo model

COLOURS, SHAPES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
TEMPLATES = (0, 1, 2, 3, 5)  # retrieval_demo.TEMPLATES that name colour and shape: unique per scene here


@pytest.fixture(scope="module")
def flickr_like(tmp_path_factory):
    """12 generated scenes (every colour x shape once) in a LAVIS-format test file, 5 captions each."""
    from jblip.train import retrieval_demo
    root = tmp_path_factory.mktemp("retrieval")
    (root / "images").mkdir()
    rng = np.random.default_rng(5)
    entries = []
    for k, (c, s) in enumerate([(c, s) for c in COLOURS for s in SHAPES]):
        side, background = ("left", "right")[k % 2], ("white", "grey", "black")[k % 3]
        scene = retrieval_demo.scene_for(c, s, side, background, 64, rng)
        name = f"images/{c}_{s}.png"
        retrieval_demo.synthetic.draw_scene(scene, 64).save(root / name)
        captions = [retrieval_demo.TEMPLATES[t].format(colour=c, shape=s, side=side, background=background)
                    for t in TEMPLATES]
        captions[0] = captions[0].capitalize() + "."  # "Red circle ... background." -> as written
        entries.append({"image": name, "caption": captions})
    (root / "flickr30k_test.json").write_text(json.dumps(entries))
    return root, entries


def independent_metrics(entries, root, k_test):
    """Recall from RetrievalEngine scores of every pair, ranked with LAVIS' code as written."""
    from jblip.commands.retrieval_common import DEMO_RETRIEVAL_MODEL
    from jblip.retrieval.engine import RetrievalEngine
    engine = RetrievalEngine.from_pretrained(DEMO_RETRIEVAL_MODEL, batch_size=4)
    paths = [str(root / e["image"]) for e in entries]
    texts = [c.lower().rstrip(".") for e in entries for c in e["caption"]]
    txt2img = [i for i, e in enumerate(entries) for _ in e["caption"]]
    img2txt = [[t for t, i in enumerate(txt2img) if i == k] for k in range(len(entries))]
    sims = engine.itc_scores(paths, texts)  # [I, T]
    states = engine.vision_states(paths)
    ids, mask = engine.tokenize(texts)
    n_img, n_txt = sims.shape
    itm = engine.itm_logits_pairs(np.repeat(states, n_txt, 0), np.tile(ids, (n_img, 1)),
                                  np.tile(mask, (n_img, 1)))[:, 1].reshape(n_img, n_txt)
    s_i2t = np.full((n_img, n_txt), -100.0, np.float32)
    for i in range(n_img):
        top = np.argsort(-sims[i])[:k_test]
        s_i2t[i, top] = itm[i, top] + sims[i, top]
    s_t2i = np.full((n_txt, n_img), -100.0, np.float32)
    for t in range(n_txt):
        top = np.argsort(-sims[:, t])[:k_test]
        s_t2i[t, top] = itm[top, t] + sims[top, t]
    return lavis_report_metrics(s_i2t, s_t2i, txt2img, img2txt), lavis_report_metrics(sims, sims.T, txt2img, img2txt)


def eval_args(root, out, k_test="4"):
    return ["eval", "--task", "flickr30k", "--data", str(root / "flickr30k_test.json"), "--images", str(root),
            "--out", str(out), "--k-test", k_test, "--batch-size", "4", "--workers", "2"]


def test_demo_retrieval_model_end_to_end(flickr_like, tmp_path, capsys, private_xla_cache):
    root, entries = flickr_like
    out = tmp_path / "out"
    assert main(eval_args(root, out)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    reranked, itc = independent_metrics(entries, root, 4)
    for key, value in reranked.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    for key, value in itc.items():
        assert metrics["itc"][key] == pytest.approx(value, abs=1e-9), key
    assert metrics["overall"] == metrics["r_mean"] and metrics["images"] == 12 and metrics["texts"] == 60
    assert metrics["img_r1"] >= 80  # the demo model finds its scenes
    assert last.startswith("flickr30k: r_mean") and f"{metrics['r_mean']:.2f}" in last
    with open(out / "retrieval_results.json") as f:
        results = json.load(f)
    assert len(results["image_to_text"]) == 12 and len(results["text_to_image"]) == 60
    assert all(len(r) == 10 for r in results["image_to_text"])


@pytest.mark.slow
def test_interrupted_retrieval_eval_resumes(flickr_like, tmp_path, capsys, private_xla_cache):
    root, _ = flickr_like
    out = tmp_path / "out"
    assert main(eval_args(root, out)) == 0
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    # interrupted after a few images (a partial last line): the rerun scores the rest, same metrics
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 12
    (out / "predictions.jsonl").write_text("".join(lines[:5]) + lines[5][:30])
    capsys.readouterr()
    assert main(eval_args(root, out)) == 0
    assert "of 7 images" in capsys.readouterr().err
    with open(out / "metrics.json") as f:
        assert json.load(f) == metrics
    assert main(eval_args(root, out, k_test="3")) == 2  # would mix two candidate sets
    assert "for other candidates" in capsys.readouterr().err


def test_retrieval_errors_are_one_line(flickr_like, tmp_path, capsys):
    root, _ = flickr_like
    base = ["eval", "--task", "coco-retrieval", "--data", str(root / "flickr30k_test.json"), "--images", str(root),
            "--out", str(tmp_path / "o")]
    assert main(base + ["--beams", "3"]) == 2
    assert "--beams do not apply to the retrieval task coco-retrieval" in capsys.readouterr().err
    assert main(["eval", "--task", "gqa", "--data", "x.json", "--images", ".", "--out", str(tmp_path), "--k-test",
                 "3"]) == 2
    assert "--k-test applies to the retrieval tasks" in capsys.readouterr().err


def test_an_unreadable_image_counts_as_a_miss(flickr_like, tmp_path, capsys, private_xla_cache):
    root, entries = flickr_like
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries[:3] + [{"image": "images/missing.png", "caption": ["red circle"]}]))
    assert main(["eval", "--task", "flickr30k", "--data", str(data), "--images", str(root), "--out",
                 str(tmp_path / "o"), "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert "missing.png" in captured.err and "1 unreadable images" in captured.err
    with open(tmp_path / "o" / "metrics.json") as f:
        m = json.load(f)
    assert m["unreadable"] == 1 and m["txt_r10"] <= 75 and m["img_r1"] <= 100 * 15 / 16  # 16 captions
