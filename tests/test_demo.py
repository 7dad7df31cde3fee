"""The bundled demo model (jblip/assets/demo): held-out accuracy per question kind, the example
images through the CLI, and `jblip generate` finding it without --model. No training here."""
from __future__ import annotations

import collections
import os
import re

import pytest

import jblip
from jblip.cli import main
from jblip.pipeline import DEFAULT_MODEL, answer
from jblip.train.synthetic import DEMO_DATA, DEMO_KINDS, samples

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
HELD_OUT_SEED = 2024  # the training data uses DEMO_DATA["seed"]
PER_KIND = 50

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")),
                                reason="demo model not bundled")


def example_rows() -> list[tuple[str, str, str]]:
    """(image, question, answer) rows of the table in examples/README.md."""
    rows = []
    with open(os.path.join(EXAMPLES, "README.md")) as f:
        for line in f:
            m = re.match(r"^\|\s*`?([\w.-]+\.png)`?\s*\|\s*(.+?)\s*\|\s*`?(\w+)`?\s*\|\s*$", line)
            if m:
                rows.append(m.groups())
    return rows


def held_out() -> list[tuple]:
    """PER_KIND questions of every kind, drawn with a seed the training data did not use."""
    assert HELD_OUT_SEED != DEMO_DATA["seed"]
    pool = samples(PER_KIND * len(DEMO_KINDS) * 3, DEMO_KINDS, DEMO_DATA["size"], HELD_OUT_SEED)
    by_kind = collections.defaultdict(list)
    for s in pool:
        by_kind[s[3]].append(s)
    assert all(len(by_kind[k]) >= PER_KIND for k in DEMO_KINDS)
    return [s for k in DEMO_KINDS for s in by_kind[k][:PER_KIND]]


def test_demo_model_answers_held_out_questions():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEFAULT_MODEL) for f in fs)
    assert size < 8 << 20, f"the bundled demo model should stay a few MB, is {size / 2**20:.1f} MiB"
    model = jblip.load_pretrained(DEFAULT_MODEL)
    data = held_out()
    out = answer(model, [s[0] for s in data], [s[1] for s in data])
    right, wrong = collections.Counter(), collections.Counter()
    for (_, question, expected, kind), got in zip(data, out):
        right[kind] += got == expected
        if got != expected:
            wrong[(question, expected, got)] += 1
    per_kind = {k: right[k] / PER_KIND for k in DEMO_KINDS}
    total = sum(right.values()) / len(data)
    print(f"held-out exact match {total:.3f} over {len(data)} questions:",
          ", ".join(f"{k} {v:.3f}" for k, v in per_kind.items()))
    print("mistakes:", wrong.most_common(8))
    assert total >= 0.9
    assert min(per_kind.values()) >= 0.8, per_kind


@pytest.mark.slow
def test_examples_through_the_cli(capsys, private_xla_cache):
    rows = example_rows()
    assert len(rows) >= 4
    got = []
    for image, question, _ in rows:  # no --model: the bundled demo
        assert main(["generate", "--image", os.path.join(EXAMPLES, image), "--prompt", question]) == 0
        got.append(capsys.readouterr().out.strip())
    for (image, question, expected), text in zip(rows, got):
        print(f"{image} | {question} -> {text}")
    assert got == [expected for _, _, expected in rows]


def test_a_long_prompt_keeps_room_for_the_new_tokens(capsys, private_xla_cache):
    """The demo LM has 64 positions (8 queries): a 200-token prompt is cut to what is left after
    the queries and max_new_tokens, keeping its end, and answered (the demo model never saw
    prompts that long, so what it answers is not checked)."""
    image = os.path.join(EXAMPLES, "red_circle.png")
    question = "what " * 200 + "What colour is the circle?"
    for new_tokens, kept in (("4", 52), ("30", 26)):
        assert main(["generate", "--image", image, "--prompt", question, "--max-new-tokens", new_tokens]) == 0
        captured = capsys.readouterr()
        assert captured.out.strip()
        assert f"cut to {kept} keeping its end" in captured.err
    assert main(["generate", "--image", image, "--prompt", question, "--max-new-tokens", "60"]) == 2
    assert "max_new_tokens=60" in capsys.readouterr().err
