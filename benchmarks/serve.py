"""Serving throughput and latency: the demo model behind `jblip serve`, N concurrent clients.

    python benchmarks/serve.py [--clients 1,4,16] [--requests 48] [--max-batch 8] [--model DIR]

Workload: the example images and questions (examples/README.md) with mixed answer lengths
(min_tokens = max_tokens = 2, 8 or 24, so every answer has exactly that many tokens). Each
client sends its next request as soon as its last answer has streamed in. Compared in the
same run with sequential `generate_text` calls (one request at a time, no server).

Per setting: requests/s, generated tokens/s, p50/p95 time to first token (first streamed
text) and end-to-end latency. Compilation is excluded: every request shape is sent once
before timing. The engine is `jblip.serve.batch_engine.BatchingEngine` (static batching:
a batch holds requests of one decoding program, knobs per row, and ends with its longest answer).
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
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LENGTHS = (2, 8, 24)


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


def workload(n: int):
    rows = example_rows()
    jobs = []
    for i in range(n):
        image, question = rows[i % len(rows)]
        jobs.append((image, question, LENGTHS[i % len(LENGTHS)]))
    return jobs


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


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
    wall = time.perf_counter() - start
    return wall, results


def report(name, wall, results):
    ttft = [r[0] for r in results]
    latency = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    line = (f"{name:<28} requests/s={len(results) / wall:7.2f}  tokens/s={tokens / wall:8.1f}  "
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
def served(path: str, max_batch: int, max_queue: int):
    """`jblip serve` in its own process (so that the clients' threads do not share its GIL)."""
    import httpx2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "jblip.cli", "serve", "--model", path, "--port", str(port),
               "--served-model-name", "bench", "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args(argv)

    import openai

    import jblip
    from jblip.pipeline import resolve_model
    from jblip.processing import Processor
    from jblip.pretrained import resolve_path

    path = resolve_path(resolve_model(args.model))
    model = jblip.load_pretrained(path)
    processor = Processor.from_pretrained(path)
    model._jblip_processor = processor
    jobs = workload(args.requests)
    distinct = list(dict.fromkeys(jobs))

    for image, question, length in distinct:  # warm-up: compile every shape
        model.generate_text(image, question, max_new_tokens=length, min_new_tokens=length)
    base = report("sequential generate_text", *sequential(model, jobs))

    with served(path, args.max_batch, 4 * args.requests) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        t = time.perf_counter()
        for job in distinct:
            one_request(client, "bench", job)
        print(f"(server warm-up, compiles included: {time.perf_counter() - t:.1f} s)", flush=True)
        for clients in (int(c) for c in args.clients.split(",")):
            got = report(f"server static, {clients:>2} clients", *run_clients(client, "bench", jobs, clients))
            print(f"{'':<28} throughput vs sequential: requests x{got['requests_per_s'] / base['requests_per_s']:.2f}"
                  f", tokens x{got['tokens_per_s'] / base['tokens_per_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
