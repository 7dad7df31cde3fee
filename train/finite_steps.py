"""Watch for training steps whose loss or gradient norm is NaN or infinite, without a host sync per step.

Each step's `finite` flag is folded on the device into (first bad micro-batch,
count of bad ones); the loop reads that pair only where it syncs anyway (a log
line) and before anything is written (checkpoint, export). So a diverged run
stops with one error before it saves a NaN model, unless the job asked to skip
such steps (`skip_nonfinite_steps`; the train step then leaves params and
optimizer state as they were), in which case they are only counted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


class TrainingDiverged(ValueError):
    """A step's loss or gradient norm was not finite; nothing after it was saved."""


@jax.jit
def _fold(first_bad, count, micro, finite):
    bad = jnp.logical_not(finite)
    first_bad = jnp.where(bad & (first_bad < 0), micro, first_bad)
    return first_bad, count + bad.astype(jnp.int32)


class FiniteSteps:
    def __init__(self, skip: bool, accumulate: int = 1):
        self.skip, self.accumulate = skip, accumulate
        self._first_bad, self._count = jnp.int32(-1), jnp.int32(0)

    def add(self, micro: int, metrics: dict):
        """Fold in the step at micro-batch index `micro` (asynchronous, like the step itself)."""
        self._first_bad, self._count = _fold(self._first_bad, self._count, micro, metrics["finite"])

    def skipped(self) -> int:
        return int(self._count)

    def check(self):
        """Raise TrainingDiverged if any step so far was not finite (and skipping was not asked for)."""
        if self.skip:
            return
        first = int(self._first_bad)
        if first >= 0:
            update = first // self.accumulate + 1
            raise TrainingDiverged(
                f"training diverged: the loss or gradient norm of step {update} (micro-batch {first + 1}) is NaN or "
                "infinite; stopped before writing any checkpoint or export after it. Lower optim.lr, check the data, "
                "or set skip_nonfinite_steps: true to skip such steps")
