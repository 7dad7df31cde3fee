"""Decoding settings: the user-facing `SamplerConfig`, split into what shapes the program and what is data.

`split(cfg, batch, seed)` returns `(StaticSampler, RowSampler)`:

- `StaticSampler` (hashable, a static argument of the jitted decode) holds only what changes the
  program's structure: strategy, beam and return-sequence counts, which logits processors exist
  at all, EOS / pad ids, early stopping, and bucketed caps (output length, top-k, n-gram size).
- `RowSampler` (a pytree of arrays, one value per input row) holds every knob: temperature,
  top-p, top-k, repetition and length penalty, no-repeat n-gram size, min / max new tokens and
  the row's random seed. Changing them never recompiles, and one batch may mix them (a server's
  batch mixes requests).

Every per-row knob of `SamplerConfig` takes a scalar (all rows) or one value per input row.
All values are checked here, at the API boundary, with a message that names the knob.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence, Union

import flax.struct
import jax
import numpy as np

PerRow = Union[float, int, Sequence[float], Sequence[int]]

# Processors in the order HF `generate` applies them; the last three only when sampling.
PROCESSORS = ("repetition_penalty", "no_repeat_ngram", "min_new_tokens", "temperature", "top_k", "top_p")
_FLOAT_KNOBS = ("temperature", "top_p", "repetition_penalty", "length_penalty")
_INT_KNOBS = ("max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size")


@dataclass(frozen=True)
class SamplerConfig:
    """Decoding settings, HF `generate` semantics. Per-row knobs: a scalar or one value per input row.

    The caps are static sizes of the compiled program; None picks a bucket that covers the
    values (so nearby values share one program). `all_processors=True` compiles every
    processor in even where no row uses it, so that no knob value ever changes the program.
    """
    strategy: str = "greedy"            # "greedy" | "sample" | "beam"
    max_new_tokens: PerRow = 30
    min_new_tokens: PerRow = 0
    temperature: PerRow = 1.0
    top_k: PerRow = 0                   # 0 = off
    top_p: PerRow = 1.0                 # 1.0 = off
    num_beams: int = 1
    length_penalty: PerRow = 1.0
    early_stopping: bool | str = False  # True, False or "never" (HF semantics)
    num_return_sequences: int = 1
    repetition_penalty: PerRow = 1.0
    no_repeat_ngram_size: PerRow = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    max_new_tokens_cap: int | None = None
    top_k_cap: int | None = None
    no_repeat_ngram_cap: int | None = None
    all_processors: bool = False

    def __post_init__(self):
        for name in _FLOAT_KNOBS + _INT_KNOBS:  # lists / arrays -> tuples: hashable, comparable
            value = getattr(self, name)
            if not np.isscalar(value):
                object.__setattr__(self, name, tuple(np.asarray(value).reshape(-1).tolist()))
        eos = self.eos_token_ids
        object.__setattr__(self, "eos_token_ids", (eos,) if np.isscalar(eos) else tuple(eos))
        _validate(self)

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- validation

def _values(cfg: SamplerConfig, name: str) -> np.ndarray:
    """The knob's values as a float64 vector (one per row, or one for all)."""
    value = getattr(cfg, name)
    try:
        arr = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or one number per row, got {value!r}") from None
    if arr.size == 0:
        raise ValueError(f"{name} has no values")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if name in _INT_KNOBS and not np.all(arr == np.round(arr)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return arr


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _validate(cfg: SamplerConfig):
    if cfg.strategy not in ("greedy", "sample", "beam"):
        raise ValueError(f"unknown decoding strategy {cfg.strategy!r}; use greedy, sample or beam")
    v = {name: _values(cfg, name) for name in _FLOAT_KNOBS + _INT_KNOBS}
    rules = (("max_new_tokens", v["max_new_tokens"] >= 1, ">= 1"),
             ("min_new_tokens", v["min_new_tokens"] >= 0, ">= 0"),
             ("temperature", v["temperature"] > 0, "> 0"),
             ("top_p", (v["top_p"] > 0) & (v["top_p"] <= 1), "in (0, 1]"),
             ("top_k", v["top_k"] >= 0, ">= 0 (0 = off)"),
             ("repetition_penalty", v["repetition_penalty"] > 0, "> 0 (1 = off)"),
             ("no_repeat_ngram_size", v["no_repeat_ngram_size"] >= 0, ">= 0 (0 = off)"))
    for name, ok, what in rules:
        if not np.all(ok):
            raise ValueError(f"{name} must be {what}, got {getattr(cfg, name)!r}")
    counts = {name: len(a) for name, a in v.items() if len(a) > 1}
    if len(set(counts.values())) > 1:
        raise ValueError("per-row knobs disagree on the number of rows: "
                         + ", ".join(f"{name} has {n}" for name, n in counts.items()))
    if np.any(v["min_new_tokens"] > v["max_new_tokens"]):
        raise ValueError(f"min_new_tokens {cfg.min_new_tokens!r} > max_new_tokens {cfg.max_new_tokens!r}")
    _check_int("num_beams", cfg.num_beams, 1)
    _check_int("num_return_sequences", cfg.num_return_sequences, 1)
    if cfg.strategy == "beam" and cfg.num_return_sequences > cfg.num_beams:
        raise ValueError(f"num_return_sequences {cfg.num_return_sequences} > num_beams {cfg.num_beams}")
    if cfg.strategy != "beam" and cfg.num_beams != 1:
        raise ValueError(f"num_beams={cfg.num_beams} needs strategy='beam'")
    if cfg.strategy == "greedy" and cfg.num_return_sequences != 1:
        raise ValueError("greedy decoding returns one sequence per input; use strategy='sample' or 'beam'")
    for token in cfg.eos_token_ids:
        _check_int("eos_token_ids", token, 0)
    _check_int("pad_token_id", cfg.pad_token_id, 0)
    if cfg.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {cfg.early_stopping!r}")
    caps = (("max_new_tokens_cap", "max_new_tokens", 1), ("top_k_cap", "top_k", 0),
            ("no_repeat_ngram_cap", "no_repeat_ngram_size", 0))
    for cap_name, knob, minimum in caps:
        cap = getattr(cfg, cap_name)
        if cap is not None:
            _check_int(cap_name, cap, minimum)
            if cap < v[knob].max():
                raise ValueError(f"{cap_name}={cap} is below the largest {knob} {int(v[knob].max())}")


# ----------------------------------------------------------------------------- the split

@dataclass(frozen=True)
class StaticSampler:
    """What shapes the decode program (hashable: a static jit argument)."""
    strategy: str
    num_beams: int
    num_return_sequences: int
    max_new_tokens_cap: int           # loop length bound and output width
    processors: tuple[str, ...]       # the enabled ones, in HF order (see PROCESSORS)
    top_k_cap: int                    # largest top-k the program supports
    no_repeat_ngram_cap: int          # largest no-repeat n-gram size the program supports
    early_stopping: bool | str
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


@flax.struct.dataclass
class RowSampler:
    """Per-row knobs as arrays [B] (B = input rows; beams and return sequences share their input's)."""
    temperature: jax.Array           # float32
    top_k: jax.Array                 # int32, 0 = off
    top_p_tail: jax.Array            # float32: 1 - top_p, the probability mass top-p may drop
    repetition_penalty: jax.Array    # float32
    length_penalty: jax.Array        # float32
    no_repeat_ngram_size: jax.Array  # int32, 0 = off
    min_new_tokens: jax.Array        # int32
    max_new_tokens: jax.Array        # int32
    seed: jax.Array                  # uint32: the row's random stream

    def repeat(self, n: int) -> "RowSampler":
        """Each row's values n times in a row (beams / return sequences of one input)."""
        return jax.tree_util.tree_map(lambda x: jax.numpy.repeat(x, n, axis=0), self)


def bucket(n: int, minimum: int = 16) -> int:
    """The size bucket holding n: doubling from `minimum` up to 256, then steps of 256."""
    b = minimum
    while b < n:
        b = b * 2 if b < 256 else b + 256
    return b


def _row_array(cfg: SamplerConfig, name: str, batch: int, dtype) -> np.ndarray:
    value = np.asarray(getattr(cfg, name), np.float64).reshape(-1)
    if value.size not in (1, batch):
        raise ValueError(f"{name} has {value.size} values, one per row, but the batch has {batch} rows")
    return np.broadcast_to(value, (batch,)).astype(dtype)


def split(cfg: SamplerConfig, batch: int, seed: int | Sequence[int] = 0) -> tuple[StaticSampler, RowSampler]:
    """(static program description, per-row arrays) for a batch of `batch` input rows.

    `seed`: one per row, or an int s that gives row b the seed s + b; a row's random draws
    depend on its own seed only, not on the other rows of the batch.
    """
    f32, i32 = np.float32, np.int32
    rows = {name: _row_array(cfg, name, batch, np.float64) for name in _FLOAT_KNOBS + _INT_KNOBS}
    seeds = np.asarray(seed, np.int64).reshape(-1)
    if seeds.size not in (1, batch):
        raise ValueError(f"seed has {seeds.size} values, one per row, but the batch has {batch} rows")
    seeds = seeds + np.arange(batch) if seeds.size == 1 else seeds
    sampling = cfg.strategy == "sample"
    keep = cfg.all_processors
    max_top_k, max_ngram = int(rows["top_k"].max()), int(rows["no_repeat_ngram_size"].max())
    top_k_cap = cfg.top_k_cap if cfg.top_k_cap is not None else (bucket(max_top_k, 64) if max_top_k or keep else 0)
    top_k_cap = top_k_cap if sampling else 0  # top-k only filters samples
    ngram_cap = (cfg.no_repeat_ngram_cap if cfg.no_repeat_ngram_cap is not None
                 else (bucket(max_ngram, 4) if max_ngram or keep else 0))
    wanted = {
        "repetition_penalty": keep or bool(np.any(rows["repetition_penalty"] != 1.0)),
        "no_repeat_ngram": ngram_cap > 0,
        "min_new_tokens": bool(cfg.eos_token_ids) and (keep or bool(np.any(rows["min_new_tokens"] > 0))),
        "temperature": sampling and (keep or bool(np.any(rows["temperature"] != 1.0))),
        "top_k": sampling and top_k_cap > 0,
        "top_p": sampling and (keep or bool(np.any(rows["top_p"] < 1.0))),
    }
    longest = int(rows["max_new_tokens"].max())
    static = StaticSampler(
        strategy=cfg.strategy, num_beams=cfg.num_beams, num_return_sequences=cfg.num_return_sequences,
        max_new_tokens_cap=cfg.max_new_tokens_cap or bucket(longest),
        processors=tuple(p for p in PROCESSORS if wanted[p]), top_k_cap=top_k_cap, no_repeat_ngram_cap=ngram_cap,
        early_stopping=cfg.early_stopping, eos_token_ids=tuple(int(e) for e in cfg.eos_token_ids),
        pad_token_id=int(cfg.pad_token_id))
    traced = RowSampler(
        temperature=rows["temperature"].astype(f32), top_k=rows["top_k"].astype(i32),
        top_p_tail=(1.0 - rows["top_p"]).astype(f32),  # in float64 first, as HF computes it
        repetition_penalty=rows["repetition_penalty"].astype(f32), length_penalty=rows["length_penalty"].astype(f32),
        no_repeat_ngram_size=rows["no_repeat_ngram_size"].astype(i32),
        min_new_tokens=rows["min_new_tokens"].astype(i32), max_new_tokens=rows["max_new_tokens"].astype(i32),
        seed=(seeds % (1 << 32)).astype(np.uint32))
    return static, traced


def longest_output(cfg: SamplerConfig) -> int:
    """The largest max_new_tokens over rows: the width of the returned tokens."""
    return int(np.max(cfg.max_new_tokens))


# LAVIS / HF docs defaults for InstructBLIP.
INSTRUCTBLIP_DEFAULTS = SamplerConfig(strategy="beam", num_beams=5, max_new_tokens=256, min_new_tokens=1,
                                      top_p=0.9, repetition_penalty=1.5, length_penalty=1.0)
PRESETS = {"instructblip": INSTRUCTBLIP_DEFAULTS, "greedy": SamplerConfig()}
