"""Checkpoint readers: torch-free reading of torch.save / safetensors files, bit-exact, and clear errors.

The files are written with torch; the reading happens in a subprocess that
must never import torch, and its arrays are compared byte for byte with torch's.
"""
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from jblip.convert.errors import CheckpointError, UnsafeCheckpointError
from jblip.convert.readers import open_checkpoint
from jblip.convert.rules import LINEAR, Rule, convert_params
from jblip.convert.safetensors_reader import CheckpointError as SafetensorsCheckpointError
from jblip.convert.safetensors_reader import SafetensorsFile, SafetensorsIndex
from jblip.convert.torch_reader import TorchCheckpoint, TorchIndex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state_dict():
    import torch
    torch.manual_seed(0)
    base = torch.randn(5, 7)
    lin = torch.nn.Linear(3, 6)
    sd = OrderedDict()
    sd["w"] = base
    sd["tied"] = base                        # same tensor under two keys
    sd["w_t"] = base.t()                     # non-contiguous view of the same storage
    sd["w_slice"] = base[1:4, 2:6]           # offset + strides into the same storage
    sd["half"] = torch.randn(4, 3).half()
    sd["bf16"] = torch.randn(3, 5).bfloat16()
    sd["bf16_t"] = torch.randn(5, 3).bfloat16().t()
    sd["long"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
    sd["mask"] = torch.tensor([True, False, True])
    sd["param"] = torch.nn.Parameter(torch.randn(2, 3))
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 4)
    sd["expanded"] = torch.randn(3, 1).expand(3, 4)
    sd["fp8"] = torch.randn(6).to(torch.float8_e4m3fn)   # new dtypes: UntypedStorage + _rebuild_tensor_v3
    for k, v in lin.state_dict().items():    # a real module state dict (carries _metadata)
        sd[f"lin.{k}"] = v
    return sd


