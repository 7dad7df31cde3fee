"""`SlotEngine`: continuous batching over a fixed number of decode slots.

Each loop iteration (1) frees the slots of finished or cancelled answers, (2) admits waiting
requests into free slots (one slot per answer: a request with n=2 takes two), (3) advances
every occupied slot by a few tokens, and (4) hands each slot's new tokens to its request.
A short answer admitted after a long one therefore finishes first; nothing waits for the
longest member of a batch.

The device side is a `SlotProgram`: the model-specific part that owns the static-shape KV
cache of `num_slots` rows and the per-row decoding settings (so requests with different
temperatures, top_p or max_tokens share one compiled step). This file is only the
scheduling, the same for any program; `jblip.serve.engine.Engine` is what the HTTP side sees.
Requests a program cannot take (`accepts` false: e.g. beam search, whose beams reorder the
cache rows among themselves) go to a `fallback` engine, such as `BatchingEngine`.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from jblip.serve.engine import Engine, EngineRequest, Failed, Finished, Tokens


class SlotProgram(Protocol):
    num_slots: int

    def accepts(self, request: EngineRequest) -> bool:
        """Whether this program can decode the request (else it goes to the fallback engine)."""

    def admit(self, slots: list[list[int]], requests: list[EngineRequest]) -> None:
        """Prefill `requests` (batched) and place answer j of requests[i] in slot slots[i][j]."""

    def step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance every occupied slot: (tokens [R, k], counts [R] of valid tokens per row,
        done [R]: the row's answer ended, by EOS or its own max_tokens)."""

    def free(self, slots: list[int]) -> None:
        """Release slots (their rows are ignored by later steps until re-admitted)."""


@dataclass
class _Answer:
    request: EngineRequest
    index: int


class SlotEngine(Engine):
    def __init__(self, program: SlotProgram, max_queue: int = 64, fallback: Engine | None = None,
                 eos_token_ids: tuple[int, ...] = ()):
        self.program = program
        self.max_queue = max_queue
        self.fallback = fallback
        self.eos = set(eos_token_ids)
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._slots: dict[int, _Answer] = {}   # occupied slot -> the answer it decodes
        self._to_free: list[int] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="jblip-slots", daemon=True)
        self.steps_run = 0

    # ------------------------------------------------------------------ interface
    def start(self):
        if self.fallback is not None:
            self.fallback.start()
        self._thread.start()

    def submit(self, request: EngineRequest):
        if self.fallback is not None and not self.program.accepts(request):
            return self.fallback.submit(request)
        if self.program.num_slots < request.decoding.n:
            raise ValueError(f"n={request.decoding.n} is more than the engine's {self.program.num_slots} slots")
        self._enqueue(request)

    def cancel(self, request_id: str):
        if self.fallback is not None:
            self.fallback.cancel(request_id)
        with self._cond:
            self._drop_waiting(request_id)
            for slot, answer in list(self._slots.items()):
                if answer.request.id == request_id:
                    answer.request.cancelled.set()
                    self._release(slot)
            self._cond.notify()

    def shutdown(self, timeout: float):
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        while time.monotonic() < deadline:
            with self._cond:
                if not self._waiting and not self._slots:
                    break
            time.sleep(0.02)
        with self._cond:
            left = list(self._waiting) + list({a.request.id: a.request for a in self._slots.values()}.values())
            self._waiting.clear()
            for slot in list(self._slots):
                self._release(slot)
            self._cond.notify_all()
        for r in left:
            if not r.cancelled.is_set():
                r.cancelled.set()
                r.emit(Failed("the server shut down before this request finished", 503))
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if self.fallback is not None:
            self.fallback.shutdown(max(0.0, deadline - time.monotonic()))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + (self.fallback.queue_depth if self.fallback is not None else 0)

    @property
    def active_slots(self) -> int:
        return len(self._slots) + (self.fallback.active_slots if self.fallback is not None else 0)

    # ------------------------------------------------------------------ loop
    def _release(self, slot: int):
        """Under the lock: the slot is free for admission; the program hears of it before its next step."""
        self._slots.pop(slot, None)
        self._to_free.append(slot)

    def _admissions(self) -> tuple[list[list[int]], list[EngineRequest]]:
        """Under the lock: waiting requests (in order) that fit the free slots."""
        free = sorted(set(range(self.program.num_slots)) - set(self._slots))
        slots, admitted = [], []
        while self._waiting and len(free) >= self._waiting[0].decoding.n:
            r = self._waiting.popleft()
            mine, free = free[:r.decoding.n], free[r.decoding.n:]
            for j, slot in enumerate(mine):
                self._slots[slot] = _Answer(r, j)
            slots.append(mine)
            admitted.append(r)
        return slots, admitted

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._slots and not self._closing:
                    self._cond.wait()
                if self._closing and not self._waiting and not self._slots:
                    return
                to_free, self._to_free = self._to_free, []
                slots, admitted = self._admissions()
            try:
                if to_free:
                    self.program.free(to_free)
                if admitted:
                    self.program.admit(slots, admitted)
                with self._cond:
                    busy = bool(self._slots)
                if busy:
                    self._emit(*self.program.step())
                    self.steps_run += 1
            except Exception as e:  # a device-side failure fails the requests it touched, never the server
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _emit(self, tokens: np.ndarray, counts: np.ndarray, done: np.ndarray):
        with self._cond:
            occupied = dict(self._slots)
        finished = []
        for slot, answer in occupied.items():
            r = answer.request
            if r.cancelled.is_set():
                continue
            ids = tokens[slot, :counts[slot]].tolist()
            if ids:
                r.emit(Tokens(answer.index, ids))
            if done[slot]:
                r.emit(Finished(answer.index, "stop" if ids and ids[-1] in self.eos else "length"))
                finished.append(slot)
        with self._cond:
            for slot in finished:
                if self._slots.get(slot) is occupied[slot]:
                    self._release(slot)

    def _fail_all(self, message: str):
        with self._cond:
            requests = {a.request.id: a.request for a in self._slots.values()}
            for slot in list(self._slots):
                self._release(slot)
        for r in requests.values():
            if not r.cancelled.is_set():
                r.cancelled.set()
                r.emit(Failed(message))
