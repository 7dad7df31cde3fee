"""Image(s) + question(s) -> answer text: processor, decoding settings and generation in one call.

    model = jblip.load_pretrained("path/to/instructblip")     # or a hub id
    model.generate_text("cat.png", "What is the cat doing?")   # -> ["sleeping on a sofa"]
    model.generate_text(videos=["clip.mp4"], prompts="What happens?", num_frames=4)
    answer(model, ["a.png", "b.png"], ["What colour is it?", "How many?"], preset="instructblip")
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from jblip.image_processing import ImageLike
from jblip.processing import DEFAULT_MAX_LENGTH, Processor
from jblip.sampling import PRESETS, SamplerConfig
from jblip.video_processing import DEFAULT_NUM_FRAMES

# The small InstructBLIP shipped inside the package (HF directory layout), used when no model is named.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")

_SAMPLER_FIELDS = {f.name for f in dataclasses.fields(SamplerConfig)}


def resolve_model(path_or_id: str | None) -> str:
    """`path_or_id`, or the bundled demo model when None (with a clear error if it is absent)."""
    if path_or_id is not None and os.path.normpath(path_or_id) != os.path.normpath(DEFAULT_MODEL):
        return path_or_id
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        raise FileNotFoundError(f"the bundled demo model is missing (expected at {DEFAULT_MODEL}; reinstall "
                                "jblip or retrain it with `jblip train --recipe demo --export` there); "
                                "or pass --model with a checkpoint directory or hub id")
    return DEFAULT_MODEL


def sampler_for(model, preset: str | None = None, sampler: SamplerConfig | None = None, **options) -> SamplerConfig:
    """Decoding settings: `sampler`, else a named preset ("greedy", "instructblip"), else greedy;
    EOS/pad ids from the model unless given; then `options` (SamplerConfig fields, plus HF's
    `do_sample=True`; `num_beams > 1` alone implies beam search)."""
    if sampler is None:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown decoding preset {preset!r}; known: {sorted(PRESETS)}")
        ids = model.default_sampler()
        base = PRESETS[preset or "greedy"]
        sampler = base.replace(eos_token_ids=ids.eos_token_ids, pad_token_id=ids.pad_token_id)
    options = {k: v for k, v in options.items() if v is not None}
    if options.pop("do_sample", False):
        options.setdefault("strategy", "sample")
    if "strategy" not in options and options.get("num_beams", 1) > 1:
        options["strategy"] = "beam"
    if options.get("strategy", sampler.strategy) != "beam" and "num_beams" not in options:
        options["num_beams"] = 1  # e.g. sampling on top of the beam-search preset
    if options.get("strategy", sampler.strategy) == "greedy":
        options.setdefault("num_return_sequences", 1)
    unknown = sorted(set(options) - _SAMPLER_FIELDS)
    if unknown:
        raise ValueError(f"unknown decoding option(s) {unknown}; known: {sorted(_SAMPLER_FIELDS | {'do_sample'})}")
    if "eos_token_ids" in options and isinstance(options["eos_token_ids"], int):
        options["eos_token_ids"] = (options["eos_token_ids"],)
    return sampler.replace(**options)


def processor_for(model) -> Processor:
    """The processor of a loaded model's checkpoint directory (built once, kept on the model)."""
    processor = getattr(model, "_jblip_processor", None)
    if processor is None:
        if not getattr(model, "path", None):
            raise ValueError("this model was not loaded from a checkpoint directory, so it has no tokenizer "
                             "files; pass processor=jblip.processing.Processor(...)")
        processor = Processor.from_pretrained(model.path, model.config)
        model._jblip_processor = processor
    return processor


def answer(model, images: ImageLike | Sequence[ImageLike] | None, prompts: str | Sequence[str], *,
           processor: Processor | None = None, preset: str | None = None, sampler: SamplerConfig | None = None,
           seed: int = 0, max_length: int | None = DEFAULT_MAX_LENGTH, truncation: bool = True,
           videos=None, num_frames: int = DEFAULT_NUM_FRAMES, **options) -> list[str]:
    """Answer one prompt per image (or one prompt for all): a list of strings, one per image
    (num_return_sequences per image, consecutively, when more are asked for).

    `images`: file paths, PIL images or uint8 arrays. Or, instead, `videos`: a list of video
    files, frame folders, animated GIFs, uint8 arrays [frames, H, W, 3] or lists of frames, each
    sampled to `num_frames` frames (`jblip.video_processing`). Decoding: see `sampler_for`
    (e.g. max_new_tokens=20, num_beams=5, do_sample=True, top_p=0.9). Prompts longer than
    `max_length` tokens are cut from the left, or rejected with truncation=False."""
    if (images is None) == (videos is None):
        raise ValueError("give either images or videos (one of the two)")
    processor = processor or processor_for(model)
    cfg = sampler_for(model, preset, sampler, **options)
    if videos is not None:
        inputs = processor.videos(videos, prompts, num_frames, max_length=max_length, truncation=truncation,
                                  new_tokens=cfg.max_new_tokens)
    else:
        inputs = processor(images, prompts, max_length=max_length, truncation=truncation,
                           new_tokens=cfg.max_new_tokens)
    output = model.generate(**inputs, sampler=cfg, seed=seed)
    return processor.decode(output)
