"""The LM head only where the loss looks.

A training batch scores a few answer tokens per row, but a plain forward
computes logits [B, T, V] for every position: with a 32K vocabulary that is a
large share of a train step's FLOPs, forward and backward. Everything after
the language model's final norm is position-wise (OPT's project_out, the head,
T5's rescale, the vocab slice: the contract's `head`), so the model returns
the final norm's states, their scored rows are gathered, and the head runs on
[B, K, D] with K = scored tokens per row.
"""
from __future__ import annotations

import jax.numpy as jnp

from jblip.model import BlipModel


def scored_logits(module: BlipModel, params, rows, inputs: dict, prepend_queries: bool):
    """fp32 logits [B, K, V] of the language model's output positions `rows` [B, K]."""
    def run(model: BlipModel, rows, **inputs):
        hidden = model.hidden_states(prepend_queries=prepend_queries, **inputs)
        picked = jnp.take_along_axis(hidden, rows[..., None].astype(jnp.int32), axis=1)
        return model.lm_head(picked)
    return module.apply({"params": params}, rows, method=run, **inputs)
