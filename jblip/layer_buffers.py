"""Per-layer buffers of a stacked layer stack that alias the stack's memory (CPU programs only).

CPU programs decode over per-layer weight buffers (`jblip.scan.LAYER_LOOPS`). Splitting a
stack inside the program copies every layer weight once per `generate` call (for the 94M
benchmark model's LLM, 100 MB a call: about eight decode steps' worth of memory traffic).
On CPU devices an array's memory is host memory, so layer i of a stacked `[L, ...]` leaf is
already a contiguous block of it: these buffers are made once, as numpy views of each
device's shard handed back to JAX without a copy (JAX keeps zero-copy host buffers on CPU
when they are aligned; otherwise it copies, which stays correct). They keep the stack
alive and cost no memory of their own.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from jblip.scan import UNROLLED_PREFIX


def _layer(x: jax.Array, i: int) -> jax.Array:
    """Layer i of a stacked leaf on CPU devices, as an array of the same sharding minus the
    stacked axis (never sharded), built from views of each local shard."""
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    else:
        target = jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))
    shards = [jax.device_put(np.asarray(shard.data)[i], shard.device) for shard in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape[1:], target, shards)


def layer_views(tree, name: str = "layers"):
    """`tree` with each stacked subtree `name` replaced by `{"layer_0": ..., ...}` views (the
    layout `jblip.scan.unstack_params` makes inside a program, without its copy)."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        if key == name and isinstance(value, Mapping):
            length = jax.tree_util.tree_leaves(value)[0].shape[0]
            out[key] = {f"{UNROLLED_PREFIX}{i}": jax.tree_util.tree_map(lambda x: _layer(x, i), value)
                        for i in range(length)}
        else:
            out[key] = layer_views(value, name)
    return out
