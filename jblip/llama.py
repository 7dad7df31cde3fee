"""LLaMA / Vicuna decoder with an optional static-shape KV cache.

One `decode` serves the full forward (training, parity tests), the prefill and
every cached decode step (see `jblip.language_model` for the contract): the
caller passes position ids (for RoPE) and a key-validity mask over the key
slots; queries sit at slots `slot + arange(T)`, so left padding only costs
masked slots. The layers are one scanned block; the KV cache is one stacked
array per k and v, carried through the scan (`jblip.kv_cache`).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jblip import kv_cache
from jblip.config import LlamaConfig
from jblip.language_model import DecoderOnlyLM, LMHead, tied_logits
from jblip.layers import Embed, LayerNorm, Linear, activation, attention, causal_bias
from jblip.quantization import Quantization
from jblip.scan import stack

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


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x, cos, sin, bias, cache, layer, slot):
        c = self.config
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant)
        q = Linear((D,), (N, H), ("embed", "heads", "kv"), name="q_proj", **dense)(x)
        k = Linear((D,), (K, H), ("embed", "kv_heads", "kv"), name="k_proj", **dense)(x)
        v = Linear((D,), (K, H), ("embed", "kv_heads", "kv"), name="v_proj", **dense)(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this layer's new slots, attend over all of its slots
            cache = kv_cache.write_layer(cache, layer, k, v, slot)
            k, v = kv_cache.read_layer(cache, layer)
        else:
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # heads-major like the cache
        out = attention(q, k.astype(self.dtype), v, bias, dtype=self.dtype, heads_major=True)
        out = Linear((N, H), (D,), ("heads", "kv", "embed"), name="o_proj", **dense)(out)
        return out, cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant)
        gate = Linear((c.hidden_size,), (c.intermediate_size,), ("embed", "mlp"), name="gate_proj", **dense)(x)
        up = Linear((c.hidden_size,), (c.intermediate_size,), ("embed", "mlp"), name="up_proj", **dense)(x)
        h = activation(c.hidden_act)(gate) * up
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return Linear((c.intermediate_size,), (c.hidden_size,), ("mlp", "embed"), name="down_proj", **dense)(h)


class LlamaBlock(nn.Module):
    """One decoder layer as a scan body: carry (x, stacked cache or None), layer index scanned."""
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, carry, layer, cos, sin, bias, slot):
        x, cache = carry
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(eps=c.rms_norm_eps, rms=True, use_bias=False, **kw)
        h, cache = LlamaAttention(c, name="self_attn", quant=self.quant, **kw)(
            LayerNorm(name="input_layernorm", **norm)(x), cos, sin, bias, cache, layer, slot)
        x = x + h
        x = x + LlamaMLP(c, name="mlp", quant=self.quant, **kw)(LayerNorm(name="post_attention_layernorm", **norm)(x))
        return (nn.with_logical_constraint(x, ("batch", "length", "act_embed")), cache), None


class LlamaModel(DecoderOnlyLM):
    """Decoder-only LM implementing `jblip.language_model`'s contract (layers scanned)."""
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)
    remat: str = "none"  # named policy, see jblip.scan
    layer_loop: str = "scan"  # "unrolled": per-layer param buffers (jblip.scan.LAYER_LOOPS)

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = Embed(c.vocab_rows, c.hidden_size, ("vocab", "embed"), **kw)
        broadcast = (nn.broadcast,) * 4  # cos, sin, bias, slot: the same for every layer
        self.layers = stack(LlamaBlock, c.num_layers, in_axes=(0,) + broadcast, remat=self.remat,
                            unrolled=self.layer_loop == "unrolled")(c, quant=self.quant, **kw)
        self.norm = LayerNorm(eps=c.rms_norm_eps, rms=True, use_bias=False, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c.hidden_size, c.vocab_rows, quant=self.quant, **kw)

    def embed(self, ids):
        return self.embed_tokens(ids)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        c = self.config
        return kv_cache.init(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype,
                             per_layer=self.layer_loop == "unrolled")

    def decode(self, embeds, positions, key_mask, cache=None, slot=0):
        """embeds [B,T,D]; positions [B,T] RoPE positions; key_mask [B,S] valid key slots
        (S = T without a cache, the cache length with one). Returns (hidden after the final
        norm [B,T,D], new cache or None)."""
        c = self.config
        B, T = embeds.shape[:2]
        bias = causal_bias(jnp.broadcast_to(slot + jnp.arange(T), (B, T)), key_mask)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        x = embeds.astype(self.dtype)
        (x, cache), _ = self.layers((x, cache), np.arange(c.num_layers), cos, sin, bias, slot)
        return self.norm(x), cache

    def head(self, hidden):
        c = self.config
        if c.tie_word_embeddings:
            logits = tied_logits(hidden, self.embed_tokens.embedding, self.dtype)
        else:
            logits = self.lm_head(hidden)
        return logits[..., : c.vocab_size]  # drop rows padded for sharding (no-op otherwise)
