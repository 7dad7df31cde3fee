"""Open any supported checkpoint (file or HF-style folder) as a TensorSource.

    with open_checkpoint("Salesforce/instructblip-vicuna-7b/") as src:
        params = convert_params(src, RULES, abstract)
"""
from __future__ import annotations

import os

from jblip import bounded_json
from jblip.convert.errors import CheckpointError, UnsafeCheckpointError  # noqa: F401  (re-exported)
from jblip.convert.safetensors_reader import SafetensorsFile, SafetensorsIndex
from jblip.convert.tensor_source import TensorSource  # noqa: F401  (re-exported)
from jblip.convert.torch_reader import TorchCheckpoint, TorchIndex

# in order of preference: safetensors first (no pickle at all)
FOLDER_CANDIDATES = ("model.safetensors", "model.safetensors.index.json",
                     "pytorch_model.bin", "pytorch_model.bin.index.json")


def _open_index(path: str, subkey):
    if subkey is not None:
        raise CheckpointError(f"{path}: subkey is not supported for sharded checkpoints")
    try:
        with open(path, "rb") as f:
            shards = set(bounded_json.load(f, "the index").get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint index ({e})") from None
    if shards and all(s.endswith(".safetensors") for s in shards):
        return SafetensorsIndex(path)
    return TorchIndex(path)


def open_checkpoint(path, subkey: str | None = None):
    """A TensorSource for a .safetensors / .bin / .pth / .pt file, an `*.index.json`, or a folder holding
    one of FOLDER_CANDIDATES. `subkey` (torch files only) picks a nested state dict, e.g. "model"."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in FOLDER_CANDIDATES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return open_checkpoint(candidate, subkey)
        present = sorted(os.listdir(path))
        raise CheckpointError(
            f"{path}: no checkpoint found; looked for {', '.join(FOLDER_CANDIDATES)}; the folder holds: "
            + (", ".join(present[:30]) + (" ..." if len(present) > 30 else "") if present else "nothing"))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.endswith(".json"):
        return _open_index(path, subkey)
    with open(path, "rb") as f:
        head = f.read(9)
    if path.endswith(".safetensors") or head[8:9] == b"{":  # 8-byte length, then the JSON header
        if subkey is not None:
            raise CheckpointError(f"{path}: subkey {subkey!r} given, but this is a safetensors file")
        return SafetensorsFile(path)
    if head.startswith(b"PK") or head.startswith(b"\x80"):  # torch.save zip / legacy pickle
        return TorchCheckpoint(path, subkey)
    raise CheckpointError(f"{path}: not a checkpoint this reader knows (neither safetensors, "
                          f"a torch.save zip, nor a legacy torch pickle)")
