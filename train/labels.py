"""Token layout and label masking of InstructBLIP instruction tuning (as LAVIS builds its batches).

Decoder-only LMs (Vicuna, OPT), LAVIS `concat_text_input_output`, right padded:
    input_ids  [<image> x Q] [BOS instruction] [answer EOS] [PAD ...]
    labels     [-100   x Q] [-100 ...       ] [answer EOS] [-100 ...]
The instruction is truncated on the left (to `max_input_len`, BOS kept), the
answer + EOS on the right (to `max_output_len`; as in LAVIS, a truncated
answer loses its EOS). Without an image token id (legacy layout) the Q
placeholders are left out of `input_ids` and `labels` and the model prepends
the queries; the loss cuts the logits to the label length either way.

Flan-T5, prefix-LM: the encoder gets [<image> x Q] [instruction EOS] [PAD ...],
the decoder `labels` = [answer EOS] (pads -100) and `decoder_input_ids` =
shift_right(labels) (start token, -100 -> pad).

Q-Former (InstructBLIP): [CLS] instruction [SEP] [PAD ...], truncated on the left.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jblip import families
from jblip.config import ModelConfig
from jblip.train.loss import IGNORE


@dataclass(frozen=True)
class TextLayout:
    family: str                    # "llama", "opt" or "t5"
    num_queries: int
    image_token: int | None        # None: queries prepended by the model (legacy / LAVIS layout)
    bos: int | None                # decoder-only LMs: prepended to the instruction
    eos: int
    pad: int
    decoder_start: int = 0         # T5
    use_qformer_text: bool = True  # InstructBLIP (False: BLIP-2)
    qformer_cls: int = 101
    qformer_sep: int = 102
    qformer_pad: int = 0
    max_input_len: int = 128       # LAVIS max_txt_len (instruction, incl. BOS / EOS)
    max_output_len: int = 256      # LAVIS max_output_txt_len (answer incl. EOS)
    max_qformer_len: int = 128
    frames: int = 1                # video records: frames per clip, each with its own Q queries

    @property
    def num_placeholders(self) -> int:
        """Query placeholders per row: Q for an image, frames * Q for a video."""
        return self.num_queries * self.frames

    @property
    def prepend_queries(self) -> bool:
        return self.image_token is None

    @property
    def encoder_decoder(self) -> bool:
        return families.family(self.family).encoder_decoder

    @classmethod
    def for_model(cls, config: ModelConfig, **overrides) -> "TextLayout":
        text = config.text
        decoder_only = not families.family(config).encoder_decoder
        pad = getattr(text, "pad_token_id", 0)
        base = cls(family=config.family, num_queries=config.num_query_tokens,
                   image_token=config.image_token_index,
                   bos=getattr(text, "bos_token_id", None) if decoder_only else None,
                   eos=text.eos_token_id, pad=pad if 0 <= pad < text.vocab_size else 0,
                   decoder_start=getattr(text, "decoder_start_token_id", 0),
                   use_qformer_text=config.qformer.use_text_input, qformer_pad=config.qformer.pad_token_id)
        return dataclasses.replace(base, **overrides)


def _left(ids: Sequence[int], n: int) -> list[int]:
    ids = list(ids)
    return ids[len(ids) - n:] if n > 0 and len(ids) > n else (ids if n > 0 else [])


def qformer_tokens(instruction: Sequence[int], layout: TextLayout) -> list[int]:
    return [layout.qformer_cls] + _left(instruction, layout.max_qformer_len - 2) + [layout.qformer_sep]


def encode_example(instruction: Sequence[int], answer: Sequence[int], layout: TextLayout,
                   qformer_instruction: Sequence[int] | None = None) -> dict[str, list[int]]:
    """One training example (unpadded lists). Token ids come without special tokens."""
    queries = [] if layout.prepend_queries else [layout.image_token] * layout.num_placeholders
    target = (list(answer) + [layout.eos])[: layout.max_output_len]
    if layout.encoder_decoder:
        prompt = _left(instruction, layout.max_input_len - 1) + [layout.eos]
        out = dict(input_ids=queries + prompt, labels=target,
                   decoder_input_ids=[layout.decoder_start] + target[:-1])
    else:
        head = [] if layout.bos is None else [layout.bos]
        prompt = head + _left(instruction, layout.max_input_len - len(head))
        out = dict(input_ids=queries + prompt + target,
                   labels=[IGNORE] * (len(queries) + len(prompt)) + target)
    if layout.use_qformer_text:
        out["qformer_ids"] = qformer_tokens(instruction if qformer_instruction is None else qformer_instruction,
                                            layout)
    return out


def encode_prompt(instruction: Sequence[int], layout: TextLayout,
                  qformer_instruction: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Generation inputs for one instruction (unpadded; pad with `collate_prompts`)."""
    queries = [] if layout.prepend_queries else [layout.image_token] * layout.num_placeholders
    if layout.encoder_decoder:
        prompt = _left(instruction, layout.max_input_len - 1) + [layout.eos]
    else:
        head = [] if layout.bos is None else [layout.bos]
        prompt = head + _left(instruction, layout.max_input_len - len(head))
    out = dict(input_ids=queries + prompt)
    if layout.use_qformer_text:
        out["qformer_ids"] = qformer_tokens(instruction if qformer_instruction is None else qformer_instruction,
                                            layout)
    return out


