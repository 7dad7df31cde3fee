"""A TensorSource over a sharded checkpoint described by an HF `*.index.json` (`weight_map`: key -> shard file).

Shards are opened only when one of their tensors (or its header) is first
needed, and every shard the index names must exist up front.
"""
from __future__ import annotations

import os
from typing import Callable

from jblip import bounded_json
from jblip.convert.errors import CheckpointError
from jblip.convert.tensor_source import SourceBase


class ShardedSource(SourceBase):
    def __init__(self, index_path, open_shard: Callable[[str], object]):
        self.path = os.fspath(index_path)
        self._open_shard = open_shard
        try:
            with open(self.path, "rb") as f:
                index = bounded_json.load(f, "the index")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: unreadable checkpoint index ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{self.path}: not a checkpoint index (needs a 'weight_map' of key -> shard file)")
        self.metadata = index.get("metadata") or {}
        self.weight_map: dict[str, str] = weight_map
        folder = os.path.dirname(self.path)
        for shard in set(weight_map.values()):
            if os.path.isabs(shard) or os.path.normpath(shard).startswith(".."):
                raise CheckpointError(f"{self.path}: shard name {shard!r} points outside the index's folder")
        self._shard_paths = {s: os.path.join(folder, s) for s in sorted(set(weight_map.values()))}
        missing = [s for s, p in self._shard_paths.items() if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(
                f"{self.path}: {len(missing)} shard(s) named in the index are missing from {folder or '.'}: "
                + ", ".join(missing))
        self._shards: dict[str, object] = {}

    def _shard_of(self, key):
        try:
            name = self.weight_map[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the index {self.path}") from None
        shard = self._shards.get(name)
        if shard is None:
            shard = self._shards[name] = self._open_shard(self._shard_paths[name])
        if key not in shard:
            raise CheckpointError(
                f"{self.path}: the index puts {key!r} in shard {name}, but that shard has no such tensor")
        return shard

    def keys(self):
        return list(self.weight_map)

    def __contains__(self, key):
        return key in self.weight_map

    def shape(self, key):
        return self._shard_of(key).shape(key)

    def dtype(self, key):
        return self._shard_of(key).dtype(key)

    def read(self, key):
        return self._shard_of(key).read(key)

    def read_rows(self, key, start, stop):
        return self._shard_of(key).read_rows(key, start, stop)

    def close(self):
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()
