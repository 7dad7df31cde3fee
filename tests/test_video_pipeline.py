"""Videos end to end: prompt assembly equal to InstructBlipVideoProcessor, `generate_text(videos=)`
text equal to HF generate + decode, `jblip generate --video` and `jblip caption --videos`."""
import json

import numpy as np
import pytest
import torch

import jblip
from jblip.cli import main
from jblip.processing import Processor
from tests.hf_models import NUM_QUERIES
from tests.hf_video import save_video_checkpoint

PROMPTS = ["What colour is the circle?", "hi", "Question: where is the red triangle? Short answer:"]
NEW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("video-vicuna"))
    hf, processor = save_video_checkpoint(path, "vicuna", seed=0)
    return path, hf, processor


def clips(n, frames=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, 20 + 3 * i, 30, 3), dtype=np.uint8) for i in range(n)]


def test_inputs_equal_hf_video_processor(checkpoint):
    path, _, hf_processor = checkpoint
    videos = [v[:4] for v in clips(3)]  # HF lays out placeholders for exactly 4 frames
    ours = Processor.from_pretrained(path).videos(videos, PROMPTS, num_frames=4)
    ref = {k: np.asarray(v) for k, v in hf_processor(images=videos, text=PROMPTS, padding=True,
                                                     return_tensors="np").items()}
    assert np.abs(ours["pixel_values"] - ref["pixel_values"].transpose(0, 1, 3, 4, 2)).max() == 0
    for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        assert ours[key].tolist() == ref[key].tolist(), key
    video_id = hf_processor.tokenizer.convert_tokens_to_ids("<video>")
    assert (ours["input_ids"][:, :4 * NUM_QUERIES] == video_id).all()
    assert (Processor.from_pretrained(path).videos(videos, PROMPTS, num_frames=2)["input_ids"] == video_id).sum(1).tolist() \
        == [2 * NUM_QUERIES] * 3


def test_generate_text_for_videos_equals_hf(checkpoint):
    path, hf, hf_processor = checkpoint
    videos = [v[[0, 1, 3, 4]] for v in clips(3, seed=1)]  # what 4 of 6 frames samples
    inputs = {k: torch.tensor(np.asarray(v)) for k, v in hf_processor(images=videos, text=PROMPTS, padding=True,
                                                                      return_tensors="np").items()}
    pad = hf_processor.tokenizer.pad_token_id
    with torch.no_grad():
        first = hf.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=pad)[0, -NEW:].numpy()
    eos = int(next((t for t in first[2:] if t != first[0]), first[2]))
    with torch.no_grad():
        tokens = hf.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    expected = [t.strip() for t in hf_processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)]
    model = jblip.load_pretrained(path)
    got = model.generate_text(videos=clips(3, seed=1), prompts=PROMPTS, num_frames=4, max_new_tokens=NEW,
                              eos_token_ids=eos)
    assert got == expected and any(got)


def test_cli_generate_and_caption_videos(checkpoint, tmp_path, capsys):
    from PIL import Image
    path = checkpoint[0]
    folder = tmp_path / "clips"
    folder.mkdir()
    for i, clip in enumerate(clips(2, seed=2)):  # animated GIFs: no PyAV needed here
        frames = [Image.fromarray(f) for f in clip]
        frames[0].save(folder / f"clip{i}.gif", save_all=True, append_images=frames[1:])
    common = ["--model", path, "--frames", "4", "--max-new-tokens", "4"]
    assert main(["generate", "--video", str(folder / "clip0.gif"), "--prompt", "What happens?", *common]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1  # the text itself: see the test above
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--videos", str(folder), "--out", str(out), "--batch-size", "2", *common]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in records) == ["clip0.gif", "clip1.gif"]
    assert main(["generate", "--video", str(folder / "clip0.gif"), "--prompt", "hi", "--frames", "9",
                 "--model", path]) != 0
    assert "fewer than the 9 asked for" in capsys.readouterr().err