def bucket(n: int, minimum: int = 8) -> int:
    """Padded lengths come from few buckets (powers of two, then multiples of 128), so jit rarely recompiles."""
    b = minimum
    while b < n:
        b = b * 2 if b < 128 else b + 128
    return b


def _pad(rows: list[list[int]], width: int, value: int, left: bool = False) -> np.ndarray:
    out = np.full((len(rows), width), value, np.int32)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"sequence of {len(r)} tokens does not fit the padded width {width}")
        if left:
            out[i, width - len(r):] = r
        else:
            out[i, : len(r)] = r
    return out


def _mask(rows, width, left=False) -> np.ndarray:
    return _pad([[1] * len(r) for r in rows], width, 0, left)


def collate(examples: list[dict], layout: TextLayout, lengths: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Right-pad a list of `encode_example` outputs into int32 arrays.

    `lengths` fixes the padded width per key (input_ids, decoder_input_ids,
    qformer_ids, targets); otherwise each is the batch maximum rounded up to a bucket.
    """
    lengths = lengths or {}
    width = lambda key: lengths.get(key) or bucket(max(len(e[key]) for e in examples))
    ids = [e["input_ids"] for e in examples]
    n = width("input_ids")
    batch = dict(input_ids=_pad(ids, n, layout.pad), attention_mask=_mask(ids, n))
    if layout.encoder_decoder:
        dec = [e["decoder_input_ids"] for e in examples]
        m = width("decoder_input_ids")
        batch["decoder_input_ids"] = _pad(dec, m, layout.pad)
        batch["labels"] = _pad([e["labels"] for e in examples], m, IGNORE)
    else:
        batch["labels"] = _pad([e["labels"] for e in examples], n, IGNORE)
    if layout.use_qformer_text:
        q = [e["qformer_ids"] for e in examples]
        k = width("qformer_ids")
        batch["qformer_ids"], batch["qformer_mask"] = _pad(q, k, layout.qformer_pad), _mask(q, k)
    batch.update(scored_targets(batch["labels"], shifted=not layout.encoder_decoder, width=lengths.get("targets")))
    return batch


def scored_targets(labels: np.ndarray, shifted: bool, width: int | None = None) -> dict[str, np.ndarray]:
    """Where the loss looks: `target_positions` [B, K] (label index of each scored token) and
    `target_labels` [B, K] (IGNORE-padded), K = the most scored tokens of a row, bucketed.

    With these the train step evaluates the LM head only at scored positions (the answer),
    not over the whole sequence; the loss is the same. Decoder-only LMs never score label 0
    (nothing predicts it after the shift), as in HF.
    """
    first = 1 if shifted else 0
    rows = [[i for i in range(first, labels.shape[1]) if labels[b, i] != IGNORE] for b in range(labels.shape[0])]
    k = width or bucket(max([len(r) for r in rows] + [1]))
    positions = _pad(rows, k, first)
    return dict(target_positions=positions,
                target_labels=np.where(_mask(rows, k) == 1, np.take_along_axis(labels, positions, axis=1), IGNORE)
                .astype(np.int32))


def collate_prompts(prompts: list[dict], layout: TextLayout, length: int | None = None) -> dict[str, np.ndarray]:
    """Pad generation prompts: left for decoder-only LMs (queries stay first), right for T5."""
    ids = [p["input_ids"] for p in prompts]
    n = length or bucket(max(len(r) for r in ids))
    if layout.encoder_decoder or layout.prepend_queries:
        left = not layout.encoder_decoder
        batch = dict(input_ids=_pad(ids, n, layout.pad, left), attention_mask=_mask(ids, n, left))
    else:  # [<image> x Q | PAD ... | BOS prompt]: the placeholders stay in front of the padding
        q = layout.num_placeholders
        body = [r[q:] for r in ids]
        width = n - q
        batch = dict(input_ids=np.concatenate([np.full((len(ids), q), layout.image_token, np.int32),
                                               _pad(body, width, layout.pad, True)], axis=1),
                     attention_mask=np.concatenate([np.ones((len(ids), q), np.int32),
                                                    _mask(body, width, True)], axis=1))
    if layout.use_qformer_text:
        q_ids = [p["qformer_ids"] for p in prompts]
        k = bucket(max(len(r) for r in q_ids))
        batch["qformer_ids"], batch["qformer_mask"] = _pad(q_ids, k, layout.qformer_pad), _mask(q_ids, k)
    return batch
