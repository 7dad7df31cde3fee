"""Flan-T5 (T5 v1.1) encoder-decoder with cross-attention K/V and a static self-attention cache.

Generation (`prefill`, then `decode_step`; see `jblip.language_model`) runs the
encoder once, then the decoder once for the prompt-free start token (which
also computes every layer's cross-attention K/V, kept for the later steps)
and once per new token, writing the decoder's self-attention K/V into a
fixed-size stacked cache at slot `slot`. Both stacks are scanned.

T5 specifics: RMS norm without bias, no 1/sqrt(d_kv)
logit scaling, a learned relative-position bias owned by block 0 of each stack
and shared by all its layers, no position bias in cross-attention, gated FFN
with exact GELU for the Salesforce checkpoints, and a d_model**-0.5 rescale of
the decoder output only when the head is tied to the shared embedding.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jblip import kv_cache
from jblip.config import T5Config
from jblip.language_model import LanguageModel, LMHead, LMState, tied_logits
from jblip.layers import (Embed, LayerNorm, Linear, activation, attention, causal_bias,
                          init_normal, key_padding_bias, logical_param)
from jblip.quantization import Quantization
from jblip.scan import stack

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
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    def setup(self):
        c = self.config
        D, N, H = c.d_model, c.num_heads, c.d_kv
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant)
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
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant)
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
    """Scan body: carry x, the position + padding bias broadcast to every layer."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x, bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _norm(self.config, name="self_attn_norm", **kw)(x)
        attn = T5Attention(self.config, name="self_attn", quant=self.quant, **kw)
        x = x + attn(h, *attn.kv(h), bias)
        x = x + T5MLP(self.config, name="mlp", quant=self.quant, **kw)(_norm(self.config, name="mlp_norm", **kw)(x))
        return _residual(x), None


