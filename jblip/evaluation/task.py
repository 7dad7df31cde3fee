"""What every benchmark task provides: examples read from its files, a protocol (prompt template
and decoding settings per model family), answer post-processing, its metric and its official
results format. One task per file in this package; `jblip.evaluation.TASKS` lists them."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Decoding:
    """Beam-search settings under LAVIS' names' meaning: `max_new_tokens`/`min_new_tokens` are
    LAVIS' max_len/min_len (LAVIS passes them to generation where they count new tokens only)."""
    num_beams: int = 5
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0

    def replace(self, **changes) -> "Decoding":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def sampler_options(self) -> dict:
        options = dataclasses.asdict(self)
        options["strategy"] = "beam" if self.num_beams > 1 else "greedy"
        return options


@dataclass(frozen=True)
class Protocol:
    """A prompt template (fields in braces, e.g. "Question: {question} Short answer:") and decoding."""
    prompt: str
    decoding: Decoding


@dataclass
class Example:
    key: str                       # unique within the task, as text: the resume key
    id: Any                        # the benchmark's own id, as its results format wants it
    image: str                     # image file path
    fields: dict = field(default_factory=dict)      # filled into the prompt template
    reference: Any = None          # what the metric compares with (None: no annotations, e.g. a test split)
    groups: dict = field(default_factory=dict)      # categories for the metric's breakdown


def model_kind(model_type: str, family: str) -> str:
    """"blip2-opt", "blip2-t5", "instructblip-llama" (Vicuna), "instructblip-t5", ..."""
    return f"{model_type}-{family}"


class Task:
    """Base class; subclasses set `name`, `summary`, `results_file` and implement `load`,
    `protocol` and `score`."""
    name: str = ""
    summary: str = ""
    results_file: str = "results.json"

    def load(self, files: Sequence[str], images: str) -> list[Example]:
        raise NotImplementedError

    def protocol(self, model_type: str, family: str) -> Protocol:
        raise NotImplementedError

    def prompt(self, example: Example, template: str) -> str:
        try:
            return template.format(**example.fields)
        except (KeyError, IndexError) as e:
            raise ValueError(f"prompt template {template!r} names a field {e} that task {self.name} does not "
                             f"have; its fields: {sorted(example.fields)}") from None

    def answer(self, generated: str, example: Example) -> str:
        """The generated text as the benchmark receives it."""
        return generated.strip()

    def score(self, examples: Sequence[Example], answers: dict[str, str]) -> dict:
        """{"overall": percent (or the main caption score), ...breakdowns, notes}."""
        raise NotImplementedError

    def headline(self, metrics: dict) -> str:
        return f"accuracy {metrics['overall']:.2f}"

    def official_results(self, examples: Sequence[Example], answers: dict[str, str]):
        return [{"question_id": e.id, "answer": answers[e.key]} for e in examples if e.key in answers]


# ----------------------------------------------------------------------------- file helpers

def read_json(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def expect_files(task: str, files: Sequence[str], names: Sequence[str]) -> list[str]:
    if len(files) != len(names):
        raise ValueError(f"task {task} takes {len(names)} --data file(s): {', '.join(names)}; got {len(files)}")
    return list(files)


def find_image(images: str, *candidates: str) -> str:
    """The first of `candidates` (paths relative to the images folder) that exists; else the first,
    so that a missing image is reported when it is read (and the run goes on without it)."""
    for c in candidates:
        path = os.path.join(images, c)
        if os.path.isfile(path):
            return path
    return os.path.join(images, candidates[0])
