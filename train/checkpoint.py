"""Training checkpoints with orbax: trainable params, optimizer state, step and data position.

Frozen params are not saved (they are the base model's, reloaded from it).
Saves are asynchronous (the step loop continues while arrays are written) and
the manager keeps the newest `keep` checkpoints. Restoring takes target
shardings from a fresh state built on the *current* mesh, so a checkpoint
written on one mesh shape restores onto another.

Failures are made plain: a save that fails (now or in the background) raises
CheckpointSaveError naming the step and directory, and `close` always releases
the manager's threads, so a failed save ends the process instead of hanging it.
`restore_newest` falls back past checkpoints that do not restore (a file
truncated by a crash, say), reporting each one it skipped and why.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import orbax.checkpoint as ocp

from jblip.train.state import TrainState


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the run stops rather than train on without one."""


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs every failed read as a traceback (from several threads); the caller reports it in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reason(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:
            raise CheckpointSaveError(f"cannot use checkpoint_dir {self.directory}: {_reason(e)}") from None

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
        try:
            return self.manager.save(step, args=args, force=force)
        except Exception as e:  # also an earlier background save's failure, surfaced here
            raise CheckpointSaveError(f"saving the checkpoint of step {step} in {self.directory} failed: "
                                      f"{_reason(e)}") from None

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

    def restore_newest(self, abstract_state: TrainState, log=None) -> tuple[TrainState, dict, dict, int] | None:
        """`restore` of the newest checkpoint that restores, with its step; None when there is none.
        Each newer one that fails is reported through `log` (default: stderr) with the reason and
        renamed `<step>.unrestorable`, so the resumed run can write that step again."""
        log = log or (lambda line: print(line, file=sys.stderr))
        skipped = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                with _quiet_orbax():
                    restored = self.restore(abstract_state, step)
            except Exception as e:
                skipped.append(step)
                log(f"checkpoint step {step} in {self.directory} does not restore, skipped: {_reason(e)}")
                continue
            self._set_aside(skipped)
            return (*restored, step)
        if skipped:
            raise ValueError(f"no checkpoint in {self.directory} restores (tried steps {skipped}); "
                             "move them away to start over")
        return None

    def _set_aside(self, steps):
        import jax
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target, n = os.path.join(self.directory, f"{step}.unrestorable"), 1
                while os.path.exists(target):
                    target, n = os.path.join(self.directory, f"{step}.unrestorable{n}"), n + 1
                os.replace(os.path.join(self.directory, str(step)), target)
        self.manager.reload()

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointSaveError(f"saving a checkpoint in {self.directory} failed: {_reason(e)}") from None

    def close(self):
        """Wait for a save in flight (raising CheckpointSaveError if it failed), and always
        release the manager, even after a failure, so the process can exit."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:
                pass  # a failure was already raised by wait(), or there is nothing left to release
