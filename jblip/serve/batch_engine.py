"""`BatchingEngine`: waiting requests that share a decoding program run together as one
`model.generate` batch; a batch ends when its longest answer ends (static batching).

Only what shapes the compiled program groups requests: strategy, beams, answers per request
(n). Every other knob (temperature, top_p, top_k, penalties, min/max tokens, the seed) is
passed per row, so one batch mixes them and new values never recompile (the sampler's
`all_processors` keeps every processor in the program whatever the values). A row's random
draws depend only on its own seed, so a seeded answer is the same alone or in a batch.
A batch is always padded to the full `max_batch` rows (copies of its last request), so each
program and prompt-length bucket compiles once, whatever the traffic.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from jblip.serve.engine import Engine, EngineRequest, Failed, Finished, Tokens


PER_ROW = ("temperature", "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
           "min_new_tokens", "max_new_tokens")


def _group_key(request: EngineRequest):
    """What the compiled program depends on (besides shapes); the knobs in PER_ROW do not."""
    s = request.decoding.sampler
    return (s.strategy, s.num_beams, s.num_return_sequences, s.early_stopping, s.eos_token_ids, s.pad_token_id)


def batch_sampler(requests: list[EngineRequest], rows: int):
    """One sampler for the batch: the per-row knobs as one value per row (padding rows repeat
    the last request), every processor compiled in."""
    samplers = [r.decoding.sampler for r in requests]
    samplers += [samplers[-1]] * (rows - len(samplers))
    per_row = {name: tuple(getattr(s, name) for s in samplers) for name in PER_ROW}
    return samplers[0].replace(all_processors=True, **per_row)


def _rows(request: EngineRequest) -> int:
    s = request.decoding.sampler
    return max(s.num_return_sequences, s.num_beams)


def _pad_width(a: np.ndarray, width: int, value: int, left: bool) -> np.ndarray:
    extra = width - a.shape[1]
    if extra == 0:
        return a
    return np.pad(a, ((0, 0), (extra, 0) if left else (0, extra)), constant_values=value)


def stack_inputs(requests: list[EngineRequest], rows: int, left_pad: bool, pad_id: int) -> dict:
    """One batch of `rows` rows from single-row inputs: prompts padded to the longest (left for
    decoder-only LMs, right for T5; Q-Former text always right), then the last row repeated."""
    def stacked(name, value, left):
        parts = [np.asarray(r.inputs[name]) for r in requests]
        if parts[0].ndim == 2:
            width = max(p.shape[1] for p in parts)
            parts = [_pad_width(p, width, value, left) for p in parts]
        batch = np.concatenate(parts)
        return np.concatenate([batch] + [batch[-1:]] * (rows - len(requests)))

    out = dict(pixel_values=stacked("pixel_values", 0, False),
               input_ids=stacked("input_ids", pad_id, left_pad),
               attention_mask=stacked("attention_mask", 0, left_pad))
    if requests[0].inputs.get("qformer_input_ids") is not None:
        out["qformer_input_ids"] = stacked("qformer_input_ids", 0, False)
        out["qformer_attention_mask"] = stacked("qformer_attention_mask", 0, False)
    return out


class BatchingEngine(Engine):
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, pad_id: int = 0):
        self.model = model
        config = model.config
        self.positions = getattr(config.text, "max_position_embeddings", None) if config.family != "t5" else None
        self.extra_positions = config.num_query_tokens if config.image_token_index is None else 0
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.pad_id = pad_id
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._running: dict[str, EngineRequest] = {}
        self._active_rows = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="jblip-engine", daemon=True)
        self.batches_run = 0

    # ------------------------------------------------------------------ interface
    def start(self):
        self._thread.start()

    def submit(self, request: EngineRequest):
        self._enqueue(request)

    def cancel(self, request_id: str):
        with self._cond:
            self._drop_waiting(request_id)
            if request_id in self._running:
                self._running[request_id].cancelled.set()  # its results are dropped when the batch ends

    def shutdown(self, timeout: float):
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        while self._thread.is_alive() and time.monotonic() < deadline:
            with self._cond:
                if not self._waiting and not self._running:
                    break
            time.sleep(0.02)
        with self._cond:
            left = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._cond.notify_all()
        for r in left:
            if not r.cancelled.is_set():
                r.cancelled.set()
                r.emit(Failed("the server shut down before this request finished", 503))
        self._thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_slots(self) -> int:
        return self._active_rows

    # ------------------------------------------------------------------ loop
    def _fits(self, width: int, longest: int) -> bool:
        """Whether prompts `width` wide plus `longest` new tokens fit the model's positions."""
        return self.positions is None or width + self.extra_positions + longest <= self.positions

    def _take_batch(self) -> list[EngineRequest]:
        first = self._waiting[0]
        key, rows, batch = _group_key(first), 0, []
        width = longest = 0
        for r in list(self._waiting):
            w, m = max(width, r.prompt_width), max(longest, r.decoding.sampler.max_new_tokens)
            if (_group_key(r) == key and rows + _rows(r) <= max(self.max_batch, _rows(first))
                    and (not batch or self._fits(w, m))):
                batch.append(r)
                rows += _rows(r)
                width, longest = w, m
                self._waiting.remove(r)
        return batch

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if not self._waiting:
                    return
                batch = self._take_batch()
                self._running = {r.id: r for r in batch}
                self._active_rows = sum(_rows(r) for r in batch)
            try:
                self._run(batch)
            except Exception as e:  # a device-side failure fails this batch, never the server
                for r in batch:
                    if not r.cancelled.is_set():
                        r.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self._cond:
                    self._running = {}
                    self._active_rows = 0
                self.batches_run += 1

    def _run(self, batch: list[EngineRequest]):
        rows = max(len(batch), self.max_batch // _rows(batch[0]))
        sampler = batch_sampler(batch, rows)
        seeds = [r.decoding.seed for r in batch] + [batch[-1].decoding.seed] * (rows - len(batch))
        inputs = stack_inputs(batch, rows, self.model.config.family != "t5", self.pad_id)
        out = self.model.generate(**inputs, sampler=sampler, seed=seeds)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        n, eos = sampler.num_return_sequences, set(sampler.eos_token_ids)
        for i, r in enumerate(batch):
            if r.cancelled.is_set():
                continue
            for j in range(n):
                row = i * n + j
                ids = tokens[row, :min(lengths[row], r.decoding.sampler.max_new_tokens)].tolist()
                r.emit(Tokens(j, ids))
                r.emit(Finished(j, "stop" if ids and ids[-1] in eos else "length"))
