"""The composite model: pixels -> ViT -> Q-Former -> projection -> language model.

One Linen module serves every family (InstructBLIP / BLIP-2 with LLaMA, OPT or
Flan-T5); the family comes from `config.text.family`. Params tree:
`{"vision", "qformer" (incl. query_tokens), "projection", "llm"}`.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jblip import families
from jblip.config import ModelConfig
from jblip.layers import Linear
from jblip.quantization import is_quantized
from jblip.scan import check_remat
from jblip.qformer import QFormer
from jblip.vision import VisionTransformer


def language_model_class(family_name: str):
    return families.family(family_name).module_class()


def scatter_queries(embeds, queries, is_placeholder):
    """Replace the placeholder rows of each sequence, in order, by that row's queries."""
    index = jnp.clip(jnp.cumsum(is_placeholder.astype(jnp.int32), axis=-1) - 1, 0, queries.shape[1] - 1)
    gathered = jnp.take_along_axis(queries, index[..., None], axis=1)
    return jnp.where(is_placeholder[..., None], gathered.astype(embeds.dtype), embeds)


class BlipModel(nn.Module):
    """`remat`: the named recompute policy of every layer stack (`jblip.scan`), a run-time choice
    (training), not part of the architecture."""
    config: ModelConfig
    remat: str = "none"
    layer_loop: str = "scan"  # the language model's stacks: jblip.scan.LAYER_LOOPS

    def setup(self):
        c, p = self.config, self.config.precision
        check_remat(self.remat)
        param_dtype = jnp.dtype(p.param_dtype)
        quant = c.quantization
        self.vision = VisionTransformer(c.vision, dtype=jnp.dtype(p.vision), param_dtype=param_dtype,
                                        remat=self.remat, quant=quant and quant.for_tower("vision"))
        self.qformer = QFormer(c.qformer, c.num_query_tokens, dtype=jnp.dtype(p.qformer), param_dtype=param_dtype,
                               remat=self.remat)
        self.projection = Linear((c.qformer.hidden_size,), (c.text.hidden_size,), ("qf_embed", "embed"),
                                 use_bias=True, dtype=jnp.dtype(p.qformer), param_dtype=param_dtype)
        self.llm = language_model_class(c.family)(c.text, dtype=jnp.dtype(p.text), param_dtype=param_dtype,
                                                  remat=self.remat, layer_loop=self.layer_loop,
                                                  quant=quant and quant.for_tower("llm"))

    @property
    def is_encoder_decoder(self) -> bool:
        return families.family(self.config).encoder_decoder

    def image_features(self, pixel_values):
        """Post-layernorm ViT output [B, 1+P, D_v] (pixels NHWC)."""
        return self.vision(pixel_values)

    def query_features(self, pixel_values, qformer_ids=None, qformer_mask=None):
        """Q-Former query outputs: [B, Q, D_q] for images [B, H, W, C]; [B*T, Q, D_q] for videos
        [B, T, H, W, C], whose frames run as B*T images with the instruction repeated per frame
        (InstructBLIP-Video). The rank of the pixels is static, so each kind is its own program."""
        if pixel_values.ndim == 5:
            frames = pixel_values.shape[1]
            pixel_values = pixel_values.reshape((-1,) + pixel_values.shape[2:])
            if qformer_ids is not None:
                qformer_ids = jnp.repeat(qformer_ids, frames, axis=0)
            if qformer_mask is not None:
                qformer_mask = jnp.repeat(qformer_mask, frames, axis=0)
        return self.qformer(self.vision(pixel_values), qformer_ids, qformer_mask, queries_only=True)

    def encode_image(self, pixel_values, qformer_ids=None, qformer_mask=None):
        """Projected query outputs, the soft prompt for the language model: [B, Q, D_llm] for
        images, [B, T*Q, D_llm] for videos (each frame's queries in frame order)."""
        queries = self.projection(self.query_features(pixel_values, qformer_ids, qformer_mask))
        if pixel_values.ndim == 5:
            queries = queries.reshape(pixel_values.shape[0], -1, queries.shape[-1])
        return queries

    def merge_queries(self, queries, input_ids, attention_mask, prepend_queries: bool):
        """Language-model input embeddings and mask with the queries in place.

        prepend_queries=False: `input_ids` hold one placeholder id (`config.image_token_index`)
        per query row (`num_query_tokens`, times T for a video), replaced in order (current HF layout).
        prepend_queries=True: the legacy/LAVIS layout, queries in front of the text.
        """
        embeds = self.llm.embed(input_ids)
        if prepend_queries:
            ones = jnp.ones(queries.shape[:2], attention_mask.dtype)
            return (jnp.concatenate([queries.astype(embeds.dtype), embeds], axis=1),
                    jnp.concatenate([ones, attention_mask], axis=1))
        is_placeholder = input_ids == self.config.image_token_index
        return scatter_queries(embeds, queries, is_placeholder), attention_mask

    def __call__(self, pixel_values, input_ids, attention_mask, qformer_ids=None, qformer_mask=None,
                 decoder_input_ids=None, prepend_queries: bool = False, return_hidden: bool = False):
        """Full forward; returns float32 logits (decoder logits for T5), and with `return_hidden`
        also the language model's states after its final norm."""
        queries = self.encode_image(pixel_values, qformer_ids, qformer_mask)
        embeds, mask = self.merge_queries(queries, input_ids, attention_mask, prepend_queries)
        return self.llm(embeds, mask, decoder_input_ids, return_hidden=return_hidden)

    def hidden_states(self, pixel_values, input_ids, attention_mask, qformer_ids=None, qformer_mask=None,
                      decoder_input_ids=None, prepend_queries: bool = False):
        """The language model's states after its final norm [B, T, D] (no head: see `lm_head`)."""
        queries = self.encode_image(pixel_values, qformer_ids, qformer_mask)
        embeds, mask = self.merge_queries(queries, input_ids, attention_mask, prepend_queries)
        return self.llm.hidden(embeds, mask, decoder_input_ids)

    def lm_head(self, hidden):
        """The language model's position-wise head: fp32 logits."""
        return self.llm.head(hidden)

    # Pieces used by the decode loop (vision + Q-Former run once, outside the loop).
    def embed_tokens(self, ids):
        return self.llm.embed(ids)


