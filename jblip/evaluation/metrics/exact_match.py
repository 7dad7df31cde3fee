"""Exact match after the VQA normalisation (GQA), and picking a listed choice from free text.

GQA: LAVIS' `GQATask` scores a prediction 1 when it equals the reference answer
after both went through the VQA script's punctuation and word normalisation
(see `vqa_accuracy`), else 0; there is one reference answer per question.
"""
from __future__ import annotations

import re
import string
from typing import Sequence

from jblip.evaluation.metrics.vqa_accuracy import normalise_punctuation, normalise_words


def normalise(text: str) -> str:
    return normalise_words(normalise_punctuation(text))


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


_LETTER = re.compile(r"^\(?([a-z])\)?[.:]?$")


def option_letters(n: int) -> str:
    return string.ascii_lowercase[:n]


def match_choice(answer: str, choices: Sequence[str]) -> int:
    """Index of the choice a generated answer names, or -1.

    In order: the answer is a choice (compared normalised); the answer is an option
    letter as the prompt lists them ("b", "(b)", "b."); the answer starts with an
    option letter in brackets ("(b) dog"); a choice appears in the answer (the
    longest such choice, so "red fox" wins over "fox")."""
    said = normalise(answer)
    options = [normalise(c) for c in choices]
    if said in options:
        return options.index(said)
    text = answer.strip().lower()
    m = _LETTER.match(text) or re.match(r"^\(([a-z])\)", text)
    if m and m.group(1) in option_letters(len(choices)):
        return option_letters(len(choices)).index(m.group(1))
    inside = [(len(o), i) for i, o in enumerate(options) if o and re.search(rf"(^| ){re.escape(o)}( |$)", said)]
    return max(inside)[1] if inside else -1
