"""Continuous batching on device: `DecoderSlots` under `SlotEngine`.

On tiny random LLaMA (InstructBLIP) and OPT (BLIP-2) models: answers admitted together and
later, at different prompt lengths, greedy and seeded sampling, n=2, more answers than slots,
each equal `generate` for its request alone. On the demo model behind the server (each step
slowed down, so that timing does not decide the order): short answers admitted after a long
one finish first, and a client that disconnects mid-stream frees its slot at once.
(`tests/test_serve.py` checks the default server, continuous batching, against `generate_text`.)
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

import jblip  # noqa: E402
from jblip.pipeline import DEFAULT_MODEL  # noqa: E402
from jblip.serve import BackgroundServer, ServerSettings, build_app  # noqa: E402
from jblip.serve.batch_engine import BatchingEngine  # noqa: E402
from jblip.serve.engine import EngineRequest, Failed, Finished, Tokens  # noqa: E402
from jblip.serve.options import Decoding  # noqa: E402
from jblip.serve.slot_engine import SlotEngine  # noqa: E402
from jblip.serve.slot_program import DecoderSlots  # noqa: E402
from tests.hf_models import IMAGE_TOKEN, TINY_OPT, left_padded_prompts, right_padded_text  # noqa: E402
from tests.hf_models import tiny_blip2, tiny_instructblip  # noqa: E402
from tests.test_demo import EXAMPLES  # noqa: E402


class Answers:
    """Collects one request's events; `done` once all n answers finished (or it failed)."""

    def __init__(self, n):
        self.n, self.tokens, self.reasons = n, [[] for _ in range(n)], {}
        self.done = threading.Event()

    def __call__(self, event):
        if isinstance(event, Tokens):
            self.tokens[event.index].extend(event.ids)
        elif isinstance(event, Finished):
            self.reasons[event.index] = event.reason
        if isinstance(event, Failed) or len(self.reasons) == self.n:
            self.done.set()


# ----------------------------------------------------------------------------- tiny LLaMA and OPT

@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    if request.param == "llama":
        tiny_instructblip(path, seed=0)
    else:
        tiny_blip2(path, seed=1, text=TINY_OPT)
    return jblip.load_pretrained(path)


def _request(model, i, length, strategy, max_new, n=1, seed=0):
    """Request i: a prompt of `length` tokens (placeholders first), one random image."""
    ids, mask = left_padded_prompts([length], 120, pad_id=0, bos_id=2, seed=i, image_token=IMAGE_TOKEN)
    inputs = dict(pixel_values=np.random.default_rng(i).standard_normal((1, 28, 28, 3)).astype(np.float32),
                  input_ids=ids, attention_mask=mask)
    if model.config.qformer.use_text_input:
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = right_padded_text([3], 99, i)
    sampler = model.default_sampler().replace(strategy=strategy, max_new_tokens=max_new, num_return_sequences=n,
                                              temperature=1.3 if strategy == "sample" else 1.0,
                                              top_p=0.9 if strategy == "sample" else 1.0)
    answers = Answers(n)
    return EngineRequest(f"r{i}", inputs, Decoding(sampler, seed, True, (), n), length, answers), answers


def test_each_answer_equals_generate_alone(tiny):
    program = DecoderSlots(tiny, num_slots=4, columns=64, steps=3)
    engine = SlotEngine(program, eos_token_ids=program.eos_token_ids)
    jobs = [_request(tiny, 0, 3, "greedy", 14), _request(tiny, 1, 8, "sample", 9, seed=5),
            _request(tiny, 2, 1, "sample", 12, n=2, seed=7), _request(tiny, 3, 6, "greedy", 3),
            _request(tiny, 4, 5, "sample", 6, seed=11), _request(tiny, 5, 2, "greedy", 10)]
    engine.start()
    try:
        for r, _ in jobs:  # 7 answers for 4 slots: the last ones wait for free slots
            engine.submit(r)
        for _, answers in jobs:
            assert answers.done.wait(300)
    finally:
        engine.shutdown(5)
    for r, answers in jobs:
        out = tiny.generate(**r.inputs, sampler=r.decoding.sampler, seed=r.decoding.seed)
        want = [np.asarray(out.tokens)[j, :int(out.lengths[j])].tolist() for j in range(r.decoding.n)]
        assert answers.tokens == want, r.id


