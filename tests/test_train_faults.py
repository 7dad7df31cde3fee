"""Training under bad input and faults: one-line option errors, unusable output places caught
before any work, bad records listed up front, unreadable images skipped and counted, a diverged
run stopped before it saves, a corrupt newest checkpoint skipped on resume, failed saves raised,
and generated demo inputs written atomically."""
import json
import os

import numpy as np
import pytest

from jblip.cli import main
from jblip.config import PRESETS
from jblip.train.checkpoint import Checkpointer
from jblip.train.cli import _write_once
from jblip.train.config import TrainConfig
from jblip.text_processing import TextTokenizer
from jblip.train.data import BatchStream, DataError, Encoder, read_jsonl
from jblip.train.finite_steps import TrainingDiverged
from jblip.train.labels import TextLayout
from jblip.train.loop import train
from jblip.train.synthetic import make_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("shapes")), train=64, eval=8, size=32, seed=0)


def config(shapes, directory, **changes):
    base = dict(model="tiny-instructblip-vicuna", train_data=shapes["train"], tokenizer=shapes["tokenizer"],
                trainable="qformer", mesh="data=1", batch_size=4, steps=4, progress=False,
                max_input_len=16, max_output_len=4, max_qformer_len=16, augment=False,
                optim=dict(lr=1e-3, warmup_lr=0.0, warmup_steps=1, total_steps=4),
                log_file=os.path.join(directory, "log.jsonl"))
    return TrainConfig.from_dict({**base, **changes})


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("jblip train: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("option, message", [
    ("keep_checkpoints=0", "keep_checkpoints must be >= 1, got 0"),
    ("steps=2.5", "steps must be an integer, got 2.5"),
    ("steps=abc", "steps must be an integer, got 'abc'"),
    ("batch_size='abc'", "batch_size must be an integer, got 'abc'"),
    ("trainable=5", "trainable must be a set name"),
    ("optim=[1, 2]", "optim must be a mapping of optimizer options, got [1, 2]"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("seed=99999999999999999999999", "seed must be <= 4294967295"),
    ("progress=[", "progress must be true or false, got '['"),
])
def test_out_of_range_options_are_one_line(shapes, tmp_path, capsys, option, message):
    rc = main(["train", "--model", "tiny-instructblip-vicuna", "--train-data", shapes["train"],
               "--output", str(tmp_path), "--set", option])
    assert rc == 2
    assert message in error_line(capsys)


@pytest.mark.parametrize("option, message", [
    ("demo_data={trian: 5}", "demo_data.trian is not an option; known: ['eval', 'train']"),
    ("demo_data={train: 0}", "demo_data.train must be a whole number >= 1, got 0"),
    ("demo_vision_pretrain=3", "demo_vision_pretrain must be a mapping of ['scenes', 'steps'], got 3"),
])
def test_bad_demo_sizes_are_one_line_before_any_file_is_written(tmp_path, capsys, option, message):
    assert main(["train", "--recipe", "demo", "--output", str(tmp_path / "run"), "--set", option]) == 2
    assert message in error_line(capsys)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("text, message", [
    ("steps: [1,\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping of options at the top level"),
    ("optim: {lr: fast}\n", "optim.lr must be a number, got 'fast'"),
])
def test_bad_config_files_are_one_line(shapes, tmp_path, capsys, text, message):
    (tmp_path / "job.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "job.yaml"), "--output", str(tmp_path)]) == 2
    assert message in error_line(capsys)


def test_an_unusable_checkpoint_dir_is_refused_before_any_work(shapes, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    rc = main(["train", "--model", "tiny-instructblip-vicuna", "--train-data", shapes["train"],
               "--output", str(tmp_path / "run"), "--set", f"checkpoint_dir={tmp_path / 'a_file' / 'ckpt'}",
               "--set", "checkpoint_every=1"])
    assert rc == 2
    err = error_line(capsys)
    assert "checkpoint_dir" in err and "a_file" in err and "is not a writable directory" in err
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")  # nothing was loaded or trained


def test_bad_records_are_listed_in_one_error_before_training(shapes, tmp_path):
    lines = [json.loads(line) for line in open(shapes["train"])][:6]
    lines[1]["image"] = "images/missing.png"
    lines[2]["text_input"] = 7
    lines[4]["image"] = None
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines).replace("images/", os.path.dirname(
        shapes["train"]) + "/images/"))
    with pytest.raises(DataError) as e:
        read_jsonl(str(data))
    message = str(e.value)
    assert "3 bad record(s)" in message and "\n" not in message
    assert "line 2: image file not found" in message and "missing.png" in message
    assert "line 3: \"text_input\" must be a string, got 7" in message
    assert "line 5: \"image\" must be a path string, got None" in message


