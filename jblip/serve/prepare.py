"""A validated request body -> an `EngineRequest`: prompt and image from the messages, the
model inputs, the server's limits on prompt length and max_tokens, decoding settings."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from jblip.processing import PromptError
from jblip.serve.engine import EngineRequest
from jblip.serve.errors import invalid
from jblip.serve.images import ImageLimits, read_image_url
from jblip.serve.options import decoding_for, requested_max_tokens
from jblip.serve.protocol import ChatCompletionRequest, CompletionRequest, DecodingFields, ImagePart, TextPart


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    max_batch: int = 8
    max_queue: int = 64
    engine: str = "continuous"          # "continuous" (slots; beam search and T5 batched statically) or "static"
    slots: int | None = None            # continuous batching's decode slots (default: max_batch)
    slot_length: int = 256              # cache columns per slot: bucketed prompt + max_tokens (longer: static)
    warm_up: bool = False               # compile the continuous engine's programs before serving
    max_prompt_tokens: int = 128        # LAVIS' max_txt_len; longer prompts are refused, not cut
    default_max_tokens: int = 64        # when a request names no max_tokens (less if the prompt leaves less room)
    max_tokens_limit: int = 1024        # the most any request may ask for
    images: ImageLimits = field(default_factory=ImageLimits)
    shutdown_timeout: float = 30.0


def chat_prompt(body: ChatCompletionRequest) -> tuple[str, str]:
    """(prompt, image URL): the text parts of every message joined by newlines, and the one image.
    InstructBLIP and BLIP-2 have no chat template: the prompt is the question itself."""
    texts, images = [], []
    for m in body.messages:
        if isinstance(m.content, str):
            texts.append(m.content)
            continue
        for part in m.content or ():
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                if m.role != "user":
                    raise invalid("images may only be sent in user messages", "messages")
                images.append(part.image_url.url)
    if not images:
        raise invalid("the messages hold no image: add one {'type': 'image_url', 'image_url': {'url': "
                      "'data:image/png;base64,...'}} part to the user message", "messages", "image_missing")
    if len(images) > 1:
        raise invalid(f"the messages hold {len(images)} images; this model answers about exactly one",
                      "messages", "too_many_images")
    return "\n".join(texts), images[0]


def completion_prompt(body: CompletionRequest) -> tuple[str, str]:
    if not isinstance(body.prompt, str):
        if len(body.prompt) != 1:
            raise invalid("send one prompt per request (a list of several is not supported)", "prompt")
        body_prompt = body.prompt[0]
    else:
        body_prompt = body.prompt
    if body.image is None:
        raise invalid("text completions need jblip's extra field 'image' (a data:image/...;base64 URL)",
                      "image", "image_missing")
    if body.echo or body.suffix:
        raise invalid("echo and suffix are not supported", "echo" if body.echo else "suffix")
    return body_prompt, body.image


class RequestBuilder:
    def __init__(self, model, processor, settings: ServerSettings):
        self.model, self.processor, self.settings = model, processor, settings
        config = model.config
        self.positions = getattr(config.text, "max_position_embeddings", None) if config.family != "t5" else None
        self.prepends_queries = config.image_token_index is None
        self.base_sampler = model.default_sampler()

    def text_inputs(self, prompt: str) -> dict:
        if self.model.config.model_type == "instructblip" and not prompt.strip():
            raise invalid("the prompt is empty; InstructBLIP needs a question or instruction", "messages",
                          "empty_prompt")
        try:
            return self.processor.text_inputs(prompt, 1, self.settings.max_prompt_tokens, truncation=False)
        except PromptError as e:
            raise invalid(str(e), "messages", "prompt_too_long") from None

    def room(self, used: int) -> int:
        """The most new tokens a prompt taking `used` positions may ask for."""
        room = self.settings.max_tokens_limit
        return room if self.positions is None else min(room, self.positions - used)

    def default_max_tokens(self, room: int) -> int:
        if self.settings.default_max_tokens <= room:
            return self.settings.default_max_tokens
        return 1 << (room.bit_length() - 1)  # a power of two: few distinct lengths to compile for

    def positions_used(self, text: dict) -> int:
        """LM positions a tokenised prompt takes (with the image's queries when they are prepended)."""
        width = int(text["input_ids"].shape[1])
        return width + (self.model.config.num_query_tokens if self.prepends_queries else 0)

    def max_new_tokens(self, body: DecodingFields, used: int) -> int:
        asked = requested_max_tokens(body)
        room = self.room(used)
        if room < 1:
            raise invalid(f"the prompt fills all {self.positions} positions of the model", "messages",
                          "context_length_exceeded")
        if asked is None:
            return self.default_max_tokens(room)
        if asked > room:
            what = (f"the prompt takes {used} of the model's {self.positions} positions, leaving {room}"
                    if self.positions is not None and room < self.settings.max_tokens_limit
                    else f"this server allows at most {room}")
            raise invalid(f"max_tokens={asked} is too large: {what}", "max_tokens", "max_tokens_too_large")
        return asked

    def build(self, body: DecodingFields, prompt: str, image_url: str, emit) -> EngineRequest:
        """Runs in a worker thread (image decoding and tokenising are CPU work)."""
        text = self.text_inputs(prompt)
        width = int(text["input_ids"].shape[1])
        used = self.positions_used(text)
        decoding = decoding_for(body, self.base_sampler, self.max_new_tokens(body, used))
        image = read_image_url(image_url, self.settings.images)
        try:
            pixels = self.processor.image_processor.preprocess_one(image, "image")
        except ValueError as e:
            raise invalid(str(e), "messages", "invalid_image") from None
        inputs = dict(pixel_values=pixels[None], **text)
        prompt_tokens = int(np.sum(text["attention_mask"])) + (used - width)
        return EngineRequest(uuid.uuid4().hex, inputs, decoding, prompt_tokens, emit)
