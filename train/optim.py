"""The InstructBLIP optimizer: AdamW, warm-up + cosine, clipping, gradient accumulation.

LAVIS (`Blip2Base.get_optimizer_params`, `lavis/common/optims.py`): AdamW
(0.9, 0.999), weight decay 0.05 except for biases, norms and other 1-D params;
the learning rate rises linearly from `warmup_lr` to `lr` over `warmup_steps`
optimizer updates, then follows a cosine down to `min_lr` at `total_steps`.
(LAVIS steps its cosine once per epoch; here it is per update, which is what
the paper's "cosine decay" describes.) Gradients are clipped by global norm,
then accumulated over `accumulate` micro-batches with `optax.MultiSteps`
(the mean of the micro-batch gradients; clipping applies to that mean).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import optax

from jblip.train import option_checks as check
from jblip.train.trainable import map_with_path


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    warmup_lr: float = 1e-8
    min_lr: float = 0.0
    warmup_steps: int = 1000
    total_steps: int = 60_000       # optimizer updates (not micro-batches)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_norm: float | None = 1.0   # None: no clipping
    accumulate: int = 1             # micro-batches per update

    def __post_init__(self):
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay"):
            check.number(f"optim.{name}", getattr(self, name), minimum=0)
        check.number("optim.eps", self.eps, positive=True)
        check.number("optim.b1", self.b1, minimum=0, below=1)
        check.number("optim.b2", self.b2, minimum=0, below=1)
        check.number("optim.clip_norm", self.clip_norm, positive=True, optional=True)  # None: no clipping
        check.integer("optim.accumulate", self.accumulate, minimum=1)
        check.integer("optim.total_steps", self.total_steps, minimum=1)
        check.integer("optim.warmup_steps", self.warmup_steps, minimum=0)

    @classmethod
    def from_dict(cls, d: dict) -> "OptimConfig":
        if not isinstance(d, dict):
            raise ValueError(f"optim must be a mapping of optimizer options, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown optimizer option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate per optimizer update: linear warm-up, then cosine to `min_lr`."""
    warmup = min(cfg.warmup_steps, cfg.total_steps)
    ramp = optax.linear_schedule(cfg.warmup_lr, cfg.lr, max(warmup, 1))
    cosine = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - warmup, 1),
                                         alpha=cfg.min_lr / cfg.lr if cfg.lr else 0.0)
    if warmup == 0:
        return cosine
    return optax.join_schedules([ramp, cosine], [warmup])


def decays(path: str, leaf) -> bool:
    """Weight decay applies to matrices, not to biases, norm scales or other 1-D params.

    By name as well as by rank: a bias of an attention projection has shape
    (heads, head_dim), 2-D but still a bias.
    """
    name = path.rsplit("/", 1)[-1]
    return leaf.ndim >= 2 and name not in ("bias", "scale")


def decay_mask(params):
    return map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The full transformation over the trainable params (MultiSteps when accumulating)."""
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if cfg.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate)
    return tx


def learning_rate(cfg: OptimConfig, micro_step):
    """The rate the update at this micro-batch index uses (for logging)."""
    return schedule(cfg)(micro_step // cfg.accumulate)


def state_shardings(tx: optax.GradientTransformation, abstract_state, param_shardings, replicated):
    """Shardings for the optimizer state: moments like their params, counters replicated."""
    return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
