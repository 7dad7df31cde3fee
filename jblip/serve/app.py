"""The FastAPI application: OpenAI-compatible endpoints over an `Engine`.

POST /v1/chat/completions, POST /v1/completions (with jblip's extra `image` field),
GET /v1/models, GET /health, GET /metrics, GET /limits (the bounds of decoding options), and the
browser playground at GET / (`jblip.serve.playground`). Errors are OpenAI-style JSON
(`{"error": {...}}`); a failing request never stops the server.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jblip.serve.engine import Engine, EngineRequest, Failed, Finished, Tokens
from jblip.serve.errors import APIError
from jblip.serve.limits import client_limits
from jblip.serve.metrics import Metrics
from jblip.serve.playground import add_playground
from jblip.serve.prepare import RequestBuilder, ServerSettings, chat_prompt, completion_prompt
from jblip.serve.protocol import ChatCompletionRequest, CompletionRequest
from jblip.serve.text_stream import TextStream

COMPLETION_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
DISCONNECT_POLL_S = 0.5


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


@dataclass
class Answer:
    """The state of one of a request's n answers."""
    text: TextStream
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Run:
    """One submitted request seen from the HTTP side: its event queue and its answers."""
    request: EngineRequest
    queue: asyncio.Queue
    answers: list[Answer]
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return all(a.finish_reason is not None for a in self.answers)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    return f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid body"), where or None


