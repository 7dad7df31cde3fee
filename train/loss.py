"""The language-modelling loss, with HF's exact semantics.

Decoder-only (HF `Blip2ForConditionalGeneration` / `InstructBlip...`): the
logits are cut to the last `labels.shape[1]` positions (so labels may leave out
prepended query positions), then position t predicts label t + 1.
Encoder-decoder (T5): decoder logits and labels are aligned, no shift.
Either way: mean cross-entropy over the labels that are not IGNORE, in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100


def token_nll(logits, labels):
    """Per-position negative log-likelihood [B, T] (0 where the label is IGNORE) and the valid mask."""
    valid = labels != IGNORE
    logits = logits.astype(jnp.float32)
    target = jnp.where(valid, labels, 0)
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.where(valid, nll, 0.0), valid


def align(logits, labels, shift: bool):
    """Logits and labels of the positions that are scored (HF cut + shift for decoder-only LMs)."""
    if logits.shape[1] < labels.shape[1]:
        raise ValueError(f"labels ({labels.shape[1]} positions) are longer than the logits ({logits.shape[1]})")
    if not shift:
        if logits.shape[1] != labels.shape[1]:
            raise ValueError(f"encoder-decoder labels ({labels.shape[1]}) must match the decoder length "
                             f"({logits.shape[1]})")
        return logits, labels
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
    return logits[:, :-1], labels[:, 1:]


def lm_loss(logits, labels, shift: bool):
    """(mean token cross-entropy, number of scored tokens). Zero loss when nothing is scored."""
    logits, labels = align(logits, labels, shift)
    nll, valid = token_nll(logits, labels)
    count = jnp.sum(valid)
    return jnp.sum(nll) / jnp.maximum(count, 1).astype(jnp.float32), count
