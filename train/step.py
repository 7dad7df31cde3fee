"""Jitted train and eval steps.

The step differentiates the trainable subtree only; the frozen params enter
under `stop_gradient` (so the frozen ViT's output is a constant to autodiff and
no backward pass runs through it). Everything is traced on global arrays, so
on a mesh the token-mean loss and the gradient norm are reduced over all
devices by the partitioner; the jit in/out shardings pin params, optimizer
state and batch to their places (see `train.state.Placement`).

Batch keys: pixel_values [B,H,W,C], input_ids, attention_mask, labels, and
optionally qformer_ids, qformer_mask (InstructBLIP), decoder_input_ids (T5),
target_positions / target_labels (the scored tokens; `labels.collate` adds them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jblip import sharding
from jblip.config import ModelConfig
from jblip.model import BlipModel
from jblip.train import trainable as tr
from jblip.train.head import scored_logits
from jblip.train.loss import lm_loss, token_nll
from jblip.train.optim import OptimConfig, learning_rate
from jblip.train.state import Placement, TrainState

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "qformer_ids", "qformer_mask", "decoder_input_ids")


def forward_loss(module: BlipModel, params, batch, prepend_queries: bool):
    """(mean token loss, scored tokens) of one batch.

    With `target_positions` / `target_labels` in the batch (see `labels.scored_targets`)
    the LM head runs only at the scored positions (`train.head`); the loss is HF's either way.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    if "target_positions" in batch:
        rows = batch["target_positions"]
        if not module.is_encoder_decoder:  # HF: logits cut to the label length, then shifted by one
            frames = inputs["pixel_values"].shape[1] if inputs["pixel_values"].ndim == 5 else 1  # videos: T*Q
            offset = module.config.num_query_tokens * frames if prepend_queries else 0
            rows = jnp.maximum(offset + rows - 1, 0)
        logits = scored_logits(module, params, rows, inputs, prepend_queries)
        nll, valid = token_nll(logits, batch["target_labels"])
        count = jnp.sum(valid)
        return jnp.sum(nll) / jnp.maximum(count, 1).astype(jnp.float32), count
    logits = module.apply({"params": params}, prepend_queries=prepend_queries, **inputs)
    return lm_loss(logits, batch["labels"], shift=not module.is_encoder_decoder)


def loss_and_grads(module: BlipModel, trainable, frozen, batch, prepend_queries: bool):
    """((loss, count), grads w.r.t. the trainable subtree only)."""
    def loss_fn(params):
        full = tr.merge(params, jax.lax.stop_gradient(frozen))
        return forward_loss(module, full, batch, prepend_queries)
    return jax.value_and_grad(loss_fn, has_aux=True)(trainable)


def _jit(fn, placement: Placement | None, in_shardings, out_shardings, donate=()):
    if placement is None or placement.mesh is None:
        return jax.jit(fn, donate_argnums=donate)
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate)

    def run(*args):  # activation constraints resolve while tracing, under the mesh's rules
        with sharding.activation_rules(placement.mesh, placement.rules):
            return jitted(*args)
    run.jitted = jitted  # for `jax.export` / `.lower` (inside `activation_rules`)
    return run


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, optim: OptimConfig,
                    placement: Placement | None = None, batch_size: int | None = None,
                    prepend_queries: bool = False, remat: str = "none", skip_nonfinite: bool = False):
    """`step(state, frozen, batch) -> (state, metrics)`; metrics: loss, grad_norm, lr, tokens, finite.

    `remat` names the layer stacks' recompute policy (`jblip.scan`).
    `grad_norm` is the global norm of this micro-batch's gradient before clipping; `finite` says
    whether it and the loss are finite. With `skip_nonfinite`, a step where they are not keeps
    the params and optimizer state as they were (only the step counter moves on).
    With a `placement` on a mesh, `batch_size` (global) fixes the batch sharding.
    """
    module = BlipModel(config, remat=remat)

    def step(state: TrainState, frozen, batch):
        (loss, count), grads = loss_and_grads(module, state.params, frozen, batch, prepend_queries)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params, opt_state = jax.tree.map(keep, (params, opt_state), (state.params, state.opt_state))
        metrics = dict(loss=loss, grad_norm=grad_norm, tokens=count, lr=learning_rate(optim, state.step),
                       finite=finite)
        return TrainState(state.step + 1, params, opt_state), metrics

    if placement is None or placement.mesh is None:
        return _jit(step, None, None, None, donate=(0,))
    if batch_size is None:
        raise ValueError("make_train_step on a mesh needs the global batch_size (for the batch sharding)")
    return _jit(step, placement, (placement.state, placement.frozen, placement.batch(batch_size)),
                (placement.state, placement.replicated), donate=(0,))


def make_eval_step(config: ModelConfig, placement: Placement | None = None, batch_size: int | None = None,
                   prepend_queries: bool = False):
    """`eval(trainable, frozen, batch) -> (summed token loss, tokens)`: sums, so a held-out
    set's mean over all its tokens is exact whatever the batching."""
    module = BlipModel(config)

    def evaluate(trainable, frozen, batch):
        loss, count = forward_loss(module, tr.merge(trainable, frozen), batch, prepend_queries)
        return loss * count, count

    if placement is None or placement.mesh is None:
        return _jit(evaluate, None, None, None)
    if batch_size is None:
        raise ValueError("make_eval_step on a mesh needs the global batch_size")
    return _jit(evaluate, placement, (placement.state.params, placement.frozen, placement.batch(batch_size)),
                placement.replicated)
