"""Fine-tuning on video records: `{"video": path}` batches of [B, T, S, S, 3] frames with T*Q query
positions, through the same train loop; the video demo's starting model keeps the demo's rows."""
import json
import os

import numpy as np
import pytest

from jblip.train.config import TrainConfig
from jblip.train.data import DataError, read_jsonl, record_pixels
from jblip.train.labels import TextLayout, encode_example
from jblip.train.loop import train
from jblip.train.synthetic import write_tokenizers
from jblip.train.video_demo import NEW_WORDS, write_clips


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clips"))
    rng = np.random.default_rng(0)
    return dict(train=write_clips(root, "train", 8, 28, rng),
                tokenizer=write_tokenizers(os.path.join(root, "tokenizer"), NEW_WORDS), root=root)


def test_video_records_train(clips, tmp_path):
    cfg = TrainConfig.from_dict(dict(
        model="tiny-instructblip-vicuna", train_data=clips["train"],
        tokenizer=clips["tokenizer"], trainable="all", mesh="data=1", batch_size=2, steps=2, num_frames=2,
        optim=dict(lr=1e-3, warmup_lr=0.0, warmup_steps=1, total_steps=2), augment=False, max_input_len=16,
        max_output_len=4, max_qformer_len=16, progress=False,
        log_file=str(tmp_path / "log.jsonl")))
    train(cfg)
    log = [json.loads(line) for line in open(cfg.log_file)]
    losses = [r["loss"] for r in log if r.get("event") == "train"]
    assert len(losses) == 2 and np.all(np.isfinite(losses))


def test_video_batches_and_layout(clips, tmp_path):
    records = read_jsonl(clips["train"])
    assert records[0]["video"].endswith(".gif") and os.path.isabs(records[0]["video"])
    layout = TextLayout(family="llama", num_queries=3, image_token=99, bos=2, eos=2, pad=0, frames=4)
    assert encode_example([5, 6], [7], layout)["input_ids"] == [99] * 12 + [2, 5, 6, 7, 2]
    pixels = record_pixels(records[0], 28, 4)
    assert pixels.shape == (4, 28, 28, 3) and pixels.dtype == np.float32
    assert not np.array_equal(pixels[0], pixels[3])  # the circle moved
    mixed = tmp_path / "mixed.jsonl"
    first = json.loads(open(clips["train"]).readline())
    image = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(image)
    mixed.write_text(json.dumps(dict(first, video=os.path.join(clips["root"], first["video"]))) + "\n"
                     + json.dumps({"image": str(image), "text_input": "q", "text_output": "a"}) + "\n")
    with pytest.raises(DataError, match="1 video and 1 image records"):
        read_jsonl(str(mixed))
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"image": str(image), "video": str(image), "text_input": "q", "text_output": "a"}))
    with pytest.raises(DataError, match="an \"image\" or a \"video\""):
        read_jsonl(str(both))
