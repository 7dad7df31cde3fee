"""Serving throughput and latency: `jblip serve` with N concurrent clients, continuous batching
against static batching and against sequential `generate_text`, in one run.

    python benchmarks/serve.py [--models demo,94m] [--clients 1,4,16,64] [--slots 16] [--slot-length 128]

Models: `demo` (the bundled demo model) and `94m` (benchmarks/generate.py's ~100M-parameter
InstructBLIP-Vicuna-shaped model with random weights: 224 px ViT, 32 queries, LLaMA 8 x 512,
vocabulary 32001; saved with a word-level tokenizer of 32000 words, so that the server can
run it), or a checkpoint directory.

Workload: the example images and questions (examples/README.md) with mixed answer lengths
(min_tokens = max_tokens = 2, 8 or 32 in turn, so every answer has exactly that many tokens).
Each client sends its next request as soon as its last answer has streamed in; N clients send
max(16, 3N) requests in all. Per setting: requests/s, generated tokens/s, p50/p95 time to first
token (first streamed text) and end-to-end latency. Both servers run at once, each in its own
process (`--engine static` and `--engine continuous`, `--max-batch` = `--slots`), started with
`--warm-up`, and get each distinct request once before timing, so compilation is excluded; per
client count, sequential, static and continuous are timed back to back.
Static batching: a batch holds requests of one decoding program and ends with its longest
answer; continuous batching: a finished answer's slot takes the next request at once.

Then the costs that bound the speed-up, measured in this process: a decode step of
`generate` at batch 1 and at batch `--slots`, a step of the slots with all of them busy (per
token of each), and an admission (vision + Q-Former + prefill) of 1 and of 4 requests.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LENGTHS = (2, 8, 32)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def example_rows():
    """(image path, question) rows of the table in examples/README.md."""
    rows = []
    with open(os.path.join(ROOT, "examples", "README.md")) as f:
        for line in f:
            m = re.match(r"^\|\s*`?([\w.-]+\.png)`?\s*\|\s*(.+?)\s*\|\s*`?(\w+)`?\s*\|\s*$", line)
            if m:
                rows.append((os.path.join(ROOT, "examples", m.group(1)), m.group(2)))
    return rows


def workload(n: int, lengths=LENGTHS):
    rows = example_rows()
    return [rows[i % len(rows)] + (lengths[i % len(lengths)],) for i in range(n)]


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def build_94m(path: str) -> str:
    """benchmarks/generate.py's model (random weights), with tokenizers for the server."""
    from benchmarks.generate import FULL, build_hf_model
    from jblip.train.synthetic import vocabulary, write_tokenizers
    build_hf_model(path, FULL)
    words = 32000 - len(vocabulary())  # ids 0..31999 are words; 32000 is the <image> placeholder
    write_tokenizers(path, tuple(f"w{i}" for i in range(words)))
    return path


# ----------------------------------------------------------------------------- clients

def one_request(client, model_name, job):
    """(ttft, latency, generated tokens) of one streamed request."""
    image, question, length = job
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model_name, stream=True, stream_options={"include_usage": True}, max_tokens=length,
        messages=[{"role": "user", "content": [{"type": "text", "text": question},
                                               {"type": "image_url", "image_url": {"url": data_url(image)}}]}],
        extra_body={"min_tokens": length})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def run_clients(client, model_name, jobs, clients: int):
    lock = threading.Lock()
    todo = list(jobs)
    results = []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                job = todo.pop(0)
            results.append(one_request(client, model_name, job))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    return time.perf_counter() - start, results


def report(name, wall, results):
    ttft = [r[0] for r in results]
    latency = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    line = (f"{name:<30} requests/s={len(results) / wall:7.2f}  tokens/s={tokens / wall:8.1f}  "
            f"ttft p50={statistics.median(ttft) * 1e3:7.1f} ms p95={percentile(ttft, 0.95) * 1e3:7.1f} ms  "
            f"latency p50={statistics.median(latency) * 1e3:7.1f} ms p95={percentile(latency, 0.95) * 1e3:7.1f} ms")
    print(line, flush=True)
    return dict(requests_per_s=len(results) / wall, tokens_per_s=tokens / wall)


def sequential(model, jobs):
    results = []
    start = time.perf_counter()
    for image, question, length in jobs:
        t = time.perf_counter()
        model.generate_text(image, question, max_new_tokens=length, min_new_tokens=length)
        d = time.perf_counter() - t
        results.append((d, d, length))
    return time.perf_counter() - start, results


@contextlib.contextmanager
def served(path: str, engine: str, slots: int, columns: int, max_queue: int):
    """`jblip serve` in its own process (so that the clients' threads do not share its GIL)."""
    import httpx2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "jblip.cli", "serve", "--model", path, "--port", str(port),
               "--served-model-name", "bench", "--engine", engine, "--max-batch", str(slots),
               "--slot-length", str(columns), "--max-queue", str(max_queue), "--warm-up"]
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx2.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                if proc.poll() is not None:
                    raise RuntimeError("jblip serve exited") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


# ----------------------------------------------------------------------------- main

