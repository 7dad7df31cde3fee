"""Jitted decoding: vision + Q-Former once, prefill, then one `lax.while_loop` on device.

Works for decoder-only LMs (LLaMA, OPT: left-padded prompt, KV cache of
prompt + max_new_tokens slots) and Flan-T5 (encoder once, cross-attention K/V
once, decoder KV cache). Semantics follow HF `generate` so tokens can be
compared one for one: see `jblip.processors` for the processors and `_beam_loop`
for HF's vectorised beam search. The knobs arrive as per-row arrays (`jblip.sampling.RowSampler`),
so new values reuse the compiled program; only `jblip.sampling.StaticSampler` is static.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jblip.model import BlipModel, positions_from_mask
from jblip.processors import argmax, is_eos, process
from jblip.sampling import RowSampler, StaticSampler

BIG_NEG = -1.0e9


class GenerateOutput(NamedTuple):
    tokens: jax.Array    # [B * num_return_sequences, max_new_tokens_cap], pad after EOS / the row's limit
    lengths: jax.Array   # [B * num_return_sequences] tokens up to and including EOS, at most the row's limit
    scores: jax.Array    # beam: final sequence scores; otherwise zeros


# ----------------------------------------------------------------------------- language-model adapters

@flax.struct.dataclass
class LMState:
    cache: tuple
    key_mask: jax.Array       # [R, S] valid key slots (decoder-only) / unused for T5
    next_position: jax.Array  # [R] position id of the next fed token (decoder-only)
    slot: jax.Array           # scalar: cache slot of the next fed token
    cross: tuple = ()         # T5: per-layer cross-attention K/V
    enc_mask: jax.Array | None = None


def _cache_factory(config):
    if config.family == "llama":
        from jblip.llama import init_cache
    elif config.family == "opt":
        from jblip.opt import init_cache
    else:
        from jblip.t5 import init_cache
    return init_cache


def _llm_call(module, params, method, *args):
    return module.apply({"params": params}, *args, method=lambda m, *a: method(m.llm, *a))


def start(module: BlipModel, params, embeds, mask, max_new: int, dtype):
    """Prefill; returns (last logits [B, V], LMState, decoder history [B, 1] or None)."""
    config = module.config
    B, P = mask.shape
    init_cache = _cache_factory(config)
    if config.family == "t5":
        text = config.text
        enc = _llm_call(module, params, lambda llm, e, m: llm.encode(e, m), embeds, mask)
        cross = _llm_call(module, params, lambda llm, e: llm.cross_kv(e), enc)
        cache = init_cache(text, B, max_new + 1, dtype)
        start_ids = jnp.full((B, 1), text.decoder_start_token_id, jnp.int32)
        logits, cache = _llm_call(module, params, lambda llm, i, c, m, k: llm.decode(i, c, m, k, 0),
                                  start_ids, cross, mask, cache)
        state = LMState(cache, jnp.zeros((B, 0), bool), jnp.zeros((B,), jnp.int32), jnp.int32(1), cross, mask)
        return logits[:, -1], state, start_ids
    positions = positions_from_mask(mask)
    key_mask = jnp.concatenate([mask.astype(bool), jnp.zeros((B, max_new), bool)], axis=1)
    cache = init_cache(config.text, B, P + max_new, dtype)
    logits, cache = _llm_call(module, params, lambda llm, e, p, k, c: llm(e, p, k, c, 0, last_logits_only=True),
                              embeds, positions, key_mask, cache)
    next_position = jnp.sum(mask, axis=-1).astype(jnp.int32)
    return logits[:, -1], LMState(cache, key_mask, next_position, jnp.int32(P)), None


def step(module: BlipModel, params, state: LMState, tokens):
    """Feed one token per row; returns (logits [R, V], new state)."""
    if module.config.family == "t5":
        logits, cache = _llm_call(module, params, lambda llm, i, c, m, k, s: llm.decode(i, c, m, k, s),
                                  tokens[:, None], state.cross, state.enc_mask, state.cache, state.slot)
        return logits[:, 0], state.replace(cache=cache, slot=state.slot + 1)
    key_mask = jax.lax.dynamic_update_slice_in_dim(
        state.key_mask, jnp.ones((tokens.shape[0], 1), bool), state.slot, axis=1)
    embeds = module.apply({"params": params}, tokens[:, None], method=BlipModel.embed_tokens)
    logits, cache = _llm_call(module, params, lambda llm, e, p, k, c, s: llm(e, p, k, c, s),
                              embeds, state.next_position[:, None], key_mask, state.cache, state.slot)
    return logits[:, 0], state.replace(cache=cache, key_mask=key_mask, next_position=state.next_position + 1,
                                       slot=state.slot + 1)


def repeat_rows(tree, n: int):
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, n, axis=0) if getattr(x, "ndim", 0) > 0 else x, tree)


def gather_rows(tree, index):
    return jax.tree_util.tree_map(lambda x: jnp.take(x, index, axis=0), tree)


# ----------------------------------------------------------------------------- loops
#
# Both loops run to the static cap `max_new_tokens_cap` at most and stop as soon as every row
# is done; a row is done at EOS or at its own max_new_tokens (a traced value per row).

@flax.struct.dataclass
class SampleState:
    t: jax.Array
    logits: jax.Array
    lm: LMState
    history: jax.Array    # [R, L] prompt ids then generated ids
    valid: jax.Array      # [R, L]
    tokens: jax.Array     # [R, cap]
    done: jax.Array       # [R]


def _row_keys(seeds, n: int):
    """[B * n] random streams: return sequence j of input b draws from fold_in(key(seed_b), j),
    whatever else is in the batch."""
    keys = jax.vmap(jax.random.key)(seeds)
    per_sample = jax.vmap(lambda key: jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n)))(keys)
    return per_sample.reshape(-1)


def _sample_loop(module, params, static: StaticSampler, rows: RowSampler, logits, lm, history, valid, keys):
    """Greedy or sampled decoding; `rows` and `keys` have one entry per row of `logits`."""
    R = logits.shape[0]
    G = static.max_new_tokens_cap
    P = history.shape[1] - G
    pad = static.pad_token_id

    def cond(s: SampleState):
        return (s.t < G) & ~jnp.all(s.done)

    def body(s: SampleState):
        scores = process(s.logits.astype(jnp.float32), static, rows, s.history, s.valid, P + s.t, s.t)
        if static.strategy == "sample":
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, s.t)
            token = jax.vmap(jax.random.categorical)(step_keys, scores).astype(jnp.int32)
        else:
            token = argmax(scores)
        token = jnp.where(s.done, pad, token)
        tokens = s.tokens.at[:, s.t].set(token)
        history = jax.lax.dynamic_update_slice_in_dim(s.history, token[:, None], P + s.t, axis=1)
        valid = jax.lax.dynamic_update_slice_in_dim(s.valid, jnp.ones((R, 1), bool), P + s.t, axis=1)
        done = s.done | is_eos(token, static.eos_token_ids) | (s.t + 1 >= rows.max_new_tokens)
        next_logits, lm_state = step(module, params, s.lm, token)
        return SampleState(s.t + 1, next_logits, lm_state, history, valid, tokens, done)

    init = SampleState(jnp.int32(0), logits, lm, history, valid, jnp.full((R, G), pad, jnp.int32),
                       jnp.zeros((R,), bool))
    out = jax.lax.while_loop(cond, body, init)
    return out.tokens, jnp.zeros((R,), jnp.float32)


@flax.struct.dataclass
class BeamState:
    t: jax.Array
    logits: jax.Array             # [B*K, V] next-token logits of the running beams
    lm: LMState
    prompt: jax.Array             # [B*K, P] prompt history
    prompt_valid: jax.Array
    running: jax.Array            # [B, K, cap]
    running_scores: jax.Array     # [B, K]
    finished: jax.Array           # [B, K, cap] best finished hypotheses
    finished_scores: jax.Array    # [B, K]
    is_finished: jax.Array        # [B, K]
    unsatisfied: jax.Array        # [B, 1] the input may still improve (early-stop heuristic, own limit)
    all_hit: jax.Array            # scalar: every top continuation hit a stop criterion


def _beam_loop(module, params, static: StaticSampler, rows: RowSampler, logits, lm, prompt, prompt_valid):
    """HF's vectorised beam search (generation/utils.py `_beam_search`), on fixed shapes.

    `rows` has one entry per input; its beams share it (length penalty, max_new_tokens, ...).
    An input that reaches its own max_new_tokens stops merging hypotheses, as HF's loop ends there.
    """
    K, G = static.num_beams, static.max_new_tokens_cap
    R, V = logits.shape
    B = R // K
    keep = max(2, 1 + len(static.eos_token_ids)) * K
    top_k_mask = jnp.arange(keep) < K
    fill = static.pad_token_id
    beam_rows = rows.repeat(K)
    limit = rows.max_new_tokens[:, None]                     # [B, 1]
    length_penalty = rows.length_penalty[:, None]            # [B, 1]
    early_true = static.early_stopping is True

    def cond(s: BeamState):
        exists_open = ~(jnp.all(s.is_finished) & early_true)
        return (s.t < G) & jnp.any(s.unsatisfied) & exists_open & ~s.all_hit

    def body(s: BeamState):
        t = s.t
        history = jnp.concatenate([s.prompt, s.running.reshape(R, G)], axis=1)
        valid = jnp.concatenate([s.prompt_valid, jnp.broadcast_to(jnp.arange(G) < t, (R, G))], axis=1)
        log_probs = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
        log_probs = process(log_probs, static, beam_rows, history, valid, s.prompt.shape[1] + t, t)
        acc = (log_probs.reshape(B, K, V) + s.running_scores[:, :, None]).reshape(B, K * V)
        topk_lp, topk_idx = jax.lax.top_k(acc, keep)
        src_beam, token = topk_idx // V, (topk_idx % V).astype(jnp.int32)
        topk_seqs = jnp.take_along_axis(s.running, src_beam[:, :, None], axis=1)
        topk_seqs = topk_seqs.at[:, :, t].set(token)
        hits = is_eos(token, static.eos_token_ids) | (t + 1 >= limit)

        # running beams for the next step: best K continuations that did not stop
        running_lp = topk_lp + hits * BIG_NEG
        next_lp, next_idx = jax.lax.top_k(running_lp, K)
        running = jnp.take_along_axis(topk_seqs, next_idx[:, :, None], axis=1)
        beam_src = jnp.take_along_axis(src_beam, next_idx, axis=1)

        # finished hypotheses: merge the new ones (top K candidates only) with the old
        just_finished = hits & top_k_mask[None, :]
        lp = topk_lp / ((t + 1).astype(jnp.float32) ** length_penalty)
        full = jnp.all(s.is_finished, axis=-1, keepdims=True) & early_true
        lp = lp + full * BIG_NEG + (~s.unsatisfied) * BIG_NEG + (~just_finished) * BIG_NEG
        merged_scores = jnp.concatenate([s.finished_scores, lp], axis=1)
        merged_seqs = jnp.concatenate([s.finished, topk_seqs], axis=1)
        merged_done = jnp.concatenate([s.is_finished, just_finished], axis=1)
        best_scores, best = jax.lax.top_k(merged_scores, K)
        finished = jnp.take_along_axis(merged_seqs, best[:, :, None], axis=1)
        is_finished = jnp.take_along_axis(merged_done, best, axis=1)

        # early-stop heuristic, evaluated with the new length t + 1 (HF: the longest possible
        # length with early_stopping="never" and a positive length penalty)
        new_len = (t + 1).astype(jnp.float32)
        if static.early_stopping == "never":
            best_len = jnp.where(length_penalty > 0.0, limit.astype(jnp.float32), new_len)
        else:
            best_len = new_len
        best_running = next_lp[:, :1] / best_len ** length_penalty
        worst_finished = jnp.where(is_finished, jnp.min(best_scores, axis=1, keepdims=True), BIG_NEG)
        improvable = jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        unsatisfied = s.unsatisfied & improvable & (t + 1 < limit)

        # advance the language model with the surviving beams' caches
        beam_rows_src = (jnp.arange(B)[:, None] * K + beam_src).reshape(R)
        lm_state = s.lm.replace(cache=gather_rows(s.lm.cache, beam_rows_src))
        next_logits, lm_state = step(module, params, lm_state, running[:, :, t].reshape(R))
        return BeamState(t + 1, next_logits, lm_state, s.prompt, s.prompt_valid, running, next_lp,
                         finished, best_scores, is_finished, unsatisfied, jnp.all(hits))

    running_scores = jnp.where(jnp.arange(K)[None, :] == 0, 0.0, BIG_NEG) * jnp.ones((B, 1))
    init = BeamState(jnp.int32(0), logits, lm, prompt, prompt_valid,
                     jnp.full((B, K, G), fill, jnp.int32), running_scores.astype(jnp.float32),
                     jnp.full((B, K, G), fill, jnp.int32), jnp.full((B, K), BIG_NEG, jnp.float32),
                     jnp.zeros((B, K), bool), jnp.ones((B, 1), bool), jnp.bool_(False))
    out = jax.lax.while_loop(cond, body, init)
    n = static.num_return_sequences
    tokens = out.finished[:, :n].reshape(B * n, G)
    return tokens, out.finished_scores[:, :n].reshape(B * n)


def _lengths(tokens, static: StaticSampler, limit):
    """Tokens up to and including the first EOS, at most the row's `limit` (its max_new_tokens;
    pad may equal EOS after it)."""
    eos = is_eos(tokens, static.eos_token_ids)
    first = jnp.argmax(eos, axis=-1)
    n = jnp.where(jnp.any(eos, axis=-1), first + 1, tokens.shape[-1])
    return jnp.minimum(n, limit).astype(jnp.int32)


def _mask_after_eos(tokens, lengths, pad):
    return jnp.where(jnp.arange(tokens.shape[-1])[None, :] < lengths[:, None], tokens, pad)


def generate(module: BlipModel, params, static: StaticSampler, rows: RowSampler, pixel_values, input_ids,
             attention_mask, qformer_ids=None, qformer_mask=None, prepend_queries: bool = False) -> GenerateOutput:
    """Decode on device. Call through `jax.jit` with `module`, `static`, `prepend_queries` static;
    `rows` (one value per input row, from `jblip.sampling.split`) is traced, so new knob values
    reuse the compiled program."""
    batch = input_ids.shape[0]
    if rows.max_new_tokens.shape != (batch,):
        raise ValueError(f"the sampler's per-row values have shape {rows.max_new_tokens.shape}; "
                         f"the batch has {batch} rows")
    config = module.config
    dtype = jnp.dtype(config.precision.text)
    G = static.max_new_tokens_cap
    queries = module.apply({"params": params}, pixel_values, qformer_ids, qformer_mask, method=BlipModel.encode_image)
    embeds, mask = module.apply({"params": params}, queries, input_ids, attention_mask, prepend_queries,
                                method=BlipModel.merge_queries)
    logits, lm, decoder_history = start(module, params, embeds, mask, G, dtype)

    # the processors' history: the user's ids from the first attended position on (HF ignores
    # leading padding), or the decoder ids for T5
    if decoder_history is not None:
        history, valid = decoder_history, jnp.ones(decoder_history.shape, bool)
    else:
        history = input_ids
        valid = jnp.cumsum(attention_mask, axis=-1) > 0

    if static.strategy == "beam":
        K, n = static.num_beams, static.num_return_sequences
        expand = lambda x: jnp.repeat(x, K, axis=0)
        lm = repeat_rows(lm, K)
        tokens, scores = _beam_loop(module, params, static, rows, expand(logits), lm, expand(history), expand(valid))
    else:
        n = static.num_return_sequences
        keys = _row_keys(rows.seed, n) if static.strategy == "sample" else None
        sample_rows = rows.repeat(n) if n > 1 else rows
        if n > 1:
            lm = repeat_rows(lm, n)
            logits, history, valid = (jnp.repeat(x, n, axis=0) for x in (logits, history, valid))
        R = history.shape[0]
        history = jnp.concatenate([history, jnp.full((R, G), static.pad_token_id, history.dtype)], axis=1)
        valid = jnp.concatenate([valid, jnp.zeros((R, G), bool)], axis=1)
        tokens, scores = _sample_loop(module, params, static, sample_rows, logits, lm, history, valid, keys)
    lengths = _lengths(tokens, static, jnp.repeat(rows.max_new_tokens, n))
    return GenerateOutput(_mask_after_eos(tokens, lengths, static.pad_token_id), lengths, scores)
