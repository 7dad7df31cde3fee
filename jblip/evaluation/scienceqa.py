"""ScienceQA-IMG: multiple-choice science questions with an image context.

File: ScienceQA's `problems.json` (problem id -> {"question", "choices",
"answer": index of the correct choice, "hint", "image": "image.png" or null,
"split", "subject", "grade", ...}). The IMG subset is the problems of the split
(--split, default test) that have an image. Images: `<split>/<pid>/image.png`
in --images (the release's layout), or `<pid>/image.png`.

Protocol: the hint (ScienceQA's text context) and the options go into the
prompt: "Context: {hint} Question: {question} Options: {choices}" + the answer
cue, the options written as LAVIS' `predict_answers` writes multiple choice
("(a) first (b) second ..."); "Context:" is left out when the hint is empty;
decoding as `protocols.short_answer`. The generated text is mapped to a choice
(`metrics.exact_match.match_choice`).

Metric: accuracy (the chosen option is the correct one), overall and per
subject, grade and whether a text context was given. Results file:
{"results": {pid: chosen index (-1 if none)}}, what ScienceQA's scoring script reads.
"""
from __future__ import annotations

from jblip.evaluation import protocols
from jblip.evaluation.aokvqa import list_choices
from jblip.evaluation.metrics.breakdown import breakdown
from jblip.evaluation.metrics.exact_match import match_choice
from jblip.evaluation.task import Example, Task, find_image, read_json


class ScienceQA(Task):
    name = "scienceqa"
    summary = "ScienceQA-IMG (problems.json, test split with images), accuracy"
    results_file = "scienceqa_results.json"
    default_split = "test"

    def __init__(self, split: str | None = None):
        self.split = split or self.default_split

    def load(self, files, images):
        if len(files) != 1:
            raise ValueError(f"task {self.name} takes --data problems.json")
        data = read_json(files[0])
        if not isinstance(data, dict) or not all(isinstance(p, dict) and "choices" in p for p in data.values()):
            raise ValueError(f"{files[0]} is not a ScienceQA problems file (problem id -> problem)")
        examples = []
        for pid, p in data.items():
            if p.get("split") != self.split or not p.get("image"):
                continue
            hint = (p.get("hint") or "").strip()
            examples.append(Example(
                key=str(pid), id=str(pid),
                image=find_image(images, f"{self.split}/{pid}/{p['image']}", f"{pid}/{p['image']}"),
                fields={"question": p["question"], "choices": list_choices(p["choices"]), "hint": hint,
                        "context": f"Context: {hint} " if hint else "", "choice_list": p["choices"]},
                reference=p.get("answer"),
                groups={"subject": p.get("subject"), "grade": p.get("grade"),
                        "context": "text" if hint else "none"}))
        if not examples:
            raise ValueError(f"{files[0]} has no problems with an image in split {self.split!r}")
        return examples

    def protocol(self, model_type, family):
        return protocols.short_answer(model_type, family, "{context}Question: {question} Options: {choices}")

    def chosen(self, e, answers) -> int:
        return match_choice(answers.get(e.key, ""), e.fields["choice_list"])

    def score(self, examples, answers):
        return breakdown((float(self.chosen(e, answers) == e.reference), e.groups) for e in examples)

    def official_results(self, examples, answers):
        return {"results": {e.id: self.chosen(e, answers) for e in examples if e.key in answers}}
