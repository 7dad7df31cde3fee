"""Benchmark evaluation with the papers' protocols: one file per task (files read, prompt,
decoding, post-processing, metric, results format, and where each comes from), the metrics
in `metrics/`, and the resumable runners behind `jblip eval` (`runner` for the generation
tasks, `retrieval_runner` for the retrieval tasks)."""
from __future__ import annotations

from jblip.evaluation.aokvqa import AOKVQA, AOKVQAChoice
from jblip.evaluation.captions import COCOKarpathy, NoCaps
from jblip.evaluation.gqa import GQA
from jblip.evaluation.retrieval import COCORetrieval, Flickr30K
from jblip.evaluation.scienceqa import ScienceQA
from jblip.evaluation.textvqa import TextVQA
from jblip.evaluation.vizwiz import VizWiz
from jblip.evaluation.vqa import OKVQA, VQAv2

TASKS = {t.name: t for t in (VQAv2, OKVQA, AOKVQA, AOKVQAChoice, GQA, VizWiz, TextVQA, ScienceQA,
                             COCOKarpathy, NoCaps, Flickr30K, COCORetrieval)}


def make_task(name: str, split: str | None = None):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    cls = TASKS[name]
    return cls(split) if hasattr(cls, "default_split") else cls()
