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

from jblip.language_model import LMState, reorder, repeat
from jblip.model import BlipModel
from jblip.processors import argmax, is_eos, process
from jblip.sampling import RowSampler, StaticSampler
from jblip.scan import unstack_params

BIG_NEG = -1.0e9


class GenerateOutput(NamedTuple):
    tokens: jax.Array    # [B * num_return_sequences, max_new_tokens_cap], pad after EOS / the row's limit
    lengths: jax.Array   # [B * num_return_sequences] tokens up to and including EOS, at most the row's limit
    scores: jax.Array    # beam: final sequence scores; otherwise zeros


# ----------------------------------------------------------------------------- the language model
# Every family implements `jblip.language_model`'s contract; these run it inside the BlipModel.

def _llm_call(module, params, method, *args):
    return module.apply({"params": params}, *args, method=lambda m, *a: method(m.llm, *a))


def start(module: BlipModel, params, embeds, mask, max_new: int, dtype):
    """Prefill into a fresh cache sized for `max_new` tokens; returns (last logits [B, V], LMState)."""
    B, P = mask.shape

    def prefill(llm, embeds, mask):
        return llm.prefill(embeds, mask, llm.init_cache(B, llm.cache_length(P, max_new), dtype))
    return _llm_call(module, params, prefill, embeds, mask)


def step(module: BlipModel, params, state: LMState, tokens):
    """Feed one token per row; returns (logits [R, V], new state)."""
    return _llm_call(module, params, lambda llm, t, s: llm.decode_step(t, s), tokens, state)


def prompt_history(module: BlipModel, params, input_ids, attention_mask):
    """(ids, valid) the logits processors see as the tokens so far (see the contract's `history`)."""
    return _llm_call(module, params, lambda llm, i, m: llm.history(i, m), input_ids, attention_mask)


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
        lm_state = reorder(s.lm, (jnp.arange(B)[:, None] * K + beam_src).reshape(R))
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


def _loop_model(module: BlipModel, params, layer_loop: str, loop_llm=None):
    """The module and params the language model runs with (prefill and decode loop): with
    "unrolled" (CPU programs, see `jblip.scan.LAYER_LOOPS`) its params as per-layer buffers, so
    no step copies a weight slice out of a stack: `loop_llm` when the caller has them
    (`jblip.layer_buffers`), else split once here, before the prefill."""
    if layer_loop == "scan":
        return module, params
    llm = loop_llm if loop_llm is not None else unstack_params(params["llm"])
    return module.clone(layer_loop=layer_loop), dict(params, llm=llm)


def check_rows(rows: RowSampler, batch: int):
    if rows.max_new_tokens.shape != (batch,):
        raise ValueError(f"the sampler's per-row values have shape {rows.max_new_tokens.shape}; "
                         f"the batch has {batch} rows")


class Prefilled(NamedTuple):
    """What the decode loop starts from: the prompt's last logits, the LM state, and the tokens
    the processors see so far."""
    logits: jax.Array    # [B, V]
    lm: LMState
    history: jax.Array   # [B, P] ids
    valid: jax.Array     # [B, P]


def prefill(module: BlipModel, params, static: StaticSampler, pixel_values, input_ids, attention_mask,
            qformer_ids=None, qformer_mask=None, prepend_queries: bool = False, layer_loop: str = "scan",
            loop_llm=None) -> Prefilled:
    """Vision, Q-Former and the prompt's prefill into a cache sized for the bucketed output cap."""
    config = module.config
    queries = module.apply({"params": params}, pixel_values, qformer_ids, qformer_mask, method=BlipModel.encode_image)
    embeds, mask = module.apply({"params": params}, queries, input_ids, attention_mask, prepend_queries,
                                method=BlipModel.merge_queries)
    module, params = _loop_model(module, params, layer_loop, loop_llm)
    logits, lm = start(module, params, embeds, mask, static.max_new_tokens_cap, jnp.dtype(config.precision.text))
    return Prefilled(logits, lm, *prompt_history(module, params, input_ids, attention_mask))


def decode(module: BlipModel, params, static: StaticSampler, rows: RowSampler, prefilled: Prefilled,
           layer_loop: str = "scan", loop_llm=None) -> GenerateOutput:
    """The decode loop (greedy, sampled or beam search) from `prefill`'s output."""
    module, params = _loop_model(module, params, layer_loop, loop_llm)
    logits, lm, history, valid = prefilled
    G = static.max_new_tokens_cap
    if static.strategy == "beam":
        K, n = static.num_beams, static.num_return_sequences
        expand = lambda x: jnp.repeat(x, K, axis=0)
        lm = repeat(lm, K)
        tokens, scores = _beam_loop(module, params, static, rows, expand(logits), lm, expand(history), expand(valid))
    else:
        n = static.num_return_sequences
        keys = _row_keys(rows.seed, n) if static.strategy == "sample" else None
        sample_rows = rows.repeat(n) if n > 1 else rows
        if n > 1:
            lm = repeat(lm, n)
            logits, history, valid = (jnp.repeat(x, n, axis=0) for x in (logits, history, valid))
        R = history.shape[0]
        history = jnp.concatenate([history, jnp.full((R, G), static.pad_token_id, history.dtype)], axis=1)
        valid = jnp.concatenate([valid, jnp.zeros((R, G), bool)], axis=1)
        tokens, scores = _sample_loop(module, params, static, sample_rows, logits, lm, history, valid, keys)
    lengths = _lengths(tokens, static, jnp.repeat(rows.max_new_tokens, n))
    return GenerateOutput(_mask_after_eos(tokens, lengths, static.pad_token_id), lengths, scores)


def generate(module: BlipModel, params, static: StaticSampler, rows: RowSampler, pixel_values, input_ids,
             attention_mask, qformer_ids=None, qformer_mask=None, prepend_queries: bool = False,
             layer_loop: str = "scan", loop_llm=None) -> GenerateOutput:
    """Decode on device: `prefill` then `decode` in one program. Call through `jax.jit` with
    `module`, `static`, `prepend_queries` and `layer_loop` (`jblip.scan.LAYER_LOOPS`, from the
    platform the program runs on) static; `rows` (one value per input row, from
    `jblip.sampling.split`) is traced, so new knob values reuse the compiled program.
    `loop_llm`: the LM params already split per layer (see `_loop_model`)."""
    check_rows(rows, input_ids.shape[0])
    prefilled = prefill(module, params, static, pixel_values, input_ids, attention_mask, qformer_ids, qformer_mask,
                        prepend_queries, layer_loop, loop_llm)
    return decode(module, params, static, rows, prefilled, layer_loop, loop_llm)
