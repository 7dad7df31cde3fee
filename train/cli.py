"""`jblip train`: fine-tune from a YAML/JSON config, a named recipe, or both.

    jblip train --recipe demo --output runs/demo --export jblip/assets/demo   # the bundled demo model
    jblip train --recipe video-demo --output runs/video   # moving-circle clips, 4 frames each
    jblip train --config vqa.yaml                         # your model and data (see train/config.py)
    jblip train --recipe instructblip --model DIR --train-data train.jsonl --output runs/x

Settings are layered: recipe, then the config file, then command-line options
(`--set key=value` for any other option, e.g. `--set optim.lr=2e-5`).
Re-running the same command resumes from the newest checkpoint in the output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from jblip.config import PRESETS
from jblip.train.config import RECIPES, TrainConfig, read_config_file, recipe


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of training options")
    parser.add_argument("--recipe", choices=sorted(RECIPES) + ["retrieval-demo"],
                        help="built-in starting settings: instructblip (LAVIS recipe, Q-Former trained), "
                             "demo (tiny model on generated data), video-demo (moving-circle clips) or "
                             "retrieval-demo (BLIP-2 stage 1 ITC/ITM/ITG on generated scenes, see "
                             "jblip.train.retrieval_demo)")
    parser.add_argument("--model", help="HF-format checkpoint directory, hub id, or preset name")
    parser.add_argument("--train-data", metavar="JSONL", help='records {"image", "text_input", "text_output"}')
    parser.add_argument("--eval-data", metavar="JSONL", help="held-out records for loss / exact-match accuracy")
    parser.add_argument("--output", metavar="DIR",
                        help="run directory: checkpoints/, log.jsonl and the exported model/ go here "
                             "unless the config names other places")
    parser.add_argument("--export", metavar="DIR",
                        help="write the trained model (HF layout) here instead of <output>/model")
    parser.add_argument("--trainable", help="qformer | qformer+llm | all")
    parser.add_argument("--steps", type=int, help="optimizer updates")
    parser.add_argument("--batch-size", type=int, help="global micro-batch size")
    parser.add_argument("--mesh", help='device mesh, e.g. "fsdp=-1" or "data=2,fsdp=4"')
    parser.add_argument("--precision", choices=("float32", "bfloat16"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other option (JSON/YAML value); dotted keys reach into optim")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _parse_value(text: str):
    """A `--set` value as YAML (JSON without PyYAML); text that does not parse stays a string, so
    the option's own check names it."""
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except ValueError:
            return text
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return text


def _optim(d: dict) -> dict:
    optim = d.setdefault("optim", {})
    if not isinstance(optim, dict):
        raise ValueError(f"optim must be a mapping of optimizer options, got {optim!r}")
    return optim


def build_config(args) -> dict:
    d = recipe(args.recipe) if args.recipe else {}
    if args.config:
        file = read_config_file(args.config)
        merged = {**d, **file}
        if isinstance(file.get("optim", {}), dict):  # anything else is refused by TrainConfig, naming it
            merged["optim"] = {**d.get("optim", {}), **file.get("optim", {})}
        d = merged
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if key.startswith("optim."):
            _optim(d)[key[len("optim."):]] = _parse_value(value)
        else:
            d[key.replace("-", "_")] = _parse_value(value)
    flags = dict(model=args.model, train_data=args.train_data, eval_data=args.eval_data, trainable=args.trainable,
                 steps=args.steps, batch_size=args.batch_size, mesh=args.mesh, precision=args.precision)
    d.update({k: v for k, v in flags.items() if v is not None})
    if args.steps is not None and not any(item.startswith("optim.total_steps=") for item in args.set):
        _optim(d)["total_steps"] = args.steps  # the schedule follows --steps
    if args.no_progress:
        d["progress"] = False
    if args.output:
        out = os.path.abspath(args.output)
        d.setdefault("checkpoint_dir", os.path.join(out, "checkpoints"))
        d.setdefault("log_file", os.path.join(out, "log.jsonl"))
        d.setdefault("export_dir", os.path.join(out, "model"))
    if args.export:
        d["export_dir"] = os.path.abspath(args.export)
    return d


def _write_once(target: str, what: str, write, last_file: str) -> None:
    """Run `write(folder)` into `<target>.partial`, then rename it to `target`: a run killed while
    writing leaves no `target`, so the rerun writes it again instead of reading half of it.
    (`last_file`, written last, tells a complete folder from one an older jblip left half-written.)"""
    if os.path.isfile(os.path.join(target, last_file)):
        return
    shutil.rmtree(target, ignore_errors=True)
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    print(f"jblip train: writing {what} to {target}", file=sys.stderr)
    write(partial)
    os.replace(partial, target)


