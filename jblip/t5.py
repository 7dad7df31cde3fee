"""Flan-T5 (T5 v1.1) encoder-decoder with cross-attention K/V and a static self-attention cache.

Generation runs `encode` once, `cross_kv` once, then `decode` once for the
prompt-free start token and once per new token, writing the decoder's
self-attention K/V into a fixed-size cache at slot `cache_index`.

T5 specifics (ARCHITECTURE.md §4.2): RMS norm without bias, no 1/sqrt(d_kv)
logit scaling, a learned relative-position bias owned by block 0 of each stack
and shared by all its layers, no position bias in cross-attention, gated FFN
with exact GELU for the Salesforce checkpoints, and a d_model**-0.5 rescale of
the decoder output only when the head is tied to the shared embedding.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jblip import kv_cache
from jblip.config import T5Config
from jblip.layers import (Embed, LayerNorm, Linear, activation, attention, causal_bias,
                          init_normal, key_padding_bias, logical_param)

Dtype = jnp.dtype


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """Bucket of `key_pos - query_pos` (int array, any shape), as HF `T5Attention._relative_position_bucket`.

    Bidirectional: half of the buckets per sign. Causal: only non-positive
    distances count (future keys fall in bucket 0). Small distances get one
    bucket each, larger ones log-spaced buckets up to `max_distance`; the log
    is taken in float32 like HF so the boundaries agree.
    """
    rel = jnp.asarray(relative_position, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(rel > 0, num_buckets, 0)
        distance = jnp.abs(rel)
    else:
        offset = 0
        distance = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    # max(.., max_exact) keeps log finite; those entries take the exact branch anyway
    scaled = jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact
    log_ratio = jnp.log(scaled) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + log_ratio.astype(jnp.int32), num_buckets - 1)
    return offset + jnp.where(distance < max_exact, distance, large)


def init_cache(config: T5Config, batch: int, max_len: int, dtype=jnp.float32):
    """Decoder self-attention cache (see jblip.kv_cache)."""
    return kv_cache.init(config.num_decoder_layers, batch, config.num_heads, max_len, config.d_kv, dtype)


class RelativePositionBias(nn.Module):
    """Learned [buckets, N] table -> additive bias [1, N, T, S] for given query/key positions."""
    config: T5Config
    bidirectional: bool
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.embedding = logical_param(self, "embedding", init_normal(),
                                       (c.relative_attention_num_buckets, c.num_heads),
                                       ("rel_buckets", "heads"), self.param_dtype)

    def __call__(self, query_positions, key_positions):
        c = self.config
        buckets = relative_position_bucket(key_positions[None, :] - query_positions[:, None], self.bidirectional,
                                           c.relative_attention_num_buckets, c.relative_attention_max_distance)
        values = jnp.take(self.embedding.astype(jnp.float32), buckets, axis=0)  # [T,S,N]
        return jnp.transpose(values, (2, 0, 1))[None]


class T5Attention(nn.Module):
    """q/k/v/o projections without bias; logits are not scaled by 1/sqrt(d_kv)."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        D, N, H = c.d_model, c.num_heads, c.d_kv
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q = Linear((D,), (N, H), ("embed", "heads", "kv"), **dense)
        self.k = Linear((D,), (N, H), ("embed", "heads", "kv"), **dense)
        self.v = Linear((D,), (N, H), ("embed", "heads", "kv"), **dense)
        self.o = Linear((N, H), (D,), ("heads", "kv", "embed"), **dense)

    def kv(self, x):
        return self.k(x), self.v(x)

    def __call__(self, x, k, v, bias, heads_major: bool = False):
        """k/v [B,S,N,H], or [B,N,S,H] (the cache layout) with heads_major."""
        return self.o(attention(self.q(x), k.astype(self.dtype), v, bias, scale=1.0, dtype=self.dtype,
                                heads_major=heads_major))


