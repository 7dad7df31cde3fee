"""A synthetic visual-question dataset: coloured shapes, drawn with Pillow.

A scene is one to three filled shapes (circle, square, triangle; distinct
kinds and colours) on a white, grey or black background. Each record asks one
question of a kind from `QUESTIONS`, about a scene that answers it without
ambiguity: colour, shape and position questions show one shape (position: in
the left or right half), counting questions one to three shapes side by side.
Answers are one word. Comes with a word-level tokenizer.json (`tokenizers`)
over the small vocabulary. Used by the tests and `jblip train --recipe demo`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (200, 30, 30), "green": (30, 150, 40), "blue": (30, 60, 200), "yellow": (210, 185, 0)}
# Backgrounds far apart after the ViT's first LayerNorm, which removes a patch's brightness: light
# greys of one hue (white vs a light grey) look the same to it.
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three")

# kind -> phrasings ("{shape}" is filled in with the scene's shape)
QUESTIONS = {
    "colour": ("What colour is the shape?", "What colour is the {shape}?"),
    "background": ("What colour is the background?",),
    "which_shape": ("What shape is in the image?", "What shape is it?"),
    "position": ("Is the {shape} on the left or the right?", "Is the shape on the left or the right?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
}
COLOUR_KINDS = ("colour", "background")  # the small training tests: colours only
DEMO_KINDS = tuple(QUESTIONS)            # the bundled demo model: every kind
MULTI_SHAPE_KINDS = ("count",)           # the others show exactly one shape
NO_QUESTION_MARK = 0.25  # share of questions asked without their "?" (people type them both ways)

# The bundled demo's data (`jblip train --recipe demo`); the demo tests hold out another seed.
# Shape and position questions are asked twice as often as the others, which are learnt sooner.
DEMO_DATA = dict(train=12_000, eval=400, size=64, seed=0,
                 kinds=("colour", "background", "count", "which_shape", "which_shape", "position", "position"))

# ids 0-3 are special: pad, T5's </s>, LLaMA/OPT's </s> (LAVIS BOS = EOS = 2), unk; then BERT-style markers
SPECIALS = ("<pad>", "<eos>", "</s>", "<unk>", "[CLS]", "[SEP]")


def _words(text: str) -> list[str]:
    return text.lower().replace("?", " ?").split()


def vocabulary(extra_words: tuple[str, ...] = ()) -> list[str]:
    """The demo's words; `extra_words` (new ones only) come last, so the demo's ids stay."""
    words = set()
    for phrasings in QUESTIONS.values():
        for q in phrasings:
            words.update(_words(q.replace("{shape}", "")))
    words.update(COLOURS, BACKGROUNDS, SHAPES, NUMBERS, ("left", "right"))
    return list(SPECIALS) + sorted(words) + [w for w in extra_words if w not in words and w not in SPECIALS]


def build_tokenizer(extra_words: tuple[str, ...] = ()):
    """A `tokenizers.Tokenizer`: lower-cased words and '?' -> ids ("color" read as "colour");
    specials skipped on decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {w: i for i, w in enumerate(vocabulary(extra_words))}
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


def draw_shape(d: ImageDraw.ImageDraw, item: Item):
    cx, cy, r, fill = item.cx, item.cy, item.r, COLOURS[item.colour]
    if item.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif item.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif item.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {item.shape!r}; known: {SHAPES}")


