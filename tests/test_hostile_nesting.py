"""Hostile object graphs and nesting in checkpoint pickles, safetensors headers and config.json
give one CheckpointError / ConfigError quickly: never exponential work, never a RecursionError."""
import json
import struct
import time
import zipfile

import pytest
import torch

from jblip.convert.errors import CheckpointError
from jblip.convert.safetensors_reader import SafetensorsFile
from jblip.convert.torch_reader import TorchCheckpoint
from jblip.config import ConfigError, from_hf_config


def shared_chain(levels, leaf):
    """A tuple chain each holding the previous one twice: a tree of 2**levels paths, a small pickle."""
    node = leaf
    for _ in range(levels):
        node = (node, node)
    return node


def timed(fn):
    start = time.perf_counter()
    result = fn()
    assert time.perf_counter() - start < 1.0
    return result


def test_a_60_level_shared_tuple_chain_loads_in_under_a_second(tmp_path):
    path = tmp_path / "chain.bin"
    torch.save({"w": torch.arange(3.0), "extra": shared_chain(60, ())}, path)  # 2**60 paths as a tree
    assert path.stat().st_size < 5000
    source = timed(lambda: TorchCheckpoint(path))
    assert source.keys() == ["w"] and source.read("w").tolist() == [0.0, 1.0, 2.0]


def test_a_100_level_shared_tuple_chain_is_refused_in_under_a_second(tmp_path):
    path = tmp_path / "chain.bin"
    torch.save({"w": torch.arange(3.0), "extra": shared_chain(100, ())}, path)
    with pytest.raises(CheckpointError, match="nests containers more than 64 levels"):
        timed(lambda: TorchCheckpoint(path))


def test_a_shared_chain_with_tensors_at_the_bottom_is_refused_in_under_a_second(tmp_path):
    path = tmp_path / "chain.bin"
    torch.save({"w": shared_chain(60, (torch.zeros(1),))}, path)
    with pytest.raises(CheckpointError, match="more than 1,000,000 tensor keys"):
        timed(lambda: TorchCheckpoint(path))


def deep_list_pickle(levels):
    """Protocol-2 pickle of a list nested `levels` deep, built opcode by opcode (pickle itself
    would recurse): `levels` EMPTY_LISTs, then APPENDs folding each into the one below."""
    return b"\x80\x02" + b"]" * levels + b"a" * (levels - 1) + b"."


@pytest.mark.parametrize("levels", [100, 100_000])
def test_deep_pickle_nesting_is_one_error(tmp_path, levels):
    path = tmp_path / "deep.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", deep_list_pickle(levels))
        zf.writestr("archive/byteorder", "little")
    with pytest.raises(CheckpointError, match="nests containers more than 64 levels"):
        timed(lambda: TorchCheckpoint(path))


def test_a_pickle_that_contains_itself_is_one_error(tmp_path):
    loop = []
    loop.append(loop)
    path = tmp_path / "loop.bin"
    torch.save({"w": torch.zeros(1), "loop": loop}, path)
    with pytest.raises(CheckpointError, match="contains itself"):
        TorchCheckpoint(path)


@pytest.mark.parametrize("levels", [100, 200_000])
def test_deep_json_in_a_safetensors_header_is_one_error(tmp_path, levels):
    header = ('{"__metadata__": ' + "[" * levels + "]" * levels + "}").encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="nested more than 64 levels"):
        timed(lambda: SafetensorsFile(path))


@pytest.mark.parametrize("levels", [100, 200_000])
def test_deep_json_in_config_json_is_one_error(tmp_path, levels):
    (tmp_path / "config.json").write_text('{"model_type": "instructblip", "x": ' + "[" * levels + "]" * levels + "}")
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        timed(lambda: from_hf_config(tmp_path))


def test_deep_json_in_processor_files_is_one_error(tmp_path):
    from jblip.bounded_json import JSONNestingError
    from jblip.image_processing import ImageProcessor
    from jblip.text_processing import _read_json
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "tokenizer_config.json").write_text(deep)
    (tmp_path / "preprocessor_config.json").write_text(deep)
    with pytest.raises(JSONNestingError, match="tokenizer_config.json is nested more than 64 levels"):
        _read_json(str(tmp_path / "tokenizer_config.json"))
    with pytest.raises(JSONNestingError, match="preprocessor_config.json is nested"):
        ImageProcessor.from_pretrained(str(tmp_path), 28)
