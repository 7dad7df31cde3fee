"""Request and response bodies of the OpenAI-compatible endpoints (pydantic models).

Only the fields jblip can honour are modelled; other OpenAI fields a client may send
(`user`, `metadata`, ...) are ignored, and the few that would change the answer in a way
jblip cannot (tools, logprobs, penalties on frequency/presence) are refused in
`jblip.serve.options`. jblip's own decoding extras (`num_beams`, `repetition_penalty`,
`min_tokens`, `length_penalty`, `top_k`) come as extra body fields, as in vLLM.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Union[TextPart, ImagePart]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class DecodingFields(_Body):
    """Options shared by chat and text completions."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    # jblip extras
    num_beams: int | None = Field(None, ge=1, le=16)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    length_penalty: float | None = None
    top_k: int | None = Field(None, ge=0)


class ChatCompletionRequest(DecodingFields):
    messages: list[Message] = Field(min_length=1)
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(DecodingFields):
    """Text completion with jblip's extra `image` field (an image URL, as in chat's image_url)."""
    prompt: Union[str, list[str]]
    image: str | None = None
    echo: bool = False
    suffix: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
