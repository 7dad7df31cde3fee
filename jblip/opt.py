"""OPT decoder (BLIP-2's language model) with an optional static-shape KV cache.

Implements `jblip.language_model`'s contract like `jblip.llama.LlamaModel`:
`decode(embeds, positions, key_mask, cache, slot)` runs the scanned layers with
queries at key slots `slot + arange(T)`; `head` gives fp32 logits.

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
import jax.numpy as jnp
import numpy as np

from jblip import kv_cache
from jblip.config import OPTConfig
from jblip.language_model import DecoderOnlyLM, tied_logits
from jblip.layers import Embed, LayerNorm, Linear, activation, attention, causal_bias
from jblip.quantization import Quantization
from jblip.scan import stack

Dtype = jnp.dtype
POSITION_OFFSET = 2  # fairseq legacy: rows 0 and 1 of the position table precede position 0


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x, bias, cache, layer, slot):
        c = self.config
        D, N, H = c.hidden_size, c.num_heads, c.head_dim
        dense = dict(use_bias=c.enable_bias, dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant)
        # OPT scales q (after its bias) rather than the scores.
        q = Linear((D,), (N, H), ("embed", "heads", "kv"), name="q_proj", **dense)(x) * (H ** -0.5)
        k = Linear((D,), (N, H), ("embed", "heads", "kv"), name="k_proj", **dense)(x)
        v = Linear((D,), (N, H), ("embed", "heads", "kv"), name="v_proj", **dense)(x)
        if cache is None:
            out = attention(q, k, v, bias, scale=1.0, dtype=self.dtype)
        else:  # write this layer's new slots, attend over all of its slots
            cache = kv_cache.write_layer(cache, layer, k, v, slot)
            k, v = kv_cache.read_layer(cache, layer)
            out = attention(q, k.astype(self.dtype), v, bias, scale=1.0, dtype=self.dtype, heads_major=True)
        out = Linear((N, H), (D,), ("heads", "kv", "embed"), name="out_proj", **dense)(out)
        return out, cache


class OPTMLP(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = dict(use_bias=c.enable_bias, dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant)
        h = Linear((c.hidden_size,), (c.ffn_dim,), ("embed", "mlp"), name="fc1", **dense)(x)
        h = activation(c.activation_function)(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return Linear((c.ffn_dim,), (c.hidden_size,), ("mlp", "embed"), name="fc2", **dense)(h)


class OPTBlock(nn.Module):
    """Pre-LN block (every released size but 350m) or post-LN (`do_layer_norm_before=False`),
    as a scan body: carry (x, stacked cache or None), layer index scanned."""
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, carry, layer, bias, slot):
        x, cache = carry
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_norm = LayerNorm(eps=c.layer_norm_eps, name="self_attn_layer_norm", **kw)
        mlp_norm = LayerNorm(eps=c.layer_norm_eps, name="final_layer_norm", **kw)
        pre = c.do_layer_norm_before
        h, cache = OPTAttention(c, name="self_attn", quant=self.quant, **kw)(attn_norm(x) if pre else x, bias, cache, layer, slot)
        x = x + h
        if not pre:
            x = attn_norm(x)
        x = x + OPTMLP(c, name="mlp", quant=self.quant, **kw)(mlp_norm(x) if pre else x)
        if not pre:
            x = mlp_norm(x)
        return (nn.with_logical_constraint(x, ("batch", "length", "act_embed")), cache), None


class OPTModel(DecoderOnlyLM):
    """Decoder-only LM implementing `jblip.language_model`'s contract (layers scanned)."""
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)
    remat: str = "none"  # named policy, see jblip.scan
    layer_loop: str = "scan"  # "unrolled": per-layer param buffers (jblip.scan.LAYER_LOOPS)

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.hidden_size % c.num_heads:
            raise ValueError(f"OPT hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        self.embed_tokens = Embed(c.vocab_rows, c.word_embed_proj_dim, ("vocab", "embed"), **kw)
        self.embed_positions = Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size,
                                     ("pos", "embed"), **kw)
        if c.word_embed_proj_dim != c.hidden_size:
            self.project_in = Linear((c.word_embed_proj_dim,), (c.hidden_size,), ("embed", "embed"),
                                     use_bias=False, quant=self.quant, **kw)
            self.project_out = Linear((c.hidden_size,), (c.word_embed_proj_dim,), ("embed", "embed"),
                                      use_bias=False, quant=self.quant, **kw)
        broadcast = (nn.broadcast,) * 2  # bias, slot: the same for every layer
        self.layers = stack(OPTBlock, c.num_layers, in_axes=(0,) + broadcast, remat=self.remat,
                            unrolled=self.layer_loop == "unrolled")(c, quant=self.quant, **kw)
        # HF (and metaseq) have a final norm only in the pre-LN variant.
        if c.do_layer_norm_before:
            self.final_layer_norm = LayerNorm(eps=c.layer_norm_eps, **kw)

    def embed(self, ids):
        """Token ids [B,T] -> embeddings [B,T,word_embed_proj_dim] (no scaling in OPT)."""
        return self.embed_tokens(ids)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        c = self.config
        return kv_cache.init(c.num_layers, batch, c.num_heads, max_len, c.head_dim, dtype,
                             per_layer=self.layer_loop == "unrolled")

    def decode(self, embeds, positions, key_mask, cache=None, slot=0):
        """embeds [B,T,word_embed_proj_dim]; positions [B,T] 0-based (pads: any); key_mask [B,S]
        valid key slots (S = T without a cache, the cache length with one).
        Returns (hidden after the final norm [B,T,hidden_size], new cache or None)."""
        c = self.config
        B, T = embeds.shape[:2]
        self._check_inputs(embeds, positions, key_mask, cache)
        bias = causal_bias(jnp.broadcast_to(slot + jnp.arange(T), (B, T)), key_mask)
        x = embeds.astype(self.dtype)
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_in(x)
        x = x + self.embed_positions(positions.astype(jnp.int32) + POSITION_OFFSET)
        (x, cache), _ = self.layers((x, cache), np.arange(c.num_layers), bias, slot)
        if c.do_layer_norm_before:
            x = self.final_layer_norm(x)
        return x, cache

    def head(self, hidden):
        """project_out (350m only) and the head tied to the token embedding, fp32 logits."""
        c = self.config
        if c.word_embed_proj_dim != c.hidden_size:
            hidden = self.project_out(hidden)
        logits = tied_logits(hidden, self.embed_tokens.embedding, self.dtype)
        return logits[..., : c.vocab_size]  # drop rows padded for sharding (no-op otherwise)

    def _check_inputs(self, embeds, positions, key_mask, cache):
        c = self.config
        if embeds.ndim != 3 or embeds.shape[-1] != c.word_embed_proj_dim:
            raise ValueError(f"OPT embeds must be [B,T,{c.word_embed_proj_dim}] (word_embed_proj_dim), "
                             f"got {embeds.shape}")
        if positions.shape != embeds.shape[:2]:
            raise ValueError(f"positions must be [B,T]={embeds.shape[:2]}, got {positions.shape}")
        if cache is not None and kv_cache.num_layers(cache) != c.num_layers:
            raise ValueError(f"cache has {kv_cache.num_layers(cache)} layers, the model {c.num_layers}")
        keys = embeds.shape[1] if cache is None else kv_cache.num_slots(cache)
        if key_mask.shape != (embeds.shape[0], keys):
            raise ValueError(f"key_mask must be [B,S]=({embeds.shape[0]}, {keys}) "
                             f"({'cache length' if cache is not None else 'no cache: S = T'}), got {key_mask.shape}")
