"""An image index on disk: `embeddings.npy` (float16 [N, Q, E], readable by numpy / any vector
library) + `paths.jsonl` (row i = {"image": path of embedding row i}) + `index.json` (model, sizes).

Appended one batch at a time: the rows first, then the .npy header's row count, then the paths,
flushed. On reopening, the two files are cut to the rows both hold (a crash between the steps,
or a partial last line, loses only that batch), so a resumed run never duplicates a row.
The .npy header is written with room for any row count, so appending never moves the data.
"""
from __future__ import annotations

import json
import os

import numpy as np

MAGIC = b"\x93NUMPY\x01\x00"
HEADER_BYTES = 128  # magic (8) + length (2) + header text (118, space-padded, '\n' last)
EMBEDDINGS, PATHS, META = "embeddings.npy", "paths.jsonl", "index.json"


class IndexFileError(ValueError):
    """An index folder that is not (or not this model's) jblip index."""


def _header(rows: int, q: int, e: int) -> bytes:
    text = f"{{'descr': '<f2', 'fortran_order': False, 'shape': ({rows}, {q}, {e}), }}"
    text = text.ljust(HEADER_BYTES - 10 - 1) + "\n"
    return MAGIC + (len(text)).to_bytes(2, "little") + text.encode("latin1")


class ImageIndex:
    def __init__(self, directory: str, model: str, queries: int, dim: int):
        self.dir, self.q, self.e = directory, queries, dim
        os.makedirs(directory, exist_ok=True)
        meta_path = os.path.join(directory, META)
        meta = dict(model=model, num_query_tokens=queries, embed_dim=dim, dtype="float16")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            if (old.get("num_query_tokens"), old.get("embed_dim")) != (queries, dim):
                raise IndexFileError(f"{directory} holds an index of another model ({old.get('model')}, "
                                  f"{old.get('num_query_tokens')}x{old.get('embed_dim')}); use another folder")
        else:
            with open(meta_path, "w") as f:
                json.dump(meta, f, indent=1)
        self.paths = self._recover()

    def _recover(self) -> list[str]:
        emb, pth = os.path.join(self.dir, EMBEDDINGS), os.path.join(self.dir, PATHS)
        paths = []
        if os.path.exists(pth):
            with open(pth, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a partial last record
                    try:
                        paths.append(json.loads(line)["image"])
                    except (ValueError, KeyError, TypeError):
                        raise IndexFileError(f"{pth} is not a jblip index paths file (bad line {len(paths) + 1})")
        row_bytes = self.q * self.e * 2
        rows = 0
        if os.path.exists(emb):
            with open(emb, "rb") as f:
                if f.read(8) != MAGIC:
                    raise IndexFileError(f"{emb} is not a jblip index embeddings file")
            rows = (os.path.getsize(emb) - HEADER_BYTES) // row_bytes
        n = min(rows, len(paths))
        with open(emb, "r+b" if os.path.exists(emb) else "w+b") as f:
            f.write(_header(n, self.q, self.e))
            f.truncate(HEADER_BYTES + n * row_bytes)
        with open(pth, "w") as f:
            f.writelines(json.dumps({"image": p}) + "\n" for p in paths[:n])
        return paths[:n]

    def append(self, paths: list[str], embeddings: np.ndarray):
        embeddings = np.ascontiguousarray(embeddings, "<f2")
        if embeddings.shape != (len(paths), self.q, self.e):
            raise ValueError(f"embeddings {embeddings.shape} do not match {len(paths)} paths x {self.q} x {self.e}")
        n = len(self.paths) + len(paths)
        with open(os.path.join(self.dir, EMBEDDINGS), "r+b") as f:
            f.seek(0, os.SEEK_END)
            f.write(embeddings.tobytes())
            f.flush()
            f.seek(0)
            f.write(_header(n, self.q, self.e))
        with open(os.path.join(self.dir, PATHS), "a") as f:
            f.writelines(json.dumps({"image": p}) + "\n" for p in paths)
            f.flush()
        self.paths.extend(paths)


def read_index(directory: str) -> tuple[dict, list[str], np.ndarray]:
    """(index.json, paths, embeddings [N, Q, E] float16 memory-mapped)."""
    meta_path = os.path.join(directory, META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no {META} in {directory}: build an index with `jblip index` first")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(os.path.join(directory, PATHS)) as f:
        paths = [json.loads(line)["image"] for line in f if line.endswith("\n")]
    emb = np.load(os.path.join(directory, EMBEDDINGS), mmap_mode="r")
    n = min(len(paths), emb.shape[0])
    return meta, paths[:n], emb[:n]
