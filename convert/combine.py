"""TensorSource wrappers that rename, drop, merge and pad tensors of other sources, without reading them.

Used to present a LAVIS checkpoint set (several files, LAVIS key names) as one
HF-layout source that the HF tables then convert.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from jblip.convert.tensor_source import SourceBase


class RenamedSource(SourceBase):
    """Each key through `rename(key) -> (new key, None)` or `(None, reason)` to drop it.

    `dropped` maps each dropped original key to its reason; two keys renamed
    to the same name are an error (the table would be ambiguous).
    """

    def __init__(self, source, rename: Callable[[str], tuple[str | None, str | None]]):
        self.source = source
        self._original: dict[str, str] = {}
        self.dropped: dict[str, str] = {}
        for key in source.keys():
            new, reason = rename(key)
            if new is None:
                self.dropped[key] = reason
            elif new in self._original:
                raise ValueError(f"keys {self._original[new]!r} and {key!r} both rename to {new!r}")
            else:
                self._original[new] = key

    def original(self, key: str) -> str:
        return self._original[key]

    def keys(self):
        return list(self._original)

    def shape(self, key):
        return self.source.shape(self._original[key])

    def dtype(self, key):
        return self.source.dtype(self._original[key])

    def read(self, key):
        return self.source.read(self._original[key])

    def close(self):
        self.source.close()


class MergedSource(SourceBase):
    """The union of labelled sources; for a key several hold, the LATER source wins.

    `origin[key]` is the label a key is read from; `overridden` lists
    (key, label that lost, label that won).
    """

    def __init__(self, parts: list[tuple[str, object]]):
        self.parts = dict(parts)
        self.origin: dict[str, str] = {}
        self.overridden: list[tuple[str, str, str]] = []
        for label, source in parts:
            for key in source.keys():
                if key in self.origin:
                    self.overridden.append((key, self.origin[key], label))
                self.origin[key] = label

    def _source(self, key):
        try:
            return self.parts[self.origin[key]]
        except KeyError:
            raise KeyError(f"{key!r} is in none of {list(self.parts)}") from None

    def keys(self):
        return list(self.origin)

    def shape(self, key):
        return self._source(key).shape(key)

    def dtype(self, key):
        return self._source(key).dtype(key)

    def read(self, key):
        return self._source(key).read(key)

    def close(self):
        for source in self.parts.values():
            source.close()


class PadRows(SourceBase):
    """Presents `keys` with `rows` rows (axis 0) when the source has a few less, the new rows being
    the mean of the existing ones (what transformers' `resize_token_embeddings` does)."""

    def __init__(self, source, keys, rows: int, max_new: int = 64):
        self.source = source
        self.rows = rows
        self.padded: dict[str, int] = {}  # key -> rows in the file
        present = set(source.keys())
        for key in keys:
            if key in present:
                have = source.shape(key)[0]
                if rows - max_new <= have < rows:
                    self.padded[key] = have

    def keys(self):
        return self.source.keys()

    def shape(self, key):
        shape = self.source.shape(key)
        return (self.rows, *shape[1:]) if key in self.padded else shape

    def dtype(self, key):
        return self.source.dtype(key)

    def read(self, key):
        x = self.source.read(key)
        if key not in self.padded:
            return x
        mean = np.asarray(x, np.float64).mean(axis=0, keepdims=True).astype(x.dtype)
        return np.concatenate([x, np.repeat(mean, self.rows - x.shape[0], axis=0)])

    def close(self):
        self.source.close()
