"""Held-out evaluation: token-mean loss and exact-match accuracy of greedy answers.

Exact match compares the generated answer (up to EOS) with the reference
answer: as text (decoded, stripped, lower-cased) when a tokenizer is known,
else as token ids. Generation goes through `VisionLanguageModel.generate`
(greedy), so it is the same decoding users get.
"""
from __future__ import annotations

import collections

import jax
import numpy as np

from jblip import sharding
from jblip.config import ModelConfig
from jblip.pretrained import VisionLanguageModel
from jblip.train import trainable as tr
from jblip.train.data import Encoder, eval_batches
from jblip.train.labels import TextLayout, collate_prompts
from jblip.train.state import Placement
from jblip.train.step import make_eval_step


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


class Evaluator:
    def __init__(self, config: ModelConfig, layout: TextLayout, encoder: Encoder, records: list[dict], cfg,
                 placement: Placement, image_size: int, num_frames: int = 4):
        self.config = config
        self.layout, self.encoder, self.records = layout, encoder, records
        self.batch_size, self.max_new_tokens, self.image_size = cfg.eval_batch_size, cfg.max_new_tokens, image_size
        self.placement, self.num_frames = placement, num_frames
        self.loss_step = make_eval_step(self.config, placement, self.batch_size, layout.prepend_queries)
        self.model: VisionLanguageModel | None = None

    def _on_mesh(self, batch: dict) -> dict:
        if self.placement.mesh is None:
            return {k: jax.numpy.asarray(v) for k, v in batch.items()}
        target = self.placement.batch(self.batch_size)
        return {k: sharding.place(v, target) for k, v in batch.items()}

    def _model(self, params) -> VisionLanguageModel:
        if self.model is None:  # one instance, so its jitted generate compiles once
            self.model = VisionLanguageModel(self.config, params, mesh=self.placement.mesh,
                                             rules=self.placement.rules)
        else:
            self.model.params = params
        return self.model

    def answers_match(self, generated: list[int], reference: list[int]) -> bool:
        tok = self.encoder.tokenizer
        if tok is not None:
            if any(t >= tok.vocab_size for t in generated):  # ids the tokenizer would silently drop
                return False
            return _normalise(tok.decode(generated)) == _normalise(tok.decode(reference))
        return list(generated) == list(reference)

    def run(self, trainable, frozen) -> dict:
        model = self._model(tr.merge(trainable, frozen))
        eos = self.layout.eos
        loss_sum, tokens, seen = 0.0, 0, 0
        right, asked = collections.Counter(), collections.Counter()  # per record "kind" (if any)
        for batch, prompts, answers, real in eval_batches(self.records, self.encoder, self.batch_size,
                                                          self.image_size, num_frames=self.num_frames):
            pixels = batch["pixel_values"]
            s, c = jax.device_get(self.loss_step(trainable, frozen, self._on_mesh(batch)))
            loss_sum, tokens = loss_sum + float(s), tokens + int(c)
            p = collate_prompts(prompts, self.layout)
            out = model.generate(pixels, p["input_ids"], p["attention_mask"],
                                 qformer_input_ids=p.get("qformer_ids"), qformer_attention_mask=p.get("qformer_mask"),
                                 max_new_tokens=self.max_new_tokens)
            toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            for i in range(real):
                gen = [int(t) for t in toks[i, : lengths[i]] if int(t) != eos]
                kind = self.records[seen + i].get("kind")
                right[kind] += self.answers_match(gen, answers[i])
                asked[kind] += 1
            seen += real
        total = sum(asked.values())
        result = dict(loss=loss_sum / max(tokens, 1), accuracy=sum(right.values()) / max(total, 1), examples=total)
        if len(asked) > 1:  # a mix of question kinds: how each fares
            result.update({f"accuracy/{k}": right[k] / asked[k] for k in sorted(asked, key=str)})
        return result