def _bytes_of(t):
    return t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    import torch
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("ckpts")
    sd = _state_dict()
    paths = {}
    lavis = {"model": sd, "epoch": 3, "config": {"lr": 1e-4, "name": "run"}}
    paths["lavis"] = root / "lavis_style.pth"
    torch.save(lavis, paths["lavis"])
    paths["legacy"] = root / "legacy.pth"
    torch.save(lavis, paths["legacy"], _use_new_zipfile_serialization=False)
    paths["flat"] = root / "flat.bin"
    torch.save(sd, paths["flat"])

    keys = list(sd)
    halves = {"00001": keys[: len(keys) // 2], "00002": keys[len(keys) // 2:]}
    hf_bin, hf_st = root / "hf_bin", root / "hf_st"
    hf_bin.mkdir()
    hf_st.mkdir()
    bin_map, st_map = {}, {}
    for part, ks in halves.items():
        name = f"pytorch_model-{part}-of-00002.bin"
        torch.save(OrderedDict((k, sd[k]) for k in ks), hf_bin / name)
        bin_map.update({k: name for k in ks})
        name = f"model-{part}-of-00002.safetensors"
        save_file({k: sd[k].detach().contiguous().clone() for k in ks}, hf_st / name)
        st_map.update({k: name for k in ks})
    (hf_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": bin_map}))
    (hf_st / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": st_map}))
    paths["hf_bin"], paths["hf_st"] = hf_bin, hf_st
    expected = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape), _bytes_of(v.detach())) for k, v in sd.items()}
    bf16 = {k: v.detach().contiguous().view(torch.int16).numpy().view(np.uint16) for k, v in sd.items()
            if v.dtype == torch.bfloat16}
    return {"paths": {k: str(v) for k, v in paths.items()}, "expected": expected, "bf16": bf16, "root": root}


READ_ALL = r"""
import json, sys
import numpy as np
from jblip.convert.readers import open_checkpoint
jobs, out_dir = json.loads(sys.argv[1]), sys.argv[2]
report = {}
for label, path in jobs.items():
    with open_checkpoint(path) as src:
        entries = {}
        for i, key in enumerate(src.keys()):
            arr = src.read(key)
            assert arr.dtype == src.dtype(key) and arr.shape == src.shape(key), key
            assert arr.flags.c_contiguous and arr.flags.writeable, key
            np.save(f"{out_dir}/{label}_{i}.npy", np.frombuffer(arr.tobytes(), np.uint8))
            entries[key] = [i, arr.dtype.name, list(arr.shape)]
        report[label] = {"type": type(src).__name__, "subkey": getattr(src, "subkey", None), "entries": entries}
assert "torch" not in sys.modules, "a reader imported torch"
print(json.dumps(report))
"""


def test_torch_free_read_is_bit_exact(ckpts, tmp_path):
    jobs = {k: ckpts["paths"][k] for k in ("lavis", "legacy", "flat", "hf_bin", "hf_st")}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", READ_ALL, json.dumps(jobs), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["lavis"]["subkey"] == "model" and report["legacy"]["subkey"] == "model"
    assert report["flat"]["subkey"] is None
    assert report["hf_bin"]["type"] == "TorchIndex" and report["hf_st"]["type"] == "SafetensorsIndex"
    expected = ckpts["expected"]
    for label, rep in report.items():
        assert list(rep["entries"]) == list(expected), label  # "epoch"/"config" are not tensors: not keys
        for key, (i, dtype, shape) in rep["entries"].items():
            want_dtype, want_shape, want_bytes = expected[key]
            got = np.load(tmp_path / f"{label}_{i}.npy").tobytes()
            assert (dtype, tuple(shape)) == (want_dtype, want_shape), (label, key)
            assert got == want_bytes, (label, key)
            if key in ckpts["bf16"]:
                np.testing.assert_array_equal(np.frombuffer(got, np.uint16).reshape(shape), ckpts["bf16"][key])
    print(f"bit-exact: {sum(len(r['entries']) for r in report.values())} tensors in {len(report)} checkpoints")


def test_subkey_and_non_tensor_entries(ckpts):
    with TorchCheckpoint(ckpts["paths"]["lavis"], subkey="model") as src:
        assert src.subkey == "model" and "epoch" not in src.keys() and "w" in src
        assert src.is_parameter("param") and not src.is_parameter("w")
    with TorchCheckpoint(ckpts["paths"]["flat"]) as src:
        assert src.subkey is None and src.keys()[0] == "w"
    with pytest.raises(CheckpointError,
                       match=r"no 'nope' in the checkpoint.*available: \['config', 'epoch', 'model'\]"):
        TorchCheckpoint(ckpts["paths"]["lavis"], subkey="nope")


def test_readers_feed_convert_params(ckpts):
    import jax
    import jax.numpy as jnp
    abstract = {"dense": {"kernel": jax.ShapeDtypeStruct((3, 6), jnp.float32),
                          "bias": jax.ShapeDtypeStruct((6,), jnp.float32)}}
    rules = [Rule(r"lin\.weight", "dense/kernel", LINEAR), Rule(r"lin\.bias", "dense/bias"), Rule(r"(?!lin\.).*", None)]
    for path in (ckpts["paths"]["lavis"], ckpts["paths"]["hf_st"]):
        with open_checkpoint(path) as src:
            params = convert_params(src, rules, abstract)
            np.testing.assert_array_equal(params["dense"]["kernel"], src.read("lin.weight").T)


def test_read_rows_reads_a_slice_of_the_leading_axis_bit_exact(ckpts):
    """Rows a:b of every tensor equal read()[a:b] in every format, strided torch views included
    (the loader reads large tensors in row chunks: convert/chunked.py)."""
    from jblip.convert.fuse import FuseQVBias
    for label in ("lavis", "legacy", "flat", "hf_bin", "hf_st"):
        with open_checkpoint(ckpts["paths"][label]) as src:
            for source in (src, FuseQVBias(src)):
                for key in source.keys():
                    whole = source.read(key)
                    if whole.ndim == 0:
                        continue
                    n = whole.shape[0]
                    for a, b in ((0, n), (1, n - 1), (n - 1, n), (2, 2)):
                        rows = source.read_rows(key, a, b)
                        want = whole[a:b]
                        assert rows.dtype == want.dtype and rows.shape == want.shape, (label, key, a, b)
                        assert rows.tobytes() == want.tobytes(), (label, key, a, b)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pickle_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"epoch": 1, "model": {"w": _Evil(marker)}}, protocol=2)
    path = tmp_path / "pytorch_model.bin"
    if container == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
            zf.writestr("archive/byteorder", "little")
    else:
        path.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to unpickle the global (posix|os|nt)\.system"):
        open_checkpoint(tmp_path)
    assert not marker.exists()


def test_disallowed_torch_global_is_refused(tmp_path):
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/data.pkl", b"\x80\x02ctorch.serialization\nload\n.")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.serialization\.load"):
        TorchCheckpoint(path)


def _rewrite_zip(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)


def test_corrupt_torch_checkpoints(ckpts, tmp_path):
    src = ckpts["paths"]["flat"]
    data = open(src, "rb").read()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt zip checkpoint"):
        TorchCheckpoint(cut)

    missing = tmp_path / "missing.bin"
    _rewrite_zip(src, missing, lambda name, b: None if name == "flat/data/1" else b)
    with pytest.raises(CheckpointError, match=r"record flat/data/1 is missing"):
        TorchCheckpoint(missing)

    short = tmp_path / "short.bin"
    _rewrite_zip(src, short, lambda name, b: b[:10] if name == "flat/data/0" else b)
    with pytest.raises(CheckpointError, match=r"record flat/data/0 has 10 bytes, needs 140"):
        TorchCheckpoint(short)

    legacy = open(ckpts["paths"]["legacy"], "rb").read()
    cut_legacy = tmp_path / "cut_legacy.pth"
    cut_legacy.write_bytes(legacy[:-50])
    with pytest.raises(CheckpointError, match="truncated file"):
        TorchCheckpoint(cut_legacy)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        TorchCheckpoint(garbage)