class StatusCounter:
    """Counts responses of the completion endpoints by status. Plain ASGI (it only watches the
    response start), so streaming responses and client disconnects pass through untouched."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        endpoint = COMPLETION_PATHS.get(scope.get("path")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(endpoint, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)


def create_app(engine: Engine, builder: RequestBuilder, settings: ServerSettings) -> FastAPI:
    metrics = Metrics(engine)
    tokenizer = builder.processor.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.shutdown, settings.shutdown_timeout)

    app = FastAPI(title="jblip", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(APIError(message, 400, "invalid_request_error", param, "invalid_body"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(exc.detail), exc.status_code, kind))

    app.add_middleware(StatusCounter, counter=metrics.requests)

    def check_model(name: str):
        if name != settings.model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                           404, "invalid_request_error", "model", "model_not_found")

    async def submit(body, prompt: str, image_url: str) -> Run:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        emit = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)  # noqa: E731
        request = await run_in_threadpool(builder.build, body, prompt, image_url, emit)
        answers = [Answer(TextStream(tokenizer, request.decoding.stop)) for _ in range(request.decoding.n)]
        engine.submit(request)
        metrics.prompt_tokens.inc(request.prompt_tokens)
        return Run(request, queue, answers)

    def on_tokens(run: Run, event: Tokens) -> str:
        if run.first_token_at is None:
            run.first_token_at = time.perf_counter()
            metrics.ttft.observe(run.first_token_at - run.request.submitted)
        answer = run.answers[event.index]
        if answer.finish_reason is not None:
            return ""
        answer.tokens += len(event.ids)
        metrics.generated_tokens.inc(len(event.ids))
        delta = answer.text.add(event.ids)
        if answer.text.stopped:
            answer.finish_reason = "stop"
        return delta

    def on_finished(run: Run, event: Finished) -> str:
        answer = run.answers[event.index]
        if answer.finish_reason is None:
            answer.finish_reason = event.reason
        return answer.text.finish()

    def close(run: Run, completed: bool):
        if completed:
            end = time.perf_counter()
            metrics.latency.observe(end - run.request.submitted)
            tokens = sum(a.tokens for a in run.answers)
            if run.first_token_at is not None and tokens > len(run.answers):
                metrics.per_token.observe((end - run.first_token_at) / (tokens - len(run.answers)))
        else:
            metrics.cancelled.inc()
        engine.cancel(run.request.id)  # frees its slot at once when it ended early (stop string, client gone)

    async def next_event(run: Run, pending: collections.deque, request: Request | None):
        """The next engine event; consecutive token events of one answer that are already
        waiting come merged (when the engine is ahead of the client, fewer, larger chunks)."""
        while not pending:
            try:
                pending.append(await asyncio.wait_for(run.queue.get(), DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise ClientGone()
                continue
            while not run.queue.empty():
                pending.append(run.queue.get_nowait())
        event = pending.popleft()
        same_answer = lambda e: isinstance(e, Tokens) and e.index == event.index  # noqa: E731
        while isinstance(event, Tokens) and pending and same_answer(pending[0]):
            event = Tokens(event.index, event.ids + pending.popleft().ids)
        return event

    async def events(run: Run, request: Request | None):
        """(index, text delta, finish reason or None) until every answer has finished."""
        pending: collections.deque = collections.deque()
        while not run.done:
            event = await next_event(run, pending, request)
            if isinstance(event, Failed):
                raise APIError(event.message, event.status, "server_error")
            if isinstance(event, Tokens):
                delta = on_tokens(run, event)
                reason = run.answers[event.index].finish_reason
                if delta or reason:
                    yield event.index, delta, reason
            elif isinstance(event, Finished):
                was_open = run.answers[event.index].finish_reason is None
                delta = on_finished(run, event)
                if delta or was_open:
                    yield event.index, delta, run.answers[event.index].finish_reason if was_open else None

    def usage(run: Run) -> dict:
        generated = sum(a.tokens for a in run.answers)
        return dict(prompt_tokens=run.request.prompt_tokens, completion_tokens=generated,
                    total_tokens=run.request.prompt_tokens + generated)

    async def complete(run: Run, request: Request, chat: bool) -> dict:
        completed = False
        try:
            async for _ in events(run, request):
                pass
            completed = True
        finally:
            close(run, completed)
        if chat:
            choices = [dict(index=i, message=dict(role="assistant", content=a.text.text), finish_reason=a.finish_reason,
                            logprobs=None) for i, a in enumerate(run.answers)]
            kind, prefix = "chat.completion", "chatcmpl-"
        else:
            choices = [dict(index=i, text=a.text.text, finish_reason=a.finish_reason, logprobs=None)
                       for i, a in enumerate(run.answers)]
            kind, prefix = "text_completion", "cmpl-"
        return dict(id=prefix + run.request.id, object=kind, created=run.created, model=settings.model_name,
                    choices=choices, usage=usage(run))

    def sse(data: dict | str) -> str:
        return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream(run: Run, chat: bool, include_usage: bool):
        kind, prefix = ("chat.completion.chunk", "chatcmpl-") if chat else ("text_completion", "cmpl-")
        head = dict(id=prefix + run.request.id, object=kind, created=run.created, model=settings.model_name)

        def chunk(index, delta, reason, first=False):
            if chat:
                body = dict(role="assistant", content=delta) if first else ({"content": delta} if delta else {})
                choice = dict(index=index, delta=body, finish_reason=reason, logprobs=None)
            else:
                choice = dict(index=index, text=delta, finish_reason=reason, logprobs=None)
            return sse({**head, "choices": [choice]})

        completed = False
        try:
            if chat:
                for i in range(len(run.answers)):
                    yield chunk(i, "", None, first=True)
            async for index, delta, reason in events(run, None):
                if delta:
                    yield chunk(index, delta, None)
                if reason is not None:
                    yield chunk(index, "", reason)
            completed = True
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(run)})
        except APIError as e:
            yield sse(e.body())
        finally:
            close(run, completed)
        yield sse("[DONE]")

    async def respond(body, request: Request, prompt: str, image_url: str, chat: bool):
        run = await submit(body, prompt, image_url)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(run, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await complete(run, request, chat))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        prompt, image_url = chat_prompt(body)
        return await respond(body, request, prompt, image_url, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt, image_url = completion_prompt(body)
        return await respond(body, request, prompt, image_url, chat=False)

    @app.get("/v1/models")
    async def models():
        return dict(object="list", data=[dict(id=settings.model_name, object="model", created=0,
                                              owned_by="jblip")])

    @app.get("/health")
    async def health():
        return dict(status="ok", queue_depth=engine.queue_depth, active_slots=engine.active_slots)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    limits = client_limits(builder)

    @app.get("/limits")
    async def decoding_limits():
        return limits

    add_playground(app)

    return app
