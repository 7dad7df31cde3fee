"""`jblip eval` with each family's published protocol on tiny saved HF checkpoints (InstructBLIP
Vicuna and Flan-T5, BLIP-2 OPT): the generated answers equal HF transformers' `generate` run with the same
prompts and the same decoding settings, so prompts, beam settings and the run's padding of
every batch to one width reach the model as intended."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from jblip.cli import main
from jblip.evaluation import protocols
from tests.hf_tokenizers import save_checkpoint
from tests.test_cli import write_images

QUESTIONS = ["what is it?", "is the sky blue or is it grey today?", "how many?", "who?", "where is the cat now?"]


def vqa_files(folder, paths):
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": i, "question": q, "question_id": 10 + i} for i, q in enumerate(QUESTIONS)]}
    annotations = {"annotations": [{"question_id": 10 + i, "image_id": i, "question_type": "what",
                                    "answer_type": "other", "answers": [{"answer": "x", "answer_id": k}
                                                                        for k in range(10)]}
                                   for i in range(len(QUESTIONS))]}
    for name, data in (("q.json", questions), ("a.json", annotations)):
        (folder / name).write_text(json.dumps(data))
    return [str(folder / "q.json"), str(folder / "a.json")]


@pytest.mark.parametrize("family,model_type,hf_family", [("llama", "instructblip", "vicuna"), ("t5", "instructblip", "t5"),
                                                         ("opt", "blip2", "opt")])
def test_eval_answers_equal_hf_generate_with_the_protocol(tmp_path, capsys, private_xla_cache, family, model_type,
                                                          hf_family):
    checkpoint = tmp_path / "ckpt"
    hf, processor = save_checkpoint(str(checkpoint), hf_family, seed=3)
    (tmp_path / "img").mkdir()
    paths = write_images(tmp_path / "img", [f"COCO_val2014_{i:012d}.jpg" for i in range(len(QUESTIONS))])
    files = vqa_files(tmp_path, paths)
    code = main(["eval", "--model", str(checkpoint), "--task", "vqav2", "--data", *files, "--images",
                 str(tmp_path / "img"), "--out", str(tmp_path / "out"), "--batch-size", "2"])
    assert code == 0
    capsys.readouterr()
    with open(tmp_path / "out" / "predictions.jsonl") as f:
        got = {r["key"]: r["output"] for r in map(json.loads, f)}

    protocol = protocols.short_answer(model_type, family)
    d = protocol.decoding
    prompts = [protocol.prompt.format(question=q) for q in QUESTIONS]
    images = [Image.open(p).convert("RGB") for p in paths]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    eos = hf.config.text_config.eos_token_id
    with torch.no_grad():
        out = hf.generate(**inputs, num_beams=d.num_beams, max_new_tokens=d.max_new_tokens,
                          min_new_tokens=d.min_new_tokens, length_penalty=d.length_penalty,
                          repetition_penalty=d.repetition_penalty, do_sample=False, eos_token_id=eos,
                          pad_token_id=processor.tokenizer.pad_token_id)
    new = out if family == "t5" else out[:, inputs["input_ids"].shape[1]:]
    expected = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    assert [got[str(10 + i)] for i in range(len(QUESTIONS))] == expected
    assert len(set(expected)) > 1  # the answers differ, so a mix-up of rows would show