def _sizes(d: dict, key: str, defaults: dict) -> dict:
    """`defaults` with the positive whole numbers the config gives under `key` (e.g. a smaller
    demo for a quick try: `--set demo_data={train: 256, eval: 32}`)."""
    given = d.pop(key, None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"{key} must be a mapping of {sorted(defaults)}, got {given!r}")
    for name, value in given.items():
        if name not in defaults:
            raise ValueError(f"{key}.{name} is not an option; known: {sorted(defaults)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}.{name} must be a whole number >= 1, got {value!r}")
    return {**defaults, **given}


def _generated_data(d: dict, output: str, what: str, write) -> str:
    """A recipe's generated data in `<output>/data` (written once, atomically), named in `d` as the
    train/eval data and tokenizer, with `<output>/checkpoints` as the default checkpoint folder."""
    base = os.path.abspath(output)
    data_dir = os.path.join(base, "data")
    _write_once(data_dir, what, write, os.path.join("tokenizer", "tokenizer.json"))
    d.update(train_data=os.path.join(data_dir, "train.jsonl"), eval_data=os.path.join(data_dir, "eval.jsonl"),
             tokenizer=os.path.join(data_dir, "tokenizer"))
    d.setdefault("checkpoint_dir", os.path.join(base, "checkpoints"))
    return data_dir


def _demo_inputs(d: dict, output: str) -> None:
    """The demo recipe's generated data and stage-1 model (each written once, atomically) and
    its default checkpoint folder, so an interrupted demo run resumes."""
    from jblip.train.synthetic import DEMO_DATA, make_dataset
    data = {**DEMO_DATA, **_sizes(d, "demo_data", {"train": DEMO_DATA["train"], "eval": DEMO_DATA["eval"]})}
    vision = _sizes(d, "demo_vision_pretrain", {"steps": 800, "scenes": 5000})
    data_dir = _generated_data(d, output, "the synthetic shapes dataset", lambda folder: make_dataset(folder, **data))
    if d.get("model") in PRESETS:  # stage 1: the ViT alone (train/vision_pretrain.py), then everything
        from jblip.train.vision_pretrain import initial_model
        start = os.path.join(data_dir, "initial_model")
        log = lambda line: print(f"jblip train: {line}", file=sys.stderr)  # noqa: E731
        _write_once(start, "the stage-1 model (pretrained ViT)",
                    lambda folder: initial_model(PRESETS[d["model"]], folder, d.get("init_seed", 0),
                                                 d.get("init_std", 0.1), log, **vision), "tokenizer.json")
        d["model"] = start


def _video_demo_inputs(d: dict, output: str) -> None:
    """The video demo's generated clips and its starting model (the image demo, vocabulary grown)."""
    from jblip.pipeline import DEFAULT_MODEL
    from jblip.train.video_demo import VIDEO_DEMO_DATA, make_video_dataset, start_model
    data_dir = _generated_data(d, output, "the moving-circle clips",
                               lambda folder: make_video_dataset(folder, **VIDEO_DEMO_DATA))
    if not d.get("model"):
        start = os.path.join(data_dir, "start_model")
        _write_once(start, "the starting model (the image demo, vocabulary grown)",
                    lambda folder: start_model(folder, DEFAULT_MODEL), "tokenizer.json")
        d["model"] = start


def run(args) -> int:
    from jblip.commands.common import enable_compilation_cache
    enable_compilation_cache()  # a resumed run compiles nothing it compiled before
    if args.recipe == "retrieval-demo":
        from jblip.train import retrieval_demo
        base = os.path.abspath(args.output or "jblip-retrieval-demo")
        return retrieval_demo.run(args.export or base, args.steps, os.path.join(base, "checkpoints"))
    d = build_config(args)
    if args.recipe == "demo" and not d.get("train_data"):
        _demo_inputs(d, args.output or "jblip-demo")
    if args.recipe == "video-demo" and not d.get("train_data"):
        _video_demo_inputs(d, args.output or "jblip-video-demo")
    cfg = TrainConfig.from_dict(d)
    if not cfg.checkpoint_dir or not cfg.checkpoint_every:
        print("jblip train: note: " + ("no checkpoint_dir (or --output): an interrupted run starts over"
                                       if not cfg.checkpoint_dir else
                                       "checkpoint_every is 0: only the end of the run is checkpointed"),
              file=sys.stderr)
    from jblip.train import loop
    from jblip.train.checkpoint import CheckpointSaveError
    try:
        result = loop.train(cfg)
    except CheckpointSaveError as e:
        # orbax's background save threads can wait minutes for a step that will never come, and
        # the interpreter waits for them at exit: report and leave now (logs are flushed already)
        print(f"jblip train: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) and k != "event"}
    print(json.dumps(summary))
    return 0
