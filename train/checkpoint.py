"""Training checkpoints with orbax: trainable params, optimizer state, step and data position.

Frozen params are not saved (they are the base model's, reloaded from it).
Saves are asynchronous (the step loop continues while arrays are written) and
the manager keeps the newest `keep` checkpoints. Restoring takes target
shardings from a fresh state built on the *current* mesh, so a checkpoint
written on one mesh shape restores onto another.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp

from train.state import TrainState


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, meta: dict | None = None,
             force: bool = False) -> bool:
        """Start saving as checkpoint `step` (the loop numbers them by optimizer update); returns
        at once when async (see `wait`)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(dict(data_state)),
                                  meta=ocp.args.JsonSave(dict(meta or {})))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict, dict]:
        """(state, data state, meta) of `step` (default: the latest), placed per `abstract_state`'s
        shardings (ShapeDtypeStructs, e.g. `Placement.abstract_state`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except (ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {self.directory} step {step} does not fit this run's trainable "
                             f"params / optimizer (different trainable set or model?): {e}") from e
        return out["state"], dict(out["data"]), dict(out["meta"] or {})

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
