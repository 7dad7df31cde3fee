"""From images + prompts to model inputs, and from generated ids back to text.

`Processor` assembles what `VisionLanguageModel.generate` takes, equal to HF's
`InstructBlipProcessor` / `Blip2Processor`:

- layout: `num_query_tokens` copies of `<image>` (`config.image_token_index`) in
  front of each row, before any padding and before BOS; a config without
  `image_token_index` gets the legacy layout (no placeholders; the model
  prepends the queries).
- padding: decoder-only LMs (Vicuna, OPT) on the left, so every prompt ends at
  the last position; Flan-T5 on the right. BOS (`</s>` = 2 for LAVIS Vicuna and
  OPT) and T5's appended `</s>` come from the checkpoint's tokenizer files.
- Q-Former text (InstructBLIP): `[CLS] instruction [SEP]`, always right-padded
  (LAVIS; its position ids start at the first token).
- long instructions: cut from the left to `max_length` tokens (default 128 =
  LAVIS `max_txt_len`, counted without the query placeholders and applied to
  both tokenizers, as LAVIS does), or rejected with `truncation=False`.
- videos (`Processor.videos`): T frames per video, T * `num_query_tokens` placeholders in
  front of each row (`<video>` for an InstructBLIP-Video checkpoint), as
  `InstructBlipVideoProcessor` lays them out for its 4 frames.
- empty prompts: an error for InstructBLIP (it needs an instruction); allowed
  for BLIP-2, whose captioning prompt is "" in LAVIS (the LM then starts from BOS).

Decoding keeps each row up to its length (through EOS) and drops special tokens.
LAVIS' "0 -> 2" remapping of its pad id is not needed: jblip pads only after EOS
and never decodes those positions.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jblip import families
from jblip.config import ModelConfig, from_hf_config
from jblip.image_processing import ImageLike, ImageProcessor
from jblip.text_processing import TextTokenizer, load_tokenizers
from jblip.video_processing import DEFAULT_NUM_FRAMES, VideoProcessor

DEFAULT_MAX_LENGTH = 128  # LAVIS max_txt_len of the InstructBLIP models


class PromptError(ValueError):
    """A prompt the model cannot take (empty, too long, not text), naming which one."""


class Processor:
    """Images + per-sample prompts -> the input arrays of `VisionLanguageModel.generate`."""

    def __init__(self, config: ModelConfig, image_processor: ImageProcessor, tokenizer: TextTokenizer,
                 qformer_tokenizer: TextTokenizer | None = None, max_length: int | None = DEFAULT_MAX_LENGTH,
                 truncation: bool = True):
        if config.qformer.use_text_input and qformer_tokenizer is None:
            raise ValueError("InstructBLIP needs a Q-Former tokenizer (qformer_tokenizer)")
        self.config = config
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer if config.qformer.use_text_input else None
        self.max_length = max_length
        self.truncation = truncation
        self.video_processor = VideoProcessor(image_processor)
        self._check_image_token()

    def __repr__(self):
        return (f"Processor({self.config.model_type}/{self.config.family}, {self.image_processor}, "
                f"{self.tokenizer}, max_length={self.max_length}, truncation={self.truncation})")

    @classmethod
    def from_pretrained(cls, path: str, config: ModelConfig | None = None, **kwargs) -> "Processor":
        """Tokenizers and image settings from a HF-format checkpoint directory."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no checkpoint directory at {path}")
        config = config or from_hf_config(path)
        tokenizer, qformer_tokenizer = load_tokenizers(path, config.qformer.use_text_input)
        images = ImageProcessor.from_pretrained(path, config.vision.image_size)
        return cls(config, images, tokenizer, qformer_tokenizer, **kwargs)

    def _check_image_token(self):
        token = "<video>" if self.config.video else "<image>"
        saved = self.tokenizer.token_id(token)
        expected = self.config.image_token_index
        if saved is not None and expected is not None and saved != expected:
            field = "video_token_index" if self.config.video else "image_token_index"
            raise ValueError(f"the tokenizer's {token} token has id {saved} but the model config says "
                             f"{field}={expected}; tokenizer and checkpoint do not belong together")

    # ------------------------------------------------------------------ limits
    def limits(self, max_length: int | None, new_tokens: int = 0, frames: int = 1) -> tuple[int | None, int | None]:
        """(language-model prompt limit, Q-Former text limit) in tokens. A decoder-only LM's
        positions hold the queries (`frames` times for a video), the prompt and the `new_tokens`
        still to be generated."""
        text_limit = max_length
        model_positions = getattr(self.config.text, "max_position_embeddings", None)
        if model_positions is not None and families.family(self.config).prompt_uses_positions:
            room = model_positions - self.config.num_query_tokens * frames - new_tokens
            text_limit = room if text_limit is None else min(text_limit, room)
        q_limit = self.config.qformer.max_position_embeddings
        q_limit = q_limit if max_length is None else min(max_length, q_limit)
        return text_limit, q_limit

    def _encode(self, tokenizer: TextTokenizer, prompts: list[str], limit: int | None, truncation: bool,
                what: str, max_length: int | None, new_tokens: int = 0) -> list[list[int]]:
        ids = tokenizer.encode(prompts)
        too_long = [i for i, row in enumerate(ids) if limit is not None and len(row) > limit]
        if not too_long:
            return ids
        if not truncation:
            i = too_long[0]
            by_model = max_length is None or limit < max_length
            cause = f"max_length={max_length} allows"
            if by_model:
                cause = f"the model allows with max_new_tokens={new_tokens}" if new_tokens else "the model allows"
            raise PromptError(f"prompt {i} is {len(ids[i])} {what} tokens long, more than the {limit} {cause}; "
                              "shorten it, or allow truncation (which keeps its end)")
        if limit <= tokenizer.num_special_tokens:
            because = f" (the model's positions less max_new_tokens={new_tokens})" if new_tokens else ""
            raise PromptError(f"a prompt limit of {limit} tokens{because} leaves no room for text after the "
                              "special tokens; ask for fewer new tokens or a shorter prompt")
        return tokenizer.encode(prompts, max_length=limit)

    # ------------------------------------------------------------------ text
    def _prompts(self, prompts: str | Sequence[str], batch: int | None, what: str = "image") -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts] * (batch or 1)
        prompts = list(prompts)
        if batch is not None and len(prompts) != batch:
            raise PromptError(f"got {len(prompts)} prompts for {batch} {what}s; give one prompt, or one per {what}")
        if not prompts:
            raise PromptError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise PromptError(f"prompt {i} is a {type(p).__name__}, not a string")
            if self.config.model_type == "instructblip" and not p.strip():
                raise PromptError(f"prompt {i} is empty; InstructBLIP needs an instruction, "
                                  "e.g. 'A short image description:'")
        return prompts

    def text_inputs(self, prompts: str | Sequence[str], batch: int | None = None,
                    max_length: int | None | str = "default", truncation: bool | None = None,
                    new_tokens: int = 0, frames: int | None = None) -> dict:
        """input_ids / attention_mask (+ qformer_input_ids / qformer_attention_mask), int32 numpy.
        `new_tokens`: how many tokens will be generated after the prompt (room kept for them);
        `frames`: the placeholder layout of videos with that many frames (None: images)."""
        prompts = self._prompts(prompts, batch, "image" if frames is None else "video")
        max_length = self.max_length if max_length == "default" else max_length
        truncation = self.truncation if truncation is None else truncation
        text_limit, q_limit = self.limits(max_length, new_tokens, frames or 1)
        ids = self._encode(self.tokenizer, prompts, text_limit, truncation, "language-model", max_length, new_tokens)
        out = self._layout(ids, frames or 1)
        if self.qformer_tokenizer is not None:
            q_ids = self._encode(self.qformer_tokenizer, prompts, q_limit, truncation, "Q-Former", max_length)
            pad = _first_not_none(self.qformer_tokenizer.special_id("pad_token"), self.config.qformer.pad_token_id)
            out["qformer_input_ids"], out["qformer_attention_mask"] = _pad(q_ids, pad, left=False)
        else:
            out["qformer_input_ids"] = out["qformer_attention_mask"] = None
        return out

    def _layout(self, ids: list[list[int]], frames: int = 1) -> dict:
        config = self.config
        pad = _first_not_none(self.tokenizer.special_id("pad_token"), getattr(config.text, "pad_token_id", 0))
        text_ids, text_mask = _pad(ids, pad, left=families.family(config).prompt_padding_side == "left")
        if config.image_token_index is not None:
            batch, q = len(ids), config.num_query_tokens * frames
            text_ids = np.concatenate([np.full((batch, q), config.image_token_index, np.int32), text_ids], 1)
            text_mask = np.concatenate([np.ones((batch, q), np.int32), text_mask], 1)
        return dict(input_ids=text_ids, attention_mask=text_mask)

    # ------------------------------------------------------------------ all together
    def __call__(self, images: ImageLike | Sequence[ImageLike], prompts: str | Sequence[str],
                 max_length: int | None | str = "default", truncation: bool | None = None,
                 new_tokens: int = 0) -> dict:
        """pixel_values [B, S, S, 3] float32, input_ids, attention_mask, qformer_input_ids,
        qformer_attention_mask: keyword arguments for `VisionLanguageModel.generate`."""
        pixels = self.image_processor(images)
        inputs = self.text_inputs(prompts, pixels.shape[0], max_length, truncation, new_tokens)
        return dict(pixel_values=pixels, **inputs)

    def videos(self, videos, prompts: str | Sequence[str], num_frames: int = DEFAULT_NUM_FRAMES,
               max_length: int | None | str = "default", truncation: bool | None = None,
               new_tokens: int = 0) -> dict:
        """pixel_values [B, T, S, S, 3] float32 (T = `num_frames` sampled per video, see
        `jblip.video_processing`) and the text inputs with T * Q placeholders per row."""
        pixels = self.video_processor(videos, num_frames)
        inputs = self.text_inputs(prompts, pixels.shape[0], max_length, truncation, new_tokens, frames=pixels.shape[1])
        return dict(pixel_values=pixels, **inputs)

    def decode(self, tokens, lengths=None) -> list[str]:
        """Text of each generated row (a `GenerateOutput`, or ids [R, L] with optional lengths [R])."""
        if lengths is None and hasattr(tokens, "lengths"):
            tokens, lengths = tokens.tokens, tokens.lengths
        tokens = np.asarray(tokens)
        lengths = np.full(tokens.shape[0], tokens.shape[1]) if lengths is None else np.asarray(lengths)
        return [self.tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths)]


def _first_not_none(*values):
    return next(v for v in values if v is not None)


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = row
        mask[i, span] = 1
    return ids, mask
