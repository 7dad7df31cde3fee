"""Type and range checks for training options, each failing with one line that names the option.

Options arrive from YAML, JSON and `--set key=value`, so a value may be of any
type; these checks turn a wrong one into a ValueError at once, instead of a
TypeError deep in the run (or a silently wrong job: `steps: 2.5`, `lr: .nan`).
"""
from __future__ import annotations

import math

MAX_SEED = 2**32 - 1  # what every RNG the job seeds takes


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None, optional: bool = False):
    if value is None and optional:
        return
    if type(value) is not int:  # bool is not an int here, nor is 2.5 or "8"
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def number(name: str, value, minimum: float | None = None, positive: bool = False, below: float | None = None,
           optional: bool = False):
    """A finite int or float: NaN and infinities are refused everywhere."""
    if value is None and optional:
        return
    if type(value) not in (int, float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be below {below}, got {value}")


def flag(name: str, value):
    if type(value) is not bool:
        raise ValueError(f"{name} must be true or false, got {value!r}")


def text(name: str, value, optional: bool = False):
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")


def writable_dir(name: str, path: str) -> None:
    """Create `path` if needed and prove a file can be written there, so a run never trains for hours
    and then fails at its first checkpoint or export."""
    import os
    import tempfile
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".jblip-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{name} {path} is not a writable directory ({e.strerror or e})") from None
