"""Text -> image search over an index written by `jblip index`: the query's ITC embedding against
every image's query embeddings (an image scores its best query), highest first.

`jblip search` and the server's search endpoint both rank through `IndexSearch`, so they agree.
Safe to call from several threads: the text embedding (tokenizer + jitted model, built lazily
by the engine) runs under a lock; the scoring over the index is plain numpy outside it.
"""
from __future__ import annotations

import threading

import numpy as np

from jblip.retrieval.engine import TEXT_BUCKET

CHUNK_ROWS = 4096  # index rows converted to float32 at a time, so memory stays bounded for any index


class IndexSearch:
    def __init__(self, engine, meta: dict, paths: list[str], embeddings: np.ndarray, directory: str = "index"):
        """`meta, paths, embeddings` as `jblip.retrieval.index_store.read_index` returns them."""
        shape = (meta.get("num_query_tokens"), meta.get("embed_dim"))
        if shape != (engine.config.num_query_tokens, engine.config.embed_dim):
            raise ValueError(f"{directory} was built with another model ({meta.get('model')}, {shape[0]}x{shape[1]}); "
                             f"this one has {engine.config.num_query_tokens}x{engine.config.embed_dim}")
        if not paths:
            raise ValueError(f"{directory} is empty")
        self.engine, self.meta, self.paths, self.embeddings = engine, meta, paths, embeddings
        self._lock = threading.Lock()

    def warm_up(self):
        """Compiles the query embedding for every text-length bucket, so that no search waits for XLA."""
        top = self.engine.max_text_length
        with self._lock:
            for width in sorted({min(w, top) for w in range(TEXT_BUCKET, top + TEXT_BUCKET, TEXT_BUCKET)}):
                ones = np.ones((1, width), np.int32)
                self.engine.text_embeddings_ids(ones, ones)

    def __len__(self) -> int:
        return len(self.paths)

    def query_tokens(self, text: str) -> int:
        """The query's length in tokens with [CLS] and [SEP] (the engine cuts it to `max_text_length`)."""
        with self._lock:
            return len(self.engine.tokenizer.encode([text])[0])

    def text_embedding(self, text: str) -> np.ndarray:
        with self._lock:
            return self.engine.text_embeddings([text])[0]

    def itc(self, text: str) -> np.ndarray:
        """ITC similarity [N] of the query with every indexed image (its best query)."""
        query = self.text_embedding(text)
        return np.concatenate([
            np.einsum("nqe,e->nq", np.asarray(self.embeddings[i:i + CHUNK_ROWS], np.float32), query).max(axis=1)
            for i in range(0, len(self.paths), CHUNK_ROWS)])

    def top(self, text: str, k: int) -> list[tuple[int, float]]:
        """The k best (row, score), highest first; ties keep index order."""
        scores = self.itc(text)
        return [(int(i), float(scores[i])) for i in np.argsort(-scores, kind="stable")[:k]]
