"""`jblip eval` end to end: the bundled demo model on generated questions written in the
VQAv2 file format. The reported VQA accuracy must equal an exact-match figure computed here
independently (the same model asked directly through `jblip.pipeline.answer`), and a rerun
after an interruption must resume without writing any question twice."""
from __future__ import annotations

import json
import os

import pytest

import jblip
from jblip.cli import main
from jblip.pipeline import DEFAULT_MODEL, answer
from jblip.train.synthetic import DEMO_KINDS, samples

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")),
                                reason="demo model not bundled")

COUNT, SEED = 20, 31
DIGITS = {"one": "1", "two": "2", "three": "3"}  # VQA annotations write numbers as digits
# the task's decoding for InstructBLIP Vicuna (protocols.short_answer); the prompt is the bare
# question because the demo model was trained on bare questions
DECODING = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, repetition_penalty=1.5)


def write_vqav2(folder):
    """Questions + annotations in the VQAv2 release format, COCO-named images. Every fourth
    question gets a wrong human answer, so that the accuracy is not simply 100."""
    os.makedirs(os.path.join(folder, "val2014"))
    questions, annotations, truth = [], [], {}
    for i, (image, question, ans, kind) in enumerate(samples(COUNT, DEMO_KINDS, 64, SEED)):
        image_id, qid = 9000 + i, 500_000 + i
        image.save(os.path.join(folder, "val2014", f"COCO_val2014_{image_id:012d}.jpg"), quality=95)
        human = "purple" if i % 4 == 3 else DIGITS.get(ans, ans)
        truth[qid] = (os.path.join(folder, "val2014", f"COCO_val2014_{image_id:012d}.jpg"), question, human)
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append({"question_id": qid, "image_id": image_id, "question_type": kind,
                            "answer_type": "number" if ans in DIGITS else "other", "multiple_choice_answer": human,
                            "answers": [{"answer": human, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k in range(10)]})
    files = [os.path.join(folder, "questions.json"), os.path.join(folder, "annotations.json")]
    with open(files[0], "w") as f:
        json.dump({"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                   "questions": questions}, f)
    with open(files[1], "w") as f:
        json.dump({"data_subtype": "val2014", "annotations": annotations}, f)
    return files, truth


def independent_accuracy(truth) -> float:
    model = jblip.load_pretrained(DEFAULT_MODEL)
    qids = sorted(truth)
    said = answer(model, [truth[q][0] for q in qids], [truth[q][1] for q in qids], **DECODING)
    right = [DIGITS.get(s.strip(), s.strip()) == truth[q][2] for q, s in zip(qids, said)]
    return 100 * sum(right) / len(right)


def run_eval(files, images, out, capsys) -> tuple[str, str]:
    code = main(["eval", "--task", "vqav2", "--data", *files, "--images", images, "--out", out,
                 "--prompt", "{question}", "--batch-size", "8"])
    assert code == 0
    captured = capsys.readouterr()
    return captured.out.strip().splitlines()[-1], captured.err


def test_demo_vqav2_end_to_end_and_resume(tmp_path, capsys, private_xla_cache):
    files, truth = write_vqav2(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    last, err = run_eval(files, str(tmp_path / "data"), out, capsys)
    assert "ETA" in err
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    expected = independent_accuracy(truth)
    print(f"demo VQAv2 accuracy {expected:.2f}")
    assert 50 <= expected < 100  # the demo is good, and the wrong human answers cost it
    assert metrics["overall"] == pytest.approx(expected, abs=1e-9)
    assert last == f"vqav2: VQA accuracy {expected:.2f} over {COUNT} examples"
    kinds = {s[3] for s in samples(COUNT, DEMO_KINDS, 64, SEED)}
    assert set(metrics["by_question_type"]) == kinds and len(kinds) > 1
    assert sum(v["count"] for v in metrics["by_question_type"].values()) == COUNT
    with open(os.path.join(out, "vqa_results.json")) as f:
        results = json.load(f)  # the VQA evaluation server's format
    assert sorted(r["question_id"] for r in results) == sorted(truth)
    assert all(set(r) == {"question_id", "answer"} for r in results)

    # interrupted mid-write after 5 questions: the rerun does the other 15, once each
    path = os.path.join(out, "predictions.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[:5]) + "\n" + lines[5][:20])
    last_again, err = run_eval(files, str(tmp_path / "data"), out, capsys)
    assert "15 examples to run, 5 already" in err and "incomplete last line" in err
    with open(path) as f:
        keys = [json.loads(line)["key"] for line in f]
    assert sorted(keys) == sorted(str(q) for q in truth)
    assert last_again == last