class T5MLP(nn.Module):
    """Gated: wo(act(wi_0 x) * wi_1 x); plain (original T5): wo(act(wi x))."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(c.dense_act_fn)
        if c.is_gated_act:
            gate = Linear((c.d_model,), (c.d_ff,), ("embed", "mlp"), name="wi_0", **dense)(x)
            up = Linear((c.d_model,), (c.d_ff,), ("embed", "mlp"), name="wi_1", **dense)(x)
            h = act(gate) * up
        else:
            h = act(Linear((c.d_model,), (c.d_ff,), ("embed", "mlp"), name="wi", **dense)(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return Linear((c.d_ff,), (c.d_model,), ("mlp", "embed"), name="wo", **dense)(h)


def _norm(config: T5Config, dtype, param_dtype, name=None):
    return LayerNorm(eps=config.layer_norm_epsilon, rms=True, use_bias=False, dtype=dtype,
                     param_dtype=param_dtype, name=name)


def _residual(x):
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class T5EncoderLayer(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _norm(self.config, name="self_attn_norm", **kw)(x)
        attn = T5Attention(self.config, name="self_attn", **kw)
        x = x + attn(h, *attn.kv(h), bias)
        x = x + T5MLP(self.config, name="mlp", **kw)(_norm(self.config, name="mlp_norm", **kw)(x))
        return _residual(x)


class T5DecoderLayer(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.self_attn_norm = _norm(c, **kw)
        self.self_attn = T5Attention(c, **kw)
        self.cross_attn_norm = _norm(c, **kw)
        self.cross_attn = T5Attention(c, **kw)
        self.mlp_norm = _norm(c, **kw)
        self.mlp = T5MLP(c, **kw)

    def cross_kv(self, enc_out):
        return self.cross_attn.kv(enc_out)

    def __call__(self, x, self_bias, cross_k, cross_v, cross_bias, layer_cache, cache_index):
        h = self.self_attn_norm(x)
        k, v = self.self_attn.kv(h)
        new_cache = None
        if layer_cache is not None:
            new_cache = kv_cache.write(layer_cache, k, v, cache_index)
            k, v = new_cache["k"], new_cache["v"]
        x = x + self.self_attn(h, k, v, self_bias, heads_major=layer_cache is not None)
        x = x + self.cross_attn(self.cross_attn_norm(x), cross_k, cross_v, cross_bias)
        x = x + self.mlp(self.mlp_norm(x))
        return _residual(x), new_cache


class T5Encoder(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, embeds, mask):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        positions = jnp.arange(embeds.shape[1])
        bias = RelativePositionBias(c, bidirectional=True, param_dtype=self.param_dtype,
                                    name="relative_attention_bias")(positions, positions)
        bias = bias + key_padding_bias(mask)
        x = embeds.astype(self.dtype)
        encoder_layer = nn.remat(T5EncoderLayer) if c.remat else T5EncoderLayer  # recompute in the backward pass
        for i in range(c.num_layers):
            x = encoder_layer(c, name=f"layers_{i}", **kw)(x, bias)
        return _norm(c, name="final_norm", **kw)(x)


class T5Decoder(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.relative_attention_bias = RelativePositionBias(c, bidirectional=False, param_dtype=self.param_dtype)
        layer = nn.remat(T5DecoderLayer) if c.remat else T5DecoderLayer  # recompute in the backward pass
        self.layers = [layer(c, name=f"layers_{i}", **kw) for i in range(c.num_decoder_layers)]
        self.final_norm = _norm(c, **kw)

    def cross_kv(self, enc_out):
        return tuple(layer.cross_kv(enc_out) for layer in self.layers)

    def __call__(self, x, cross_kv, enc_mask, cache, cache_index):
        B, T = x.shape[:2]
        # key slot s holds decoder position s (without a cache the keys are the T queries themselves)
        query_positions = cache_index + jnp.arange(T)
        num_keys = T if cache is None else cache[0]["k"].shape[2]
        self_bias = (self.relative_attention_bias(query_positions, jnp.arange(num_keys))
                     + causal_bias(jnp.broadcast_to(query_positions, (B, T)), jnp.ones((B, num_keys), bool)))
        cross_bias = key_padding_bias(enc_mask)
        x = x.astype(self.dtype)
        new_cache = []
        for i, layer in enumerate(self.layers):
            k, v = cross_kv[i]
            x, layer_cache = layer(x, self_bias, k, v, cross_bias, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))


class LMHead(nn.Module):
    """Untied output projection, kernel (D, V); logits accumulated in float32."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kernel = logical_param(self, "kernel", init_normal(), (c.d_model, c.vocab_rows), ("embed", "vocab"),
                               self.param_dtype)
        return jnp.einsum("BTD,DV->BTV", x.astype(self.dtype), kernel.astype(self.dtype),
                          preferred_element_type=jnp.float32)


