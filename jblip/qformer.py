"""Q-Former: a post-LN BERT whose learned query tokens read the image.

Two variants, chosen by `QFormerConfig.use_text_input`:
- InstructBLIP: the instruction's tokens join the queries in self-attention
  (text has word + position embeddings; queries have none), and text positions
  have their own feed-forward block.
- BLIP-2: queries only; no text embeddings and no text feed-forward params.
Only query positions cross-attend to the image, on every
`cross_attention_frequency`-th layer (0, f, 2f, ...).

The retrieval checkpoints (BLIP-2 stage 1, `Blip2ForImageTextRetrieval`) use the
InstructBLIP variant in three modes: image (queries alone), text (`use_queries=False`:
the BERT text encoder, no queries, no cross-attention) and multimodal (queries +
text, bidirectional); `causal_text=True` is the image-grounded text decoder (queries
see queries, text sees every query and the text before it).

Layer stack: groups of f layers (cross-attention in the group's first) are one
scanned stack (`jblip.scan.stack`), so compile time does not grow with depth:
params `layers/layer_{j}/<path>` with a leading [G] axis stand for layer g*f + j.
The stack holds the whole groups that end before the last layer; the 1 to f
layers after them, the last included, stay separate modules `layers_{m}` (12
layers, f=2: a stack of 5 groups, then layers_10 and layers_11). See
`QFormer.__call__` for why.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jblip.config import QFormerConfig
from jblip.layers import NEG_INF, Dtype, Embed, LayerNorm, Linear, activation, attention, key_padding_bias, logical_param
from jblip.scan import stack, with_remat


class QFormerAttention(nn.Module):
    """Multi-head attention; K/V come from `kv` (width `kv_width`, axis name `kv_axis`)."""
    config: QFormerConfig
    kv_width: int
    kv_axis: str = "qf_embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv, bias=None):
        cfg = self.config
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear((d,), (n, h), ("qf_embed", "qf_heads", "qf_kv"), **kw, name="query")(x)
        k = Linear((self.kv_width,), (n, h), (self.kv_axis, "qf_heads", "qf_kv"), **kw, name="key")(kv)
        v = Linear((self.kv_width,), (n, h), (self.kv_axis, "qf_heads", "qf_kv"), **kw, name="value")(kv)
        out = attention(q, k, v, bias, scale=h ** -0.5, dtype=self.dtype)
        return Linear((n, h), (d,), ("qf_heads", "qf_kv", "qf_embed"), **kw, name="output")(out)


class QFormerFFN(nn.Module):
    config: QFormerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Linear((cfg.hidden_size,), (cfg.intermediate_size,), ("qf_embed", "qf_mlp"), **kw, name="intermediate")(x)
        y = activation(cfg.hidden_act)(y)
        return Linear((cfg.intermediate_size,), (cfg.hidden_size,), ("qf_mlp", "qf_embed"), **kw, name="output")(y)


class QFormerLayer(nn.Module):
    """One post-LN block; positions [:num_queries] are queries, the rest text."""
    config: QFormerConfig
    has_cross_attention: bool
    num_queries: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, image_embeds, self_bias, queries_only: bool = False):
        """`queries_only`: return the query rows alone, and compute text rows only as keys and
        values (the last layer, whose text outputs nothing reads: autodiff would otherwise run
        their feed-forward block forward and backward). Init still creates every param."""
        cfg, num_queries = self.config, self.num_queries
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name):
            return LayerNorm(eps=cfg.layer_norm_eps, axis_name="qf_norm", **kw, name=name)

        skip_text = queries_only and not self.is_initializing()
        rows = x[:, :num_queries] if skip_text else x
        self_attn = QFormerAttention(cfg, cfg.hidden_size, **kw, name="self_attn")
        x = norm("self_attn_norm")(rows + self_attn(rows, x, self_bias))
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if num_queries == 0:  # text mode: no queries, nothing reads the image (init runs the other modes too)
            return norm("text_ffn_norm")(text + QFormerFFN(cfg, **kw, name="text_ffn")(text))
        if self.has_cross_attention:
            cross = QFormerAttention(cfg, cfg.encoder_hidden_size, "vis_embed", **kw, name="cross_attn")
            queries = norm("cross_attn_norm")(queries + cross(queries, image_embeds))
        queries = norm("query_ffn_norm")(queries + QFormerFFN(cfg, **kw, name="query_ffn")(queries))
        if not cfg.use_text_input or skip_text:
            return queries
        # Runs (at no cost) on zero text positions too, so the params always exist as in HF.
        text = norm("text_ffn_norm")(text + QFormerFFN(cfg, **kw, name="text_ffn")(text))
        return jnp.concatenate([queries, text], axis=1)


class QFormerGroup(nn.Module):
    """`cross_attention_frequency` consecutive layers, cross-attention in the first: one scan step."""
    config: QFormerConfig
    num_queries: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, image_embeds, self_bias):
        kw = dict(num_queries=self.num_queries, dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.config.cross_attention_frequency):
            x = QFormerLayer(self.config, has_cross_attention=j == 0, **kw, name=f"layer_{j}")(
                x, image_embeds, self_bias)
        return x, None


class QFormerEmbeddings(nn.Module):
    """LayerNorm(concat(queries, word_emb(text) + pos_emb(0..L-1))); queries get no positions."""
    config: QFormerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, text_ids):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        words = Embed(cfg.vocab_size, cfg.hidden_size, ("qf_vocab", "qf_embed"), **kw, name="word_embeddings")
        positions = Embed(cfg.max_position_embeddings, cfg.hidden_size, ("qf_pos", "qf_embed"), **kw,
                          name="position_embeddings")
        text = words(text_ids) + positions(jnp.arange(text_ids.shape[1]))[None]
        x = jnp.concatenate([queries, text.astype(queries.dtype)], axis=1)
        return LayerNorm(eps=cfg.layer_norm_eps, axis_name="qf_norm", **kw, name="layernorm")(x)


class QFormer(nn.Module):
    """image_embeds [B, S, K], text_ids / text_mask [B, L] (or None) -> hidden [B, Q + L, D].

    Owns the learned `query_tokens` (Q, D). The first Q outputs are the query
    outputs used downstream. `text_mask` marks valid text tokens (1) and pads (0);
    queries always attend and are always attended to. BLIP-2 configs
    (`use_text_input=False`) take no text. `remat` names the recompute policy
    of the layers (see `jblip.scan`).
    """
    config: QFormerConfig
    num_query_tokens: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, image_embeds, text_ids=None, text_mask=None, queries_only: bool = False,
                 use_queries: bool = True, causal_text: bool = False):
        """`queries_only`: return [B, Q, D], skipping the work that only the text outputs need.
        `use_queries=False`: text mode, `image_embeds` unused (may be None), returns [B, L, D].
        `causal_text`: text rows attend causally (and to every query); queries never see text."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if use_queries:
            self._check_inputs(image_embeds, text_ids, text_mask)
        elif text_ids is None or not cfg.use_text_input:
            raise ValueError("text mode (use_queries=False) needs text_ids and a Q-Former that reads text")
        b = image_embeds.shape[0] if use_queries else text_ids.shape[0]
        nq = self.num_query_tokens if use_queries else 0
        queries = logical_param(self, "query_tokens", nn.initializers.normal(0.02),
                                (self.num_query_tokens, cfg.hidden_size), ("qf_queries", "qf_embed"),
                                self.param_dtype)[:nq]
        queries = jnp.broadcast_to(queries.astype(self.dtype), (b, nq, cfg.hidden_size))
        if image_embeds is not None:
            image_embeds = image_embeds.astype(self.dtype)

        if cfg.use_text_input:
            if text_ids is None:  # queries only; zero text positions keep the text params in use
                text_ids = jnp.zeros((b, 0), jnp.int32)
            x = QFormerEmbeddings(cfg, **kw, name="embeddings")(queries, text_ids)
        else:
            x = LayerNorm(eps=cfg.layer_norm_eps, axis_name="qf_norm", **kw, name="layernorm")(queries)

        self_bias = None
        if text_mask is not None:
            mask = jnp.concatenate([jnp.ones((b, nq), bool), text_mask.astype(bool)], axis=1)
            self_bias = key_padding_bias(mask)
        if causal_text:
            self_bias = _query_causal_bias(nq, text_ids.shape[1]) + (0.0 if self_bias is None else self_bias)

        # The last layer stays out of the scan: under `queries_only` it returns the query rows
        # alone, a shape a scan step cannot change its carry to, and computing its text rows
        # anyway would run their feed-forward forward and backward in every train step for
        # outputs nothing reads. So the stack holds the whole groups before the last layer,
        # and the 1 to f layers after them run unscanned (compile time still independent
        # of depth).
        f, last = cfg.cross_attention_frequency, cfg.num_layers - 1
        groups = max(last // f, 0)
        if groups:
            scanned = stack(QFormerGroup, groups, in_axes=(nn.broadcast, nn.broadcast), remat=self.remat)
            x, _ = scanned(cfg, nq, **kw, name="layers")(x, image_embeds, self_bias)
        layer_cls = with_remat(QFormerLayer, self.remat, static_argnums=(4,))  # queries_only is static
        for i in range(groups * f, cfg.num_layers):
            layer = layer_cls(cfg, has_cross_attention=i % f == 0, num_queries=nq, **kw, name=f"layers_{i}")
            x = layer(x, image_embeds, self_bias, queries_only and i == last)
        return x

    def _check_inputs(self, image_embeds, text_ids, text_mask):
        cfg = self.config
        if image_embeds.ndim != 3 or image_embeds.shape[-1] != cfg.encoder_hidden_size:
            raise ValueError(f"image_embeds must be [batch, tokens, {cfg.encoder_hidden_size}]; "
                             f"got shape {tuple(image_embeds.shape)}")
        if text_ids is None:
            if text_mask is not None:
                raise ValueError("text_mask was given without text_ids")
            return
        if not cfg.use_text_input:
            raise ValueError("this Q-Former (BLIP-2, use_text_input=False) takes no text; pass text_ids=None")
        if text_ids.ndim != 2 or text_ids.shape[0] != image_embeds.shape[0]:
            raise ValueError(f"text_ids must be [batch={image_embeds.shape[0]}, length]; got {tuple(text_ids.shape)}")
        if text_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"instruction of {text_ids.shape[1]} tokens exceeds the Q-Former's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text_ids.shape):
            raise ValueError(f"text_mask shape {tuple(text_mask.shape)} != text_ids shape {tuple(text_ids.shape)}")


def _query_causal_bias(num_queries: int, text_len: int):
    """[1, 1, Q+L, Q+L] bias of the image-grounded decoder: queries see the queries only, text
    position i sees every query and text positions <= i."""
    n = num_queries + text_len
    row, col = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    allowed = jnp.where(row < num_queries, col < num_queries, (col < num_queries) | (col <= row))
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[None, None]
