"""The `jblip` command line on a tiny saved checkpoint, run in-process: generate, caption
(resume without duplicates, corrupt images skipped), info, and one-line errors."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from jblip.cli import main
from jblip.pipeline import DEFAULT_MODEL
from tests.hf_tokenizers import save_checkpoint

NEW = "6"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, private_xla_cache):
    path = str(tmp_path_factory.mktemp("tiny-instructblip"))
    hf, processor = save_checkpoint(path, "vicuna", seed=0)
    return path, hf, processor


def write_images(folder, names, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, name in enumerate(names):
        size = (30 + 7 * i, 25 + 3 * i)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
        paths.append(str(folder / name))
    return paths


def hf_answers(hf, processor, paths, prompt):
    """HF generate + decode, greedy, with jblip's default Vicuna EOS (2)."""
    images = [Image.open(p).convert("RGB") for p in paths]
    inputs = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=int(NEW), do_sample=False, eos_token_id=2,
                          pad_token_id=processor.tokenizer.pad_token_id)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def test_generate_prints_the_answer(checkpoint, tmp_path, capsys):
    path, hf, processor = checkpoint
    [image] = write_images(tmp_path, ["cat.png"])
    prompt = "What colour is the circle?"
    rc = main(["generate", "--model", path, "--image", image, "--prompt", prompt, "--max-new-tokens", NEW])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.strip() == hf_answers(hf, processor, [image], prompt)[0]
    assert out.strip()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_caption_resumes_without_duplicates_and_skips_corrupt_images(checkpoint, tmp_path, capsys):
    path, hf, processor = checkpoint
    folder = tmp_path / "images"
    folder.mkdir()
    first_half = [os.path.realpath(p) for p in write_images(folder, ["a0.png", "a1.png", "a2.jpg"], seed=1)]
    second_half = [os.path.realpath(p) for p in write_images(folder, ["b0.png", "b1.png"], seed=2)]
    (folder / "a3_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "notes.txt").write_text("not an image and not listed")
    out = tmp_path / "results.jsonl"
    common = ["--model", path, "--out", str(out), "--batch-size", "2", "--max-new-tokens", NEW]

    # an "interrupted" first run: only half of the images
    assert main(["caption", "--images", str(folder / "a*"), *common]) == 0
    err = capsys.readouterr().err
    assert "a3_corrupt.jpg" in err and "1 unreadable" in err
    first = read_jsonl(out)
    assert [r["image"] for r in first] == first_half
    # a kill in the middle of a write leaves a partial line; the rerun must drop it
    with open(out, "a") as f:
        f.write('{"image": "' + first_half[0][:5])

    assert main(["caption", "--images", str(folder), *common]) == 0
    err = capsys.readouterr().err
    assert "incomplete last line" in err and "3 already in" in err and "a3_corrupt.jpg" in err
    records = read_jsonl(out)
    images = [r["image"] for r in records]
    assert len(images) == len(set(images)) == 5, images
    assert set(images) == set(first_half + second_half)
    assert records[:3] == first  # earlier lines untouched
    # captions are the model's (default InstructBLIP captioning prompt), equal to HF's
    captions = {r["image"]: r["caption"] for r in records}
    expected = hf_answers(hf, processor, first_half + second_half, "A short image description:")
    assert [captions[p] for p in first_half + second_half] == expected

    # a third run has nothing left to do (and does not load the model)
    assert main(["caption", "--images", str(folder), *common]) == 0
    assert "already in" in capsys.readouterr().err
    assert len(read_jsonl(out)) == 5


def test_info_prints_the_parameter_count(checkpoint, capsys):
    path, hf, _ = checkpoint
    assert main(["info", "--model", path]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in hf.parameters())
    print(out)
    assert re.search(rf"^parameters\s+{total:,}$", out, re.M), out
    assert "instructblip" in out and "llama" in out and "bfloat16" in out
    assert main(["info", "--model", "instructblip-vicuna-7b"]) == 0
    assert re.search(r"^parameters\s+7,913,210,624$", capsys.readouterr().out, re.M)  # the released checkpoint's count


def error_line(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jblip {command}: error: ") and "\n" not in err, err
    return err


def test_bad_input_gives_one_line_errors(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    [image] = write_images(tmp_path, ["ok.png"])
    assert main(["generate", "--model", path, "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]) == 2
    assert "missing.png" in error_line(capsys, "generate")
    (tmp_path / "fake.png").write_text("text")
    assert main(["generate", "--model", path, "--image", str(tmp_path / "fake.png"), "--prompt", "hi"]) == 2
    assert "fake.png" in error_line(capsys, "generate")
    assert main(["generate", "--model", path, "--image", image, "--prompt", ""]) == 2
    assert "empty" in error_line(capsys, "generate")
    long = "What colour is the circle? " * 20
    assert main(["generate", "--model", path, "--image", image, "--prompt", long, "--no-truncation"]) == 2
    assert "more than the 92 the model allows with max_new_tokens=30" in error_line(capsys, "generate")
    assert main(["generate", "--model", str(tmp_path), "--image", image, "--prompt", "hi"]) == 2
    assert "no config.json" in error_line(capsys, "generate")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["caption", "--model", path, "--images", str(empty), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no image files" in error_line(capsys, "caption")
    if not os.path.exists(os.path.join(DEFAULT_MODEL, "config.json")):
        assert main(["generate", "--image", image, "--prompt", "hi"]) == 2
        assert "bundled demo model is missing" in error_line(capsys, "generate")
