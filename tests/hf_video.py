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


class PerFrameBlipProcessor:
    """HF's `InstructBlipVideoImageProcessor` steps, the PIL BLIP image processor on every frame,
    standing in for the torchvision video processor inside `InstructBlipVideoProcessor`."""

    def __init__(self, size: int):
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
        self.frames = BlipImageProcessorPil(size={"height": size, "width": size})

    def __call__(self, videos, return_tensors=None):
        return {"pixel_values": np.stack([self.frames(list(v), return_tensors="np")["pixel_values"] for v in videos])}


def hf_video_processor(tokenizer, qformer_tokenizer, size: int = 28):
    """HF's own `InstructBlipVideoProcessor.__call__` (it adds `<video>` to the tokenizer), built
    without its torchvision frame backend, which is not installed here."""
    from tokenizers import AddedToken
    from transformers import InstructBlipVideoProcessor
    processor = InstructBlipVideoProcessor.__new__(InstructBlipVideoProcessor)
    processor.video_token = AddedToken("<video>", normalized=False, special=True)
    tokenizer.add_tokens([processor.video_token], special_tokens=True)
    processor.tokenizer, processor.qformer_tokenizer = tokenizer, qformer_tokenizer
    processor.video_processor, processor.num_query_tokens = PerFrameBlipProcessor(size), NUM_QUERIES
    return processor


def save_video_checkpoint(path, family: str = "vicuna", seed: int = 0):
    """A tiny InstructBLIP-Video model whose vocabulary ends in `<video>`, saved with its tokenizers
    in the HF layout (`qformer_tokenizer/` beside the LM's). Returns (hf_model, hf_processor)."""
    import os
    from tests.hf_models import TINY_T5
    from tests.hf_tokenizers import bert_tokenizer, llama_tokenizer, t5_tokenizer
    lm, bert = (llama_tokenizer() if family == "vicuna" else t5_tokenizer()), bert_tokenizer()
    processor = hf_video_processor(lm, bert)
    video_id = lm.convert_tokens_to_ids("<video>")
    assert video_id == len(lm) - 1
    text = {**(TINY_LLAMA if family == "vicuna" else TINY_T5), "vocab_size": len(lm)}
    model = tiny_instructblip_video(path, seed=seed, text=text, qformer={"vocab_size": len(bert)},
                                    video_token=video_id)
    lm.save_pretrained(path)
    bert.save_pretrained(os.path.join(path, "qformer_tokenizer"))
    return model, processor
