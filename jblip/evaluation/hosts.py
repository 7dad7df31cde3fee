"""The processes of a run (one, or several joined with `jax.distributed`): which share of each
batch this process reads, and how the shares are put back together.

Every process walks the same list of global batches in the same order (they all
read the same data and predictions files), reads the images of its own rows only
(row slice `index * B/N : (index + 1) * B/N` of each batch of B), and the rows of
all processes are gathered so that each passes the same global batch to the
model, whose weights and batch are sharded over the mesh that spans them.
"""
from __future__ import annotations

import numpy as np


class Hosts:
    def __init__(self, index: int = 0, count: int = 1):
        self.index, self.count = index, count

    @classmethod
    def current(cls) -> "Hosts":
        import jax
        return cls(jax.process_index(), jax.process_count())

    def share(self, batch_size: int) -> slice:
        if batch_size % self.count:
            raise ValueError(f"--batch-size {batch_size} must be a multiple of the {self.count} processes")
        per = batch_size // self.count
        return slice(self.index * per, (self.index + 1) * per)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """This process's rows -> every process's, in process order (the global batch)."""
        if self.count == 1:
            return rows
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(rows, tiled=True))

    def fetch(self, array) -> np.ndarray:
        """A (possibly multi-process) jax.Array as one host numpy array on every process."""
        if self.count == 1:
            return np.asarray(array)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))

    def barrier(self, name: str):
        if self.count > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(name)
