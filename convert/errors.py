"""Errors shared by every checkpoint reader."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or of an unsupported kind."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asked for a global outside the tensor-state-dict allow-list; nothing was executed."""
