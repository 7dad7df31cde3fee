"""Text -> image search over an index of `jblip index`, for `jblip serve --index INDEX_DIR`.

    GET  /v1/search/index          {"loaded": false} or the index's size, model and the bounds below
    POST /v1/search                {"query": "blue square", "top_k": 8} -> hits, best first:
                                   {"rank", "id", "score" (ITC, as `jblip search`), "name", "url"}
    GET  /v1/search/images/{id}    the indexed image itself, with its format's content type

An image is named by its row in the index (`id`), never by a path: the only files this router
reads are the ones the index lists. A search runs in a worker thread (`IndexSearch` is
thread-safe); the index is read once at start, so images indexed later need a restart.
"""
from __future__ import annotations

import io
import os
import re

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from jblip.serve.errors import APIError, invalid

DEFAULT_TOP_K, MAX_TOP_K = 8, 100
MAX_QUERY_CHARS = 1000
ROW = re.compile(r"(0|[1-9][0-9]{0,17})")  # a row number as the search answers it; nothing else


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt "top_k" is an error, not silently the default
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, query: str) -> str:
        if not query.strip():
            raise PydanticCustomError("blank", "the query is blank")  # no "Value error, " before it
        return query


def no_index() -> APIError:
    return APIError("this server has no search index: start it with `jblip serve --index INDEX_DIR` "
                    "(an index built by `jblip index`)", 404, "not_found_error", None, "no_index")


def _read_image(path: str, image_id: str) -> tuple[bytes, str]:
    """The file's bytes and the content type of the format they are in (not of the file's name)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            kind = Image.MIME.get(image.format or "")
    except (OSError, UnidentifiedImageError):
        kind = None
    if kind is None or not kind.startswith("image/"):
        raise APIError(f"the image of id {image_id} is no longer readable on the server", 404, "not_found_error",
                       "id", "image_gone")
    return data, kind


def search_router(search=None) -> APIRouter:
    """The search endpoints over `search` (a `jblip.retrieval.index_search.IndexSearch`); with
    None they answer 404 `no_index` (and `GET /v1/search/index` says `loaded: false`)."""
    router = APIRouter()
    max_tokens = search.engine.max_text_length if search is not None else None

    @router.get("/v1/search/index")
    async def index_info():
        if search is None:
            return dict(loaded=False)
        return dict(loaded=True, images=len(search), model=os.path.basename(os.path.normpath(search.engine.path or "")),
                    top_k=dict(default=DEFAULT_TOP_K, max=min(MAX_TOP_K, len(search))),
                    max_query_tokens=max_tokens, max_query_chars=MAX_QUERY_CHARS)

    def ranked(body: SearchRequest) -> list[tuple[int, float]]:
        tokens = search.query_tokens(body.query)
        if tokens > max_tokens:
            raise invalid(f"query: the query is {tokens} tokens long; the retrieval model reads at most {max_tokens} "
                          "(with [CLS] and [SEP])", "query", "query_too_long")
        return search.top(body.query, body.top_k)

    @router.post("/v1/search")
    async def run_search(body: SearchRequest, request: Request):
        if search is None:
            raise no_index()
        hits = await run_in_threadpool(ranked, body)
        data = [dict(rank=rank, id=str(row), score=score, name=os.path.basename(search.paths[row]),
                     url=request.url_for("search_image", image_id=str(row)).path)
                for rank, (row, score) in enumerate(hits, 1)]
        return dict(object="list", query=body.query, images=len(search), data=data)

    @router.get("/v1/search/images/{image_id}", name="search_image")
    async def image(image_id: str):
        if search is None:
            raise no_index()
        if not ROW.fullmatch(image_id) or int(image_id) >= len(search):
            raise APIError(f"no image with id {image_id[:64]!r} in the index", 404, "not_found_error", "id",
                           "image_not_found")
        data, kind = await run_in_threadpool(_read_image, search.paths[int(image_id)], image_id)
        return Response(data, media_type=kind, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    return router
