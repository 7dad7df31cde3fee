"""`DecoderSlots`: the device side of continuous batching (a `jblip.serve.slot_engine.SlotProgram`)
for decoder-only language models (LLaMA / Vicuna, OPT).

The program keeps one `SlotState` on the device for `num_slots` rows R, each of `columns` cache
columns C: the LM's KV cache [L, R, N, C + 1, H] (per layer on CPU, see `jblip.kv_cache`) with
its key mask and next position ids (a `jblip.language_model.LMState`), and per row the pending
next-token logits, the token history the processors read, the answer's length so far, a done flag, the decoding knobs (one
`jblip.sampling.RowSampler` row: temperature, top_p, top_k, penalties, min / max tokens) and
the row's random key. Every call donates the state, so XLA updates it in place; knob values
are data, so no temperature, top_p or max_tokens ever recompiles.

Rows at different lengths, with the contract unchanged: the contract's `decode_step` writes
every row's new K/V at one shared cache slot (`LMState.slot`). Here that slot is always the
last column, a scratch column: the new token of every row is written there and attends to
what its row's key mask marks (itself included), then the step moves the scratch column into
the row's own next column (a per-row scatter of one column, [L, R, N, H]) and unmarks the
scratch. A row's keys carry their positions already (RoPE angles, OPT's position rows are
applied from `next_position` before K is cached), so where a key sits in its row does not
matter to attention, and causality holds because a row only ever marks columns it wrote. So
no row waits for another, nothing is shifted or compacted, and the models are untouched.
(The simpler-looking alternative, one shared write column with rows starting at different
columns, must compact the cache whenever that column reaches its end, and a long answer
pins the compaction.) Flan-T5 does not fit: its decoder reads each key's position from its
cache slot (relative position bias), so T5 requests go to the static-batching engine.

`admit`: the newcomers' images and prompts run as one batch per prompt bucket (rows padded to
a power of two, prompts left-padded to `generate`'s length buckets, Q-Former text to 16-token
buckets, so few programs compile): vision, Q-Former, prefill into a cache as wide as the
prompt, then each row lands in its slot at columns [0, P). `step`: up to `steps` tokens per
call in one `lax.while_loop`: the processors in HF's order (each skipped by `lax.cond` when
no live row uses it), a greedy or sampled token per row, done at EOS or the row's own
max_tokens, then `decode_step`. A row's random stream is `generate`'s: answer j of a request
with seed s draws step t from fold_in(fold_in(key(s), j), t). So each answer equals what
`generate` gives the request alone (up to float summation order, which batch shapes and cache
widths may change).
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jblip import families, kv_cache
from jblip.language_model import LMState
from jblip.model import BlipModel
from jblip.pretrained import bucket_length
from jblip.processors import argmax, forbid_eos, is_eos, no_repeat_ngram, repetition_penalty, top_k_filter, top_p_filter
from jblip.sampling import RowSampler, split
from jblip.serve.engine import EngineRequest

TOP_K_CAP = 256   # largest top_k the program filters by (larger: the static engine)
NGRAM_CAP = 4     # largest no-repeat n-gram size, as `generate`'s smallest bucket


@flax.struct.dataclass
class SlotState:
    lm: LMState            # cache [L, R, N, C + 1, H] (column C: scratch), key_mask [R, C + 1], next_position [R]
    logits: jax.Array      # [R, V] float32: next-token logits of each row
    column: jax.Array      # [R] cache column that receives the row's next token
    history: jax.Array     # [R, C] prompt ids (left-padded), then the answer from column `start` on
    valid: jax.Array       # [R, C]
    start: jax.Array       # [R] history column of the answer's first token
    generated: jax.Array   # [R] answer tokens so far
    done: jax.Array        # [R] the answer ended (EOS or max_tokens)
    knobs: RowSampler      # [R] per-row decoding knobs
    sample: jax.Array      # [R] sample (else greedy)
    keys: jax.Array        # [R, ...] raw random key data


def _llm(module, params, fn, *args):
    return module.apply({"params": params}, *args, method=lambda m, *a: fn(m.llm, *a))


def _neutral_knobs(rows: int) -> RowSampler:
    f32, i32 = jnp.float32, jnp.int32
    return RowSampler(temperature=jnp.ones(rows, f32), top_k=jnp.zeros(rows, i32), top_p_tail=jnp.zeros(rows, f32),
                      repetition_penalty=jnp.ones(rows, f32), length_penalty=jnp.ones(rows, f32),
                      no_repeat_ngram_size=jnp.zeros(rows, i32), min_new_tokens=jnp.zeros(rows, i32),
                      max_new_tokens=jnp.ones(rows, i32), seed=jnp.zeros(rows, jnp.uint32))


def init_state(module: BlipModel, params, rows: int, columns: int) -> SlotState:
    config = module.config
    dtype = jnp.dtype(config.precision.text)
    cache = _llm(module, params, lambda llm: llm.init_cache(rows, columns + 1, dtype))
    lm = LMState(cache, jnp.zeros((rows, columns + 1), bool), jnp.zeros(rows, jnp.int32), jnp.int32(columns))
    zeros = jnp.zeros(rows, jnp.int32)
    key_data = jax.random.key_data(jax.random.key(0))
    return SlotState(lm, jnp.zeros((rows, config.text.vocab_size), jnp.float32), zeros,
                     jnp.zeros((rows, columns), jnp.int32), jnp.zeros((rows, columns), bool), zeros, zeros,
                     jnp.ones(rows, bool), _neutral_knobs(rows), jnp.zeros(rows, bool),
                     jnp.zeros((rows,) + key_data.shape, key_data.dtype))


def admit(module: BlipModel, params, state: SlotState, batch: dict, dst, prepend_queries: bool) -> SlotState:
    """Prefill `batch` (A rows: images, prompts, knobs, seeds, answer indices) and place row a in
    slot dst[a] (dst = R for padding rows: dropped)."""
    run = functools.partial(module.apply, {"params": params})
    queries = run(batch["pixel_values"], batch["qformer_ids"], batch["qformer_mask"], method=BlipModel.encode_image)
    embeds, mask = run(queries, batch["input_ids"], batch["attention_mask"], prepend_queries,
                       method=BlipModel.merge_queries)
    rows, width = mask.shape
    cache_dtype = jax.tree_util.tree_leaves(state.lm.cache)[0].dtype
    logits, lm = _llm(module, params, lambda llm, e, m: llm.prefill(e, m, llm.init_cache(rows, width, cache_dtype)),
                      embeds, mask)
    history, valid = _llm(module, params, lambda llm, i, m: llm.history(i, m), batch["input_ids"],
                          batch["attention_mask"])
    columns = state.history.shape[1]
    put = lambda big, new: big.at[dst].set(new.astype(big.dtype), mode="drop")  # noqa: E731
    pad = lambda x: jnp.pad(x, ((0, 0), (0, columns - x.shape[1])))  # noqa: E731
    cache = jax.tree_util.tree_map(  # (leaves [L, R, N, C + 1, H], or per layer [R, N, C + 1, H])
        lambda big, new: big.at[..., dst, :, :width, :].set(new.astype(big.dtype), mode="drop"), state.lm.cache, lm.cache)
    key_mask = put(state.lm.key_mask, jnp.pad(lm.key_mask, ((0, 0), (0, columns + 1 - width))))
    keys = jax.vmap(lambda s, j: jax.random.key_data(jax.random.fold_in(jax.random.key(s), j)))(
        batch["knobs"].seed, batch["index"])
    full = lambda value: jnp.full((rows,), value, jnp.int32)  # noqa: E731
    return state.replace(
        lm=state.lm.replace(cache=cache, key_mask=key_mask,
                            next_position=put(state.lm.next_position, lm.next_position)),
        logits=put(state.logits, logits), column=put(state.column, full(width)),
        history=put(state.history, pad(history)), valid=put(state.valid, pad(valid)),
        start=put(state.start, full(history.shape[1])), generated=put(state.generated, full(0)),
        done=put(state.done, jnp.zeros(rows, bool)),
        knobs=jax.tree_util.tree_map(put, state.knobs, batch["knobs"]), sample=put(state.sample, batch["sample"]),
        keys=put(state.keys, keys))


def _process(scores, s: SlotState, active, eos_ids: tuple[int, ...]):
    """`jblip.processors.process` for rows that mix strategies: HF's order, each processor run only
    when some active row needs it (greedy rows hold neutral sampling knobs, so they pass unchanged)."""
    k = s.knobs
    cur_len = (s.start + s.generated)[:, None]

    def maybe(needed, fn, x):
        return jax.lax.cond(jnp.any(active & needed), fn, lambda y: y, x)
    scores = maybe(k.repetition_penalty != 1.0,
                   lambda x: repetition_penalty(x, s.history, s.valid, k.repetition_penalty), scores)
    scores = maybe(k.no_repeat_ngram_size > 0, lambda x: no_repeat_ngram(
        x, s.history, s.valid, cur_len, k.no_repeat_ngram_size, NGRAM_CAP), scores)
    if eos_ids:
        early = s.generated < k.min_new_tokens
        scores = maybe(early, lambda x: forbid_eos(x, eos_ids, early), scores)
    scores = maybe(k.temperature != 1.0, lambda x: x / k.temperature[:, None], scores)
    scores = maybe(k.top_k > 0, lambda x: top_k_filter(x, k.top_k, TOP_K_CAP), scores)
    return maybe(k.top_p_tail > 0, lambda x: top_p_filter(x, k.top_p_tail), scores)


def _settle(lm: LMState, before: LMState, column, active) -> LMState:
    """After `decode_step` wrote every row at the scratch column: move each active row's new K/V
    to its own `column`, mark it, unmark the scratch; inactive rows keep their positions."""
    scratch = before.slot
    rows = jnp.arange(column.shape[0])
    at = jnp.where(active, column, scratch + 1)  # out of range: dropped

    def move(buf):  # [L, R, N, C + 1, H], or per layer [R, N, C + 1, H]
        return buf.at[..., rows, :, at, :].set(jnp.moveaxis(buf[..., scratch, :], -3, 0), mode="drop")
    key_mask = lm.key_mask.at[rows, at].set(True, mode="drop").at[:, scratch].set(False)
    return lm.replace(cache=jax.tree_util.tree_map(move, lm.cache), key_mask=key_mask, slot=scratch,
                      next_position=jnp.where(active, lm.next_position, before.next_position))


def _map_rows(fn, state: SlotState, *more: SlotState) -> SlotState:
    """fn(axis, x, *same field of `more`) on every per-row array of the state (the cache's rows are
    its axis 1, every other array's axis 0; the shared scratch slot stays)."""
    rows0 = lambda *trees: jax.tree_util.tree_map(lambda *x: fn(0, *x), *trees)  # noqa: E731
    lm = state.lm.replace(cache=jax.tree_util.tree_map(lambda *x: fn(kv_cache.batch_axis(x[0]), *x), state.lm.cache,
                                                       *(m.lm.cache for m in more)),
                          key_mask=fn(0, state.lm.key_mask, *(m.lm.key_mask for m in more)),
                          next_position=fn(0, state.lm.next_position, *(m.lm.next_position for m in more)))
    return rows0(state.replace(lm=None), *(m.replace(lm=None) for m in more)).replace(lm=lm)


def step(module: BlipModel, params, state: SlotState, live, steps: int, eos_ids: tuple[int, ...], pad_id: int,
         rows: int):
    """Advance every live, unfinished row by up to `steps` tokens; only the first `rows` rows
    (static: every live row is among them) are computed, so a lightly loaded server does not pay
    for its empty slots. Returns (state, tokens [R, steps] (pad after a row's last), counts [R]
    of new tokens per row)."""
    total = state.done.shape[0]
    if rows == total:
        return _step_rows(module, params, state, live, steps, eos_ids, pad_id)
    first = _map_rows(lambda axis, x: jax.lax.slice_in_dim(x, 0, rows, axis=axis), state)
    first, tokens, counts = _step_rows(module, params, first, live[:rows], steps, eos_ids, pad_id)
    state = _map_rows(lambda axis, x, y: jax.lax.dynamic_update_slice_in_dim(x, y, 0, axis), state, first)
    rest = total - rows
    return (state, jnp.concatenate([tokens, jnp.full((rest, steps), pad_id, jnp.int32)]),
            jnp.concatenate([counts, jnp.zeros(rest, jnp.int32)]))


def _step_rows(module: BlipModel, params, state: SlotState, live, steps: int, eos_ids: tuple[int, ...],
               pad_id: int):
    rows, columns = state.history.shape
    index = jnp.arange(rows)

    def cond(carry):
        i, s, _, _ = carry
        return (i < steps) & jnp.any(live & ~s.done)

    def body(carry):
        i, s, tokens, counts = carry
        active = live & ~s.done
        scores = _process(s.logits.astype(jnp.float32), s, active, eos_ids)
        greedy = argmax(scores)

        def sample(scores):  # random bits for every row and token: only when some row samples
            keys = jax.vmap(lambda d, t: jax.random.fold_in(jax.random.wrap_key_data(d), t))(s.keys, s.generated)
            return jnp.where(s.sample, jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32), greedy)
        token = jax.lax.cond(jnp.any(active & s.sample), sample, lambda _: greedy, scores)
        token = jnp.where(active, token, pad_id)
        at = jnp.where(active, s.start + s.generated, columns)  # out of range: dropped
        ended = is_eos(token, eos_ids) | (s.generated + 1 >= s.knobs.max_new_tokens)
        logits, lm = _llm(module, params, lambda llm, t, st: llm.decode_step(t, st), token, s.lm)
        s = s.replace(lm=_settle(lm, s.lm, s.column, active), logits=logits, column=s.column + active,
                      history=s.history.at[index, at].set(token, mode="drop"),
                      valid=s.valid.at[index, at].set(True, mode="drop"),
                      generated=s.generated + active, done=s.done | (active & ended))
        return i + 1, s, tokens.at[:, i].set(token), counts + active

    init = (jnp.int32(0), state, jnp.full((rows, steps), pad_id, jnp.int32), jnp.zeros(rows, jnp.int32))
    _, state, tokens, counts = jax.lax.while_loop(cond, body, init)
    return state, tokens, counts