def draw_scene(scene: Scene, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    for item in scene.items:
        draw_shape(d, item)
    return img


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def single_shape_scene(size: int, rng: np.random.Generator, side: str | None = None) -> Scene:
    """One shape of random kind, colour, size and place; `side` "left"/"right" keeps it there,
    clear of the middle."""
    shape, colour, background = _pick(SHAPES, rng), _pick(list(COLOURS), rng), _pick(list(BACKGROUNDS), rng)
    if side is None:
        r = rng.uniform(0.15, 0.4) * size
        cx, cy = rng.uniform(r, size - r, 2)
    else:
        r = rng.uniform(0.1, 0.2) * size
        gap = 0.06 * size  # between the shape and the middle line
        lo, hi = (r, size / 2 - gap - r) if side == "left" else (size / 2 + gap + r, size - r)
        cx, cy = rng.uniform(lo, hi), rng.uniform(r, size - r)
    return Scene(background, (Item(shape, colour, cx, cy, r),))


def row_scene(count: int, size: int, rng: np.random.Generator) -> Scene:
    """`count` shapes of distinct kinds and colours, each in its own vertical band (left to right)."""
    shapes = rng.permutation(SHAPES)[:count]
    colours = rng.permutation(list(COLOURS))[:count]
    background = _pick(list(BACKGROUNDS), rng)
    band = size / count
    items = []
    for k in range(count):
        r = min(rng.uniform(0.1, 0.2) * size, band / 2 - 1)
        cx, cy = rng.uniform(k * band + r, (k + 1) * band - r), rng.uniform(r, size - r)
        items.append(Item(str(shapes[k]), str(colours[k]), cx, cy, r))
    return Scene(background, tuple(items))


def question_for(kind: str, scene: Scene, rng: np.random.Generator, size: int) -> tuple[str, str]:
    """(question, one-word answer) of this kind about the scene."""
    text, items = _pick(QUESTIONS[kind], rng), scene.items
    if kind == "count":
        return text, NUMBERS[len(items) - 1]
    if kind == "background":
        return text, scene.background
    if len(items) != 1:
        raise ValueError(f"a {kind!r} question needs a scene with one shape, got {len(items)}")
    item = items[0]
    text = text.format(shape=item.shape)
    if kind == "colour":
        return text, item.colour
    if kind == "which_shape":
        return text, item.shape
    if kind == "position":
        return text, "left" if item.cx < size / 2 else "right"
    raise ValueError(f"unknown question kind {kind!r}; known: {list(QUESTIONS)}")


def _check_kinds(kinds) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(QUESTIONS))
    if unknown or not kinds:
        raise ValueError(f"bad question kinds {list(kinds)!r}: give some of {list(QUESTIONS)}")
    return kinds


def sample(kinds, size: int, rng: np.random.Generator):
    """One (image, question, answer, kind): a kind drawn uniformly from `kinds` (a kind listed twice
    comes twice as often), then a scene for it."""
    kind = _pick(_check_kinds(kinds), rng)
    if kind in MULTI_SHAPE_KINDS:
        scene = row_scene(int(rng.integers(1, 4)), size, rng)
    else:
        scene = single_shape_scene(size, rng, side=_pick(("left", "right"), rng) if kind == "position" else None)
    question, answer = question_for(kind, scene, rng, size)
    if rng.random() < NO_QUESTION_MARK:
        question = question.rstrip("?")
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


def write_tokenizers(directory: str, extra_words: tuple[str, ...] = ()) -> str:
    """The tokenizers as a HF processor saves them: tokenizer.json (the LM's: BOS `</s>` prepended,
    as LAVIS' Vicuna) + tokenizer_config.json, and qformer_tokenizer/ ([CLS] text [SEP]), so that
    the exported model works with `jblip generate` too (training encodes without special tokens)."""
    from tokenizers import processors
    os.makedirs(os.path.join(directory, "qformer_tokenizer"), exist_ok=True)
    ids = {t: i for i, t in enumerate(SPECIALS)}
    lm_tok = build_tokenizer(extra_words)
    lm_tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B:1", special_tokens=[("</s>", ids["</s>"])])
    lm_tok.save(os.path.join(directory, "tokenizer.json"))
    lm = dict(bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
              add_eos_token=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(lm, f, indent=1)
    qformer = build_tokenizer(extra_words)
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
    `kinds`: the question kinds asked (some of the keys of QUESTIONS, each equally often)."""
    _check_kinds(kinds)  # errors before any file is written
    rng = np.random.default_rng(seed)
    return dict(train=write_split(directory, "train", train, size, rng, kinds),
                eval=write_split(directory, "eval", eval, size, rng, kinds),
                tokenizer=write_tokenizers(os.path.join(directory, "tokenizer")))
