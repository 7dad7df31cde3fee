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

import dataclasses
from collections.abc import Mapping
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def stack(block: type[nn.Module], length: int, in_axes=(), remat: str = "none",
          unrolled: bool = False) -> type[nn.Module]:
    """A module class that applies `block` `length` times with stacked params.

    `block.__call__(self, carry, *args)` must return `(carry, per_layer_output)`;
    `in_axes` gives, per extra arg, `nn.broadcast` (the same value for every
    layer, e.g. an attention bias) or 0 (a per-layer slice of a stacked array,
    e.g. the KV cache `[L, ...]`). The per-layer outputs come back stacked on a
    leading `[L]` axis (None outputs stay None).

    `unrolled=True` gives the same computation as a Python loop over `length`
    blocks named `layer_0` .. whose params are per-layer buffers
    (`unstack_params` makes them from the stacked ones): see `LAYER_LOOPS`.
    """
    if unrolled:
        return _unrolled(with_remat(block, remat), length, tuple(in_axes))
    return nn.scan(
        with_remat(block, remat),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=tuple(in_axes),
        length=length,
        metadata_params={nn.PARTITION_NAME: STACK_AXIS},
    )


# How a program walks a layer stack:
#   scan      one loop over stacked params (every platform's default: compile time
#             independent of depth)
#   unrolled  one block per layer over per-layer param buffers. XLA:CPU copies a layer's
#             weight slice out of the stack before each matmul (a dynamic-slice fusion),
#             which for a memory-bound decode step triples the bytes moved per weight; the
#             CPU programs of `jblip.generate` therefore run their decode loop unrolled over
#             buffers split once before the loop. Chosen from the devices the program runs
#             on (`layer_loop_for`), never elsewhere.
LAYER_LOOPS = ("scan", "unrolled")
UNROLLED_PREFIX = "layer_"


def layer_loop_for(platform: str) -> str:
    """The layer loop of decode programs compiled for `platform` ("cpu", "gpu"/"cuda", "tpu")."""
    return "unrolled" if platform == "cpu" else "scan"


def _unrolled(block: type[nn.Module], length: int, in_axes: tuple) -> type[nn.Module]:
    class Unrolled(nn.Module):
        block_args: tuple = ()
        block_kwargs: dict = dataclasses.field(default_factory=dict)

        @nn.compact
        def __call__(self, carry, *args):
            outputs = []
            for i in range(length):
                layer_args = [a if axis is nn.broadcast else jax.tree_util.tree_map(lambda x: x[i], a)
                              for a, axis in zip(args, in_axes)]
                layer = block(*self.block_args, **self.block_kwargs, name=f"{UNROLLED_PREFIX}{i}")
                carry, out = layer(carry, *layer_args)
                outputs.append(out)
            stacked = (None if outputs[0] is None
                       else jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outputs))
            return carry, stacked

    def construct(*args, **kwargs):
        name = kwargs.pop("name", None)
        parent = kwargs.pop("parent", None)
        extra = {} if parent is None else {"parent": parent}
        return Unrolled(block_args=args, block_kwargs=kwargs, name=name, **extra)
    return construct


def unstack_params(tree, name: str = "layers"):
    """`tree` with every stacked subtree `name` ([L, ...] leaves) split into per-layer buffers
    `{name: {"layer_0": ..., "layer_1": ...}}`, the params of an `unrolled` stack."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        if key == name and isinstance(value, Mapping):
            length = jax.tree_util.tree_leaves(value)[0].shape[0]
            out[key] = {f"{UNROLLED_PREFIX}{i}": jax.tree_util.tree_map(lambda x: x[i], value)
                        for i in range(length)}
        else:
            out[key] = unstack_params(value, name)
    return out
