"""The continuous-batching scheduler (`SlotEngine`) on a scripted device program: short answers
admitted after a long one finish first, a cancelled request frees its slots at once for the
next in line, n answers take n slots, back-pressure, fallback and shutdown."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from jblip.sampling import SamplerConfig
from jblip.serve.engine import EngineRequest, Failed, Finished, Tokens
from jblip.serve.errors import QueueFull
from jblip.serve.options import Decoding
from jblip.serve.slot_engine import SlotEngine

EOS, TOKEN = 2, 7


class ScriptedProgram:
    """Each answer is `max_new_tokens` tokens (`token`..., then EOS), one token per step."""

    def __init__(self, num_slots=4, step_s=0.002, token=TOKEN):
        self.num_slots, self.step_s, self.token = num_slots, step_s, token
        self.target = np.zeros(num_slots, int)
        self.made = np.zeros(num_slots, int)
        self.live = np.zeros(num_slots, bool)
        self.freed, self.admitted = [], []

    def accepts(self, request):
        return request.decoding.sampler.strategy != "beam"

    def admit(self, slots, requests):
        for rows, r in zip(slots, requests):
            self.admitted.append((r.id, list(rows)))
            for row in rows:
                self.target[row], self.made[row], self.live[row] = r.decoding.sampler.max_new_tokens, 0, True

    def step(self):
        time.sleep(self.step_s)
        tokens = np.full((self.num_slots, 1), self.token)
        self.made[self.live] += 1
        done = self.live & (self.made >= self.target)
        tokens[done, 0] = EOS
        counts = self.live.astype(int)
        self.live &= ~done
        return tokens, counts, done

    def free(self, slots):
        self.freed.extend(slots)
        self.live[slots] = False


class Recorder:
    def __init__(self):
        self.events, self.finished_at = [], {}
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.finished_at[getattr(event, "index", -1)] = time.perf_counter()
            self.done.set()

    def tokens(self, index=0):
        return [t for e in self.events if isinstance(e, Tokens) and e.index == index for t in e.ids]


def request(name, tokens, n=1, strategy="sample"):
    sampler = SamplerConfig(strategy=strategy, max_new_tokens=tokens, num_return_sequences=n,
                            num_beams=n if strategy == "beam" else 1, eos_token_ids=(EOS,))
    recorder = Recorder()
    r = EngineRequest(name, {"input_ids": np.zeros((1, 4), np.int32)}, Decoding(sampler, 0, False, (), n), 4,
                      recorder)
    return r, recorder


@pytest.fixture
def engine():
    program = ScriptedProgram()
    e = SlotEngine(program, max_queue=8, eos_token_ids=(EOS,))
    e.start()
    yield e
    e.shutdown(5)


def wait(recorders, timeout=30):
    for rec in recorders:
        assert rec.done.wait(timeout)


def test_short_answers_admitted_after_a_long_one_finish_first(engine):
    long, long_rec = request("long", 300)
    engine.submit(long)
    while engine.active_slots == 0:
        time.sleep(0.001)
    shorts = [request(f"short{i}", 5) for i in range(3)]
    for r, _ in shorts:
        engine.submit(r)
    wait([rec for _, rec in shorts] + [long_rec])
    assert long_rec.tokens() == [TOKEN] * 299 + [EOS]
    assert long_rec.events[-1] == Finished(0, "stop")
    for _, rec in shorts:
        assert rec.tokens() == [TOKEN] * 4 + [EOS]
        assert rec.finished_at[0] < long_rec.finished_at[0]


def test_cancel_frees_the_slots_at_once_for_the_next_request(engine):
    program = engine.program
    running = [request(f"r{i}", 10_000) for i in range(4)]  # every slot taken
    for r, _ in running:
        engine.submit(r)
    queued, queued_rec = request("queued", 3)
    engine.submit(queued)
    while engine.active_slots < 4:
        time.sleep(0.001)
    assert engine.queue_depth == 1
    slot_of_r2 = dict(program.admitted)["r2"]
    engine.cancel("r2")
    wait([queued_rec])
    assert queued_rec.tokens() == [TOKEN, TOKEN, EOS]
    assert dict(program.admitted)["queued"] == slot_of_r2 and set(slot_of_r2) <= set(program.freed)
    assert engine.queue_depth == 0
    assert not any(isinstance(e, Finished) for e in running[2][1].events)  # cancelled: no more events
    for r, _ in running:
        engine.cancel(r.id)
    deadline = time.monotonic() + 10
    while engine.active_slots and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.active_slots == 0


def test_n_answers_take_n_slots_and_finish_separately(engine):
    r, rec = request("pair", 6, n=2)
    engine.submit(r)
    deadline = time.monotonic() + 10
    while not (rec.finished_at.keys() >= {0, 1}) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert rec.tokens(0) == rec.tokens(1) == [TOKEN] * 5 + [EOS]
    assert len(dict(engine.program.admitted)["pair"]) == 2


def test_full_queue_and_shutdown():
    program = ScriptedProgram(num_slots=1)
    engine = SlotEngine(program, max_queue=2, eos_token_ids=(EOS,))
    engine.start()
    first, first_rec = request("first", 10_000)
    engine.submit(first)
    while engine.active_slots == 0:
        time.sleep(0.001)
    waiting = [request(f"w{i}", 3) for i in range(2)]
    for r, _ in waiting:
        engine.submit(r)
    with pytest.raises(QueueFull):
        engine.submit(request("refused", 3)[0])
    engine.shutdown(0.2)
    for rec in [first_rec] + [rec for _, rec in waiting]:
        assert isinstance(rec.events[-1], Failed) and rec.events[-1].status == 503
    assert not engine._thread.is_alive()


def test_requests_the_program_cannot_take_go_to_the_fallback():
    class Fallback:
        def __init__(self):
            self.got = []
            self.queue_depth = self.active_slots = 0

        def start(self):
            pass

        def submit(self, r):
            self.got.append(r.id)

        def cancel(self, request_id):
            pass

        def shutdown(self, timeout):
            pass

    fallback = Fallback()
    engine = SlotEngine(ScriptedProgram(), fallback=fallback, eos_token_ids=(EOS,))
    engine.start()
    beam, _ = request("beam", 5, n=2, strategy="beam")
    plain, plain_rec = request("plain", 2)
    engine.submit(beam)
    engine.submit(plain)
    wait([plain_rec])
    assert fallback.got == ["beam"]
    engine.shutdown(1)
