"""VizWiz VQA: questions from blind people's photos, many of them unanswerable.

File: the official split JSON (`val.json`: a list of {"image", "question",
"answers": ten {"answer", "answer_confidence"}, "answer_type", "answerable"};
`test.json` has no answers). Images: `<image>` in --images or its `val/`,
`test/` folder. A question that cannot be answered from the photo has the
human answer "unanswerable" (answer type "unanswerable"); the model is scored
on it like on any other answer.

Protocol: `protocols.short_answer`, the short-answer VQA template and the same
5-beam, 1-10 token decoding (LAVIS publishes no VizWiz configuration of its own).

Metric: VQA accuracy as VizWiz's evaluation code (a port of the VQA script)
computes it: the prediction is normalised as in the VQA script, the human
answers are compared as written (the VQA script's punctuation pass over
differing human answers is not in VizWiz's port); overall, per answer type
(including "unanswerable") and per answerable flag. Answerability, which
VizWiz scores from a predicted "answerable" flag: the answer "unanswerable"
counts as predicting it, and its precision, recall and F1 against the
`answerable` = 0 questions are reported. Results file: `[{"image", "answer"}]`,
the format of the VizWiz evaluation server (which keys questions by image).
"""
from __future__ import annotations

from jblip.evaluation import protocols
from jblip.evaluation.metrics.breakdown import breakdown
from jblip.evaluation.metrics.vqa_accuracy import normalise_prediction, vqa_accuracy
from jblip.evaluation.task import Example, Task, find_image, read_json


class VizWiz(Task):
    name = "vizwiz"
    summary = "VizWiz VQA (split JSON, unanswerable included), VQA accuracy"
    results_file = "vizwiz_results.json"

    def load(self, files, images):
        if len(files) != 1:
            raise ValueError(f"task {self.name} takes --data val.json (or test.json)")
        data = read_json(files[0])
        if not isinstance(data, list) or not all(isinstance(q, dict) and "image" in q for q in data):
            raise ValueError(f"{files[0]} is not a VizWiz file (a list of {{image, question, answers}})")
        examples = []
        for q in data:
            answers = [a["answer"] for a in q.get("answers", [])] or None
            examples.append(Example(
                key=q["image"], id=q["image"], image=find_image(images, q["image"], f"val/{q['image']}",
                                                               f"test/{q['image']}"),
                fields={"question": q["question"]}, reference=answers,
                groups={"answer_type": q.get("answer_type"), "answerable": q.get("answerable")}))
        return examples

    def protocol(self, model_type, family):
        return protocols.short_answer(model_type, family)

    def score(self, examples, answers):
        result = breakdown((vqa_accuracy(answers.get(e.key, ""), e.reference, humans="vizwiz"), e.groups)
                           for e in examples)
        said = [normalise_prediction(answers.get(e.key, "")) == "unanswerable" for e in examples]
        truly = [e.groups.get("answerable") == 0 for e in examples]
        hits = sum(s and t for s, t in zip(said, truly))
        precision = hits / sum(said) if any(said) else 0.0
        recall = hits / sum(truly) if any(truly) else 0.0
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        result["unanswerable"] = {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1}
        return result

    def headline(self, metrics):
        return f"VQA accuracy {metrics['overall']:.2f}"

    def official_results(self, examples, answers):
        return [{"image": e.id, "answer": answers[e.key]} for e in examples if e.key in answers]
