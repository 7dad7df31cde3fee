"""`jblip eval` for the retrieval tasks (jblip/evaluation/retrieval.py): LAVIS' `compute_sim_matrix` over a
test split, resumable, then recall as LAVIS reports it.

1. Text embeddings of every caption, image embeddings of every image (images decoded on the
   grain pipeline of jblip/image_batches.py), ITC similarity of every pair.
2. The k_test candidates per query (`jblip.retrieval.k_test`), grouped by image: each image's
   ViT output is computed once more and scored with every text it is paired with, in either
   direction (recomputing the ViT costs one more forward per image, against ~2 k_test ITM
   passes per image, and spares holding every image's ViT output: 19 GB for COCO at 364 px).
   Each image's ITM logits are appended to OUT/predictions.jsonl as they come
   ({"key": image index, "id": image, "texts": [...], "itm": [...]}): a rerun skips those images.
3. The score matrices, recall (with and without re-ranking), OUT/metrics.json,
   OUT/retrieval_results.json, and the one-line summary.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from jblip.evaluation.predictions import PredictionWriter, read_predictions
from jblip.evaluation.retrieval import RetrievalData, RetrievalTask
from jblip.evaluation.runner import METRICS, PREDICTIONS, Progress
from jblip.image_batches import ImageBatches
from jblip.retrieval.k_test import FILL, itc_matrix, pairs_per_image, score_matrices, top_candidates
from jblip.retrieval.metrics import lavis_order, retrieval_metrics

TOP = 10  # candidates per query in the results file


def _batches(items, size):
    return [items[s:s + size] for s in range(0, len(items), size)]


def _loaded(engine, paths, rows, workers):
    """(rows, [(row, pixels)] of the readable images, [errors]) per batch of `rows`."""
    batches = _batches(rows, engine.batch_size)
    loader = ImageBatches(engine.image_processor, [[paths[r] for r in b] for b in batches], workers)
    for batch, loaded in zip(batches, loader):
        yield batch, [(r, px) for r, (px, err) in zip(batch, loaded) if err is None], \
            [err for _, err in loaded if err is not None]


def image_embeddings(engine, paths, workers) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [I, Q, E] float32, readable [I] bool); unreadable images reported, rows zero."""
    c = engine.config
    out = np.zeros((len(paths), c.num_query_tokens, c.embed_dim), np.float32)
    ok = np.zeros(len(paths), bool)
    for _, good, errors in _loaded(engine, paths, list(range(len(paths))), workers):
        for error in errors:
            print(f"eval: skipped {error}", file=sys.stderr)
        if good:
            rows = [r for r, _ in good]
            out[rows] = engine.image_embeddings(np.stack([px for _, px in good]))
            ok[rows] = True
    return out, ok


def _itm_logits(engine, states, image_rows, texts, ids, mask) -> np.ndarray:
    """ITM "match" logits of (states[image_rows[j]], text texts[j]) pairs, a model batch at a time
    (only one batch of repeated ViT outputs is ever built)."""
    out = []
    for s in range(0, len(texts), engine.batch_size):
        rows, t = image_rows[s:s + engine.batch_size], texts[s:s + engine.batch_size]
        out.append(engine.itm_logits_pairs(states[rows], ids[t], mask[t])[:, 1])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _check_done(done: dict, readable, pairs, out_dir):
    position = {int(i): r for r, i in enumerate(readable)}
    for key, record in done.items():
        r = position.get(int(key)) if key.isdigit() else None
        if r is None or record.get("texts") != pairs[r].tolist() or len(record.get("itm", ())) != len(pairs[r]):
            raise ValueError(f"{out_dir} holds ITM scores of image {key!r} for other candidates (another data file, "
                             "model, --k-test or --limit?): choose another --out")


