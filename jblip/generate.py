"""Jitted decoding: vision + Q-Former once, prefill, then one `lax.while_loop` on device.

Works for decoder-only LMs (LLaMA, OPT: left-padded prompt, KV cache of
prompt + max_new_tokens slots) and Flan-T5 (encoder once, cross-attention K/V
once, decoder KV cache). Semantics follow HF `generate` so tokens can be
compared one for one: see `jblip.sampling` for the processors and `_beam_loop`
for HF's vectorised beam search.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jblip.language_model import LMState, reorder, repeat
from jblip.model import BlipModel
from jblip.sampling import SamplerConfig, argmax, is_eos, process

BIG_NEG = -1.0e9


class GenerateOutput(NamedTuple):
    tokens: jax.Array    # [B * num_return_sequences, max_new_tokens], pad after EOS
    lengths: jax.Array   # [B * num_return_sequences] tokens up to and including EOS
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

@flax.struct.dataclass
class SampleState:
    t: jax.Array
    logits: jax.Array
    lm: LMState
    history: jax.Array    # [R, L] prompt ids then generated ids
    valid: jax.Array      # [R, L]
    tokens: jax.Array     # [R, max_new]
    done: jax.Array       # [R]
    rng: jax.Array


def _sample_loop(module, params, cfg: SamplerConfig, logits, lm, history, valid, rng):
    R = logits.shape[0]
    P = history.shape[1] - cfg.max_new_tokens

    def cond(s: SampleState):
        return (s.t < cfg.max_new_tokens) & ~jnp.all(s.done)

    def body(s: SampleState):
        scores = process(s.logits.astype(jnp.float32), cfg, s.history, s.valid, P + s.t, s.t)
        rng, key = jax.random.split(s.rng)
        if cfg.strategy == "sample":
            token = jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
        else:
            token = argmax(scores)
        token = jnp.where(s.done, cfg.pad_token_id, token)
        tokens = s.tokens.at[:, s.t].set(token)
        history = jax.lax.dynamic_update_slice_in_dim(s.history, token[:, None], P + s.t, axis=1)
        valid = jax.lax.dynamic_update_slice_in_dim(s.valid, jnp.ones((R, 1), bool), P + s.t, axis=1)
        done = s.done | is_eos(token, cfg.eos_token_ids)
        next_logits, lm_state = step(module, params, s.lm, token)
        return SampleState(s.t + 1, next_logits, lm_state, history, valid, tokens, done, rng)

    init = SampleState(jnp.int32(0), logits, lm, history, valid,
                       jnp.full((R, cfg.max_new_tokens), cfg.pad_token_id, jnp.int32), jnp.zeros((R,), bool), rng)
    out = jax.lax.while_loop(cond, body, init)
    return out.tokens, jnp.zeros((R,), jnp.float32)


@flax.struct.dataclass
class BeamState:
    t: jax.Array
    logits: jax.Array             # [B*K, V] next-token logits of the running beams
    lm: LMState
    prompt: jax.Array             # [B*K, P] prompt history
    prompt_valid: jax.Array
    running: jax.Array            # [B, K, max_new]
    running_scores: jax.Array     # [B, K]
    finished: jax.Array           # [B, K, max_new] best finished hypotheses
    finished_scores: jax.Array    # [B, K]
    is_finished: jax.Array        # [B, K]
    unsatisfied: jax.Array        # [B, 1] early-stop heuristic still allows improvement
    all_hit: jax.Array            # scalar: every top continuation hit a stop criterion


def _beam_loop(module, params, cfg: SamplerConfig, logits, lm, prompt, prompt_valid):
    """HF's vectorised beam search (generation/utils.py `_beam_search`), on fixed shapes."""
    K, G = cfg.num_beams, cfg.max_new_tokens
    R, V = logits.shape
    B = R // K
    keep = max(2, 1 + len(cfg.eos_token_ids)) * K
    top_k_mask = jnp.arange(keep) < K
    fill = cfg.pad_token_id

    def cond(s: BeamState):
        exists_open = ~(jnp.all(s.is_finished) & (cfg.early_stopping is True))
        return (s.t < G) & jnp.any(s.unsatisfied) & exists_open & ~s.all_hit

    def body(s: BeamState):
        t = s.t
        history = jnp.concatenate([s.prompt, s.running.reshape(R, G)], axis=1)
        valid = jnp.concatenate([s.prompt_valid, jnp.broadcast_to(jnp.arange(G) < t, (R, G))], axis=1)
        log_probs = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
        log_probs = process(log_probs, cfg, history, valid, s.prompt.shape[1] + t, t)
        acc = (log_probs.reshape(B, K, V) + s.running_scores[:, :, None]).reshape(B, K * V)
        topk_lp, topk_idx = jax.lax.top_k(acc, keep)
        src_beam, token = topk_idx // V, (topk_idx % V).astype(jnp.int32)
        topk_seqs = jnp.take_along_axis(s.running, src_beam[:, :, None], axis=1)
        topk_seqs = topk_seqs.at[:, :, t].set(token)
        hits = is_eos(token, cfg.eos_token_ids) | (t + 1 >= G)

        # running beams for the next step: best K continuations that did not stop
        running_lp = topk_lp + hits * BIG_NEG
        next_lp, next_idx = jax.lax.top_k(running_lp, K)
        running = jnp.take_along_axis(topk_seqs, next_idx[:, :, None], axis=1)
        beam_src = jnp.take_along_axis(src_beam, next_idx, axis=1)

        # finished hypotheses: merge the new ones (top K candidates only) with the old
        just_finished = hits & top_k_mask[None, :]
        lp = topk_lp / ((t + 1).astype(jnp.float32) ** cfg.length_penalty)
        full = jnp.all(s.is_finished, axis=-1, keepdims=True) & (cfg.early_stopping is True)
        lp = lp + full * BIG_NEG + (~s.unsatisfied) * BIG_NEG + (~just_finished) * BIG_NEG
        merged_scores = jnp.concatenate([s.finished_scores, lp], axis=1)
        merged_seqs = jnp.concatenate([s.finished, topk_seqs], axis=1)
        merged_done = jnp.concatenate([s.is_finished, just_finished], axis=1)
        best_scores, best = jax.lax.top_k(merged_scores, K)
        finished = jnp.take_along_axis(merged_seqs, best[:, :, None], axis=1)
        is_finished = jnp.take_along_axis(merged_done, best, axis=1)

        # early-stop heuristic, evaluated with the new length t + 1
        if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
            best_len = jnp.float32(G)
        else:
            best_len = (t + 1).astype(jnp.float32)
        best_running = next_lp[:, :1] / best_len ** cfg.length_penalty
        worst_finished = jnp.where(is_finished, jnp.min(best_scores, axis=1, keepdims=True), BIG_NEG)
        unsatisfied = s.unsatisfied & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)

        # advance the language model with the surviving beams' caches
        rows = (jnp.arange(B)[:, None] * K + beam_src).reshape(R)
        lm_state = reorder(s.lm, rows)
        next_logits, lm_state = step(module, params, lm_state, running[:, :, t].reshape(R))
        return BeamState(t + 1, next_logits, lm_state, s.prompt, s.prompt_valid, running, next_lp,
                         finished, best_scores, is_finished, unsatisfied, jnp.all(hits))

    running_scores = jnp.where(jnp.arange(K)[None, :] == 0, 0.0, BIG_NEG) * jnp.ones((B, 1))
    init = BeamState(jnp.int32(0), logits, lm, prompt, prompt_valid,
                     jnp.full((B, K, G), fill, jnp.int32), running_scores.astype(jnp.float32),
                     jnp.full((B, K, G), fill, jnp.int32), jnp.full((B, K), BIG_NEG, jnp.float32),
                     jnp.zeros((B, K), bool), jnp.ones((B, 1), bool), jnp.bool_(False))
    out = jax.lax.while_loop(cond, body, init)
    n = cfg.num_return_sequences
    tokens = out.finished[:, :n].reshape(B * n, G)
    return tokens, out.finished_scores[:, :n].reshape(B * n)


