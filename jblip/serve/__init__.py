"""`jblip serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for one model.

    from jblip.serve import ServerSettings, build_app, run
    app = build_app(model, processor, ServerSettings(model_name="demo"))
    run(app, port=8000)

Layout: `protocol` (request bodies), `prepare` (body -> engine request, limits),
`images` (image URLs, size limits), `options` (OpenAI options -> decoding settings),
`engine` (the engine interface), `slot_engine` (continuous batching: the scheduler over decode
slots) and `slot_program` (its device side for decoder-only LMs), `batch_engine` (static
batching through `generate`: beam search, Flan-T5, answers longer than a slot),
`text_stream` (incremental text with stop strings), `metrics` (Prometheus), `app`
(endpoints), `server` (uvicorn, in the foreground or a background thread), `limits` (GET
/limits), `playground` (the browser page at GET /, its files in `static/`), `search` (text ->
image search over a `jblip index` index, with `--index`).
"""
from jblip.serve.prepare import ServerSettings
from jblip.serve.server import BackgroundServer, build_app, run

__all__ = ["BackgroundServer", "ServerSettings", "build_app", "run"]
