"""OpenAI request options -> jblip decoding settings (`SamplerConfig`, seed, stop strings).

Mapping (names as in OpenAI's API; the extras as vLLM accepts them):

| request field | jblip |
|---|---|
| `max_completion_tokens` / `max_tokens` | `max_new_tokens` (default: the server's --default-max-tokens, cut to the positions left) |
| `temperature` | absent or 0: greedy (the model's default, as `jblip generate`); > 0: sampling at that temperature |
| `top_p`, `top_k` | nucleus / top-k filtering when sampling |
| `n` | `num_return_sequences` (sampling or beam search; greedy would repeat one answer, so n > 1 needs one of them) |
| `seed` | the sampling seed (absent: a fresh random one per request) |
| `stop` | up to 4 strings; the answer ends before the first one (finish_reason "stop") |
| `num_beams` (extra) | beam search with this many beams |
| `repetition_penalty`, `length_penalty`, `min_tokens` (extras) | HF's processors of the same names |
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from jblip.sampling import SamplerConfig
from jblip.serve.errors import invalid
from jblip.serve.protocol import DecodingFields

MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class Decoding:
    sampler: SamplerConfig
    seed: int
    seeded: bool             # the client chose the seed (answers must then be reproducible)
    stop: tuple[str, ...]
    n: int


def _refuse_unsupported(body: DecodingFields):
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise invalid(f"{name} is not supported by jblip; use the extra field repetition_penalty", name,
                          "unsupported_parameter")
    if body.logprobs:
        raise invalid("logprobs are not supported by jblip", "logprobs", "unsupported_parameter")
    if getattr(body, "tools", None):
        raise invalid("tools are not supported by jblip's models", "tools", "unsupported_parameter")
    fmt = getattr(body, "response_format", None)
    if fmt and fmt.get("type", "text") != "text":
        raise invalid("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")


def _stop_strings(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise invalid("stop strings must not be empty", "stop")
    return stops


def decoding_for(body: DecodingFields, base: SamplerConfig, max_new_tokens: int) -> Decoding:
    """Decoding settings for a request whose `max_new_tokens` the caller has already checked.
    `base` holds the model's EOS/pad ids (and its default strategy, greedy)."""
    _refuse_unsupported(body)
    beams = body.num_beams or 1
    sample = body.temperature is not None and body.temperature > 0
    if sample and beams > 1:
        raise invalid("beam search with sampling is not supported: use temperature 0 (or omit it) with num_beams",
                      "num_beams")
    if body.n > 1 and not sample and beams < body.n:
        raise invalid(f"n={body.n} needs sampling (temperature > 0) or num_beams >= n; greedy decoding has "
                      "one answer", "n")
    options = dict(max_new_tokens=max_new_tokens, num_return_sequences=body.n, num_beams=beams,
                   top_k=0, top_p=1.0, temperature=1.0)
    if sample:
        options.update(strategy="sample", temperature=body.temperature)
        if body.top_p is not None:
            options["top_p"] = body.top_p
        if body.top_k:
            options["top_k"] = body.top_k
    else:
        options["strategy"] = "beam" if beams > 1 else "greedy"
    if body.repetition_penalty is not None:
        options["repetition_penalty"] = body.repetition_penalty
    if body.length_penalty is not None:
        options["length_penalty"] = body.length_penalty
    if body.min_tokens is not None:
        if body.min_tokens > max_new_tokens:
            raise invalid(f"min_tokens {body.min_tokens} exceeds max_tokens {max_new_tokens}", "min_tokens")
        options["min_new_tokens"] = body.min_tokens
    try:
        sampler = base.replace(**options)
    except ValueError as e:
        raise invalid(str(e)) from None
    seeded = body.seed is not None
    seed = body.seed if seeded else secrets.randbits(31)
    return Decoding(sampler, seed % (1 << 31), seeded, _stop_strings(body.stop), body.n)


def requested_max_tokens(body: DecodingFields) -> int | None:
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
