"""Which params train: named sets, and the split into trainable / frozen subtrees.

The optimizer only ever sees the trainable subtree, so frozen params get no
gradients and no optimizer state (no Adam moments for a 7B LLM that does not
move). `merge` puts the two halves back together for the forward pass.

Sets (paths in the `BlipModel` params tree):
  qformer      the InstructBLIP recipe: Q-Former (with its query tokens and text
               embeddings), `ln_vision` (= vision/post_layernorm) and the projection
  qformer+llm  the above and the whole language model
  all          everything, ViT included
  retrieval-stage1  (`jblip.retrieval` params) the Q-Former and its ITC/ITM/ITG heads and temperature
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

QFORMER_SET = ("qformer", "vision/post_layernorm", "projection")
TRAINABLE_SETS: dict[str, tuple[str, ...]] = {
    "qformer": QFORMER_SET,
    "qformer+llm": QFORMER_SET + ("llm",),
    "all": ("",),
    # BLIP-2 stage 1 (jblip.retrieval): the Q-Former and its ITC/ITM/ITG heads, the ViT frozen
    "retrieval-stage1": ("qformer", "vision_projection", "text_projection", "itm_head", "temp", "lm_head"),
}


def set_prefixes(name_or_prefixes: str | Iterable[str]) -> tuple[str, ...]:
    """A set name (see TRAINABLE_SETS) or an explicit list of '/'-separated path prefixes."""
    if isinstance(name_or_prefixes, str):
        if name_or_prefixes not in TRAINABLE_SETS:
            raise ValueError(f"unknown trainable set {name_or_prefixes!r}; known: {sorted(TRAINABLE_SETS)} "
                             "(or pass a list of param path prefixes such as ['qformer', 'projection'])")
        return TRAINABLE_SETS[name_or_prefixes]
    prefixes = tuple(name_or_prefixes)
    if not prefixes:
        raise ValueError("an empty trainable set trains nothing; name at least one param path prefix")
    return prefixes


def _matches(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _flat(tree: Mapping) -> dict[str, object]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: Mapping[str, object]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def trainable_paths(params: Mapping, name_or_prefixes) -> list[str]:
    """Sorted '/'-joined paths of the params the set trains; an error if it matches none."""
    prefixes = set_prefixes(name_or_prefixes)
    paths = sorted(p for p in _flat(params) if _matches(p, prefixes))
    if not paths:
        raise ValueError(f"trainable set {name_or_prefixes!r} matches no parameter; top-level groups are "
                         f"{sorted(params)}")
    return paths


def split(params: Mapping, name_or_prefixes) -> tuple[dict, dict]:
    """(trainable, frozen): two pruned nested dicts that `merge` back into `params`."""
    chosen = set(trainable_paths(params, name_or_prefixes))
    flat = _flat(params)
    trainable = {k: v for k, v in flat.items() if k in chosen}
    frozen = {k: v for k, v in flat.items() if k not in chosen}
    return _unflat(trainable), (_unflat(frozen) if frozen else {})


def merge(trainable: Mapping, frozen: Mapping) -> dict:
    """The full params tree from its two halves (they must not overlap)."""
    a, b = _flat(trainable), _flat(frozen)
    both = sorted(set(a) & set(b))
    if both:
        raise ValueError(f"params both trainable and frozen: {both[:5]}")
    return _unflat({**b, **a})


def cast(tree, dtype):
    """Floating leaves cast to `dtype` (e.g. fp32 master copies of the trainable params)."""
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x, tree)


def map_with_path(fn: Callable[[str, object], object], tree: Mapping) -> dict:
    """`fn('/'-joined path, leaf)` over a nested params dict."""
    return _unflat({k: fn(k, v) for k, v in _flat(tree).items()})


def count(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
