"""`jblip index --images DIR_OR_GLOB --out INDEX_DIR`: ITC embeddings of a folder of images.

Writes `embeddings.npy` (float16 [N, Q, E]) + `paths.jsonl` + `index.json` (see
`jblip.retrieval.index_store`), one batch at a time: an interrupted run resumes where it
stopped, without duplicates. Unreadable images are reported on stderr and skipped (the next
run retries them).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from jblip.commands.caption import list_images
from jblip.commands.retrieval_common import add_retrieval_model_argument, load_engine, load_pixels


def add_arguments(parser):
    add_retrieval_model_argument(parser)
    parser.add_argument("--images", required=True, metavar="DIR_OR_GLOB",
                        help="a folder (searched recursively) or a glob such as 'photos/**/*.jpg' (quote it)")
    parser.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder; resumed if it exists")


def run(args) -> int:
    from jblip.retrieval.index_store import ImageIndex
    paths = list_images(args.images)
    engine = load_engine(args.model, args.batch_size)
    index = ImageIndex(args.out, engine.path, engine.config.num_query_tokens, engine.config.embed_dim)
    done = set(index.paths)
    todo = [p for p in paths if p not in done]
    if not todo:
        print(f"index: all {len(paths)} images are already in {args.out}", file=sys.stderr)
        return 0
    start, written, bad = time.perf_counter(), 0, 0
    try:
        for i in range(0, len(todo), engine.batch_size):
            good, pixels = [], []
            for p in todo[i:i + engine.batch_size]:
                x, error = load_pixels(engine, p)
                if error is None:
                    good.append(p)
                    pixels.append(x)
                else:
                    bad += 1
                    print(f"index: skipped {error}", file=sys.stderr)
            if good:
                index.append(good, engine.image_embeddings(np.stack(pixels)).astype(np.float16))
                written += len(good)
            rate = written / max(time.perf_counter() - start, 1e-9)
            print(f"index: {written + bad}/{len(todo)} images, {rate:.1f} images/s"
                  + (f", {bad} unreadable" if bad else ""), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"index: interrupted after {written} images; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"index: wrote {written} embeddings ({len(paths) - len(todo)} already there, {bad} unreadable) "
          f"to {args.out}: {len(index.paths)} images in all", file=sys.stderr)
    return 0