def costs(model, path: str, slots: int, columns: int, repeats: int = 5):
    """Seconds: generate's decode step at batch 1 and at batch `slots`, a slot step per token with
    every slot busy, and admissions of 1 and 4 requests."""
    import jax

    from jblip.processing import Processor
    from jblip.serve.prepare import RequestBuilder, ServerSettings
    from jblip.serve.protocol import ChatCompletionRequest
    from jblip.serve.slot_program import DecoderSlots

    image, question = example_rows()[0]

    def decode_step(batch):
        inputs = model._jblip_processor([image] * batch, question)

        def generate(new):
            t = time.perf_counter()
            jax.block_until_ready(model.generate(**inputs, max_new_tokens=new, min_new_tokens=new).tokens)
            return time.perf_counter() - t
        generate(1), generate(33)
        return (statistics.median(generate(33) for _ in range(repeats))
                - statistics.median(generate(1) for _ in range(repeats))) / 32
    decode_1, decode_n = decode_step(1), decode_step(slots)
    builder = RequestBuilder(model, Processor.from_pretrained(path), ServerSettings("bench"))
    body = ChatCompletionRequest(model="bench", max_tokens=32, min_tokens=32,
                                 messages=[{"role": "user", "content": "a"}])
    request = builder.build(body, question, data_url(image), lambda event: None)
    program = DecoderSlots(model, slots, columns)

    def admit(rows):
        program.free(list(range(slots)))
        t = time.perf_counter()
        program.admit([[i] for i in range(rows)], [request] * rows)
        jax.block_until_ready(program._state.logits)
        return time.perf_counter() - t
    admit(1), admit(4), admit(slots)
    program.step()

    def step():
        t = time.perf_counter()
        program.step()
        return (time.perf_counter() - t) / program.steps
    return dict(decode_1=decode_1, decode_n=decode_n, slot_step=statistics.median(step() for _ in range(repeats)),
                admit_1=statistics.median(admit(1) for _ in range(repeats)),
                admit_4=statistics.median(admit(4) for _ in range(repeats)))


def bench_model(path: str, label: str, clients: list[int], slots: int, columns: int, lengths=LENGTHS):
    """Both servers run side by side (an idle one costs nothing); for each client count the
    sequential baseline, static and continuous batching are timed back to back, so that the
    load of a shared machine drifts as little as possible between the three."""
    import openai

    import jblip
    from jblip.processing import Processor

    model = jblip.load_pretrained(path)
    model._jblip_processor = Processor.from_pretrained(path)
    distinct = list(dict.fromkeys(workload(48, lengths)))
    print(f"== {label}: answers of {'/'.join(map(str, lengths))} tokens, {slots} slots of {columns} columns",
          flush=True)
    for image, question, length in distinct:  # warm-up: compile every shape
        model.generate_text(image, question, max_new_tokens=length, min_new_tokens=length)
    cost = costs(model, path, slots, columns)
    most = max(16, 3 * max(clients))
    with served(path, "static", slots, columns, 4 * most) as static_url, \
            served(path, "continuous", slots, columns, 4 * most) as continuous_url:
        urls = dict(static=static_url, continuous=continuous_url)
        client = {k: openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=600)
                  for k, u in urls.items()}
        for engine in urls:
            for job in distinct:
                one_request(client[engine], "bench", job)
        for n in clients:
            base = report("sequential generate_text", *sequential(model, workload(48, lengths)))
            jobs = workload(max(16, 3 * n), lengths)
            got = {engine: report(f"{engine}, {n:>2} clients", *run_clients(client[engine], "bench", jobs, n))
                   for engine in urls}
            c, st, b = got["continuous"]["tokens_per_s"], got["static"]["tokens_per_s"], base["tokens_per_s"]
            print(f"   -> {n} clients, generated tokens/s: continuous x{c / b:.2f} sequential and x{c / st:.2f} "
                  f"static; static x{st / b:.2f} sequential", flush=True)
    print(f"costs: generate's decode step {cost['decode_1'] * 1e3:.1f} ms at batch 1, "
          f"{cost['decode_n'] * 1e3:.1f} ms at batch {slots}; a step of {slots} busy slots "
          f"{cost['slot_step'] * 1e3:.1f} ms per token of each "
          f"({slots / cost['slot_step']:.0f} tokens/s); admission of 1 request {cost['admit_1'] * 1e3:.0f} ms, "
          f"of 4 {cost['admit_4'] * 1e3:.0f} ms", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,94m", help="demo, 94m and/or checkpoint directories")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--slots", type=int, default=16, help="continuous slots = static --max-batch")
    parser.add_argument("--slot-length", type=int, default=128, help="KV-cache columns per slot")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="answer lengths, in turn")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    lengths = tuple(int(n) for n in args.lengths.split(","))

    from jblip.pipeline import DEFAULT_MODEL
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = DEFAULT_MODEL if name == "demo" else build_94m(tmp) if name == "94m" else name
            bench_model(path, name, clients, args.slots, args.slot_length, lengths)


if __name__ == "__main__":
    main()
