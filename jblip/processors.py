"""HF-equivalent logits processors with per-row knobs (traced arrays, see `jblip.sampling.RowSampler`).

Processors act on float32 scores [R, V] (R = rows: batch x beams or return sequences) given
the token history [R, L] and a validity mask over it; each knob is an array [R]. A row whose
knob is neutral (penalty 1, top-k 0, top-p 1, ...) keeps its scores bit for bit, so one batch
can mix rows with and without a processor. `process` runs the enabled ones (a static choice)
in the order HF `generate` applies them: repetition penalty, no-repeat n-gram, min new tokens,
then (sampling only) temperature, top-k, top-p.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def seen_tokens(history, valid, vocab: int):
    """[R, V] bool: which ids occur at valid history positions."""
    rows = jnp.arange(history.shape[0])[:, None]
    return jnp.zeros((history.shape[0], vocab), bool).at[rows, jnp.clip(history, 0, vocab - 1)].max(valid)


def repetition_penalty(scores, history, valid, penalty):
    seen = seen_tokens(history, valid, scores.shape[-1])
    penalty = penalty[:, None]
    penalized = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalized, scores)


def no_repeat_ngram(scores, history, valid, cur_len, size, cap: int):
    """Ban every token that would repeat an n-gram (n = size[r], 0 = off) of the valid history.

    history [R, L] holds tokens at positions < cur_len (traced). A window starting at i
    matches when its first n-1 tokens equal the last n-1 of the history; its n-th token is
    then banned. Sizes up to the static `cap` share one program: prefix offsets j >= n-1
    are masked out.
    """
    R, L = history.shape
    n = size[:, None]                                                               # [R, 1]
    offsets = jnp.arange(cap - 1)                                                   # prefix offsets j
    used = offsets[None, :] < n - 1                                                 # [R, cap-1]
    prefix = jnp.take_along_axis(history, jnp.clip(cur_len - (n - 1) + offsets, 0, L - 1), axis=1)
    win_idx = jnp.clip(jnp.arange(L)[:, None] + offsets[None, :], 0, L - 1)         # [L, cap-1]
    same = (history[:, win_idx] == prefix[:, None, :]) & valid[:, win_idx]          # [R, L, cap-1]
    last = jnp.arange(L)[None, :] + n - 1                                           # [R, L] n-th token
    last_clipped = jnp.clip(last, 0, L - 1)
    match = (jnp.all(same | ~used[:, None, :], axis=-1) & (last < cur_len) & (n > 0) & (cur_len >= n)
             & jnp.take_along_axis(valid, last_clipped, axis=1))
    banned_ids = jnp.take_along_axis(history, last_clipped, axis=1)
    rows = jnp.arange(R)[:, None]
    banned = jnp.zeros(scores.shape, bool).at[rows, jnp.clip(banned_ids, 0, scores.shape[-1] - 1)].max(match)
    return jnp.where(banned, NEG_INF, scores)


def forbid_eos(scores, eos_ids, condition):
    """Set EOS scores to -inf on rows where `condition` [R] holds (min_new_tokens)."""
    if not eos_ids:
        return scores
    eos = jnp.zeros(scores.shape[-1], bool).at[jnp.array(eos_ids)].set(True)
    return jnp.where(condition[:, None] & eos[None, :], NEG_INF, scores)


def top_k_filter(scores, k, cap: int):
    """Keep each row's k[r] best scores (ties at the k-th kept, as HF); k = 0 keeps all.
    One `top_k` of the static cap serves every k <= cap."""
    cap = min(cap, scores.shape[-1])
    best = jax.lax.top_k(scores, cap)[0]                                           # [R, cap] descending
    kth = jnp.take_along_axis(best, jnp.clip(k, 1, cap)[:, None] - 1, axis=1)
    return jnp.where((k[:, None] > 0) & (scores < kth), NEG_INF, scores)


def top_p_filter(scores, tail):
    """Keep the smallest set whose probability reaches top_p (HF: drop the ascending prefix of
    cumulative mass <= tail = 1 - top_p). tail = 0 (top_p = 1) keeps every token."""
    order = jnp.argsort(scores, axis=-1)                      # ascending
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = (cum <= tail[:, None]) & (tail[:, None] > 0)
    remove_sorted = remove_sorted.at[:, -1].set(False)        # always keep the most likely token
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(scores.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, scores)


def process(scores, static, rows, history, valid, cur_len, n_generated):
    """Apply the enabled processors (`static.processors`) in HF's order. scores: float32 [R, V];
    rows: a `RowSampler` with R rows; n_generated: tokens generated so far (scalar)."""
    enabled = static.processors
    if "repetition_penalty" in enabled:
        scores = repetition_penalty(scores, history, valid, rows.repetition_penalty)
    if "no_repeat_ngram" in enabled:
        scores = no_repeat_ngram(scores, history, valid, cur_len, rows.no_repeat_ngram_size,
                                 static.no_repeat_ngram_cap)
    if "min_new_tokens" in enabled:
        scores = forbid_eos(scores, static.eos_token_ids, n_generated < rows.min_new_tokens)
    if "temperature" in enabled:
        scores = scores / rows.temperature[:, None]
    if "top_k" in enabled:
        scores = top_k_filter(scores, rows.top_k, static.top_k_cap)
    if "top_p" in enabled:
        scores = top_p_filter(scores, rows.top_p_tail)
    return scores


def argmax(scores):
    """`jnp.argmax` over the last axis (first maximum; first NaN if any) as two plain
    reductions: XLA:CPU runs argmax's paired (value, index) reduction ~10x slower, which
    cost 1.1 ms of a 20 ms decode step at 8 x 32001."""
    best = jnp.max(scores, axis=-1, keepdims=True)
    hit = (scores == best) | jnp.isnan(scores)
    index = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, scores.shape[-1]), axis=-1)


def is_eos(tokens, eos_ids):
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.array(eos_ids), axis=-1)
