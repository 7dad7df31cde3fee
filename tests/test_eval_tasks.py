"""Each benchmark task on a few records in its official file format, through the evaluation
runner with a stand-in model (answers looked up by prompt): the files are read, prompts
built per protocol, answers post-processed, scored as worked out by hand, and written in the
benchmark's results format. Resuming and unreadable images too."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jblip.evaluation import make_task, protocols
from jblip.evaluation.runner import PREDICTIONS, finish, predict


class Images:
    """A stand-in image processor: any file that exists is an image, unless it says "corrupt"."""
    image_size = 4

    def preprocess_one(self, path, name):
        with open(path, "rb") as f:
            if f.read() == b"corrupt":
                raise ValueError(f"cannot read image {path}: corrupt")
        return np.zeros((4, 4, 3), np.float32)


def stand_in(replies: dict):
    calls = []

    def generate(pixels, prompts):
        assert pixels.shape[0] == len(prompts)
        calls.append(list(prompts))
        return [replies[p] for p in prompts]
    generate.calls = calls
    return generate


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def touch(folder, *names, content=b"x"):
    for n in names:
        p = os.path.join(folder, n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(content)


def evaluate(task, files, images, out, replies, template=None, batch_size=2):
    examples = task.load(files, images)
    template = template or task.protocol("instructblip", "llama").prompt
    generate = stand_in(replies)
    records = predict(task, examples, template, generate, Images(), str(out), batch_size, workers=1)
    metrics, line = finish(task, examples, records, str(out))
    with open(os.path.join(out, task.results_file)) as f:
        return metrics, line, json.load(f), generate


def test_protocols_per_family():
    assert protocols.short_answer("blip2", "opt").prompt == "Question: {question} Answer:"
    assert protocols.short_answer("blip2", "t5").prompt == "Question: {question} Short answer:"
    vicuna = protocols.short_answer("instructblip", "llama")
    assert vicuna.prompt == "Question: {question} Short answer:"
    assert (vicuna.decoding.num_beams, vicuna.decoding.max_new_tokens, vicuna.decoding.min_new_tokens) == (5, 10, 1)
    assert protocols.short_answer("blip2", "t5").decoding.length_penalty == -1.0
    assert protocols.short_answer("blip2", "opt").decoding.length_penalty == 0.0
    assert protocols.caption("blip2").prompt == "a photo of"
    assert protocols.caption("instructblip").decoding.max_new_tokens == 80


def test_gqa(tmp_path):
    touch(tmp_path / "img", "n1.jpg", "n2.jpg")
    data = write(tmp_path / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes",
                "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"imageId": "n2", "question": "Which side is the cup on?", "answer": "left",
                "types": {"structural": "query", "semantic": "rel"}}})
    replies = {"Question: Is the sky blue? Short answer:": "Yes.",
               "Question: Which side is the cup on? Short answer:": "the right"}
    metrics, line, results, _ = evaluate(make_task("gqa"), [data], str(tmp_path / "img"), tmp_path / "out", replies)
    assert metrics["overall"] == 50.0
    assert metrics["by_structural"] == {"query": {"score": 0.0, "count": 1}, "verify": {"score": 100.0, "count": 1}}
    assert sorted(results, key=lambda r: r["questionId"]) == [{"questionId": "201", "prediction": "Yes."},
                                                               {"questionId": "202", "prediction": "the right"}]
    assert line == "gqa: exact match 50.00 over 2 examples"


def test_vizwiz_keeps_unanswerable_apart(tmp_path):
    touch(tmp_path / "img" / "val", "VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg")
    data = write(tmp_path / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "unanswerable",
         "answerable": 0, "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 7
         + [{"answer": "phone", "answer_confidence": "maybe"}] * 3},
        {"image": "VizWiz_val_00000001.jpg", "question": "What colour is the shirt?", "answer_type": "other",
         "answerable": 1, "answers": [{"answer": "red", "answer_confidence": "yes"}] * 2
         + [{"answer": "pink", "answer_confidence": "yes"}] * 8}])
    replies = {"Question: What is this? Short answer:": "unanswerable",
               "Question: What colour is the shirt? Short answer:": "red"}
    metrics, _, results, _ = evaluate(make_task("vizwiz"), [data], str(tmp_path / "img"), tmp_path / "out", replies)
    # 7 humans said it: every leave-one-out set has >= 6 matches -> 1; "red" by 2 of 10 -> 0.6 (by hand)
    assert metrics["by_answer_type"]["unanswerable"]["score"] == pytest.approx(100.0)
    assert metrics["by_answer_type"]["other"]["score"] == pytest.approx(60.0)
    assert metrics["overall"] == pytest.approx(80.0)
    # the one unanswerable question was called so, and nothing else was
    assert metrics["unanswerable"] == {"precision": 100.0, "recall": 100.0, "f1": 100.0}
    assert {"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"} in results


def test_textvqa_puts_ocr_tokens_in_the_prompt(tmp_path):
    touch(tmp_path / "img" / "train_images", "abc.jpg")
    data = write(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 34602, "image_id": "abc", "question": "what brand is this?", "answers": ["nokia"] * 10}]})
    ocr = write(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [
        {"image_id": "abc", "ocr_tokens": ["NOKIA"] + [f"t{i}" for i in range(40)]}]})
    task = make_task("textvqa")
    examples = task.load([data, ocr], str(tmp_path / "img"))
    prompt = task.prompt(examples[0], task.protocol("instructblip", "llama").prompt)
    tokens = ", ".join(["NOKIA"] + [f"t{i}" for i in range(29)])  # the first 30, as LAVIS
    assert prompt == f"OCR tokens: {tokens}. Question: what brand is this? Short answer:"
    metrics, _, results, _ = evaluate(task, [data, ocr], str(tmp_path / "img"), tmp_path / "out", {prompt: "Nokia"})
    assert metrics["overall"] == 100.0 and results == [{"question_id": 34602, "answer": "Nokia"}]


AOKVQA = [{"question_id": "q1", "image_id": 42, "question": "What is the man holding?",
           "choices": ["umbrella", "bat", "kite", "phone"], "correct_choice_idx": 1,
           "direct_answers": ["bat"] * 2 + ["baseball bat"] * 8, "difficult_direct_answer": False},
          {"question_id": "q2", "image_id": 42, "question": "Why is he here?", "choices": ["game", "work", "rain", "fun"],
           "correct_choice_idx": 0, "direct_answers": ["game"] * 10, "difficult_direct_answer": True}]


def test_aokvqa_direct_answer_and_multiple_choice(tmp_path):
    touch(tmp_path / "img" / "val2017", "000000000042.jpg")
    data = write(tmp_path / "aokvqa_v1p0_val.json", AOKVQA)
    replies = {"Question: What is the man holding? Short answer:": "Bat.", "Question: Why is he here? Short answer:": "x"}
    metrics, _, results, _ = evaluate(make_task("aokvqa"), [data], str(tmp_path / "img"), tmp_path / "da", replies)
    # "Bat." -> "bat"; 2 of the 10 direct answers equal it: min(2/3, 1) (A-OKVQA does not average subsets);
    # q2 is marked difficult: A-OKVQA leaves it out of the direct-answer score
    assert metrics["overall"] == pytest.approx(100 * 2 / 3) and metrics["count"] == 1
    assert metrics["difficult_not_scored"] == 1
    assert results == {"q1": {"direct_answer": "bat"}, "q2": {"direct_answer": "x"}}
    mc = make_task("aokvqa-mc")
    prompt = "Question: What is the man holding? Options: (a) umbrella (b) bat (c) kite (d) phone Short answer:"
    assert mc.prompt(mc.load([data], str(tmp_path / "img"))[0], mc.protocol("instructblip", "llama").prompt) == prompt
    other = "Question: Why is he here? Options: (a) game (b) work (c) rain (d) fun Short answer:"
    metrics, _, results, _ = evaluate(mc, [data], str(tmp_path / "img"), tmp_path / "mc", {prompt: "(b)", other: "work"})
    assert metrics["overall"] == 50.0  # multiple choice scores every question
    assert results == {"q1": {"multiple_choice": "bat"}, "q2": {"multiple_choice": "work"}}


def test_scienceqa_img_subset(tmp_path):
    touch(tmp_path / "img" / "test" / "7", "image.png")
    problem = dict(question="Which animal is a mammal?", choices=["frog", "whale"], answer=1, hint="Look closely.",
                   image="image.png", split="test", subject="natural science", grade="grade3")
    data = write(tmp_path / "problems.json", {"7": problem, "8": dict(problem, image=None),  # no image: not IMG
                                              "9": dict(problem, split="train")})
    task = make_task("scienceqa")
    prompt = ("Context: Look closely. Question: Which animal is a mammal? Options: (a) frog (b) whale "
              "Short answer:")
    metrics, _, results, _ = evaluate(task, [data], str(tmp_path / "img"), tmp_path / "out", {prompt: "whale"})
    assert metrics["count"] == 1 and metrics["overall"] == 100.0
    assert metrics["by_subject"] == {"natural science": {"score": 100.0, "count": 1}}
    assert results == {"results": {"7": 1}}


def test_caption_tasks(tmp_path, monkeypatch):
    pytest.importorskip("pycocoevalcap")
    from jblip.evaluation.metrics import captions
    monkeypatch.setattr(captions, "java_available", lambda: False)  # fast: Python tokenizer, no METEOR
    touch(tmp_path / "img" / "val2014", "COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg")
    karpathy = write(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
         "sentences": [{"raw": f"a {w} on a table"}, {"raw": f"the {w} sits on the table"}]}
        for i, w, split in ((1, "cat", "test"), (2, "dog", "test"), (3, "cow", "train"))]})
    replies = {"a photo of": "a cat on a table"}
    task = make_task("coco-karpathy")
    examples = task.load([karpathy], str(tmp_path / "img"))
    assert [e.id for e in examples] == [1, 2] and examples[0].image.endswith("val2014/COCO_val2014_000000000001.jpg")
    template = task.protocol("blip2", "opt").prompt
    metrics, line, results, _ = evaluate(task, [karpathy], str(tmp_path / "img"), tmp_path / "coco", replies, template)
    assert results == [{"image_id": 1, "caption": "a cat on a table"}, {"image_id": 2, "caption": "a cat on a table"}]
    assert 0 < metrics["BLEU-4"] < 1 and metrics["overall"] == metrics["CIDEr-D"]
    assert line.startswith("coco-karpathy: CIDEr-D ")

    touch(tmp_path / "nocaps" / "validation", "0013ea2087020901.jpg", "00223fe8d8b1d1b4.jpg")
    nocaps = write(tmp_path / "nocaps_val_4500_captions.json", {
        "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain"},
                   {"id": 1, "file_name": "00223fe8d8b1d1b4.jpg", "domain": "out-domain"}],
        "annotations": [{"image_id": 0, "id": 0, "caption": "a cat on a table"},
                        {"image_id": 1, "id": 1, "caption": "a red fire truck"}]})
    metrics, _, results, _ = evaluate(make_task("nocaps"), [nocaps], str(tmp_path / "nocaps"), tmp_path / "nc",
                                      replies, template)
    assert set(metrics["by_domain"]) == {"in-domain", "out-domain"}
    assert metrics["by_domain"]["in-domain"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # the caption is the reference
    assert metrics["by_domain"]["out-domain"]["BLEU-4"] < 1e-3


def vqa_files(tmp_path, n=5):
    touch(tmp_path / "img", *(f"COCO_val2014_{i:012d}.jpg" for i in range(n)))
    questions = write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": i, "question": f"q{i}?", "question_id": 100 + i} for i in range(n)]})
    annotations = write(tmp_path / "a.json", {"annotations": [
        {"question_id": 100 + i, "image_id": i, "question_type": "what", "answer_type": "other",
         "answers": [{"answer": f"a{i}", "answer_id": k} for k in range(10)]} for i in range(n)]})
    return questions, annotations


def test_resume_writes_each_example_once(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    replies = {f"q{i}?": f"a{i}" for i in range(5)}
    task = make_task("vqav2")
    examples = task.load([questions, annotations], str(tmp_path / "img"))
    out = tmp_path / "out"
    predict(task, examples, "{question}", stand_in(replies), Images(), str(out), 2, workers=1)
    path = out / PREDICTIONS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])  # as if killed while writing the third line
    generate = stand_in(replies)
    records = predict(task, examples, "{question}", generate, Images(), str(out), 2, workers=1)
    assert generate.calls == [["q2?", "q3?"], ["q4?", "q4?"]]  # only what was missing; a short batch is filled
    keys = [json.loads(l)["key"] for l in path.read_text().splitlines()]
    assert sorted(keys) == [str(100 + i) for i in range(5)]
    assert finish(task, examples, records, str(out))[0]["overall"] == 100.0
    generate = stand_in(replies)
    predict(task, examples, "{question}", generate, Images(), str(out), 2, workers=1)
    assert generate.calls == []


def test_unreadable_image_is_reported_and_retried(tmp_path, capsys):
    questions, annotations = vqa_files(tmp_path, 3)
    touch(tmp_path / "img", "COCO_val2014_000000000001.jpg", content=b"corrupt")
    task = make_task("vqav2")
    examples = task.load([questions, annotations], str(tmp_path / "img"))
    replies = {f"q{i}?": f"a{i}" for i in range(3)}
    records = predict(task, examples, "{question}", stand_in(replies), Images(), str(tmp_path / "out"), 2, workers=1)
    assert sorted(records) == ["100", "102"] and "skipped 101" in capsys.readouterr().err
    metrics, _ = finish(task, examples, records, str(tmp_path / "out"))
    assert metrics["overall"] == pytest.approx(200 / 3) and metrics["missing"] == 1
    touch(tmp_path / "img", "COCO_val2014_000000000001.jpg")
    records = predict(task, examples, "{question}", stand_in(replies), Images(), str(tmp_path / "out"), 2, workers=1)
    assert sorted(records) == ["100", "101", "102"]


def test_errors_are_clear(tmp_path):
    questions, annotations = vqa_files(tmp_path, 2)
    task = make_task("vqav2")
    with pytest.raises(ValueError, match="not a VQA questions file"):
        task.load([annotations], str(tmp_path / "img"))
    examples = task.load([questions], str(tmp_path / "img"))
    with pytest.raises(ValueError, match="names a field"):
        predict(task, examples, "{context} {question}", stand_in({}), Images(), str(tmp_path / "o"), 2)
    records = predict(task, examples, "{question}", stand_in({"q0?": "x", "q1?": "y"}), Images(),
                      str(tmp_path / "o2"), 2)
    metrics, line = finish(task, examples, records, str(tmp_path / "o2"))  # no annotations: written, not scored
    assert metrics is None and "no annotations" in line
    with pytest.raises(ValueError, match="unknown task"):
        make_task("vqa3")
