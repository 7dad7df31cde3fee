"""Tiny random HF InstructBLIP-Video models (LLaMA or T5 text config), saved for jblip to load."""
from __future__ import annotations

import numpy as np
import torch

from tests.hf_models import IMAGE_TOKEN, NUM_QUERIES, TINY_LLAMA, TINY_QFORMER, TINY_VISION, randomize

VIDEO_TOKEN = IMAGE_TOKEN  # the last row of the tiny vocabulary holds `<video>`


def tiny_instructblip_video(path, seed=0, text=None, qformer=None, video_token=VIDEO_TOKEN):
    from transformers import InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration
    torch.manual_seed(seed)
    config = InstructBlipVideoConfig(vision_config=dict(TINY_VISION), qformer_config={**TINY_QFORMER, **(qformer or {})},
                                     text_config=dict(text or TINY_LLAMA), num_query_tokens=NUM_QUERIES,
                                     video_token_index=video_token)
    model = randomize(InstructBlipVideoForConditionalGeneration(config).eval(), seed)
    model.save_pretrained(path)
    return model


def video_prompts(family: str, lengths, frames: int, seed=0, vocab=128):
    """Rows of [<video>*T*Q | prompt], left-padded with BOS (decoder-only) or ending in </s>
    and right-padded (T5), as the HF processor lays them out."""
    rng = np.random.default_rng(seed)
    prefix = [VIDEO_TOKEN] * (NUM_QUERIES * frames)
    bodies = [rng.integers(3, vocab - 2, size=n).tolist() for n in lengths]
    bodies = [b + [1] for b in bodies] if family == "t5" else [[2] + b for b in bodies]
    width = max(map(len, bodies))
    ids, mask = [], []
    for body in bodies:
        pad = [0] * (width - len(body))
        if family == "t5":
            ids.append(prefix + body + pad)
            mask.append([1] * (len(prefix) + len(body)) + [0] * len(pad))
        else:
            ids.append(prefix + pad + body)
            mask.append([1] * len(prefix) + [0] * len(pad) + [1] * len(body))
    return np.array(ids), np.array(mask)
