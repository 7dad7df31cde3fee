"""A synthetic image-instruction dataset: coloured shapes, drawn with Pillow.

Each image shows one filled shape (circle, square or triangle) in one colour
at a random place and size on a black, grey or white background; each record
asks either "What colour is the shape?" or "What colour is the background?",
so the answer depends on the instruction as well as the image. Comes with a word-level tokenizer.json
(`tokenizers`) over its small vocabulary. Used by the tests and `--recipe demo`.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
BACKGROUNDS = {"black": (15, 15, 15), "grey": (128, 128, 128), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"shape": "What colour is the shape?", "background": "What colour is the background?"}
# ids 0-3 are special: pad, T5's </s>, LLaMA/OPT's </s> (LAVIS BOS = EOS = 2), unk; then BERT-style markers
SPECIALS = ("<pad>", "<eos>", "</s>", "<unk>", "[CLS]", "[SEP]")


def vocabulary() -> list[str]:
    words = set()
    for q in QUESTIONS.values():
        words.update(q.replace("?", " ?").split())
    words.update(COLOURS)
    words.update(BACKGROUNDS)
    return list(SPECIALS) + sorted(words)


def build_tokenizer():
    """A `tokenizers.Tokenizer`: lower-cased words and '?' -> ids; specials skipped on decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(list(SPECIALS))
    return tok


def draw(shape: str, colour: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def write_split(directory: str, name: str, count: int, size: int, rng: np.random.Generator) -> str:
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            image = f"images/{name}_{i:05d}.png"
            draw(shape, colour, background, size, rng).save(os.path.join(directory, image))
            kind = "shape" if rng.random() < 0.5 else "background"
            answer = str(colour if kind == "shape" else background)
            f.write(json.dumps({"image": image, "text_input": QUESTIONS[kind], "text_output": answer}) + "\n")
    return path


def write_tokenizers(directory: str) -> str:
    """The tokenizer as a HF processor saves it: tokenizer.json + tokenizer_config.json (the LM's:
    BOS `</s>` added, as LAVIS' Vicuna) and qformer_tokenizer/ ([CLS] text [SEP]), so that the
    exported model works with `jblip generate` too."""
    from tokenizers import processors
    os.makedirs(os.path.join(directory, "qformer_tokenizer"), exist_ok=True)
    build_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    lm = dict(bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
              add_eos_token=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(lm, f, indent=1)
    qformer = build_tokenizer()
    ids = {t: i for i, t in enumerate(SPECIALS)}
    qformer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    qformer.save(os.path.join(directory, "qformer_tokenizer", "tokenizer.json"))
    with open(os.path.join(directory, "qformer_tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump(dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>", unk_token="<unk>"), f, indent=1)
    return directory


def make_dataset(directory: str, train: int = 512, eval: int = 64, size: int = 32, seed: int = 0) -> dict:
    """Write train.jsonl, eval.jsonl, images/ and tokenizer/; returns their paths."""
    rng = np.random.default_rng(seed)
    return dict(train=write_split(directory, "train", train, size, rng),
                eval=write_split(directory, "eval", eval, size, rng),
                tokenizer=write_tokenizers(os.path.join(directory, "tokenizer")))
