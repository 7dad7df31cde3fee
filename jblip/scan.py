"""Layer stacks as one scanned block: compile time independent of depth, params stacked on "layers".

`nn.scan` traces a block once and runs it `length` times in a loop, so a 40-layer
model compiles like a 1-layer one. Every param of the block gains a leading
axis of size `length` whose logical name is "layers" (never sharded, see
`jblip.sharding.LOGICAL_RULES`). The scanned module is named `layers`, so a
stacked param reads `.../layers/<block path>` with shape `[L, ...]`; the
converters present it to the HF tables as `.../layers_{i}/<block path>`
(`convert.stacking`).

Remat (recomputing activations in the backward pass to save memory) is a
named policy chosen when the model is built for a job (`BlipModel(...,
remat="dots_saveable")`), not part of the architecture config:
  none              keep every activation (fastest, most memory; inference)
  full              save nothing inside a block, recompute it all (least memory)
  dots_saveable     keep matmul outputs, recompute the element-wise work
  minimal           keep matmul outputs that have no batch dimension (weights-side products)
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

STACK_AXIS = "layers"  # logical axis name of the stacked dimension

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return policy


def with_remat(block: type[nn.Module], policy: str, static_argnums: Sequence[int] = ()) -> type[nn.Module]:
    """`block` recomputed in the backward pass under the named policy ("none": unchanged).

    static_argnums count `self` as 0, as `nn.remat` does.
    """
    check_remat(policy)
    if policy == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=False, static_argnums=tuple(static_argnums))


def stack(block: type[nn.Module], length: int, in_axes=(), remat: str = "none") -> type[nn.Module]:
    """A module class that applies `block` `length` times with stacked params.

    `block.__call__(self, carry, *args)` must return `(carry, per_layer_output)`;
    `in_axes` gives, per extra arg, `nn.broadcast` (the same value for every
    layer, e.g. an attention bias) or 0 (a per-layer slice of a stacked array,
    e.g. the KV cache `[L, ...]`). The per-layer outputs come back stacked on a
    leading `[L]` axis (None outputs stay None).
    """
    return nn.scan(
        with_remat(block, remat),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=tuple(in_axes),
        length=length,
        metadata_params={nn.PARTITION_NAME: STACK_AXIS},
    )