class T5Model(nn.Module):
    """Flan-T5 LM. Methods (via `apply(..., method=T5Model.xxx)`): embed, encode, cross_kv, decode, __call__."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if jnp.dtype(self.dtype) == jnp.float16:
            raise ValueError("T5 activations overflow float16 (ARCHITECTURE.md P3); use float32 or bfloat16")
        self.shared = Embed(c.vocab_rows, c.d_model, ("vocab", "embed"), **kw)
        self.encoder = T5Encoder(c, **kw)
        self.decoder = T5Decoder(c, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c, **kw)

    def embed(self, ids):
        """Token ids [B,T] -> shared embeddings [B,T,D] (T5 does not scale them)."""
        return self.shared(ids)

    def encode(self, embeds, mask=None):
        """embeds [B,S,D], mask [B,S] (1 = real token; right padding) -> encoder output [B,S,D]."""
        if embeds.ndim != 3 or embeds.shape[-1] != self.config.d_model:
            raise ValueError(f"encode expects embeds [B,S,{self.config.d_model}], got {embeds.shape}")
        if mask is None:
            mask = jnp.ones(embeds.shape[:2], bool)
        if mask.shape != embeds.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match embeds {embeds.shape[:2]}")
        return self.encoder(embeds, mask)

    def cross_kv(self, enc_out):
        """Cross-attention (k, v), each [B,S,N,H], per decoder layer; computed once per generation."""
        return self.decoder.cross_kv(enc_out)

    def decode(self, decoder_ids, cross_kv, enc_mask, cache=None, cache_index=0):
        """decoder_ids [B,T] at decoder positions cache_index + t -> (logits fp32 [B,T,V], new cache).

        With `cache` (from `init_cache`), the new self-attention k/v are written at
        slot `cache_index` and queries attend causally over the slots; without it,
        a plain causal forward over the T ids (returns cache None).
        """
        c = self.config
        if decoder_ids.ndim != 2:
            raise ValueError(f"decoder_ids must be [B,T], got shape {decoder_ids.shape}")
        if len(cross_kv) != c.num_decoder_layers:
            raise ValueError(f"cross_kv has {len(cross_kv)} layers, the decoder has {c.num_decoder_layers}")
        if cache is not None:
            if len(cache) != c.num_decoder_layers:
                raise ValueError(f"cache has {len(cache)} layers, the decoder has {c.num_decoder_layers}")
            max_len = cache[0]["k"].shape[2]
            if isinstance(cache_index, int) and not 0 <= cache_index <= max_len - decoder_ids.shape[1]:
                raise ValueError(f"cache_index {cache_index} + {decoder_ids.shape[1]} new tokens "
                                 f"does not fit a cache of length {max_len}")
        elif not (isinstance(cache_index, int) and cache_index == 0):
            raise ValueError("cache_index is only meaningful with a cache; pass cache=None and cache_index=0")
        x, new_cache = self.decoder(self.embed(decoder_ids), cross_kv, enc_mask, cache, cache_index)
        return self.logits(x)[..., : c.vocab_size], new_cache  # drop rows padded for sharding

    def logits(self, x):
        c = self.config
        if not c.tie_word_embeddings:
            return self.lm_head(x)
        if c.rescales_output:  # original T5: rescale before the shared-embedding head
            x = x * (c.d_model ** -0.5)
        return jnp.einsum("BTD,VD->BTV", x.astype(self.dtype), self.shared.embedding.astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, embeds, mask, decoder_ids):
        """Full forward (training, tests): logits fp32 [B,T,V]."""
        enc_out = self.encode(embeds, mask)
        logits, _ = self.decode(decoder_ids, self.cross_kv(enc_out), mask)
        return logits