def test_an_image_that_fails_to_decode_is_skipped_and_counted(shapes, tmp_path, capsys):
    records = read_jsonl(shapes["train"])[:8]
    with open(records[3]["image"], "rb") as f:
        broken = tmp_path / "broken.png"
        broken.write_bytes(f.read()[:40])  # truncated: exists, but does not decode
    records[3] = dict(records[3], image=str(broken))
    tok = TextTokenizer.from_dir(shapes["tokenizer"])
    encoder = Encoder(TextLayout.for_model(PRESETS["tiny-instructblip-vicuna"], qformer_cls=4, qformer_sep=5), tok, tok)
    stream = lambda: BatchStream(records, encoder, 4, 28, shuffle=False, train=False, workers=1)  # noqa: E731
    first = stream()
    batches = [next(first) for _ in range(4)]  # two epochs: record 3 met twice, reported once
    assert all(b["pixel_values"].shape == (4, 28, 28, 3) for b in batches)
    assert first.skipped_images == 1
    err = capsys.readouterr().err
    assert err.count("skipped an unreadable training image") == 1 and "broken.png" in err
    # record 3 is replaced by record 4, the same way in a fresh (resumed) stream
    assert np.array_equal(batches[0]["pixel_values"][3], batches[1]["pixel_values"][0])
    again = stream()
    again.restore(dict(position=0, seed=0))
    assert np.array_equal(next(again)["pixel_values"], batches[0]["pixel_values"])


def test_a_diverged_run_stops_before_any_later_checkpoint_or_export(shapes, tmp_path, capsys):
    directory = str(tmp_path)
    cfg = config(shapes, directory, optim=dict(lr=1e30, warmup_lr=1e30, warmup_steps=0, total_steps=4),
                 checkpoint_dir=os.path.join(directory, "ckpt"), checkpoint_every=1,
                 export_dir=os.path.join(directory, "model"))
    with pytest.raises(TrainingDiverged, match=r"step (\d) .* is NaN or infinite") as e:
        train(cfg)
    bad = int(e.value.args[0].split("step ")[1].split()[0])
    probe = Checkpointer(cfg.checkpoint_dir)
    assert all(step < bad for step in probe.all_steps())
    probe.close()
    assert not os.path.exists(cfg.export_dir)
    # asked to skip such steps, the run finishes and counts them
    skipping = cfg.updated(skip_nonfinite_steps=True, checkpoint_dir=os.path.join(directory, "ckpt2"),
                           log_file=os.path.join(directory, "log2.jsonl"))
    result = train(skipping)
    assert result["skipped_steps"] == 4 - (bad - 1)
    state = result["state"]
    assert int(state.step) == 4


def test_a_corrupt_newest_checkpoint_is_skipped_on_resume(shapes, tmp_path, capsys):
    """Also left behind: the temporary folder of a save killed before it completed. The resumed run
    ends with the same params and optimizer state as an uninterrupted one."""
    import shutil

    import jax
    directory = str(tmp_path)
    cfg = config(shapes, directory, checkpoint_dir=os.path.join(directory, "ckpt"), checkpoint_every=1)
    assert train(cfg, stop_after=2)["stopped"]
    step_two = os.path.join(cfg.checkpoint_dir, "2")
    shutil.copytree(step_two, os.path.join(cfg.checkpoint_dir, "3.orbax-checkpoint-tmp"))  # a save killed midway
    biggest = max((os.path.join(root, n) for root, _, names in os.walk(step_two) for n in names), key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    capsys.readouterr()
    result = train(cfg)
    err = capsys.readouterr().err
    assert "checkpoint step 2" in err and "does not restore, skipped" in err
    assert os.path.isdir(step_two + ".unrestorable")
    steps = [r["step"] for r in map(json.loads, open(cfg.log_file)) if r.get("event") == "train"]
    assert steps == [1, 2, 2, 3, 4]  # resumed after update 1, update 2 redone
    straight = train(config(shapes, os.path.join(directory, "straight")))
    a, b = jax.device_get(straight["state"]), jax.device_get(result["state"])
    assert int(b.step) == 4
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_generated_inputs_are_written_atomically(tmp_path):
    target = str(tmp_path / "data")

    def killed(folder):
        os.makedirs(folder)
        open(os.path.join(folder, "train.jsonl"), "w").write('{"image": "a.png"')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_once(target, "data", killed, "done")
    assert not os.path.exists(target)  # the rerun does not mistake a half-written folder for data

    def complete(folder):
        os.makedirs(folder)
        open(os.path.join(folder, "done"), "w").write("ok")

    _write_once(target, "data", complete, "done")
    assert os.listdir(target) == ["done"] and not os.path.exists(target + ".partial")


FAILING_RUN = r"""
import os, sys, shutil
import jax.numpy as jnp
from jblip.cli import main
from jblip.train import loop
from jblip.train.checkpoint import Checkpointer
from jblip.train.state import TrainState

def train(cfg):  # the real CLI around a run whose checkpoint folder breaks mid-run
    checkpointer = Checkpointer(cfg.checkpoint_dir)
    shutil.rmtree(cfg.checkpoint_dir)
    open(cfg.checkpoint_dir, "w").write("the folder was replaced by a file")
    checkpointer.save(1, TrainState(jnp.int32(0), {"w": jnp.ones(3)}, {}), {"position": 0, "seed": 0})
    checkpointer.wait()

loop.train = train
sys.exit(main(["train", "--model", "tiny-instructblip-vicuna", "--train-data", "x.jsonl", "--output", sys.argv[1],
               "--set", "checkpoint_every=1"]))
"""


def test_a_checkpoint_failure_ends_the_process_at_once(tmp_path):
    """In a subprocess: the failed save's orbax threads must not keep the process alive."""
    import subprocess
    import sys
    import time
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FAILING_RUN, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=240, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert time.perf_counter() - start < 120  # orbax's own threads would hold the exit for 300 s
    assert done.returncode == 3
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("jblip train: error: saving "), last
    assert "checkpoints failed: NotADirectoryError" in last, last