def _lengths(tokens, cfg: SamplerConfig):
    """Tokens up to and including the first EOS (all of them when there is none)."""
    eos = is_eos(tokens, cfg.eos_token_ids)
    first = jnp.argmax(eos, axis=-1)
    return jnp.where(jnp.any(eos, axis=-1), first + 1, tokens.shape[-1]).astype(jnp.int32)


def _mask_after_eos(tokens, lengths, pad):
    return jnp.where(jnp.arange(tokens.shape[-1])[None, :] < lengths[:, None], tokens, pad)


def generate(module: BlipModel, params, cfg: SamplerConfig, pixel_values, input_ids, attention_mask,
             qformer_ids=None, qformer_mask=None, rng=None, prepend_queries: bool = False) -> GenerateOutput:
    """Decode on device. Call through `jax.jit` with `module`, `cfg`, `prepend_queries` static."""
    config = module.config
    dtype = jnp.dtype(config.precision.text)
    queries = module.apply({"params": params}, pixel_values, qformer_ids, qformer_mask, method=BlipModel.encode_image)
    embeds, mask = module.apply({"params": params}, queries, input_ids, attention_mask, prepend_queries,
                                method=BlipModel.merge_queries)
    logits, lm = start(module, params, embeds, mask, cfg.max_new_tokens, dtype)
    history, valid = prompt_history(module, params, input_ids, attention_mask)
    rng = jax.random.key(0) if rng is None else rng

    if cfg.strategy == "beam":
        K = cfg.num_beams
        expand = lambda x: jnp.repeat(x, K, axis=0)
        lm = repeat(lm, K)
        tokens, scores = _beam_loop(module, params, cfg, expand(logits), lm, expand(history), expand(valid))
    else:
        n = cfg.num_return_sequences
        if n > 1:
            lm = repeat(lm, n)
            logits, history, valid = (jnp.repeat(x, n, axis=0) for x in (logits, history, valid))
        G = cfg.max_new_tokens
        R = history.shape[0]
        history = jnp.concatenate([history, jnp.full((R, G), cfg.pad_token_id, history.dtype)], axis=1)
        valid = jnp.concatenate([valid, jnp.zeros((R, G), bool)], axis=1)
        tokens, scores = _sample_loop(module, params, cfg, logits, lm, history, valid, rng)
    lengths = _lengths(tokens, cfg)
    return GenerateOutput(_mask_after_eos(tokens, lengths, cfg.pad_token_id), lengths, scores)
