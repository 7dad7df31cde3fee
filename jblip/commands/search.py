"""`jblip search`: text -> image over an index, or image -> text over a captions file.

    jblip search --index INDEX_DIR --text "red circle" [--top 10] [--rerank K]
    jblip search --image photo.png --captions captions.txt [--top 5] [--rerank K]

Candidates are ranked by ITC similarity (each image's best query); `--rerank K` re-scores the
top K with the ITM head as LAVIS' `k_test` does (ITM "match" logit + ITC similarity), the
rest keep their ITC order below them. One JSON line per hit: rank, image or caption, score, itc.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from jblip.commands.retrieval_common import add_retrieval_model_argument, load_engine, open_index
from jblip.image_batches import load_or_error


def add_arguments(parser):
    add_retrieval_model_argument(parser)
    parser.add_argument("--index", metavar="INDEX_DIR", help="an index built by `jblip index` (text -> image)")
    parser.add_argument("--text", help="the query text (with --index)")
    parser.add_argument("--image", help="the query image (with --captions: image -> text)")
    parser.add_argument("--captions", metavar="FILE",
                        help="candidate texts: one per line, or JSONL records with a \"caption\" field")
    parser.add_argument("--top", type=int, default=10, help="hits to print (default 10)")
    parser.add_argument("--rerank", type=int, default=0, metavar="K",
                        help="re-rank the ITC top K with the ITM head (LAVIS k_test; default 0: ITC only)")


def read_captions(path: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    line = json.loads(line)["caption"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: a JSON line needs a \"caption\" string") from None
            out.append(str(line))
    if not out:
        raise ValueError(f"{path} holds no captions")
    return out


def _order(itc: np.ndarray, rerank_scores: dict[int, float], top: int) -> list[tuple[int, float]]:
    """Re-ranked candidates first (by their new score), then the rest by ITC."""
    reranked = sorted(rerank_scores.items(), key=lambda kv: -kv[1])
    rest = [(int(i), float(itc[i])) for i in np.argsort(-itc, kind="stable") if int(i) not in rerank_scores]
    return (reranked + rest)[:top]


def run(args) -> int:
    if args.top < 1 or args.rerank < 0:
        raise ValueError("--top must be >= 1 and --rerank >= 0")
    if args.index and args.text is not None:
        return _text_to_image(args)
    if args.image and args.captions:
        return _image_to_text(args)
    raise ValueError("give --index with --text (text -> image) or --image with --captions (image -> text)")


def _text_to_image(args) -> int:
    search = open_index(args.index, args.model, args.batch_size)
    engine, paths = search.engine, search.paths
    itc = search.itc(args.text)
    scores = {}
    if args.rerank:
        top = [int(i) for i in np.argsort(-itc, kind="stable")[:args.rerank]]
        loaded = [(i, load_or_error(engine.image_processor, paths[i])) for i in top]
        for i, (_, error) in loaded:
            if error is not None:
                print(f"search: cannot re-rank {error}", file=sys.stderr)
        ok = [(i, x) for i, (x, error) in loaded if error is None]
        if ok:
            states = engine.vision_states(np.stack([x for _, x in ok]))
            ids, mask = engine.tokenize([args.text] * len(ok))
            new = engine.rerank(states, ids, mask, itc[[i for i, _ in ok]])
            scores = {i: float(s) for (i, _), s in zip(ok, new)}
    for rank, (i, score) in enumerate(_order(itc, scores, args.top), 1):
        print(json.dumps({"rank": rank, "image": paths[i], "score": round(score, 4), "itc": round(float(itc[i]), 4)}))
    return 0


def _image_to_text(args) -> int:
    captions = read_captions(args.captions)
    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"no image file {args.image}")
    engine = load_engine(args.model, args.batch_size)
    pixels, error = load_or_error(engine.image_processor, args.image)
    if error is not None:
        raise ValueError(error)
    itc = engine.itc_scores(pixels[None], captions)[0]
    scores = {}
    if args.rerank:
        top = [int(i) for i in np.argsort(-itc, kind="stable")[:args.rerank]]
        states = np.repeat(engine.vision_states(pixels[None]), len(top), axis=0)
        ids, mask = engine.tokenize([captions[i] for i in top])
        scores = {i: float(s) for i, s in zip(top, engine.rerank(states, ids, mask, itc[top]))}
    for rank, (i, score) in enumerate(_order(itc, scores, args.top), 1):
        print(json.dumps({"rank": rank, "caption": captions[i], "score": round(score, 4), "itc": round(float(itc[i]), 4)}))
    return 0
