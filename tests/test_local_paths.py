"""Local paths never go to the HF hub (a symlink loop, a file, a folder's typo: one local error at
once), only `owner/name` strings naming nothing here do; an unknown mesh axis is named."""
import os

import pytest
from PIL import Image

from jblip.cli import main
from jblip.pretrained import is_hub_id
from jblip.train.loop import make_mesh


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the hub fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_only_owner_name_strings_that_name_nothing_here_are_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("Salesforce/instructblip-vicuna-7b")
    os.symlink("loop", "loop")
    os.makedirs("runs")
    (tmp_path / "notes").write_text("x")
    for local in ("loop", "runs/model", "notes/x", "./a", "/abs/path", "a/b/c", "owner/", "../x", 42):
        assert not is_hub_id(local), local


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_symlink_loop_or_a_file_is_a_local_error(tmp_path, monkeypatch, capsys, no_hub, command):
    monkeypatch.chdir(tmp_path)
    os.makedirs("m")
    os.symlink("loop", "m/loop")
    (tmp_path / "m" / "weights.bin").write_bytes(b"\0" * 8)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    extra = [] if command == "info" else ["--image", "x.png", "--prompt", "hi"]
    assert main([command, "--model", "m/loop", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jblip {command}: error: ") and "\n" not in err
    assert "m/loop is a broken symbolic link or a symlink loop" in err
    if command == "info":
        assert main(["info", "--model", "m/weights.bin"]) == 2
        assert "m/weights.bin is a file" in capsys.readouterr().err


def test_an_unknown_mesh_axis_is_named():
    with pytest.raises(ValueError, match="unknown axis 'banana'"):
        make_mesh("banana=3")
