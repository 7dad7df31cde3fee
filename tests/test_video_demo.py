"""The bundled video demo (jblip/assets/video-demo, `jblip train --recipe video-demo`): which way a
circle moves, on clips drawn with a seed its training data did not use. No training here."""
import collections
import json
import os

import numpy as np
import pytest

import jblip
from jblip.train.video_demo import NUM_FRAMES, QUESTION, VIDEO_DEMO_DATA, write_clips

VIDEO_DEMO = os.path.join(os.path.dirname(jblip.__file__), "assets", "video-demo")
HELD_OUT_SEED = 2024

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(VIDEO_DEMO, "config.json")),
                                reason="video demo model not bundled")


def test_video_demo_tells_the_direction_of_held_out_clips(tmp_path):
    assert HELD_OUT_SEED != VIDEO_DEMO_DATA["seed"]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(VIDEO_DEMO) for f in fs)
    assert size < 8 << 20, f"the bundled video demo should stay a few MB, is {size / 2**20:.1f} MiB"
    records = write_clips(str(tmp_path), "held_out", 100, VIDEO_DEMO_DATA["size"], np.random.default_rng(HELD_OUT_SEED))
    records = [json.loads(line) for line in open(records)]
    model = jblip.load_pretrained(VIDEO_DEMO)
    got = model.generate_text(videos=[str(tmp_path / r["video"]) for r in records], prompts=QUESTION,
                              num_frames=NUM_FRAMES, max_new_tokens=3)
    right, asked = collections.Counter(), collections.Counter()
    for r, answer in zip(records, got):
        right[r["text_output"]] += answer.strip() == r["text_output"]
        asked[r["text_output"]] += 1
    accuracy = sum(right.values()) / len(records)
    print("held-out accuracy", accuracy, {k: right[k] / asked[k] for k in asked})
    assert accuracy >= 0.9 and min(right[k] / asked[k] for k in asked) >= 0.75
