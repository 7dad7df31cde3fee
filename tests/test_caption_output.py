"""`jblip caption --out`: a file that is not a caption file is refused untouched, only a cut last
record is dropped, a second writer is refused, records are keyed by resolved absolute path, a
short batch runs at its bucket, and pipes or huge images are refused when decoded."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jblip import image_processing
from jblip.cli import main
from jblip.commands.caption import bucket, list_images
from jblip.commands.caption_output import CaptionOutput, image_key
from jblip.image_processing import ImageError, load_image

RECORD = json.dumps({"image": "/photos/a.png", "caption": "a cat"}) + "\n"


def caption(tmp_path, out):
    """`jblip caption` on a folder with one image; refusals happen before any model is read."""
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    return main(["caption", "--model", str(tmp_path / "no-model"), "--images", str(folder), "--out", str(out)])


@pytest.mark.parametrize("content", [
    b"my notes, no newline",                       # one line of text: used to be emptied
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff",  # binary
    RECORD.encode() + b"last line of someone's notes",  # a text file whose last line has no newline
    b"first line\n" + RECORD.encode(),
    RECORD.encode() + b'{"image": "/p.png", "caption": 3}\n',
])
def test_a_file_that_is_not_a_caption_file_is_refused_untouched(tmp_path, capsys, content):
    out = tmp_path / "results.jsonl"
    out.write_bytes(content)
    before = os.stat(out)
    assert caption(tmp_path, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jblip caption: error: ") and "\n" not in err, err
    assert "is not a jblip caption" in err and "left untouched" in err, err
    assert out.read_bytes() == content
    assert os.stat(out).st_mtime_ns == before.st_mtime_ns


def test_only_a_cut_caption_record_is_dropped(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    out.write_bytes(RECORD.encode() + b'{"image": "/photos/b.pn')
    with CaptionOutput(str(out)) as o:
        assert o.done == {image_key("/photos/a.png")}
    assert "incomplete last line" in capsys.readouterr().err
    assert out.read_text() == RECORD
    # a whole record that lost only its newline is kept, and the newline restored
    out.write_text(RECORD + RECORD.strip())
    with CaptionOutput(str(out)) as o:
        o.write([("/photos/c.png", "a dog")])
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == ["/photos/a.png"] * 2 + [
        "/photos/c.png"]


def test_a_second_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    out.write_text(RECORD)
    with CaptionOutput(str(out)):
        assert caption(tmp_path, out) == 2
        err = capsys.readouterr().err
        assert "another process is writing to" in err and "locked" in err, err
    assert out.read_text() == RECORD
    with CaptionOutput(str(out)) as o:  # released on close
        assert len(o.done) == 1


def test_non_regular_output_is_refused(tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    assert caption(tmp_path, fifo) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_records_are_keyed_by_resolved_absolute_path(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "a.png")
    os.symlink(real, tmp_path / "link")
    monkeypatch.chdir(real)
    here = list_images("*.png")
    monkeypatch.chdir(tmp_path)
    assert list_images("link/*.png") == list_images(str(tmp_path / "real")) == here
    assert here == [os.path.realpath(real / "a.png")]


def test_a_short_batch_runs_at_the_next_power_of_two():
    assert [bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [bucket(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


def test_pipes_are_refused_and_huge_images_are_reduced_or_refused(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path / "pipe.jpg")  # would block forever if opened
    monkeypatch.setattr(image_processing, "REDUCE_ABOVE", 50 * 50)
    monkeypatch.setattr(image_processing, "MAX_DECODED_PIXELS", 100 * 100)
    pixels = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg")
    assert load_image(tmp_path / "big.jpg").size == (50, 50)  # JPEG: decoded at 1/4 scale
    Image.fromarray(pixels[:90, :90]).save(tmp_path / "mid.png")
    assert load_image(tmp_path / "mid.png").size == (45, 45)  # decoded whole, then halved at once
    Image.fromarray(pixels[:120, :120]).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"120x120 .* limited to 0 megapixels"):
        load_image(tmp_path / "big.png")