def _safetensors_parts(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def _write_safetensors(path, header, data):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_corrupt_safetensors(ckpts, tmp_path):
    shard = os.path.join(ckpts["paths"]["hf_st"], "model-00001-of-00002.safetensors")
    header, data = _safetensors_parts(shard)

    cut = tmp_path / "cut.safetensors"
    _write_safetensors(cut, header, data[:-7])
    with pytest.raises(CheckpointError, match=r"truncated file: its header describes \d+ data bytes but only"):
        SafetensorsFile(cut)

    lying = tmp_path / "lying.safetensors"
    bad = json.loads(json.dumps(header))
    bad["w"]["data_offsets"] = [0, 8]
    _write_safetensors(lying, bad, data)
    with pytest.raises(CheckpointError, match=r"header lies about tensor 'w': data_offsets 0\.\.8 span 8 bytes "
                                              r"but shape \[5, 7\] F32 needs 140"):
        SafetensorsFile(lying)

    overlap = tmp_path / "overlap.safetensors"
    bad = json.loads(json.dumps(header))
    bad["tied"]["data_offsets"] = list(bad["w"]["data_offsets"])
    _write_safetensors(overlap, bad, data)
    with pytest.raises(CheckpointError, match=r"header lies about offsets: tensors .* overlap"):
        SafetensorsFile(overlap)

    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsFile(text)
    with pytest.raises(CheckpointError, match="looks like a PyTorch zip checkpoint"):
        SafetensorsFile(ckpts["paths"]["flat"])
    assert SafetensorsCheckpointError is CheckpointError  # one error class for every reader


def test_missing_shards(ckpts, tmp_path):
    for folder, index, gone in (("hf_st", "model.safetensors.index.json", "model-00002-of-00002.safetensors"),
                                ("hf_bin", "pytorch_model.bin.index.json", "pytorch_model-00002-of-00002.bin")):
        copy = tmp_path / folder
        shutil.copytree(ckpts["paths"][folder], copy)
        os.remove(copy / gone)
        with pytest.raises(CheckpointError, match=rf"{index}: 1 shard\(s\) named in the index are missing .*: {gone}"):
            open_checkpoint(copy)

    # the index points a key at the wrong shard: caught when that key is first used
    copy = tmp_path / "wrong"
    shutil.copytree(ckpts["paths"]["hf_st"], copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["w"] = "model-00002-of-00002.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with SafetensorsIndex(copy / "model.safetensors.index.json") as src:
        with pytest.raises(CheckpointError, match=r"puts 'w' in shard model-00002-of-00002.safetensors, but"):
            src.shape("w")


def test_open_checkpoint_picks_the_right_reader(ckpts, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(os.path.join(ckpts["paths"]["hf_st"], "model-00001-of-00002.safetensors"), both / "model.safetensors")
    shutil.copy(ckpts["paths"]["flat"], both / "pytorch_model.bin")
    with open_checkpoint(both) as src:
        assert isinstance(src, SafetensorsFile)  # safetensors preferred over pickle
    os.remove(both / "model.safetensors")
    with open_checkpoint(both) as src:
        assert isinstance(src, TorchCheckpoint)
    with open_checkpoint(os.path.join(ckpts["paths"]["hf_bin"], "pytorch_model.bin.index.json")) as src:
        assert isinstance(src, TorchIndex)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no checkpoint found; looked for model\.safetensors, "
                                              r"model\.safetensors\.index\.json, pytorch_model\.bin, "
                                              r"pytorch_model\.bin\.index\.json; the folder holds: config\.json"):
        open_checkpoint(empty)


def test_pickle_cannot_tamper_with_stand_ins(tmp_path):
    # GLOBAL _rebuild_tensor_v2, then BUILD with slot state {"__defaults__": (1,)}: must not change the reader
    payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b.")
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/data.pkl", payload)
    with pytest.raises(UnsafeCheckpointError,
                       match=r"tried to set '__defaults__' on torch\._utils\._rebuild_tensor_v2"):
        TorchCheckpoint(path)


def test_big_endian_storages_are_swapped_bit_exactly():
    import ml_dtypes
    from jblip.convert.tensor_source import bytes_as
    rng = np.random.default_rng(0)
    for arr in (rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(ml_dtypes.bfloat16),
                (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
                np.arange(4, dtype=np.int64)):
        unit = arr.dtype.itemsize // 2 if arr.dtype.kind == "c" else arr.dtype.itemsize
        big = np.frombuffer(arr.tobytes(), f"<u{unit}").astype(f">u{unit}").view(np.uint8)
        got = bytes_as(big.copy(), arr.dtype, "big")
        assert got.dtype == arr.dtype and got.tobytes() == arr.tobytes()
