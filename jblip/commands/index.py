"""`jblip index --images DIR_OR_GLOB --out INDEX_DIR`: ITC embeddings of a folder of images.

Writes `embeddings.npy` (float16 [N, Q, E]) + `paths.jsonl` + `index.json` (see
`jblip.retrieval.index_store`), one batch at a time: an interrupted run resumes where it
stopped, without duplicates. Images are decoded on the batch jobs' grain pipeline
(`jblip/image_batches.py`); unreadable ones are reported on stderr and skipped (the next run
retries them).

On several processes (`--distributed`, or a program that has called `jax.distributed.initialize`
first) every process lists the same images, embeds every N-th of those not yet indexed with
its own copy of the model, and appends them to its own index folder `OUT.p<i>of<N>`; at the
end process 0 moves the rows OUT lacks into OUT, in the images' order, and removes the parts
(`jblip/commands/process_outputs.py`, as `caption` does): every image ends in OUT exactly once,
and an interrupted run resumes with any process count.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np

from jblip.commands.caption import list_images
from jblip.commands.process_outputs import ProcessOutputs
from jblip.commands.retrieval_common import add_retrieval_model_argument, load_engine
from jblip.image_batches import ImageBatches


def add_arguments(parser):
    add_retrieval_model_argument(parser)
    parser.add_argument("--images", required=True, metavar="DIR_OR_GLOB",
                        help="a folder (searched recursively) or a glob such as 'photos/**/*.jpg' (quote it)")
    parser.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder; resumed if it exists")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding images ahead of the model")
    parser.add_argument("--distributed", action="store_true",
                        help="join the other processes of a multi-host run (jax.distributed.initialize with the "
                             "cluster's environment); each process embeds its share of the images")


class _IndexOutput:
    def __init__(self, path: str, files: "IndexFiles"):
        self.path, self.files, self.index = path, files, None
        self.done: set[str] = set()

    def __enter__(self):
        from jblip.retrieval.index_store import ImageIndex
        self.index = ImageIndex(self.path, self.files.model, self.files.queries, self.files.dim)  # cuts a torn batch
        self.done = set(self.index.paths)
        return self

    def write(self, records):
        records = list(records)
        if records:
            self.index.append([p for p, _ in records], np.stack([e for _, e in records]))

    def close(self):
        self.index = None


class IndexFiles:
    """An index folder as a `jblip.commands.process_outputs` store: records are (image path, float16
    embeddings [Q, E])."""

    def __init__(self, model: str, queries: int, dim: int):
        self.model, self.queries, self.dim = model, queries, dim

    def open(self, path: str) -> _IndexOutput:
        return _IndexOutput(path, self)

    def read_records(self, path: str) -> list[tuple[str, np.ndarray]]:
        from jblip.retrieval.index_store import META, IndexFileError, read_index
        if not os.path.exists(os.path.join(path, META)):
            return []
        meta, paths, embeddings = read_index(path)
        if (meta.get("num_query_tokens"), meta.get("embed_dim")) != (self.queries, self.dim):
            raise IndexFileError(f"{path} holds an index of another model ({meta.get('model')}); remove it or use "
                                 "another --out")
        return list(zip(paths, embeddings))

    def read_done(self, path: str) -> set[str]:
        return {p for p, _ in self.read_records(path)}

    @staticmethod
    def key(record) -> str:
        return record[0]

    remove = staticmethod(shutil.rmtree)


def run(args) -> int:
    from jblip.evaluation.hosts import Hosts
    paths = list_images(args.images)
    if args.distributed:
        import jax
        jax.distributed.initialize()
    hosts = Hosts.current()
    engine = load_engine(args.model, args.batch_size)  # on this process's devices
    store = IndexFiles(engine.path, engine.config.num_query_tokens, engine.config.embed_dim)
    with ProcessOutputs(args.out, hosts, store, "index") as out:
        code = _embed(engine, paths, out, hosts, args)
        if code == 0:
            out.merge(paths)
    if code == 0 and hosts.index == 0:
        print(f"index: {len(store.read_done(args.out))} images in {args.out}", file=sys.stderr)
    return code


def _embed(engine, paths: list[str], out: ProcessOutputs, hosts, args) -> int:
    todo = [p for p in paths if p not in out.done]
    if not todo:
        if hosts.index == 0:
            print(f"index: all {len(paths)} images are already in {args.out}", file=sys.stderr)
        return 0
    mine = todo[hosts.index::hosts.count]
    batches = [mine[i:i + engine.batch_size] for i in range(0, len(mine), engine.batch_size)]
    images = ImageBatches(engine.image_processor, batches, args.workers)
    start, written, bad = time.perf_counter(), 0, 0
    who = f" (process {hosts.index} of {hosts.count})" if hosts.count > 1 else ""
    try:
        for batch, loaded in zip(batches, images):
            good = [(p, px) for p, (px, error) in zip(batch, loaded) if error is None]
            for _, error in loaded:
                if error is not None:
                    bad += 1
                    print(f"index: skipped {error}", file=sys.stderr)
            if good:
                embeddings = engine.image_embeddings(np.stack([px for _, px in good])).astype(np.float16)
                out.write(zip([p for p, _ in good], embeddings))
                written += len(good)
            rate = written / max(time.perf_counter() - start, 1e-9)
            print(f"index{who}: {written + bad}/{len(mine)} images, {rate:.1f} images/s"
                  + (f", {bad} unreadable" if bad else ""), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        images.close()
        print(f"index: interrupted after {written} images; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"index{who}: wrote {written} embeddings ({len(paths) - len(todo)} already there, {bad} unreadable)",
          file=sys.stderr)
    return 0
