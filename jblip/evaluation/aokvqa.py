"""A-OKVQA: questions needing outside knowledge, direct answer and multiple choice.

File: `aokvqa_v1p0_val.json` (a list of {"question_id", "image_id", "question",
"choices", "correct_choice_idx", "direct_answers": ten strings,
"difficult_direct_answer"}). Images: COCO 2017, `<image_id:012d>.jpg` in
--images or its `val2017/` (`test2017/`) folder.

Direct answer (`aokvqa`): prompt and decoding of `protocols.short_answer`;
the answer is the stripped, lower-cased text without a final period. Scored as
A-OKVQA's `evaluation/eval_predictions.py` does: min(#direct answers equal to
it / 3, 1), with no further normalisation, over the questions not marked
`difficult_direct_answer` (those are predicted and written, not scored).

Multiple choice (`aokvqa-mc`): the options go into the prompt the way LAVIS'
`predict_answers` writes them ("(a) first (b) second ..."), i.e.
"Question: {question} Options: {choices}" + the answer cue, same decoding; the
generated text is mapped to a choice (`metrics.exact_match.match_choice`) and
scored 1 when it is the correct one.

Results file: A-OKVQA's own format, {question_id: {"direct_answer": ...}} or
{question_id: {"multiple_choice": choice text}}.
"""
from __future__ import annotations

from jblip.evaluation import protocols
from jblip.evaluation.metrics.breakdown import breakdown
from jblip.evaluation.metrics.exact_match import match_choice, option_letters
from jblip.evaluation.task import Example, Task, find_image, read_json


def list_choices(choices) -> str:
    return " ".join(f"({letter}) {c}" for letter, c in zip(option_letters(len(choices)), choices))


class AOKVQA(Task):
    name = "aokvqa"
    summary = "A-OKVQA direct answer (split JSON), A-OKVQA accuracy"
    results_file = "aokvqa_results.json"

    def load(self, files, images):
        if len(files) != 1:
            raise ValueError(f"task {self.name} takes --data aokvqa_v1p0_val.json")
        data = read_json(files[0])
        if not isinstance(data, list) or not all(isinstance(q, dict) and "question_id" in q for q in data):
            raise ValueError(f"{files[0]} is not an A-OKVQA file (a list of question records)")
        examples = []
        for q in data:
            name = f"{int(q['image_id']):012d}.jpg"
            examples.append(Example(
                key=str(q["question_id"]), id=q["question_id"],
                image=find_image(images, name, f"val2017/{name}", f"test2017/{name}"),
                fields={"question": q["question"], "choices": list_choices(q.get("choices", [])),
                        "choice_list": q.get("choices", [])},
                reference=self.reference(q), groups={"difficult": bool(q.get("difficult_direct_answer"))}))
        return examples

    def reference(self, q):
        return q.get("direct_answers")

    def protocol(self, model_type, family):
        return protocols.short_answer(model_type, family)

    def answer(self, generated, example):
        text = generated.strip().lower()
        return text[:-1].rstrip() if text.endswith(".") else text

    def score(self, examples, answers):
        def one(e):
            said = answers.get(e.key, "")
            return min(sum(said == d for d in e.reference) / 3, 1.0)
        scored = [e for e in examples if not e.groups["difficult"]]
        return dict(breakdown((one(e), {}) for e in scored), difficult_not_scored=len(examples) - len(scored))

    def official_results(self, examples, answers):
        return {str(e.id): {"direct_answer": answers[e.key]} for e in examples if e.key in answers}


class AOKVQAChoice(AOKVQA):
    name = "aokvqa-mc"
    summary = "A-OKVQA multiple choice (split JSON), accuracy"
    results_file = "aokvqa_mc_results.json"

    def reference(self, q):
        return q.get("correct_choice_idx")  # None on the test split

    def protocol(self, model_type, family):
        return protocols.short_answer(model_type, family, "Question: {question} Options: {choices}")

    def answer(self, generated, example):
        return generated.strip()

    def chosen(self, e, answers) -> int:
        return match_choice(answers.get(e.key, ""), e.fields["choice_list"])

    def score(self, examples, answers):
        return breakdown((float(self.chosen(e, answers) == e.reference), {}) for e in examples)

    def official_results(self, examples, answers):
        out = {}
        for e in examples:
            if e.key in answers:
                i = self.chosen(e, answers)
                out[str(e.id)] = {"multiple_choice": e.fields["choice_list"][i] if i >= 0 else answers[e.key]}
        return out