def rerank(engine, data: RetrievalData, sims, readable, k_test, ids, mask, out_dir, workers):
    """ITM logits of every candidate pair, as three flat arrays (readable-image position, text, logit);
    computed for the images not yet in OUT/predictions.jsonl and appended there."""
    i2t, t2i = top_candidates(sims, k_test)
    pairs = pairs_per_image(i2t, t2i, len(readable))
    path = os.path.join(out_dir, PREDICTIONS)
    done = read_predictions(path)
    _check_done(done, readable, pairs, out_dir)
    todo = [r for r in range(len(readable)) if str(int(readable[r])) not in done and len(pairs[r])]
    print(f"eval: re-ranking {sum(len(pairs[r]) for r in todo)} (image, text) pairs of {len(todo)} images with "
          f"the ITM head ({len(readable) - len(todo)} images already in {out_dir})", file=sys.stderr)
    progress = Progress(len(todo), "images")
    paths = {r: data.images[int(readable[r])] for r in todo}
    failed = 0
    with PredictionWriter(path) as writer:
        for batch, good, errors in _loaded(engine, paths, todo, workers):
            for error in errors:
                print(f"eval: skipped {error}", file=sys.stderr)
            failed += len(errors)
            progress.bad += len(errors)
            if not good:
                continue
            states = engine.vision_states(np.stack([px for _, px in good]))
            image_rows = np.concatenate([np.full(len(pairs[r]), j) for j, (r, _) in enumerate(good)])
            texts = np.concatenate([pairs[r] for r, _ in good])
            logits = _itm_logits(engine, states, image_rows, texts, ids, mask).tolist()
            records, start = [], 0
            for r, _ in good:
                n = len(pairs[r])
                i = int(readable[r])
                records.append({"key": str(i), "id": data.names[i], "texts": pairs[r].tolist(),
                                "itm": logits[start:start + n]})
                start += n
            writer.write(records)
            done.update((rec["key"], rec) for rec in records)
            progress.done += len(good)
            progress.update()
    progress.finish()
    if failed:
        raise ValueError(f"{failed} images that were read for their embeddings could not be read again for "
                         "re-ranking; run the same command again to retry them")
    position = {int(i): r for r, i in enumerate(readable)}
    recs = [done[str(int(i))] for i in readable if str(int(i)) in done]
    pi = np.concatenate([np.full(len(rec["texts"]), position[int(rec["key"])]) for rec in recs] or [np.zeros(0)])
    pt = np.concatenate([np.asarray(rec["texts"], np.int64) for rec in recs] or [np.zeros(0)])
    pl = np.concatenate([np.asarray(rec["itm"], np.float32) for rec in recs] or [np.zeros(0)])
    return score_matrices(sims, i2t, t2i, pi, pt, pl)


def _full(score_i2t, score_t2i, readable, data: RetrievalData):
    """Score matrices over every image of the data from those over the readable ones: an unreadable
    image is never a candidate (-inf), and its own captions rank last for it."""
    n_img, n_txt = len(data.images), len(data.texts)
    if len(readable) == n_img:
        return score_i2t, score_t2i
    full_i2t = np.full((n_img, n_txt), FILL, np.float32)
    full_i2t[readable] = score_i2t
    full_t2i = np.full((n_txt, n_img), -np.inf, np.float32)
    full_t2i[:, readable] = score_t2i
    for i in sorted(set(range(n_img)) - set(readable.tolist())):
        full_i2t[i, data.img2txt[i]] = -np.inf
    return full_i2t, full_t2i


def evaluate_retrieval(task: RetrievalTask, data: RetrievalData, engine, out_dir: str, k_test: int,
                       workers: int = 4) -> tuple[dict, str]:
    """The whole protocol; returns (metrics, summary line)."""
    os.makedirs(out_dir, exist_ok=True)
    print(f"eval: {task.name}, {len(data.images)} images, {len(data.texts)} captions, {engine.config.name}; "
          f"ITC, then ITM + ITC for the top {k_test} of every query", file=sys.stderr)
    ids, mask = engine.tokenize(data.texts)  # one width for every caption: one compile
    text = engine.text_embeddings_ids(ids, mask)
    emb, ok = image_embeddings(engine, data.images, workers)
    readable = np.nonzero(ok)[0]
    if not len(readable):
        raise ValueError("none of the images could be read")
    sims = itc_matrix(emb[readable], text)
    score_i2t, score_t2i = rerank(engine, data, sims, readable, k_test, ids, mask, out_dir, workers)
    score_i2t, score_t2i = _full(score_i2t, score_t2i, readable, data)
    metrics = retrieval_metrics(score_i2t, score_t2i, data.txt2img, data.img2txt)
    itc_i2t, itc_t2i = _full(sims, sims.T, readable, data)
    unreadable = len(data.images) - len(readable)
    notes = [f"{unreadable} unreadable images: never retrieved, and their own queries count as misses"] \
        if unreadable else []
    metrics = dict(metrics, overall=metrics["r_mean"], task=task.name, k_test=k_test, images=len(data.images),
                   texts=len(data.texts), unreadable=unreadable, itc=retrieval_metrics(itc_i2t, itc_t2i, data.txt2img,
                                                                                        data.img2txt), notes=notes)
    with open(os.path.join(out_dir, METRICS), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    results = {"image_to_text": [lavis_order(row)[:TOP].tolist() for row in score_i2t],
               "text_to_image": [lavis_order(row)[:TOP].tolist() for row in score_t2i]}
    with open(os.path.join(out_dir, task.results_file), "w", encoding="utf-8") as f:
        json.dump(results, f)
    return metrics, f"{task.name}: {task.headline(metrics)} over {len(data.images)} images, {len(data.texts)} captions"
