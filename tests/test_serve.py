"""`jblip serve` on the bundled demo model, driven by the official `openai` client (and raw
HTTP for malformed bodies): answers equal `generate_text`, streaming, seeded sampling,
OpenAI-style errors with the server still serving, concurrency, back-pressure, client
disconnects, metrics, and the CLI's graceful shutdown on SIGTERM."""
from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

import jblip  # noqa: E402
from jblip.pipeline import DEFAULT_MODEL  # noqa: E402
from jblip.processing import Processor  # noqa: E402
from jblip.serve import BackgroundServer, ServerSettings, build_app  # noqa: E402
from jblip.serve.batch_engine import BatchingEngine  # noqa: E402
from jblip.serve.images import ImageLimits  # noqa: E402
from jblip.serve.slot_engine import SlotEngine  # noqa: E402
from tests.test_demo import EXAMPLES, example_rows  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")),
                                reason="demo model not bundled")
NAME = "demo"


def data_url(path_or_bytes, mime="image/png") -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def chat_body(question: str, url: str, **options) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return dict(model=NAME, messages=[{"role": "user", "content": content}], **options)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (with almost no pixel data): what a
    decompression bomb looks like before it is expanded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def model():
    return jblip.load_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def server(model, processor, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    Image.open(example("red_circle.png")).save(allowed / "circle.png")
    settings = ServerSettings(model_name=NAME, max_batch=8, max_queue=64,
                              images=ImageLimits(allow_local_files=str(allowed)))
    with BackgroundServer(build_app(model, processor, settings)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, question, image, **options):
    return client.chat.completions.create(**chat_body(question, data_url(example(image)), **options))


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


# ----------------------------------------------------------------------------- answers

def test_each_example_equals_generate_text(client, model):
    rows = example_rows()
    assert len(rows) == 11
    want = model.generate_text([example(r[0]) for r in rows], [r[1] for r in rows], max_new_tokens=32)
    for (image, question, expected), text in zip(rows, want):
        reply = ask(client, question, image, temperature=0, max_tokens=32)
        assert reply.choices[0].message.content == text == expected, (image, question)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.model == NAME and reply.object == "chat.completion"
        u = reply.usage
        assert u.prompt_tokens > 8 and u.completion_tokens >= 1 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_chunks_concatenate_to_the_answer(client, model):
    rows = example_rows()[:4]
    want = model.generate_text([example(r[0]) for r in rows], [r[1] for r in rows], max_new_tokens=16)
    for (image, question, _), expected in zip(rows, want):
        chunks = list(ask(client, question, image, max_tokens=16, stream=True,
                          stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reasons == ["stop"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_max_tokens_cuts_the_answer(client, model):
    reply = ask(client, "What colour is the circle?", "red_circle.png", max_tokens=1)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 1
    assert reply.choices[0].message.content == model.generate_text(example("red_circle.png"),
                                                                   "What colour is the circle?", max_new_tokens=1)[0]


def test_stop_strings_end_the_answer(client):
    options = dict(max_tokens=16, stop=["ed", "zzz"])
    reply = ask(client, "What colour is the circle?", "red_circle.png", **options)
    assert reply.choices[0].message.content == "r" and reply.choices[0].finish_reason == "stop"
    chunks = list(ask(client, "What colour is the circle?", "red_circle.png", stream=True, **options))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "r"


def test_sse_ends_with_done(server):
    body = chat_body("What colour is the circle?", data_url(example("red_circle.png")), stream=True)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_two_sampled_answers_with_a_seed_are_reproducible(client, model):
    options = dict(n=2, temperature=1.5, top_p=0.95, seed=7, max_tokens=6)
    first = ask(client, "How many shapes are there?", "three_shapes.png", **options)
    second = ask(client, "How many shapes are there?", "three_shapes.png", **options)
    answers = [c.message.content for c in first.choices]
    assert len(answers) == 2 and [c.index for c in first.choices] == [0, 1]
    assert answers == [c.message.content for c in second.choices]
    assert answers == model.generate_text(example("three_shapes.png"), "How many shapes are there?",
                                          do_sample=True, temperature=1.5, top_p=0.95, num_return_sequences=2,
                                          seed=7, max_new_tokens=6)


def test_text_completions_and_local_files(client, server, model):
    question = "What colour is the circle?"
    want = model.generate_text(example("red_circle.png"), question, max_new_tokens=16)[0]
    reply = client.completions.create(model=NAME, prompt=question, max_tokens=16,
                                      extra_body={"image": data_url(example("red_circle.png"))})
    assert reply.choices[0].text == want and reply.object == "text_completion"
    chunks = list(client.completions.create(model=NAME, prompt=question, max_tokens=16, stream=True,
                                            extra_body={"image": data_url(example("red_circle.png"))}))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
    local = client.chat.completions.create(**chat_body(question, "circle.png", max_tokens=16))
    assert local.choices[0].message.content == want
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(**chat_body(question, "../" * 8 + example("red_circle.png")[1:]))


def test_beam_search_and_extras(server, client, model):
    options = dict(num_beams=3, n=2, max_tokens=8, repetition_penalty=1.5, length_penalty=0.8, min_tokens=2)
    static = server.server.config.app.state.engine.fallback
    batches = static.batches_run
    reply = ask(client, "What shape is it?", "green_triangle.png", extra_body=options)
    deadline = time.monotonic() + 10  # counted once the batch's events are out
    while static.batches_run == batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert static.batches_run == batches + 1  # beam search: static batching
    want = model.generate_text(example("green_triangle.png"), "What shape is it?", num_beams=3,
                               num_return_sequences=2, max_new_tokens=8, repetition_penalty=1.5,
                               length_penalty=0.8, min_new_tokens=2)
    assert [c.message.content for c in reply.choices] == want


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("jblip_requests_total", "jblip_queue_depth", "jblip_active_slots", "jblip_prompt_tokens_total",
                 "jblip_generated_tokens_total", "jblip_time_to_first_token_seconds_bucket",
                 "jblip_time_per_output_token_seconds_bucket", "jblip_request_latency_seconds_bucket"):
        assert name in text
    assert metric(server, 'jblip_requests_total{endpoint="chat",status="200"}') >= 1
    assert metric(server, "jblip_generated_tokens_total") >= 1


# ----------------------------------------------------------------------------- errors

RED = example("red_circle.png")
GOOD = chat_body("What colour is the circle?", data_url(RED), max_tokens=5)


def _bad_requests():
    text_only = dict(model=NAME, messages=[{"role": "user", "content": "What colour is the circle?"}])
    huge = png_header_only(20000, 20000)
    return [
        ("malformed json", b'{"model": "demo", "messages": [', 400, "invalid_body"),
        ("wrong field type", dict(GOOD, max_tokens="many"), 400, "invalid_body"),
        ("missing image", text_only, 400, "image_missing"),
        ("two images", dict(GOOD, messages=[{"role": "user", "content": GOOD["messages"][0]["content"] * 2}]),
         400, "too_many_images"),
        ("bad base64", chat_body("What colour?", "data:image/png;base64,@@not base64@@"), 400, "invalid_image"),
        ("not an image", chat_body("What colour?", data_url(b"just some text, not a picture")), 400, "invalid_image"),
        ("not an image type", chat_body("What colour?", data_url(open(RED, "rb").read(), "text/plain")), 400,
         "invalid_image"),
        ("20000x20000 image", chat_body("What colour?", data_url(huge)), 413, "image_too_large"),
        ("8000x8000 image", chat_body("What colour?", data_url(png_header_only(8000, 8000))), 413, "image_too_large"),
        ("empty prompt", chat_body("", data_url(RED)), 400, "empty_prompt"),
        ("over-long prompt", chat_body("what colour is it " * 60, data_url(RED)), 400, "prompt_too_long"),
        ("max_tokens too large", dict(GOOD, max_tokens=1000), 400, "max_tokens_too_large"),
        ("unknown model", dict(GOOD, model="gpt-4o"), 404, "model_not_found"),
        ("remote url", chat_body("What colour?", "https://example.com/cat.png"), 400, "remote_url_refused"),
        ("greedy n=2", dict(GOOD, n=2), 400, None),
        ("beam sampling", dict(GOOD, temperature=0.7, num_beams=2), 400, None),
        ("logprobs", dict(GOOD, logprobs=True), 400, "unsupported_parameter"),
    ]


@pytest.mark.parametrize("what,body,status,code", _bad_requests(), ids=[b[0] for b in _bad_requests()])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, what, body, status, code):
    kwargs = dict(content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) else dict(json=body)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    after = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=120)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "red"


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        client.chat.completions.create(**chat_body("What colour?", "http://example.com/a.png"))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**dict(GOOD, model="nope"))


# ----------------------------------------------------------------------------- concurrency

def test_concurrent_requests_each_equal_their_sequential_answer(client, tmp_path):
    rows = example_rows()
    big = tmp_path / "big.png"
    Image.open(example("two_shapes.png")).resize((300, 200)).save(big)
    images = [example(r[0]) for r in rows] + [str(big)]
    questions = [r[1] for r in rows] + ["How many shapes are in the image?"]
    jobs = [(images[i % 12], questions[i % 12], (3, 8, 16, 32)[i % 4]) for i in range(32)]

    def send(job):
        image, question, max_tokens = job
        reply = client.chat.completions.create(**chat_body(question, data_url(image), max_tokens=max_tokens))
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    sequential = [send(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        concurrent_replies = list(pool.map(send, jobs))
    assert concurrent_replies == sequential
    assert {r for r, _ in sequential} >= {"red", "two", "three"}


class HeldEngine(BatchingEngine):
    """A batching engine whose batches wait for `release` (to fill its queue on purpose)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.started_batch = threading.Event()

    def _run(self, batch):
        self.started_batch.set()
        assert self.release.wait(60)
        super()._run(batch)


@pytest.fixture
def held_server(model, processor):
    engine = HeldEngine(model, max_batch=1, max_queue=1)
    app = build_app(model, processor, ServerSettings(model_name=NAME, max_batch=1, max_queue=1), engine=engine)
    with BackgroundServer(app) as s:
        yield s, engine
        engine.release.set()


def test_full_queue_answers_429_then_serves_again(held_server):
    server, engine = held_server
    post = lambda: httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=120)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(post)
        assert engine.started_batch.wait(60)
        waiting = pool.submit(post)
        deadline = time.monotonic() + 30
        while engine.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = post()
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        engine.release.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert post().status_code == 200


def test_client_disconnect_mid_stream_frees_its_place(held_server):
    server, engine = held_server
    blocker = threading.Thread(target=lambda: httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=120))
    blocker.start()
    assert engine.started_batch.wait(60)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=dict(GOOD, stream=True), timeout=60) as r:
        lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection early
        first = next(line for line in lines if line)
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert engine.queue_depth == 1
    deadline = time.monotonic() + 30
    while (engine.queue_depth or metric(server, "jblip_requests_cancelled_total") < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.queue_depth == 0 and metric(server, "jblip_queue_depth") == 0
    assert metric(server, "jblip_requests_cancelled_total") == 1
    engine.release.set()
    blocker.join(60)
    assert metric(server, "jblip_active_slots") == 0


# ----------------------------------------------------------------------------- the command

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_shuts_down_on_sigterm(tmp_path):
    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JBLIP_CACHE_DIR=str(tmp_path / "xla"), PYTHONPATH=root)
    proc = subprocess.Popen([sys.executable, "-m", "jblip.cli", "serve", "--port", str(port), "--max-batch", "2",
                             "--shutdown-timeout", "20"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(ask, client, "What colour is the circle?", "red_circle.png", max_tokens=5)
            deadline = time.monotonic() + 60
            while sum(httpx.get(url + "/health").json()[k] for k in ("queue_depth", "active_slots")) == 0:
                assert time.monotonic() < deadline and not pending.done()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)  # the open request still gets its answer
            assert pending.result().choices[0].message.content == "red"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "Shutting down" in log and "model 'demo'" in log


def test_new_sampling_knobs_never_recompile(server, client, model):
    def sample(temperature, top_p, max_tokens, seed):
        return ask(client, "What colour is the background?", "green_triangle.png", temperature=temperature,
                   top_p=top_p, max_tokens=max_tokens, seed=seed)

    engine = server.server.config.app.state.engine
    assert isinstance(engine, SlotEngine)  # continuous batching by default
    sample(0.5, 0.9, 12, 0)  # warm-up: the admission program at this prompt bucket, the step
    compiled, slot_programs = model._generate_jit._cache_size(), engine.program.compiled
    for temperature, top_p, max_tokens, seed in [(0.7, 0.8, 9, 1), (1.3, 1.0, 16, 2), (0.2, 0.5, 3, 3)]:
        reply = sample(temperature, top_p, max_tokens, seed)
        assert reply.usage.completion_tokens <= max_tokens
        assert reply.choices[0].message.content == model.generate_text(
            example("green_triangle.png"), "What colour is the background?", do_sample=True,
            temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed, all_processors=True)[0]
    greedy = ask(client, "What colour is the background?", "green_triangle.png", max_tokens=7)
    assert greedy.choices[0].message.content == "grey"
    assert model._generate_jit._cache_size() == compiled + 1  # the one generate_text batch shape, once
    assert engine.program.compiled == slot_programs
