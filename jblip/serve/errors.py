"""Errors the server answers with, in OpenAI's JSON shape:
`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status."""
from __future__ import annotations


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP status it is answered with."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, "invalid_request_error", param, code)


def too_large(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 413, "invalid_request_error", param, code)


class QueueFull(APIError):
    """Every queue place is taken: the client should retry later (429)."""

    def __init__(self, limit: int):
        super().__init__(f"the server's queue is full ({limit} requests waiting); retry later",
                         429, "rate_limit_error", None, "queue_full")


class ShuttingDown(APIError):
    def __init__(self):
        super().__init__("the server is shutting down and admits no new requests", 503, "server_error",
                         None, "shutting_down")
