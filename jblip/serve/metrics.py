"""Prometheus metrics of one server (its own registry, so several servers can live in one
process, e.g. in tests). Served as text at GET /metrics."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: they only double the text

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("jblip_requests", "Finished HTTP requests to the completion endpoints",
                                ["endpoint", "status"], registry=r)
        self.cancelled = Counter("jblip_requests_cancelled", "Requests dropped because the client went away",
                                 registry=r)
        self.prompt_tokens = Counter("jblip_prompt_tokens", "Prompt tokens (image positions included)", registry=r)
        self.generated_tokens = Counter("jblip_generated_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("jblip_time_to_first_token_seconds", "From admission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("jblip_time_per_output_token_seconds",
                                   "Mean time per generated token after the first, per request",
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("jblip_request_latency_seconds", "From admission to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        queue = Gauge("jblip_queue_depth", "Requests waiting for the engine", registry=r)
        queue.set_function(lambda: engine.queue_depth)
        active = Gauge("jblip_active_slots", "Answers being decoded now", registry=r)
        active.set_function(lambda: engine.active_slots)

    def text(self) -> bytes:
        return generate_latest(self.registry)