def test_what_the_program_cannot_decode_goes_elsewhere(tiny):
    program = DecoderSlots(tiny, num_slots=2, columns=40)
    fits, _ = _request(tiny, 0, 3, "greedy", 16)
    assert program.accepts(fits)
    too_long, _ = _request(tiny, 0, 3, "greedy", 40)   # prompt bucket 16 + 40 > 40 columns
    beam, _ = _request(tiny, 0, 3, "greedy", 4)
    beam.decoding = Decoding(beam.decoding.sampler.replace(strategy="beam", num_beams=2), 0, False, (), 1)
    too_many, _ = _request(tiny, 0, 3, "sample", 4, n=3)
    assert not any(program.accepts(r) for r in (too_long, beam, too_many))


def test_flan_t5_and_engine_static_are_served_by_static_batching():
    from types import SimpleNamespace

    from jblip.config import preset
    from jblip.serve.server import build_engine
    t5 = SimpleNamespace(config=preset("blip2-flan-t5-xl"))
    assert isinstance(build_engine(t5, ServerSettings("t5")), BatchingEngine)
    with pytest.raises(ValueError, match="decoder-only"):
        DecoderSlots(t5)
    llama = SimpleNamespace(config=preset("tiny-instructblip-vicuna"))
    assert isinstance(build_engine(llama, ServerSettings("x", engine="static")), BatchingEngine)
    with pytest.raises(ValueError, match="unknown engine"):
        build_engine(llama, ServerSettings("x", engine="dynamic"))


# ----------------------------------------------------------------------------- the demo model, served

class SlowSlots(DecoderSlots):
    """Each step takes at least `STEP_S`: the order of events then depends on the scheduling alone."""
    STEP_S = 0.04

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.freed = []

    def step(self):
        time.sleep(self.STEP_S)
        return super().step()

    def free(self, slots):
        self.freed.extend(slots)
        super().free(slots)


def data_url(name):
    with open(os.path.join(EXAMPLES, name), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def chat(question, image, **options):
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    return dict(model="demo", messages=[{"role": "user", "content": content}], **options)


@pytest.fixture(scope="module")
def demo():
    return jblip.load_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def slow_server(demo):
    from jblip.processing import Processor
    program = SlowSlots(demo, num_slots=4, columns=128, steps=2)
    engine = SlotEngine(program, fallback=BatchingEngine(demo, 4), eos_token_ids=program.eos_token_ids)
    settings = ServerSettings("demo", warm_up=True)  # admission at 1, 2 and 4 rows, the step
    with BackgroundServer(build_app(demo, Processor.from_pretrained(DEFAULT_MODEL), settings, engine=engine)) as s:
        yield s, engine


def metric(server, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(server.url + "/metrics").text, re.M)
    return float(m.group(1))


LONG = chat("What colour is the circle?", "red_circle.png", max_tokens=40, min_tokens=40, stream=True)
SHORT = chat("What shape is it?", "green_triangle.png", max_tokens=2)


def test_short_answers_admitted_after_a_long_one_finish_first(slow_server):
    server, engine = slow_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    compiled = engine.program.compiled  # warmed up: admission of 1, 2 and 4 rows, steps over 1, 2 and 4 rows
    finished = {}

    def short(i):
        reply = client.chat.completions.create(**SHORT)
        finished[f"short{i}"] = time.perf_counter()
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        long = {k: v for k, v in LONG.items() if k != "min_tokens"}
        chunks = iter(client.chat.completions.create(**long, extra_body={"min_tokens": 40},
                                                     stream_options={"include_usage": True}))
        while not next(chunks).choices[0].delta.content:  # the long answer is being decoded
            pass
        shorts = [pool.submit(short, i) for i in range(3)]
        usage = [c.usage for c in chunks if c.usage is not None]
        finished["long"] = time.perf_counter()
        answers = [f.result() for f in shorts]
    assert usage[0].completion_tokens == 40
    assert max(finished[f"short{i}"] for i in range(3)) < finished["long"], finished
    assert answers == ["triangle"] * 3  # the examples table's answer
    assert engine.program.compiled == compiled == 6


def test_a_client_gone_mid_stream_frees_its_slot(slow_server):
    server, engine = slow_server
    cancelled = metric(server, "jblip_requests_cancelled_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=LONG, timeout=60) as r:
        lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
        for line in lines:  # up to the first token's text
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert metric(server, "jblip_active_slots") == 1
        slot = int(np.flatnonzero(engine.program.live)[0])
        freed = len(engine.program.freed)
    deadline = time.monotonic() + 30
    while metric(server, "jblip_active_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "jblip_active_slots") == 0 and engine.active_slots == 0
    assert metric(server, "jblip_requests_cancelled_total") == cancelled + 1
    reply = httpx.post(server.url + "/v1/chat/completions", json=SHORT, timeout=60).json()  # a slot serves it
    assert reply["choices"][0]["message"]["content"] == "triangle"
    assert slot in engine.program.freed[freed:]  # the program dropped the row before the next admission
