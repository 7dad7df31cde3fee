"""The LM head only where the loss looks.

A training batch scores a few answer tokens per row, but a plain forward
computes logits [B, T, V] for every position: with a 32K vocabulary that is a
large share of a train step's FLOPs, forward and backward. Everything after
the language model's final norm is position-wise (OPT's project_out, the head,
T5's rescale, the vocab slice), so the rows of the final norm's output can be
gathered first: the head then runs on [B, K, D] with K = scored tokens per
row. The gather is a Flax method interceptor on that one module, so the
towers need no training-specific code path.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax.numpy as jnp

# The language model's last module before the (position-wise) head, per family.
FINAL_NORM = {"llama": ("llm", "norm"), "opt": ("llm", "final_layer_norm"), "t5": ("llm", "decoder", "final_norm")}


@contextlib.contextmanager
def gather_before_head(family: str, rows):
    """Within the context, the final norm's output [B, T, D] becomes [B, K, D] at `rows` [B, K].

    Yields a dict whose "applied" is True once the gather happened (checked by
    the caller, so a renamed module cannot silently give full-length logits).
    """
    path = FINAL_NORM.get(family)
    seen = {"applied": False}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if path is not None and context.method_name == "__call__" and tuple(context.module.path) == path:
            seen["applied"] = True
            return jnp.take_along_axis(out, rows[..., None].astype(jnp.int32), axis=1)
        return out

    with nn.intercept_methods(interceptor):
        yield seen
