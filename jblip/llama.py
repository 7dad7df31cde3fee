"""LLaMA / Vicuna decoder with an optional static-shape KV cache.

One `__call__` serves the full forward (training, parity tests), the prefill
and every cached decode step: the caller passes position ids (for RoPE) and a
key-validity mask over the key slots; queries sit at slots
`cache_index + arange(T)`, so left padding only costs masked slots.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jblip import kv_cache
from jblip.config import LlamaConfig
from jblip.layers import Embed, LayerNorm, Linear, activation, attention, causal_bias

Dtype = jnp.dtype


def rope_tables(positions, head_dim: int, theta: float):
    """cos/sin [B,T,H] for the rotate-half convention (HF layout of q/k weights)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B,T,N,H]; rotate_half([a, b]) = [-b, a] over the two halves of H."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32):
    return kv_cache.init(config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim, dtype)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, bias, layer_cache, cache_index):
        c = self.config
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear((D,), (N, H), ("embed", "heads", "kv"), name="q_proj", **dense)(x)
        k = Linear((D,), (K, H), ("embed", "kv_heads", "kv"), name="k_proj", **dense)(x)
        v = Linear((D,), (K, H), ("embed", "kv_heads", "kv"), name="v_proj", **dense)(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            new_cache = kv_cache.write(layer_cache, k, v, cache_index)
            k, v = new_cache["k"], new_cache["v"]
        else:
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # heads-major like the cache
        if K != N:  # grouped-query attention: share each kv head across N/K query heads
            k, v = jnp.repeat(k, N // K, axis=1), jnp.repeat(v, N // K, axis=1)
        out = attention(q, k.astype(self.dtype), v, bias, dtype=self.dtype, heads_major=True)
        out = Linear((N, H), (D,), ("heads", "kv", "embed"), name="o_proj", **dense)(out)
        return out, new_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Linear((c.hidden_size,), (c.intermediate_size,), ("embed", "mlp"), name="gate_proj", **dense)(x)
        up = Linear((c.hidden_size,), (c.intermediate_size,), ("embed", "mlp"), name="up_proj", **dense)(x)
        h = activation(c.hidden_act)(gate) * up
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return Linear((c.intermediate_size,), (c.hidden_size,), ("mlp", "embed"), name="down_proj", **dense)(h)


class LlamaBlock(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, bias, layer_cache, cache_index):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(eps=c.rms_norm_eps, rms=True, use_bias=False, **kw)
        h, new_cache = LlamaAttention(c, name="self_attn", **kw)(
            LayerNorm(name="input_layernorm", **norm)(x), cos, sin, bias, layer_cache, cache_index)
        x = x + h
        x = x + LlamaMLP(c, name="mlp", **kw)(LayerNorm(name="post_attention_layernorm", **norm)(x))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), new_cache


class LlamaModel(nn.Module):
    """Decoder-only LM: `embed(ids)`, then `__call__(embeds, positions, key_mask, cache, cache_index)`."""
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = Embed(c.vocab_rows, c.hidden_size, ("vocab", "embed"), **kw)
        block = nn.remat(LlamaBlock) if c.remat else LlamaBlock  # recompute in the backward pass
        self.layers = [block(c, name=f"layers_{i}", **kw) for i in range(c.num_layers)]
        self.norm = LayerNorm(eps=c.rms_norm_eps, rms=True, use_bias=False, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = Linear((c.hidden_size,), (c.vocab_rows,), ("embed", "vocab"), use_bias=False, **kw)

    def embed(self, ids):
        return self.embed_tokens(ids)

    def forward_ids(self, ids, positions, key_mask, cache=None, cache_index=0):
        """Token ids in, logits out (also the method to `init` the standalone LM with)."""
        return self(self.embed(ids), positions, key_mask, cache, cache_index)

    def __call__(self, embeds, positions, key_mask, cache=None, cache_index=0, last_logits_only: bool = False):
        """embeds [B,T,D]; positions [B,T] RoPE positions; key_mask [B,S] valid key slots
        (S = T without a cache, the cache length with one). Returns (logits fp32 [B,T,V], cache).
        `last_logits_only`: logits of the last position only, [B,1,V] (prefill needs no more)."""
        c = self.config
        B, T = embeds.shape[:2]
        slots = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
        bias = causal_bias(slots, key_mask)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        x = embeds.astype(self.dtype)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, bias, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        if last_logits_only:  # skip the vocabulary projection of every other position
            x = x[:, -1:]
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if c.tie_word_embeddings else self.lm_head(x)
        logits = logits[..., : c.vocab_size]  # drop rows padded for sharding (no-op otherwise)
        return logits.astype(jnp.float32), (None if cache is None else tuple(new_cache))
