"""The BLIP-2 retrieval model: ViT -> Q-Former in its three modes -> ITC / ITM / ITG heads.

Params tree: `{"vision", "qformer", "vision_projection", "text_projection", "itm_head",
"temp", "lm_head"}` (the first two as in `jblip.model.BlipModel`, so the towers and their
conversion tables are shared). Modes (see `jblip.qformer`):
- image: the queries read the image; `vision_projection`, L2-normalised per query -> [B, Q, E]
- text: the Q-Former alone on [CLS] ... [SEP]; `text_projection` of [CLS], normalised -> [B, E]
- multimodal: queries + text, both ways; `itm_head` on each query output, averaged -> [B, 2]
- decoder (ITG): queries + causal text; the BERT LM head (`lm_head`, its output matrix tied to
  the Q-Former's word embeddings) -> [B, L, V]
ITC similarity: the best of the Q query embeddings against the text embedding (`itc_similarity`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jblip.layers import LayerNorm, Linear, activation, logical_param
from jblip.qformer import QFormer
from jblip.retrieval.config import RetrievalConfig
from jblip.scan import check_remat
from jblip.vision import VisionTransformer


def l2_normalize(x, eps: float = 1e-12):
    """x / max(|x|, eps) along the last axis, in float32 (torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def itc_similarity(image_embeds, text_embeds):
    """[I, Q, E] x [T, E] -> [I, T]: each pair's best query (the temperature is applied by the loss)."""
    return jnp.einsum("iqe,te->iqt", image_embeds, text_embeds).max(axis=1)


class QFormerLMHead(nn.Module):
    """BERT's prediction head: dense -> activation -> LayerNorm -> tied word embeddings + bias."""
    hidden_size: int
    vocab_size: int
    hidden_act: str
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, word_embeddings):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Linear((self.hidden_size,), (self.hidden_size,), ("qf_embed", "qf_mlp"), **kw, name="transform")(x)
        x = LayerNorm(eps=self.eps, axis_name="qf_norm", **kw, name="norm")(activation(self.hidden_act)(x))
        bias = logical_param(self, "bias", nn.initializers.zeros, (self.vocab_size,), ("qf_vocab",),
                             self.param_dtype)
        logits = jnp.einsum("...d,vd->...v", x.astype(jnp.float32), word_embeddings.astype(jnp.float32))
        return logits + bias.astype(jnp.float32)


class RetrievalModel(nn.Module):
    config: RetrievalConfig
    remat: str = "none"

    def setup(self):
        c, p = self.config, self.config.precision
        check_remat(self.remat)
        param_dtype, qf_dtype = jnp.dtype(p.param_dtype), jnp.dtype(p.qformer)
        kw = dict(dtype=qf_dtype, param_dtype=param_dtype)
        d, e = c.qformer.hidden_size, c.embed_dim
        self.vision = VisionTransformer(c.vision, dtype=jnp.dtype(p.vision), param_dtype=param_dtype, remat=self.remat)
        self.qformer = QFormer(c.qformer, c.num_query_tokens, remat=self.remat, **kw)
        self.vision_projection = Linear((d,), (e,), ("qf_embed", "qf_proj"), **kw)
        self.text_projection = Linear((d,), (e,), ("qf_embed", "qf_proj"), **kw)
        self.itm_head = Linear((d,), (2,), ("qf_embed", "qf_proj"), **kw)
        self.temp = logical_param(self, "temp", nn.initializers.constant(c.temperature), (), (), jnp.float32)
        self.lm_head = QFormerLMHead(d, c.qformer.vocab_size, c.qformer.hidden_act, c.qformer.layer_norm_eps, **kw)

    # ------------------------------------------------------------------ the three modes
    def vision_states(self, pixel_values):
        """Post-layernorm ViT output [B, 1+P, D_v]: what every image mode reads (compute it once)."""
        return self.vision(pixel_values)

    def image_features(self, vision_states):
        """Query outputs [B, Q, D] of the image mode."""
        return self.qformer(vision_states, queries_only=True)

    def image_embeddings(self, pixel_values):
        """L2-normalised per-query ITC embeddings [B, Q, E]."""
        return l2_normalize(self.vision_projection(self.image_features(self.vision_states(pixel_values))))

    def text_features(self, text_ids, text_mask):
        """Text-mode outputs [B, L, D] ([CLS] first)."""
        return self.qformer(None, text_ids, text_mask, use_queries=False)

    def text_embeddings(self, text_ids, text_mask):
        """L2-normalised ITC embedding of [CLS] [B, E]."""
        return l2_normalize(self.text_projection(self.text_features(text_ids, text_mask)[:, 0]))

    def itm_logits(self, vision_states, text_ids, text_mask):
        """Multimodal mode: `itm_head` on every query output, averaged over queries -> [B, 2]
        (index 1 = "matches")."""
        hidden = self.qformer(vision_states, text_ids, text_mask)[:, :self.config.num_query_tokens]
        return self.itm_head(hidden).astype(jnp.float32).mean(axis=1)

    def itg_logits(self, vision_states, text_ids, text_mask):
        """Image-grounded decoder: LM logits [B, L, V] of every text position (position i predicts i+1)."""
        hidden = self.qformer(vision_states, text_ids, text_mask, causal_text=True)[:, self.config.num_query_tokens:]
        words = self.qformer.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
        return self.lm_head(hidden, nn.unbox(words))

    def temperature(self):
        return self.temp

    def __call__(self, pixel_values, text_ids, text_mask):
        """Every head once (init / eval_shape): image and text embeddings, ITM and ITG logits."""
        states = self.vision_states(pixel_values)
        image = l2_normalize(self.vision_projection(self.image_features(states)))
        return (image, self.text_embeddings(text_ids, text_mask), self.itm_logits(states, text_ids, text_mask),
                self.itg_logits(states, text_ids, text_mask), self.temp)


def dummy_inputs(config: RetrievalConfig, batch: int = 1) -> dict:
    s = config.vision.image_size
    return dict(pixel_values=jnp.zeros((batch, s, s, config.vision.num_channels), jnp.float32),
                text_ids=jnp.ones((batch, 2), jnp.int32), text_mask=jnp.ones((batch, 2), jnp.int32))


def abstract_params(config: RetrievalConfig, boxed: bool = False):
    module = RetrievalModel(config)
    tree = jax.eval_shape(lambda: module.init(jax.random.key(0), **dummy_inputs(config)))["params"]
    return tree if boxed else nn.unbox(tree)


def init_params(config: RetrievalConfig, seed: int = 0):
    return nn.unbox(RetrievalModel(config).init(jax.random.key(seed), **dummy_inputs(config))["params"])
