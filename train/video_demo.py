"""The moving-shape video demo: clips of one circle moving left, right, up or down, asked
"Which way does the circle move?", and the model it starts from.

A clip is `CLIP_FRAMES` frames (an animated GIF) of a circle of random colour and size on a
random background, crossing about half the frame in a straight line. One frame cannot answer
the question: only the order of positions across frames does. The model starts from the bundled
image demo (its ViT already knows where a shape is) with the four new words added to its
vocabulary (fresh embedding rows; the others keep their ids), and `jblip train --recipe
video-demo` trains all of it on 4 sampled frames per clip.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

from jblip.train import synthetic

QUESTION = "Which way does the circle move?"
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NEW_WORDS = ("which", "way", "does", "move", "up", "down")
CLIP_FRAMES = 8       # frames in each GIF; training samples NUM_FRAMES of them
NUM_FRAMES = 4
VIDEO_DEMO_DATA = dict(train=3000, eval=200, size=64, seed=0)


def moving_clip(size: int, rng: np.random.Generator, direction: str, frames: int = CLIP_FRAMES) -> list[Image.Image]:
    """Frames of one circle moving in `direction`, by 0.4-0.55 of the frame over the clip."""
    dx, dy = DIRECTIONS[direction]
    r = rng.uniform(0.1, 0.16) * size
    travel = rng.uniform(0.4, 0.55) * size
    colour = synthetic.COLOURS[synthetic._pick(list(synthetic.COLOURS), rng)]
    background = synthetic.BACKGROUNDS[synthetic._pick(list(synthetic.BACKGROUNDS), rng)]
    # a start from which the whole path stays inside the frame
    lo = np.array([r, r]) + np.maximum(-np.array([dx, dy]) * travel, 0)
    hi = np.array([size - r, size - r]) - np.maximum(np.array([dx, dy]) * travel, 0)
    start = rng.uniform(lo, hi)
    out = []
    for t in range(frames):
        cx, cy = start + np.array([dx, dy]) * travel * t / (frames - 1)
        img = Image.new("RGB", (size, size), background)
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        out.append(img)
    return out


def write_clips(directory: str, name: str, count: int, size: int, rng: np.random.Generator) -> str:
    os.makedirs(os.path.join(directory, "clips"), exist_ok=True)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            direction = synthetic._pick(list(DIRECTIONS), rng)
            frames = moving_clip(size, rng, direction)
            clip = f"clips/{name}_{i:05d}.gif"
            frames[0].save(os.path.join(directory, clip), save_all=True, append_images=frames[1:], duration=100)
            f.write(json.dumps({"video": clip, "text_input": QUESTION, "text_output": direction,
                                "kind": direction}) + "\n")
    return path


def make_video_dataset(directory: str, train: int = 3000, eval: int = 200, size: int = 64, seed: int = 0) -> dict:
    """train.jsonl, eval.jsonl, clips/ and tokenizer/ (the demo's words plus NEW_WORDS)."""
    rng = np.random.default_rng(seed)
    return dict(train=write_clips(directory, "train", train, size, rng),
                eval=write_clips(directory, "eval", eval, size, rng),
                tokenizer=synthetic.write_tokenizers(os.path.join(directory, "tokenizer"), NEW_WORDS))


# tensors with one row per word: grown for the new words
_VOCAB_ROWS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
               "qformer.embeddings.word_embeddings.weight")


def start_model(directory: str, base: str, seed: int = 0) -> str:
    """`base` (the image demo) with its vocabularies grown by NEW_WORDS, written to `directory`
    in the HF layout, with the grown tokenizers."""
    from jblip.convert.safetensors_reader import SafetensorsFile
    from jblip.convert.safetensors_writer import write_safetensors
    os.makedirs(directory, exist_ok=True)
    vocab = len(synthetic.vocabulary(NEW_WORDS))
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["vocab_size"] = config["qformer_config"]["vocab_size"] = vocab
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    rng = np.random.default_rng(seed)
    source = SafetensorsFile(os.path.join(base, "model.safetensors"))
    try:
        def grown(key):
            x = source.read(key)
            if key not in _VOCAB_ROWS:
                return x
            new = rng.standard_normal((vocab - x.shape[0], x.shape[1])) * x.std()
            return np.concatenate([x, new.astype(x.dtype)])
        entries = [(k, (vocab,) + tuple(source.shape(k))[1:] if k in _VOCAB_ROWS else tuple(source.shape(k)),
                    source.dtype(k)) for k in source.keys()]
        write_safetensors(os.path.join(directory, "model.safetensors"), entries, grown)
    finally:
        source.close()
    tokenizers = synthetic.write_tokenizers(os.path.join(directory, ".tokenizers"), NEW_WORDS)
    for name in os.listdir(tokenizers):
        shutil.move(os.path.join(tokenizers, name), os.path.join(directory, name))
    os.rmdir(tokenizers)
    return directory
