"""Build and run a server: model -> engine -> FastAPI app -> uvicorn.

uvicorn handles SIGTERM/SIGINT: it stops accepting connections, waits up to
`shutdown_timeout` seconds for open ones, then the app's lifespan shuts the engine down
(waiting requests are answered with 503, the loop thread stops).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import uvicorn

from jblip.serve.app import create_app
from jblip.serve.batch_engine import BatchingEngine
from jblip.serve.prepare import RequestBuilder, ServerSettings
from jblip.serve.search import search_router


def build_app(model, processor, settings: ServerSettings, engine=None, search=None):
    """The ASGI app for a loaded model and its processor (engine: `BatchingEngine` by default);
    `search`: an `IndexSearch` for the text -> image search endpoints (`jblip.serve.search`)."""
    pad = processor.tokenizer.special_id("pad_token")
    pad = pad if pad is not None else max(getattr(model.config.text, "pad_token_id", 0), 0)
    engine = engine or BatchingEngine(model, settings.max_batch, settings.max_queue, pad)
    app = create_app(engine, RequestBuilder(model, processor, settings), settings)
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
