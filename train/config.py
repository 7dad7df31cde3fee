"""The fine-tuning job description: one dataclass, read from YAML or JSON, plus named recipes.

Example (YAML):
    model: Salesforce/instructblip-vicuna-7b   # HF-format dir / hub id, or a preset name (random init)
    train_data: data/train.jsonl
    eval_data: data/val.jsonl
    trainable: qformer                          # qformer | qformer+llm | all | [path prefixes]
    precision: bfloat16                         # compute; trainable params stay float32
    mesh: fsdp=-1
    batch_size: 16                              # global micro-batch
    steps: 2000                                 # optimizer updates
    optim: {lr: 1.0e-5, warmup_steps: 200, total_steps: 2000, accumulate: 8}
    eval_every: 500
    checkpoint_dir: runs/vqa/ckpt
    log_file: runs/vqa/log.jsonl
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from jblip import bounded_json
from jblip.scan import check_remat

from jblip.train import option_checks as check
from jblip.train.optim import OptimConfig

# integer options and their least allowed value
_INTEGERS = dict(batch_size=1, steps=1, seed=0, init_seed=0, max_input_len=1, max_output_len=1, max_qformer_len=1,
                 eval_every=0, eval_batch_size=1, max_new_tokens=1, checkpoint_every=0, keep_checkpoints=1,
                 log_every=1, data_threads=0, data_processes=0, num_frames=1)
_PATHS = ("eval_data", "image_root", "tokenizer", "qformer_tokenizer", "checkpoint_dir", "log_file", "export_dir")


@dataclass
class TrainConfig:
    model: str = ""
    train_data: str = ""
    eval_data: str | None = None
    image_root: str | None = None
    tokenizer: str | None = None          # dir with tokenizer.json (default: the model dir)
    qformer_tokenizer: str | None = None  # default: <tokenizer>/qformer_tokenizer, else the LM tokenizer
    trainable: Any = "qformer"
    precision: str = "float32"            # "float32" or "bfloat16" (ViT + LM compute; Q-Former fp32)
    quantize: str | None = None           # "int8" / "int4": the frozen LM's kernels, weight-only (QLoRA-style
                                          # base); they must not be in `trainable`
    remat: str = "none"                   # recompute policy of the layer stacks (jblip.scan): none | full |
                                          # dots_saveable | minimal; old booleans: true = full, false = none
    mesh: str = "fsdp=-1"
    batch_size: int = 8
    steps: int = 1000
    seed: int = 0
    init_seed: int = 0                    # random init when `model` is a preset name
    init_std: float = 0.02                # its weights' std (BERT/ViT's 0.02 is too small for tiny widths)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_input_len: int = 128
    max_output_len: int = 256
    max_qformer_len: int = 128
    image_size: int | None = None         # default: the vision tower's
    augment: bool = True                  # random resized crop + flip on the training images
    data_threads: int = 4                 # grain read-ahead threads decoding training images
    data_processes: int = 0               # > 0: grain worker processes decode instead (mp_prefetch)
    num_frames: int = 4                   # frames sampled from each video record ({"video": ...})
    eval_every: int = 0                   # optimizer updates; 0: only at the end (if eval_data)
    eval_at_start: bool = False           # also evaluate the model before training (the baseline)
    eval_batch_size: int = 8
    eval_max_examples: int | None = None
    max_new_tokens: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0             # optimizer updates; 0: only at the end
    keep_checkpoints: int = 3
    log_file: str | None = None
    log_every: int = 1
    export_dir: str | None = None
    progress: bool = True
    skip_nonfinite_steps: bool = False    # True: a step with a NaN/inf loss or gradient changes nothing;
    #                                       False: such a step stops the run before anything is written

    def __post_init__(self):
        if isinstance(self.optim, dict):
            self.optim = OptimConfig.from_dict(self.optim)
        elif not isinstance(self.optim, OptimConfig):
            raise ValueError(f"optim must be a mapping of optimizer options, got {self.optim!r}")
        for name, minimum in _INTEGERS.items():
            check.integer(name, getattr(self, name), minimum, check.MAX_SEED if "seed" in name else None)
        for name in ("image_size", "eval_max_examples"):
            check.integer(name, getattr(self, name), 1, optional=True)
        for name in ("augment", "eval_at_start", "progress", "skip_nonfinite_steps"):
            check.flag(name, getattr(self, name))
        if isinstance(self.remat, bool):  # configs written before remat had named policies
            self.remat = "full" if self.remat else "none"
        check_remat(self.remat)
        for name in ("model", "train_data", "mesh"):
            check.text(name, getattr(self, name))
        for name in _PATHS:
            check.text(name, getattr(self, name), optional=True)
        check.number("init_std", self.init_std, positive=True)
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize must be 'int8', 'int4' or null, got {self.quantize!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {self.precision!r}")
        if not (isinstance(self.trainable, str) or (isinstance(self.trainable, list) and self.trainable
                                                    and all(isinstance(p, str) for p in self.trainable))):
            raise ValueError(f"trainable must be a set name (qformer, qformer+llm, all) or a list of param "
                             f"path prefixes, got {self.trainable!r}")

    def check(self):
        """Errors for a job that cannot start (called before anything heavy happens)."""
        if not self.model:
            raise ValueError("no model: set `model` to a HF-format checkpoint directory, hub id or preset name")
        if not self.train_data:
            raise ValueError("no training data: set `train_data` to a JSONL file")
        for name in ("train_data", "eval_data"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f"{name}: no such file {path}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"training options must be a mapping, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def updated(self, **changes) -> "TrainConfig":
        merged = {**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        if isinstance(changes.get("optim"), dict):
            merged["optim"] = {**self.to_dict()["optim"], **changes["optim"]}
        return TrainConfig.from_dict(merged)


def read_config_file(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON file as a dict; relative data/output paths resolve next to it."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
        try:
            d = yaml.safe_load(text) or {}
        except (yaml.YAMLError, RecursionError) as e:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            d = bounded_json.loads(text, path)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of options at the top level")
    base = os.path.dirname(os.path.abspath(path))
    for key in ("train_data", *_PATHS):
        if isinstance(d.get(key), str) and not os.path.isabs(d[key]):
            d[key] = os.path.join(base, d[key])
    if isinstance(d.get("model"), str) and d["model"].startswith(("./", "../")):
        d["model"] = os.path.join(base, d["model"])
    return d


# LAVIS InstructBLIP instruction tuning: Q-Former + query tokens + ln_vision + projection
# trained, AdamW(0.9, 0.999) wd 0.05, warm-up 1000 updates from 1e-8 to 1e-5, cosine to 0 over
# 60K updates, global batch 128 (7B; 192 for 3B, 64 for 11-13B). batch_size x accumulate = 128.
RECIPES: dict[str, dict] = {
    "instructblip": dict(
        trainable="qformer", steps=60_000, batch_size=16, precision="bfloat16",
        optim=dict(lr=1e-5, warmup_lr=1e-8, min_lr=0.0, warmup_steps=1000, total_steps=60_000,
                   weight_decay=0.05, accumulate=8, clip_norm=1.0),
        max_input_len=128, max_output_len=256, eval_every=3000, checkpoint_every=3000),
    # The bundled demo model (jblip/assets/demo): the demo preset from a random init, its ViT first
    # pretrained alone (train/vision_pretrain.py), then every tower trained on the synthetic
    # questions of train.synthetic.DEMO_DATA (both written by `jblip train --recipe demo`).
    # init_std 0.1: with BERT's 0.02 at these widths, shape questions stayed at chance for 750 steps.
    "demo": dict(
        model="demo-instructblip-vicuna", trainable="all", steps=1500, batch_size=64, mesh="data=1",
        init_std=0.1, optim=dict(lr=1e-3, warmup_lr=0.0, warmup_steps=50, total_steps=1500, weight_decay=0.05),
        max_input_len=16, max_output_len=4, max_qformer_len=16, eval_every=500, eval_at_start=True,
        eval_batch_size=100, max_new_tokens=3, augment=False, checkpoint_every=100),
    # The moving-shape video demo (train/video_demo.py): the image demo, grown by four words, trained
    # on clips of a moving circle, 4 frames each ("Which way does the circle move?").
    "video-demo": dict(
        trainable="all", steps=500, batch_size=32, mesh="data=1", num_frames=4,
        optim=dict(lr=1e-3, warmup_lr=0.0, warmup_steps=20, total_steps=500, weight_decay=0.05),
        max_input_len=16, max_output_len=4, max_qformer_len=16, eval_every=100, eval_at_start=True,
        eval_batch_size=100, max_new_tokens=3, augment=False, checkpoint_every=100),
}


def recipe(name: str) -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return json.loads(json.dumps(RECIPES[name]))  # a deep copy