def _replicated(model):
    """Whole arrays on every device of the model's mesh, or on the device that holds its params."""
    if model.mesh is not None:
        return jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec())
    leaf = jax.tree_util.tree_leaves(model.params)[0]
    return leaf.sharding if isinstance(leaf, jax.Array) else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class DecoderSlots:
    """`SlotProgram` for a `jblip.pretrained.VisionLanguageModel` with a decoder-only LM.

    num_slots: answers decoded at once; columns: cache columns per slot (a request fits when
    its bucketed prompt, image queries included, plus max_tokens fit); steps: tokens per `step`
    call (fewer host round trips; a newcomer waits at most that many tokens to be admitted).
    """

    def __init__(self, model, num_slots: int = 8, columns: int = 256, steps: int = 4, pad_id: int = 0):
        if families.family(model.config).encoder_decoder:
            raise ValueError(f"continuous batching needs a decoder-only language model, not {model.config.family} "
                             "(serve it with static batching)")
        if num_slots < 1 or columns < 2 or steps < 1:
            raise ValueError(f"num_slots, columns and steps must be positive, got {num_slots}, {columns}, {steps}")
        self.model, self.num_slots, self.columns, self.steps = model, num_slots, columns, steps
        base = model.default_sampler()
        self.eos_token_ids, self.pad_id = base.eos_token_ids, pad_id
        self.text_pad = pad_id if 0 <= pad_id < model.config.text.vocab_size else 0
        self.live = np.zeros(num_slots, bool)
        # The stacked scan over the LM's layers on every platform: on CPU the per-layer buffers of
        # `generate` measured slower here (16 busy slots, 94M: 36.9 vs 30.2 ms per step).
        module = model.module
        # The state keeps one placement from its first call on: jit compiles again for inputs that
        # are placed differently (a fresh state whose program reads no params would come back
        # uncommitted, the state after a step committed), even at identical shapes.
        where = _replicated(model)
        state = jax.tree_util.tree_map(lambda _: where, jax.eval_shape(
            lambda p: init_state(module, p, num_slots, columns), model.params))
        self._init = jax.jit(functools.partial(init_state, module), static_argnums=(1, 2), out_shardings=state)
        self._admit = jax.jit(functools.partial(admit, module), static_argnames="prepend_queries", donate_argnums=1,
                              out_shardings=state)
        self._step = jax.jit(functools.partial(step, module, steps=steps, eos_ids=self.eos_token_ids,
                                               pad_id=base.pad_token_id), static_argnames="rows", donate_argnums=1,
                             out_shardings=(state, where, where), compiler_options=model.decode_options)
        self._state = None

    @property
    def compiled(self) -> int:
        """Programs compiled so far (admission shapes + the step)."""
        return self._admit._cache_size() + self._step._cache_size()

    # ------------------------------------------------------------------ the SlotProgram interface
    def accepts(self, request: EngineRequest) -> bool:
        s = request.decoding.sampler
        ids = np.asarray(request.inputs["input_ids"])
        return (s.strategy in ("greedy", "sample") and request.decoding.n <= self.num_slots
                and np.asarray(request.inputs["pixel_values"]).ndim == 4
                and int(np.max(s.top_k)) <= TOP_K_CAP and int(np.max(s.no_repeat_ngram_size)) <= NGRAM_CAP
                and self._prompt_columns(ids) + int(np.max(s.max_new_tokens)) <= self.columns)

    def admit(self, slots: list[list[int]], requests: list[EngineRequest]):
        by_bucket: dict[int, list] = {}
        for answer_slots, r in zip(slots, requests):
            width = bucket_length(r.prompt_width)
            by_bucket.setdefault(width, []).extend((r, j, slot) for j, slot in enumerate(answer_slots))
        if self._state is None:
            with self.model.sharding_context():
                self._state = self._init(self.model.params, self.num_slots, self.columns)
        for width, answers in by_bucket.items():
            self._admit_group(width, answers)
        for answer_slots in slots:
            self.live[answer_slots] = True

    def step(self):
        with self.model.sharding_context():
            self._state, tokens, counts = self._step(self.model.params, self._state, jnp.asarray(self.live),
                                                     rows=self._busy_rows())
        counts = np.asarray(counts)
        done = np.asarray(self._state.done) & (counts > 0)
        return np.asarray(tokens), counts, done

    def free(self, slots: list[int]):
        self.live[slots] = False

    def _busy_rows(self) -> int:
        """Rows a step computes: the power of two that covers the highest live slot (the engine
        fills the lowest free slots first, so a light load stays in the first rows)."""
        live = np.flatnonzero(self.live)
        return min(_power_of_two(int(live[-1]) + 1 if live.size else 1), self.num_slots)

    def warm_up(self, request: EngineRequest):
        """Compile before serving: the admission of `request`'s prompt bucket at every batch-size
        bucket (rows dropped, no slot changes), and the step."""
        self.admit([], [])
        width, rows = bucket_length(request.prompt_width), 1
        while rows <= _power_of_two(self.num_slots):
            self._admit_group(width, [(request, 0, self.num_slots)] * rows)
            self.live[:] = False
            self.live[:min(rows, self.num_slots)] = True  # rows the step computes: the first `rows`
            done = jax.device_put(np.ones(self.num_slots, bool), self._state.done.sharding)  # placed as a step's
            self._state = self._state.replace(done=done)  # decode nothing
            self.step()
            rows *= 2
        self.live[:] = False

    # ------------------------------------------------------------------ admission
    def _prompt_columns(self, ids) -> int:
        """Cache columns a prompt takes: its bucketed width, plus the queries when they are prepended."""
        prepend = self.model.query_layout(ids)
        return bucket_length(ids.shape[1]) + (self.model.config.num_query_tokens if prepend else 0)

    def _admit_group(self, width: int, answers: list[tuple[EngineRequest, int, int]]):
        rows = _power_of_two(len(answers))
        padded = answers + [answers[-1]] * (rows - len(answers))
        inputs = [r.inputs for r, _, _ in padded]

        def stack(name, pad_value, to_width=None, left=False):
            parts = [np.asarray(x[name]) for x in inputs]
            if to_width is not None:
                parts = [np.pad(p, ((0, 0), (to_width - p.shape[1], 0) if left else (0, to_width - p.shape[1])),
                                constant_values=pad_value) for p in parts]
            return np.concatenate(parts)

        batch = dict(pixel_values=stack("pixel_values", 0),
                     input_ids=stack("input_ids", self.text_pad, width, left=True).astype(np.int32),
                     attention_mask=stack("attention_mask", 0, width, left=True).astype(np.int32),
                     qformer_ids=None, qformer_mask=None)
        if inputs[0].get("qformer_input_ids") is not None:
            limit = self.model.config.qformer.max_position_embeddings
            q_width = min(bucket_length(max(np.asarray(x["qformer_input_ids"]).shape[1] for x in inputs)), limit)
            batch["qformer_ids"] = stack("qformer_input_ids", 0, q_width).astype(np.int32)
            batch["qformer_mask"] = stack("qformer_attention_mask", 0, q_width).astype(np.int32)
        batch["knobs"] = _stack_knobs([self._knobs(r) for r, _, _ in padded])
        batch["sample"] = np.array([r.decoding.sampler.strategy == "sample" for r, _, _ in padded])
        batch["index"] = np.array([j for _, j, _ in padded], np.int32)
        dst = np.array([slot for _, _, slot in answers] + [self.num_slots] * (rows - len(answers)),  # pads: dropped
                       np.int32)
        prepend = self.model.query_layout(batch["input_ids"])
        with self.model.sharding_context():
            self._state = self._admit(self.model.params, self._state, batch, dst, prepend_queries=prepend)

    @staticmethod
    def _knobs(request: EngineRequest) -> RowSampler:
        """The request's knobs as `generate` would trace them (one row); greedy rows get neutral
        sampling knobs, so a batch's sampling processors leave them bit for bit unchanged."""
        sampler = request.decoding.sampler
        _, knobs = split(sampler.replace(num_return_sequences=1), 1, request.decoding.seed)
        if sampler.strategy != "sample":
            knobs = knobs.replace(temperature=np.ones(1, np.float32), top_k=np.zeros(1, np.int32),
                                  top_p_tail=np.zeros(1, np.float32))
        return knobs


def _stack_knobs(rows: list[RowSampler]) -> RowSampler:
    return jax.tree_util.tree_map(lambda *x: np.concatenate(x), *rows)
