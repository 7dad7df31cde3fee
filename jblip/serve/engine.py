"""The engine interface the HTTP side talks to: submit a request, cancel it, receive its
tokens as events. The engine runs its loop in its own thread; events reach the request's
`emit` callback from that thread (the HTTP side hands them to its event loop).

An implementation decides how requests share the device (`BatchingEngine`: requests with
the same decoding settings batched through `generate`; a slot-based continuous-batching
engine plugs in behind the same interface).
"""
from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from jblip.serve.errors import QueueFull, ShuttingDown
from jblip.serve.options import Decoding


@dataclass
class Tokens:
    """New tokens of one answer (`index` among the request's n answers)."""
    index: int
    ids: list[int]


@dataclass
class Finished:
    """Answer `index` is complete: reason "stop" (EOS) or "length" (max_tokens reached)."""
    index: int
    reason: str


@dataclass
class Failed:
    """The whole request failed on the engine side (the message is safe to show the client);
    `status` is the HTTP status to answer with (503 when the server is shutting down)."""
    message: str
    status: int = 500


Event = Tokens | Finished | Failed


@dataclass
class EngineRequest:
    """One prepared request: model inputs for one image + prompt (batch axis of size 1)."""
    id: str
    inputs: dict                 # pixel_values [1, S, S, C] float32, input_ids, attention_mask, qformer_* (numpy)
    decoding: Decoding
    prompt_tokens: int
    emit: Callable[[Event], None]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_width(self) -> int:
        return int(np.asarray(self.inputs["input_ids"]).shape[1])


class Engine(abc.ABC):
    """Owns the model and the device loop; thread-safe `submit` / `cancel` / `shutdown`."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the loop thread (after warm-up, if the implementation does any)."""

    @abc.abstractmethod
    def submit(self, request: EngineRequest) -> None:
        """Queue a request; raises `QueueFull` when the queue holds --max-queue requests and
        `ShuttingDown` once shutdown has begun."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Drop a request (waiting or running); it gets no further events. Unknown ids are ignored."""

    @abc.abstractmethod
    def shutdown(self, timeout: float) -> None:
        """Stop admitting; let running work finish for up to `timeout` seconds, then cancel the
        rest (each gets a `Failed` event) and stop the thread."""

    @property
    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""

    @property
    @abc.abstractmethod
    def active_slots(self) -> int:
        """Rows (answers) being decoded right now."""

    # Shared by the implementations, which keep `_cond`, `_waiting`, `_closing` and `max_queue`.
    def _enqueue(self, request: EngineRequest) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.max_queue)
            self._waiting.append(request)
            self._cond.notify()

    def _drop_waiting(self, request_id: str) -> None:
        """Cancel a request that is still waiting (call with `_cond` held)."""
        for r in list(self._waiting):
            if r.id == request_id:
                self._waiting.remove(r)
                r.cancelled.set()
