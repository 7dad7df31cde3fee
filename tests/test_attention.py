"""The attention core: the blocked CPU path (long sequences on one device) equals attention in one
piece, values and gradients; on a mesh the one-piece path is used."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jblip import layers
from jblip.sharding import activation_rules, make_mesh


def qkv(t=130, s=140, b=2, n=3, h=8, seed=0):
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, t, n, h)).astype(np.float32)
    k, v = (r.standard_normal((b, s, n, h)).astype(np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def one_piece(q, k, v):
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(layers._attention_heads_major(t(q), t(k), t(v), None, 0.3, jnp.float32))


def test_blocked_attention_equals_one_piece():
    q, k, v = qkv()
    assert layers._block_on_cpu(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3))  # the path under test
    blocked = jax.jit(lambda q, k, v: layers.attention(q, k, v, scale=0.3))(q, k, v)
    ref = one_piece(q, k, v)
    print("blocked vs one piece: max |d|", float(jnp.max(jnp.abs(blocked - ref))))
    np.testing.assert_allclose(blocked, ref, atol=1e-6)
    g_blocked = jax.grad(lambda *a: jnp.sum(jnp.sin(layers.attention(*a, scale=0.3))), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(jnp.sin(one_piece(*a))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blocked, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_short_sequences_and_meshes_use_one_piece():
    q, k, v = qkv(t=8, s=8)
    assert not layers._block_on_cpu(q, k)
    q, k, v = qkv()
    decisions = []

    def probe(q, k):  # the decision as made while tracing under a mesh
        decisions.append(layers._block_on_cpu(q, k))
        return q

    with activation_rules(make_mesh("data=2,tensor=4")):
        jax.jit(probe)(q, k)
    assert decisions == [False]
