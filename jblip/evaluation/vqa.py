"""VQAv2 and OK-VQA: open-ended questions about COCO images, scored with VQA accuracy.

Files (the official release format): the questions JSON
(`v2_OpenEnded_mscoco_val2014_questions.json`, OK-VQA's
`OpenEnded_mscoco_val2014_questions.json`) and, to score, the annotations JSON
(`v2_mscoco_val2014_annotations.json`, `mscoco_val2014_annotations.json`); a
test split has questions only and is written out for the evaluation server.
Images: `COCO_<data_subtype>_<image_id:012d>.jpg` in --images or in its
`<data_subtype>/` folder (data_subtype from the questions file, e.g. val2014).

Protocol: `protocols.short_answer` (prompt "Question: {question} Short answer:"
or the BLIP-2 OPT wording; 5 beams, 1-10 new tokens, the family's length
penalty; see there for the sources). The answer is the generated text, stripped;
the VQA script normalises it. LAVIS' BLIP-2 OK-VQA evaluation can also
lemmatise answers with spaCy (`apply_lemmatizer`); jblip does not.

Metric: VQA accuracy (`metrics.vqa_accuracy`), overall and per question type
and answer type. Results file: `[{"question_id", "answer"}]`, the format the
VQA evaluation server and script take.
"""
from __future__ import annotations

from jblip.evaluation import protocols
from jblip.evaluation.metrics.breakdown import breakdown
from jblip.evaluation.metrics.vqa_accuracy import vqa_accuracy
from jblip.evaluation.task import Example, Task, find_image, read_json


def coco_image(images: str, subtype: str, image_id: int) -> str:
    name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
    return find_image(images, name, f"{subtype}/{name}", f"{int(image_id):012d}.jpg")


class VQAv2(Task):
    name = "vqav2"
    summary = "VQAv2 (questions + annotations JSON), VQA accuracy"
    results_file = "vqa_results.json"

    def load(self, files, images):
        if len(files) not in (1, 2):
            raise ValueError(f"task {self.name} takes --data QUESTIONS.json [ANNOTATIONS.json]")
        questions = read_json(files[0])
        if "questions" not in questions:
            raise ValueError(f"{files[0]} is not a VQA questions file (no 'questions' list)")
        subtype = questions.get("data_subtype", "val2014")
        annotations = {}
        if len(files) == 2:
            data = read_json(files[1])
            if "annotations" not in data:
                raise ValueError(f"{files[1]} is not a VQA annotations file (no 'annotations' list)")
            annotations = {a["question_id"]: a for a in data["annotations"]}
        examples = []
        for q in questions["questions"]:
            a = annotations.get(q["question_id"])
            if annotations and a is None:
                raise ValueError(f"question {q['question_id']} has no annotation in {files[1]}")
            examples.append(Example(
                key=str(q["question_id"]), id=q["question_id"], image=coco_image(images, subtype, q["image_id"]),
                fields={"question": q["question"]},
                reference=None if a is None else [x["answer"] for x in a["answers"]],
                groups={} if a is None else {"question_type": a.get("question_type"),
                                             "answer_type": a.get("answer_type")}))
        return examples

    def protocol(self, model_type, family):
        return protocols.short_answer(model_type, family)

    def score(self, examples, answers):
        return breakdown((vqa_accuracy(answers.get(e.key, ""), e.reference), e.groups) for e in examples)

    def headline(self, metrics):
        return f"VQA accuracy {metrics['overall']:.2f}"


class OKVQA(VQAv2):
    name = "okvqa"
    summary = "OK-VQA (questions + annotations JSON, VQA format), VQA accuracy"
    results_file = "okvqa_results.json"