def dummy_inputs(config: ModelConfig, batch: int = 1):
    """Smallest inputs that touch every parameter (for init / eval_shape)."""
    s = config.vision.image_size
    inputs = dict(
        pixel_values=jnp.zeros((batch, s, s, config.vision.num_channels), jnp.float32),
        input_ids=jnp.ones((batch, 2), jnp.int32),
        attention_mask=jnp.ones((batch, 2), jnp.int32),
        prepend_queries=True,
    )
    if config.qformer.use_text_input:
        inputs.update(qformer_ids=jnp.ones((batch, 2), jnp.int32), qformer_mask=jnp.ones((batch, 2), jnp.int32))
    if families.family(config).encoder_decoder:
        inputs.update(decoder_input_ids=jnp.zeros((batch, 1), jnp.int32))
    return inputs


def abstract_params(config: ModelConfig, boxed: bool = False):
    """Param shapes/dtypes without allocating (jax.eval_shape); logical-axis boxes kept if `boxed`."""
    module = BlipModel(config)
    tree = jax.eval_shape(lambda: module.init(jax.random.key(0), **dummy_inputs(config)))["params"]
    return tree if boxed else nn.unbox(tree)


def init_params(config: ModelConfig, seed: int = 0):
    module = BlipModel(config)
    return nn.unbox(module.init(jax.random.key(seed), **dummy_inputs(config))["params"])


def count_params(tree) -> int:
    """Weights in the tree; a quantised kernel counts its values, not its scales."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)
    return sum(math.prod(x.shape) for x in leaves)
