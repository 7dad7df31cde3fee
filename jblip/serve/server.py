"""Build and run a server: model -> engine -> FastAPI app -> uvicorn.

uvicorn handles SIGTERM/SIGINT: it stops accepting connections, waits up to
`shutdown_timeout` seconds for open ones, then the app's lifespan shuts the engine down
(waiting requests are answered with 503, the loop thread stops).
"""
from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time

import uvicorn
from PIL import Image

from jblip import families
from jblip.serve.app import create_app
from jblip.serve.batch_engine import BatchingEngine
from jblip.serve.prepare import RequestBuilder, ServerSettings
from jblip.serve.protocol import ChatCompletionRequest
from jblip.serve.slot_engine import SlotEngine
from jblip.serve.search import search_router
from jblip.serve.slot_program import DecoderSlots

ENGINES = ("continuous", "static")


def build_engine(model, settings: ServerSettings, pad_id: int = 0):
    """settings.engine "continuous": a `SlotEngine` over `DecoderSlots` for what it can decode
    (greedy and sampled answers of a decoder-only LM that fit a slot), with a `BatchingEngine`
    for the rest (beam search, Flan-T5, answers longer than a slot); "static": the
    `BatchingEngine` alone."""
    if settings.engine not in ENGINES:
        raise ValueError(f"unknown engine {settings.engine!r}; choose one of {', '.join(ENGINES)}")
    static = BatchingEngine(model, settings.max_batch, settings.max_queue, pad_id)
    if settings.engine == "static" or families.family(model.config).encoder_decoder:
        return static
    program = DecoderSlots(model, settings.slots or settings.max_batch, settings.slot_length, pad_id=pad_id)
    return SlotEngine(program, settings.max_queue, fallback=static, eos_token_ids=program.eos_token_ids)


def warm_up(engine, builder: RequestBuilder):
    """Compile the continuous engine's admission (one-word prompts' bucket, every batch size) and
    its step now rather than on the first requests."""
    program = getattr(engine, "program", None)
    if program is None or not hasattr(program, "warm_up"):
        return
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    body = ChatCompletionRequest(model=builder.settings.model_name, max_tokens=1,
                                 messages=[{"role": "user", "content": "a"}])
    program.warm_up(builder.build(body, "a", url, lambda event: None))


def build_app(model, processor, settings: ServerSettings, engine=None, search=None):
    """The ASGI app for a loaded model and its processor (engine: `build_engine`'s by default);
    `search`: an `IndexSearch` for the text -> image search endpoints (`jblip.serve.search`)."""
    pad = processor.tokenizer.special_id("pad_token")
    pad = pad if pad is not None else max(getattr(model.config.text, "pad_token_id", 0), 0)
    engine = engine or build_engine(model, settings, pad)
    builder = RequestBuilder(model, processor, settings)
    if settings.warm_up:
        warm_up(engine, builder)
    app = create_app(engine, builder, settings)
    app.include_router(search_router(search))
    return app


def default_model_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or "jblip"


def run(app, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0, log_level: str = "info"):
    """Serve until SIGTERM / SIGINT (blocks), then return once shut down gracefully."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(shutdown_timeout))
    # uvicorn raises the signal again after its graceful shutdown, for the handler that was
    # there before it; make that one a no-op so a planned stop exits with status 0
    before = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """uvicorn in a thread (tests, notebooks): `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 120.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="jblip-http", daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
