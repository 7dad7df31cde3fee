"""`GET /limits`: the bounds a client (the playground page) should keep its requests within.

Read from the same places the server enforces them: the request models' field bounds
(`jblip.serve.protocol`), the server settings and the model's positions.
"""
from __future__ import annotations

from annotated_types import Ge, Le

from jblip.serve.errors import APIError
from jblip.serve.prepare import RequestBuilder
from jblip.serve.protocol import DecodingFields

SHORT_QUESTION = "a"  # max_tokens is reported for a one-word question; longer prompts leave less room


def _bounds(name: str) -> tuple[float | None, float | None]:
    low = high = None
    for rule in DecodingFields.model_fields[name].metadata:
        if isinstance(rule, Ge):
            low = rule.ge
        elif isinstance(rule, Le):
            high = rule.le
    return low, high


def client_limits(builder: RequestBuilder) -> dict:
    settings = builder.settings
    try:
        used = builder.positions_used(builder.text_inputs(SHORT_QUESTION))
    except APIError:  # a --max-prompt-tokens below one word: every prompt is refused anyway
        used = 0
    room = max(builder.room(used), 1)
    t_low, t_high = _bounds("temperature")
    return dict(
        model=settings.model_name,
        max_tokens=room,
        default_max_tokens=builder.default_max_tokens(room),
        max_positions=builder.positions,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_beams=_bounds("num_beams")[1],
        temperature=dict(min=t_low, max=t_high),
        max_image_bytes=settings.images.max_bytes,
        max_image_pixels=settings.images.max_pixels,
    )