class T5DecoderLayer(nn.Module):
    """Scan body: carry (x, stacked self-attention cache or None); scanned: the layer index and
    its cross-attention K/V (None: computed here from the broadcast encoder output and
    returned, stacked by the scan, for the decode steps to reuse)."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.self_attn_norm = _norm(c, **kw)
        self.self_attn = T5Attention(c, quant=self.quant, **kw)
        self.cross_attn_norm = _norm(c, **kw)
        self.cross_attn = T5Attention(c, quant=self.quant, **kw)
        self.mlp_norm = _norm(c, **kw)
        self.mlp = T5MLP(c, quant=self.quant, **kw)

    def __call__(self, carry, layer, cross, enc_out, self_bias, cross_bias, slot):
        x, cache = carry
        h = self.self_attn_norm(x)
        k, v = self.self_attn.kv(h)
        if cache is not None:  # write this layer's new slots, attend over all of its slots
            cache = kv_cache.write_layer(cache, layer, k, v, slot)
            k, v = kv_cache.read_layer(cache, layer)
        x = x + self.self_attn(h, k, v, self_bias, heads_major=cache is not None)
        new_cross = None
        if cross is None:  # heads-major like the cache, so decode steps read it in place
            ck, cv = self.cross_attn.kv(enc_out)
            cross = new_cross = {"k": jnp.swapaxes(ck, 1, 2), "v": jnp.swapaxes(cv, 1, 2)}
        x = x + self.cross_attn(self.cross_attn_norm(x), cross["k"], cross["v"], cross_bias, heads_major=True)
        x = x + self.mlp(self.mlp_norm(x))
        return (_residual(x), cache), new_cross


class T5Encoder(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)
    remat: str = "none"
    layer_loop: str = "scan"  # "unrolled": per-layer param buffers (jblip.scan.LAYER_LOOPS)

    @nn.compact
    def __call__(self, embeds, mask):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        positions = jnp.arange(embeds.shape[1])
        # HF keeps this table in block 0; every layer uses it, so it is computed once, out of the scan
        bias = RelativePositionBias(c, bidirectional=True, param_dtype=self.param_dtype,
                                    name="relative_attention_bias")(positions, positions)
        bias = bias + key_padding_bias(mask)
        layers = stack(T5EncoderLayer, c.num_layers, in_axes=(nn.broadcast,), remat=self.remat,
                       unrolled=self.layer_loop == "unrolled")
        x, _ = layers(c, name="layers", quant=self.quant, **kw)(embeds.astype(self.dtype), bias)
        return _norm(c, name="final_norm", **kw)(x)


class T5Decoder(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)
    remat: str = "none"
    layer_loop: str = "scan"  # "unrolled": per-layer param buffers (jblip.scan.LAYER_LOOPS)

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # HF keeps this table in block 0; every layer uses it, so it is computed once, out of the scan
        self.relative_attention_bias = RelativePositionBias(c, bidirectional=False, param_dtype=self.param_dtype)
        in_axes = (0, 0) + (nn.broadcast,) * 4  # layer, cross | enc_out, self_bias, cross_bias, slot
        self.layers = stack(T5DecoderLayer, c.num_decoder_layers, in_axes=in_axes, remat=self.remat,
                            unrolled=self.layer_loop == "unrolled")(c, quant=self.quant, **kw)
        self.final_norm = _norm(c, **kw)

    def __call__(self, x, enc_mask, cache, slot, enc_out=None, cross=None):
        """Returns (hidden after the final norm, new cache or None, cross K/V: `cross`, or the
        stacked K/V computed from `enc_out` when `cross` is None)."""
        B, T = x.shape[:2]
        # key slot s holds decoder position s (without a cache the keys are the T queries themselves)
        query_positions = slot + jnp.arange(T)
        num_keys = T if cache is None else kv_cache.num_slots(cache)
        self_bias = (self.relative_attention_bias(query_positions, jnp.arange(num_keys))
                     + causal_bias(jnp.broadcast_to(query_positions, (B, T)), jnp.ones((B, num_keys), bool)))
        cross_bias = key_padding_bias(enc_mask)
        L = self.config.num_decoder_layers
        (x, cache), new_cross = self.layers((x.astype(self.dtype), cache), np.arange(L), cross, enc_out,
                                            self_bias, cross_bias, slot)
        return self.final_norm(x), cache, (cross if cross is not None else new_cross)


class T5Model(LanguageModel):
    """Flan-T5 LM implementing `jblip.language_model`'s contract; also `encode` and `decode`."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)
    remat: str = "none"  # named policy, see jblip.scan
    layer_loop: str = "scan"  # of both stacks: jblip.scan.LAYER_LOOPS

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if jnp.dtype(self.dtype) == jnp.float16:
            raise ValueError("T5 activations overflow float16; use float32 or bfloat16")
        self.shared = Embed(c.vocab_rows, c.d_model, ("vocab", "embed"), **kw)
        self.encoder = T5Encoder(c, remat=self.remat, layer_loop=self.layer_loop, quant=self.quant, **kw)
        self.decoder = T5Decoder(c, remat=self.remat, layer_loop=self.layer_loop, quant=self.quant, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c.d_model, c.vocab_rows, quant=self.quant, **kw)

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

    def decode(self, decoder_ids, enc_mask, cache=None, slot=0, enc_out=None, cross=None):
        """decoder_ids [B,T] at decoder positions slot + t, attending to the encoder output
        (`enc_out`, or its cross-attention K/V `cross` from an earlier call).

        Returns (hidden after the final norm [B,T,D], new cache, cross K/V). With `cache`
        (from `init_cache`) the new self-attention k/v are written at slots slot..slot+T-1
        and queries attend causally over the slots; without it, a plain causal forward.
        """
        c = self.config
        if decoder_ids.ndim != 2:
            raise ValueError(f"decoder_ids must be [B,T], got shape {decoder_ids.shape}")
        if (enc_out is None) == (cross is None):
            raise ValueError("decode needs exactly one of enc_out and cross")
        if cache is not None:
            max_len = kv_cache.num_slots(cache)
            if isinstance(slot, int) and not 0 <= slot <= max_len - decoder_ids.shape[1]:
                raise ValueError(f"slot {slot} + {decoder_ids.shape[1]} new tokens "
                                 f"does not fit a cache of length {max_len}")
        elif not (isinstance(slot, int) and slot == 0):
            raise ValueError("slot is only meaningful with a cache; pass cache=None and slot=0")
        return self.decoder(self.embed(decoder_ids), enc_mask, cache, slot, enc_out, cross)

    def head(self, hidden):
        c = self.config
        if not c.tie_word_embeddings:
            logits = self.lm_head(hidden)
        else:
            if c.rescales_output:  # original T5: rescale before the shared-embedding head
                hidden = hidden * (c.d_model ** -0.5)
            logits = tied_logits(hidden, self.shared.embedding, self.dtype)
        return logits[..., : c.vocab_size]  # drop rows padded for sharding

    # ---------------------------------------------------------------- the language-model contract
    def hidden(self, embeds, mask, decoder_ids=None):
        if decoder_ids is None:
            raise ValueError("Flan-T5 needs decoder_ids (start with decoder_start_token_id "
                             f"{self.config.decoder_start_token_id})")
        hidden, _, _ = self.decode(decoder_ids, mask, enc_out=self.encode(embeds, mask))
        return hidden

    def cache_length(self, prompt_len: int, max_new: int) -> int:
        return max_new + 1  # the start token, then every generated token but the last

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        c = self.config
        return kv_cache.init(c.num_decoder_layers, batch, c.num_heads, max_len, c.d_kv, dtype,
                             per_layer=self.layer_loop == "unrolled")

    def _start_ids(self, batch: int):
        return jnp.full((batch, 1), self.config.decoder_start_token_id, jnp.int32)

    def prefill(self, embeds, mask, cache):
        """Encoder once, then the start token through the decoder, which also computes the
        cross-attention K/V kept in the state."""
        B = mask.shape[0]
        hidden, cache, cross = self.decode(self._start_ids(B), mask, cache, 0, enc_out=self.encode(embeds, mask))
        key_mask = jnp.ones((B, kv_cache.num_slots(cache)), bool)  # causality alone limits the slots
        state = LMState(cache, key_mask, jnp.ones((B,), jnp.int32), jnp.int32(1), cross, mask)
        return self.head(hidden[:, -1]), state

    def decode_step(self, tokens, state: LMState):
        hidden, cache, _ = self.decoder(self.embed(tokens[:, None]), state.enc_mask, state.cache, state.slot,
                                        cross=state.cross)
        return self.head(hidden[:, 0]), state.replace(cache=cache, next_position=state.next_position + 1,
                                                      slot=state.slot + 1)

    def history(self, input_ids, attention_mask):
        """The processors see the decoder's tokens: the start token so far."""
        ids = self._start_ids(input_ids.shape[0])
        return ids, jnp.ones(ids.shape, bool)
