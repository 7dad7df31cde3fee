"""GQA balanced test-dev: compositional questions about Visual Genome images, exact match.

File: `testdev_balanced_questions.json` (GQA's official format: question id ->
{"imageId", "question", "answer", "types": {"structural", "semantic", ...}}).
Images: `<imageId>.jpg` in --images.

Protocol: `protocols.short_answer` (BLIP-2 paper / LAVIS `gqa_zeroshot_flant5xl_eval.yaml`:
"Question: {} Short answer:", 5 beams, 1-10 new tokens). LAVIS' GQA task
passes no length penalty, so the model's `predict_answers` default applies,
which is what `short_answer` sets per family.

Metric: exact match after the VQA normalisation of both sides, as LAVIS'
`GQATask` scores it (`metrics.exact_match`), overall and per structural and
semantic type. Results file: `[{"questionId", "prediction"}]`, the format of
GQA's evaluation script and server.
"""
from __future__ import annotations

from jblip.evaluation import protocols
from jblip.evaluation.metrics.breakdown import breakdown
from jblip.evaluation.metrics.exact_match import exact_match
from jblip.evaluation.task import Example, Task, find_image, read_json


class GQA(Task):
    name = "gqa"
    summary = "GQA balanced test-dev (questions JSON), exact match"
    results_file = "gqa_results.json"

    def load(self, files, images):
        if len(files) != 1:
            raise ValueError(f"task {self.name} takes --data testdev_balanced_questions.json")
        data = read_json(files[0])
        if not isinstance(data, dict) or not all(isinstance(v, dict) and "question" in v for v in data.values()):
            raise ValueError(f"{files[0]} is not a GQA questions file (question id -> question record)")
        return [Example(key=str(qid), id=str(qid), image=find_image(images, f"{q['imageId']}.jpg"),
                        fields={"question": q["question"]}, reference=q.get("answer"),
                        groups={"structural": q.get("types", {}).get("structural"),
                                "semantic": q.get("types", {}).get("semantic")})
                for qid, q in data.items()]

    def protocol(self, model_type, family):
        return protocols.short_answer(model_type, family)

    def score(self, examples, answers):
        return breakdown((exact_match(answers.get(e.key, ""), e.reference), e.groups) for e in examples)

    def headline(self, metrics):
        return f"exact match {metrics['overall']:.2f}"

    def official_results(self, examples, answers):
        return [{"questionId": e.id, "prediction": answers[e.key]} for e in examples if e.key in answers]
