"""OPT decoder (BLIP-2's language model) with an optional static-shape KV cache.

Same contract as `jblip.llama.LlamaModel`: `embed(ids)` gives token embeddings,
`__call__(embeds, positions, key_mask, cache, cache_index)` gives fp32 logits
and the updated cache. Queries sit at key slots `cache_index + arange(T)`.

Widths: token embeddings (and the tied output head) are `word_embed_proj_dim`
wide; the blocks run at `hidden_size`. When the two differ (only OPT-350m),
`project_in` maps the *whole* input sequence (image queries included) to
`hidden_size` and `project_out` maps back before the head, as HF does. So the
composite model must feed `__call__` vectors of width `word_embed_proj_dim`.
(HF's `language_projection` outputs `text_config.hidden_size`, which equals
`word_embed_proj_dim` in every released BLIP-2 OPT checkpoint.)

Positions: 0-based ids from the caller (`cumsum(mask) - 1`); the learned table
has `max_position_embeddings + 2` rows and row `position + 2` is used, so HF's
padding position -1 reads row 1. Positions past the table are clipped by the
gather, so callers must keep `position < max_position_embeddings`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jblip import kv_cache
from jblip.config import OPTConfig
from jblip.layers import Embed, LayerNorm, Linear, activation, attention, causal_bias

Dtype = jnp.dtype
POSITION_OFFSET = 2  # fairseq legacy: rows 0 and 1 of the position table precede position 0


def init_cache(config: OPTConfig, batch: int, max_len: int, dtype=jnp.float32):
    return kv_cache.init(config.num_layers, batch, config.num_heads, max_len, config.head_dim, dtype)


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, layer_cache, cache_index):
        c = self.config
        D, N, H = c.hidden_size, c.num_heads, c.head_dim
        dense = dict(use_bias=c.enable_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        # OPT scales q (after its bias) rather than the scores.
        q = Linear((D,), (N, H), ("embed", "heads", "kv"), name="q_proj", **dense)(x) * (H ** -0.5)
        k = Linear((D,), (N, H), ("embed", "heads", "kv"), name="k_proj", **dense)(x)
        v = Linear((D,), (N, H), ("embed", "heads", "kv"), name="v_proj", **dense)(x)
        new_cache = None
        if layer_cache is None:
            out = attention(q, k, v, bias, scale=1.0, dtype=self.dtype)
        else:
            new_cache = kv_cache.write(layer_cache, k, v, cache_index)
            out = attention(q, new_cache["k"].astype(self.dtype), new_cache["v"], bias, scale=1.0,
                            dtype=self.dtype, heads_major=True)
        out = Linear((N, H), (D,), ("heads", "kv", "embed"), name="out_proj", **dense)(out)
        return out, new_cache


class OPTMLP(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = dict(use_bias=c.enable_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear((c.hidden_size,), (c.ffn_dim,), ("embed", "mlp"), name="fc1", **dense)(x)
        h = activation(c.activation_function)(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return Linear((c.ffn_dim,), (c.hidden_size,), ("mlp", "embed"), name="fc2", **dense)(h)


class OPTBlock(nn.Module):
    """Pre-LN block (every released size but 350m) or post-LN (`do_layer_norm_before=False`)."""
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, layer_cache, cache_index):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_norm = LayerNorm(eps=c.layer_norm_eps, name="self_attn_layer_norm", **kw)
        mlp_norm = LayerNorm(eps=c.layer_norm_eps, name="final_layer_norm", **kw)
        pre = c.do_layer_norm_before
        h, new_cache = OPTAttention(c, name="self_attn", **kw)(attn_norm(x) if pre else x, bias,
                                                               layer_cache, cache_index)
        x = x + h
        if not pre:
            x = attn_norm(x)
        x = x + OPTMLP(c, name="mlp", **kw)(mlp_norm(x) if pre else x)
        if not pre:
            x = mlp_norm(x)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), new_cache


class OPTModel(nn.Module):
    """Decoder-only LM: `embed(ids)`, then `__call__(embeds, positions, key_mask, cache, cache_index)`."""
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.hidden_size % c.num_heads:
            raise ValueError(f"OPT hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        self.embed_tokens = Embed(c.vocab_rows, c.word_embed_proj_dim, ("vocab", "embed"), **kw)
        self.embed_positions = Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size,
                                     ("pos", "embed"), **kw)
        if c.word_embed_proj_dim != c.hidden_size:
            self.project_in = Linear((c.word_embed_proj_dim,), (c.hidden_size,), ("embed", "embed"),
                                     use_bias=False, **kw)
            self.project_out = Linear((c.hidden_size,), (c.word_embed_proj_dim,), ("embed", "embed"),
                                      use_bias=False, **kw)
        block = nn.remat(OPTBlock) if c.remat else OPTBlock  # recompute in the backward pass
        self.layers = [block(c, name=f"layers_{i}", **kw) for i in range(c.num_layers)]
        # HF (and metaseq) have a final norm only in the pre-LN variant.
        if c.do_layer_norm_before:
            self.final_layer_norm = LayerNorm(eps=c.layer_norm_eps, **kw)

    def embed(self, ids):
        """Token ids [B,T] -> embeddings [B,T,word_embed_proj_dim] (no scaling in OPT)."""
        return self.embed_tokens(ids)

    def forward_ids(self, ids, positions, key_mask, cache=None, cache_index=0):
        """Token ids in, logits out (also the method to `init` the standalone LM with)."""
        return self(self.embed(ids), positions, key_mask, cache, cache_index)

    def __call__(self, embeds, positions, key_mask, cache=None, cache_index=0, last_logits_only: bool = False):
        """embeds [B,T,word_embed_proj_dim]; positions [B,T] 0-based (pads: -1); key_mask [B,S]
        valid key slots (S = T without a cache, the cache length with one).
        Returns (logits fp32 [B,T,V], new cache or None).
        `last_logits_only`: logits of the last position only, [B,1,V] (prefill needs no more)."""
        c = self.config
        B, T = embeds.shape[:2]
        self._check_inputs(embeds, positions, key_mask, cache)
        slots = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
        bias = causal_bias(slots, key_mask)

        x = embeds.astype(self.dtype)
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_in(x)
        x = x + self.embed_positions(positions.astype(jnp.int32) + POSITION_OFFSET)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, bias, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        if last_logits_only:  # skip the vocabulary projection of every other position
            x = x[:, -1:]
        if c.do_layer_norm_before:
            x = self.final_layer_norm(x)
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_out(x)
        # Tied head; accumulate and return in fp32 whatever the compute dtype.
        table = self.embed_tokens.embedding.astype(self.dtype)
        logits = jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)
        logits = logits[..., : c.vocab_size]  # drop rows padded for sharding (no-op otherwise)
        return logits, (None if cache is None else tuple(new_cache))

    def _check_inputs(self, embeds, positions, key_mask, cache):
        c = self.config
        if embeds.ndim != 3 or embeds.shape[-1] != c.word_embed_proj_dim:
            raise ValueError(f"OPT embeds must be [B,T,{c.word_embed_proj_dim}] (word_embed_proj_dim), "
                             f"got {embeds.shape}")
        if positions.shape != embeds.shape[:2]:
            raise ValueError(f"positions must be [B,T]={embeds.shape[:2]}, got {positions.shape}")
        if cache is not None and len(cache) != c.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, the model {c.num_layers}")
        keys = embeds.shape[1] if cache is None else cache[0]["k"].shape[2]
        if key_mask.shape != (embeds.shape[0], keys):
            raise ValueError(f"key_mask must be [B,S]=({embeds.shape[0]}, {keys}) "
                             f"({'cache length' if cache is not None else 'no cache: S = T'}), got {key_mask.shape}")
