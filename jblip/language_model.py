"""The language-model contract that LLaMA, OPT and Flan-T5 implement, and its decode state.

Every language model (`jblip.llama.LlamaModel`, `jblip.opt.OPTModel`,
`jblip.t5.T5Model`) offers, as Linen methods:

  embed(ids)                            token ids [B, T] -> input embeddings [B, T, D]
  __call__(embeds, mask, decoder_ids=None, return_hidden=False)
                                        full forward: fp32 logits [B, T, V]; with
                                        `return_hidden`, (logits, hidden) where hidden are
                                        the states after the final norm (what `head` reads)
  forward_ids(ids, mask, decoder_ids=None)  the same from token ids (touches every param:
                                        the method to `init` a standalone LM with)
  hidden(embeds, mask, decoder_ids=None)  those states alone [B, T, D']
  head(hidden)                          position-wise head: fp32 logits [..., V]
  cache_length(prompt_len, max_new)     cache slots a generation needs (static ints)
  init_cache(batch, max_len, dtype)     zeroed stacked KV cache (no params needed)
  prefill(embeds, mask, cache)          -> (fp32 logits [B, V] of the next token, LMState)
  decode_step(tokens [R], state)        -> (fp32 logits [R, V], LMState): feed one token per row
  history(input_ids, attention_mask)    -> (ids, valid): the tokens the logits processors see
                                        (the prompt for decoder-only models, the decoder's
                                        start token for encoder-decoders)

plus `reorder(state, rows)` / `repeat(state, n)` on the state (beam search,
several return sequences). `mask` marks real tokens; decoder-only prompts are
left-padded, encoder inputs right-padded (see `jblip.families`).

Every head accumulates its logits in float32 whatever the compute dtype, so
beam scores and sampling see full-precision logits.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jblip import kv_cache
from jblip.head_product import head_product
from jblip.layers import init_normal
from jblip.quantization import Quantization, kernel_param


@flax.struct.dataclass
class LMState:
    """Everything a decode step needs besides the params; a pytree (jit/while_loop carry)."""
    cache: Any                # self-attention K/V {"k", "v"}, leaves [L, R, N, S, H] (`jblip.kv_cache`)
    key_mask: jax.Array       # [R, S] cache slots holding a token
    next_position: jax.Array  # [R] position id of the next fed token
    slot: jax.Array           # scalar: cache slot of the next fed token
    cross: Any = None         # encoder-decoder: stacked cross-attention K/V, leaves [L, R, N, S_enc, H]
    enc_mask: Any = None      # encoder-decoder: [R, S_enc]

    def _map_rows(self, fn):
        stacked = lambda tree: jax.tree_util.tree_map(lambda x: fn(x, kv_cache.batch_axis(x)), tree)
        rows = lambda x: None if x is None else fn(x, 0)
        return self.replace(cache=stacked(self.cache), key_mask=rows(self.key_mask),
                            next_position=rows(self.next_position), cross=stacked(self.cross),
                            enc_mask=rows(self.enc_mask))


def reorder(state: LMState, rows) -> LMState:
    """Row r of the result continues row `rows[r]` (beam search keeps the surviving beams).

    Only the self-attention cache moves: every other field is the same for all
    rows of one prompt, and beams are only ever replaced by beams of their own
    prompt, so gathering those would copy them for nothing.
    """
    take = lambda x: jnp.take(x, rows, axis=kv_cache.batch_axis(x))
    return state.replace(cache=jax.tree_util.tree_map(take, state.cache))


def repeat(state: LMState, n: int) -> LMState:
    """Each row repeated `n` times in place (row b -> rows b*n .. b*n+n-1)."""
    return state._map_rows(lambda x, axis: jnp.repeat(x, n, axis=axis))


def positions_from_mask(mask):
    """Position ids for left-padded rows: first real token at 0 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class LMHead(nn.Module):
    """Untied output projection, kernel [D, V]; logits accumulated in float32 (a few rows on CPU:
    `jblip.head_product`)."""
    width: int
    vocab_rows: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    quant: Quantization | None = None

    @nn.compact
    def __call__(self, x):
        kernel = kernel_param(self, "kernel", init_normal(), (self.width, self.vocab_rows), ("embed", "vocab"), 1,
                              self.param_dtype, self.quant)
        return head_product(x, kernel, self.dtype)


def tied_logits(x, embedding, dtype):
    """Head tied to the token embedding [V, D]; accumulated in float32."""
    return jnp.einsum("...D,VD->...V", x.astype(dtype), embedding.astype(dtype), preferred_element_type=jnp.float32)


class LanguageModel(nn.Module):
    """What every family's module shares: the full forward from `hidden` and `head`."""

    def __call__(self, embeds, mask, decoder_ids=None, return_hidden: bool = False):
        """Full forward (training, tests): fp32 logits [B,T,V] (and the hidden states)."""
        hidden = self.hidden(embeds, mask, decoder_ids)
        logits = self.head(hidden)
        return (logits, hidden) if return_hidden else logits

    def forward_ids(self, ids, mask, decoder_ids=None):
        return self(self.embed(ids), mask, decoder_ids)


class DecoderOnlyLM(LanguageModel):
    """The contract for decoder-only models, given the family's `embed`, `head` and
    `decode(embeds, positions, key_mask, cache, slot) -> (hidden after the final norm, cache)`.

    Queries sit at cache slots `slot + arange(T)` and attend causally to the slots
    `key_mask` marks; left padding thus only costs masked slots. Without a cache
    the keys are the T inputs themselves.
    """

    def hidden(self, embeds, mask, decoder_ids=None):
        if decoder_ids is not None:
            raise ValueError("decoder-only language models take no decoder_ids")
        hidden, _ = self.decode(embeds, positions_from_mask(mask), mask.astype(bool))
        return hidden

    def cache_length(self, prompt_len: int, max_new: int) -> int:
        return prompt_len + max_new

    def prefill(self, embeds, mask, cache):
        B, P = mask.shape
        S = kv_cache.num_slots(cache)
        if S < P:
            raise ValueError(f"a cache of {S} slots cannot hold a prompt of {P} tokens")
        key_mask = jnp.concatenate([mask.astype(bool), jnp.zeros((B, S - P), bool)], axis=1)
        hidden, cache = self.decode(embeds, positions_from_mask(mask), key_mask, cache, 0)
        logits = self.head(hidden[:, -1])  # the vocabulary projection of the last position only
        next_position = jnp.sum(mask, axis=-1).astype(jnp.int32)
        return logits, LMState(cache, key_mask, next_position, jnp.int32(P))

    def decode_step(self, tokens, state: LMState):
        key_mask = jax.lax.dynamic_update_slice_in_dim(
            state.key_mask, jnp.ones((tokens.shape[0], 1), bool), state.slot, axis=1)
        hidden, cache = self.decode(self.embed(tokens[:, None]), state.next_position[:, None], key_mask,
                                    state.cache, state.slot)
        return self.head(hidden[:, 0]), state.replace(cache=cache, key_mask=key_mask,
                                                      next_position=state.next_position + 1, slot=state.slot + 1)

    def history(self, input_ids, attention_mask):
        """The prompt from its first attended position on (HF ignores leading padding)."""
        return input_ids, jnp.cumsum(attention_mask, axis=-1) > 0
