"""TextVQA: questions that need reading text in the image.

Files: `TextVQA_0.5.1_val.json` ({"data": [{"question_id", "image_id",
"question", "answers": ten strings}]}) and, optionally, the OCR file released
with it (`TextVQA_Rosetta_OCR_v0.2_val.json`: {"data": [{"image_id",
"ocr_tokens"}]}). Images: `<image_id>.jpg` in --images or its `train_images/`
(where the val split's images are) or `test_images/` folder.

Protocol: the InstructBLIP paper gives the OCR tokens of datasets that have
them to the model as text ("OCR tokens: ..."; BLIP-2 is given them too in its
table); LAVIS' `predict_answers` joins the first 30 tokens with ", ". So the
prompt is "OCR tokens: {ocr}. Question: {question}" + the family's answer cue
when the OCR file is given, else the plain short-answer template; decoding as
`protocols.short_answer`.

Metric: VQA accuracy as TextVQA's EvalAI evaluator computes it (the VQA
formula, with the prediction and every human answer normalised alike; see
`metrics.vqa_accuracy`, humans="evalai"), overall. Results file: `[{"question_id", "answer"}]`.
"""
from __future__ import annotations

from jblip.evaluation import protocols
from jblip.evaluation.metrics.breakdown import breakdown
from jblip.evaluation.metrics.vqa_accuracy import vqa_accuracy
from jblip.evaluation.task import Example, Task, find_image, read_json

MAX_OCR_TOKENS = 30  # LAVIS predict_answers


class TextVQA(Task):
    name = "textvqa"
    summary = "TextVQA (questions JSON [+ Rosetta OCR JSON]), VQA accuracy"
    results_file = "textvqa_results.json"

    def __init__(self):
        self.with_ocr = False

    def load(self, files, images):
        if len(files) not in (1, 2):
            raise ValueError(f"task {self.name} takes --data TextVQA_0.5.1_val.json [TextVQA_Rosetta_OCR_v0.2_val.json]")
        data = read_json(files[0])
        if not isinstance(data, dict) or "data" not in data:
            raise ValueError(f"{files[0]} is not a TextVQA file (no 'data' list)")
        ocr = {}
        if len(files) == 2:
            ocr = {r["image_id"]: r.get("ocr_tokens", []) for r in read_json(files[1])["data"]}
        self.with_ocr = bool(ocr)
        examples = []
        for q in data["data"]:
            image = q["image_id"]
            examples.append(Example(
                key=str(q["question_id"]), id=q["question_id"],
                image=find_image(images, f"{image}.jpg", f"train_images/{image}.jpg", f"test_images/{image}.jpg"),
                fields={"question": q["question"], "ocr": ", ".join(ocr.get(image, [])[:MAX_OCR_TOKENS])},
                reference=q.get("answers") or None, groups={}))
        return examples

    def protocol(self, model_type, family):
        question = "OCR tokens: {ocr}. Question: {question}" if self.with_ocr else "Question: {question}"
        return protocols.short_answer(model_type, family, question)

    def score(self, examples, answers):
        return breakdown((vqa_accuracy(answers.get(e.key, ""), e.reference, humans="evalai"), e.groups)
                         for e in examples)

    def headline(self, metrics):
        return f"VQA accuracy {metrics['overall']:.2f}"
