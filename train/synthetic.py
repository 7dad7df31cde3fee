"""A synthetic visual-question dataset: coloured shapes, drawn with Pillow.

A scene is one to three filled shapes (circle, square, triangle: distinct kinds
and colours) on a black, grey or white background; with several shapes each
sits in its own vertical band, so "left" and "right" are unambiguous. Each
record asks one question of a kind from `QUESTIONS`, only where the scene
answers it ("What colour is the shape?" and "What shape is in the image?" need
a single shape, "Is the circle on the left or the right?" two). Answers are
one word. Comes with a word-level tokenizer.json (`tokenizers`) over the small
vocabulary. Used by the tests and `jblip train --recipe demo`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
BACKGROUNDS = {"black": (15, 15, 15), "grey": (128, 128, 128), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three")

# kind -> phrasings ("{shape}" is filled in with a shape in the scene); the first is the canonical one.
QUESTIONS = {
    "shape": ("What colour is the shape?",),
    "background": ("What colour is the background?",),
    "colour_of": ("What colour is the {shape}?",),
    "which_shape": ("What shape is in the image?", "What shape is it?"),
    "position": ("Is the {shape} on the left or the right?",),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
}
COLOUR_KINDS = ("shape", "background")   # one shape, two questions: the small training tests
DEMO_KINDS = tuple(QUESTIONS)            # everything: the bundled demo model
SHAPE_COUNTS = {"shape": (1,), "which_shape": (1,), "position": (2,)}  # others: 1, 2 or 3 shapes

# The bundled demo's data (`jblip train --recipe demo`); the demo tests hold out another seed.
DEMO_DATA = dict(train=12_000, eval=384, size=64, seed=0, kinds=DEMO_KINDS)

# ids 0-3 are special: pad, T5's </s>, LLaMA/OPT's </s> (LAVIS BOS = EOS = 2), unk; then BERT-style markers
SPECIALS = ("<pad>", "<eos>", "</s>", "<unk>", "[CLS]", "[SEP]")


def _words(text: str) -> list[str]:
    return text.lower().replace("?", " ?").split()


def vocabulary() -> list[str]:
    words = set()
    for phrasings in QUESTIONS.values():
        for q in phrasings:
            words.update(_words(q.replace("{shape}", "")))
    words.update(COLOURS, BACKGROUNDS, SHAPES, NUMBERS, ("left", "right"))
    return list(SPECIALS) + sorted(words)


def build_tokenizer():
    """A `tokenizers.Tokenizer`: lower-cased words and '?' -> ids ("color" read as "colour");
    specials skipped on decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace("color", "colour")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(list(SPECIALS))
    return tok


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    background: str
    items: tuple[Item, ...]  # left to right

    def item(self, shape: str) -> Item:
        return next(i for i in self.items if i.shape == shape)


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw(shape: str, colour: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One shape of random size and place."""
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    return draw_scene(Scene(background, (Item(shape, colour, cx, cy, r),)), size)


def draw_scene(scene: Scene, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    for item in scene.items:
        draw_shape(d, item.shape, item.cx, item.cy, item.r, COLOURS[item.colour])
    return img


def random_scene(count: int, size: int, rng: np.random.Generator) -> Scene:
    """`count` shapes of distinct kinds and colours, each in its own vertical band (left to right)."""
    shapes = rng.permutation(SHAPES)[:count]
    colours = rng.permutation(list(COLOURS))[:count]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if count == 1:
        r = rng.uniform(0.15, 0.4) * size
        cx, cy = rng.uniform(r, size - r, 2)
        return Scene(background, (Item(str(shapes[0]), str(colours[0]), cx, cy, r),))
    band = size / count
    items = []
    for k in range(count):
        r = rng.uniform(0.11, 0.2) * size if count == 3 else rng.uniform(0.12, 0.24) * size
        r = min(r, band / 2 - 1)
        cx = rng.uniform(k * band + r, (k + 1) * band - r)
        cy = rng.uniform(r, size - r)
        items.append(Item(str(shapes[k]), str(colours[k]), cx, cy, r))
    return Scene(background, tuple(items))


def question_for(kind: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(question, one-word answer) of this kind about the scene."""
    phrasings = QUESTIONS[kind]
    text = phrasings[rng.integers(len(phrasings))]
    items = scene.items
    if kind in ("shape", "which_shape") and len(items) != 1:
        raise ValueError(f"a {kind!r} question needs a scene with one shape, got {len(items)}")
    if kind == "position" and len(items) != 2:
        raise ValueError(f"a 'position' question needs a scene with two shapes, got {len(items)}")
    if kind == "shape":
        return text, items[0].colour
    if kind == "background":
        return text, scene.background
    if kind == "which_shape":
        return text, items[0].shape
    if kind == "count":
        return text, NUMBERS[len(items) - 1]
    k = int(rng.integers(len(items)))
    text = text.format(shape=items[k].shape)
    if kind == "colour_of":
        return text, items[k].colour
    return text, ("left", "right")[k]  # position: items run left to right


def sample(kinds, size: int, rng: np.random.Generator):
    """One (image, question, answer, kind): the kind uniformly from `kinds`, then a scene it fits."""
    kind = kinds[rng.integers(len(kinds))]
    counts = SHAPE_COUNTS.get(kind, (1, 2, 3))
    scene = random_scene(int(counts[rng.integers(len(counts))]), size, rng)
    question, answer = question_for(kind, scene, rng)
    return draw_scene(scene, size), question, answer, kind


def samples(count: int, kinds=DEMO_KINDS, size: int = 64, seed: int = 0) -> list[tuple]:
    """`count` in-memory (PIL image, question, answer, kind) tuples (held-out sets, examples)."""
    rng = np.random.default_rng(seed)
    return [sample(kinds, size, rng) for _ in range(count)]


def write_split(directory: str, name: str, count: int, size: int, rng: np.random.Generator,
                kinds=COLOUR_KINDS) -> str:
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            img, question, answer, kind = sample(kinds, size, rng)
            image = f"images/{name}_{i:05d}.png"
            img.save(os.path.join(directory, image))
            f.write(json.dumps({"image": image, "text_input": question, "text_output": answer, "kind": kind}) + "\n")
    return path


def write_tokenizers(directory: str) -> str:
    """The tokenizers as a HF processor saves them: tokenizer.json (the LM's: BOS `</s>` prepended,
    as LAVIS' Vicuna) + tokenizer_config.json, and qformer_tokenizer/ ([CLS] text [SEP]), so that
    the exported model works with `jblip generate` too (training encodes without special tokens)."""
    from tokenizers import processors
    os.makedirs(os.path.join(directory, "qformer_tokenizer"), exist_ok=True)
    ids = {t: i for i, t in enumerate(SPECIALS)}
    lm_tok = build_tokenizer()
    lm_tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B:1", special_tokens=[("</s>", ids["</s>"])])
    lm_tok.save(os.path.join(directory, "tokenizer.json"))
    lm = dict(bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
              add_eos_token=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(lm, f, indent=1)
    qformer = build_tokenizer()
    qformer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    qformer.save(os.path.join(directory, "qformer_tokenizer", "tokenizer.json"))
    with open(os.path.join(directory, "qformer_tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump(dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>", unk_token="<unk>"), f, indent=1)
    return directory


def make_dataset(directory: str, train: int = 512, eval: int = 64, size: int = 32, seed: int = 0,
                 kinds=COLOUR_KINDS) -> dict:
    """Write train.jsonl, eval.jsonl, images/ and tokenizer/; returns their paths.
    `kinds`: the question kinds asked (keys of QUESTIONS), e.g. DEMO_KINDS."""
    unknown = sorted(set(kinds) - set(QUESTIONS))
    if unknown or not kinds:
        raise ValueError(f"unknown question kind(s) {unknown or kinds!r}; known: {list(QUESTIONS)}")
    kinds = tuple(kinds)
    rng = np.random.default_rng(seed)
    return dict(train=write_split(directory, "train", train, size, rng, kinds),
                eval=write_split(directory, "eval", eval, size, rng, kinds),
                tokenizer=write_tokenizers(os.path.join(directory, "tokenizer")))
