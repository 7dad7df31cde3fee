"""The training loop: data -> jitted step on the mesh -> logs, evals, checkpoints, export.

`train(cfg)` runs a `TrainConfig` to its last optimizer update, resuming from
the newest checkpoint in `cfg.checkpoint_dir` when there is one (params,
optimizer state, step and data position are restored; the run continues as if
it had never stopped). Logs one JSON object per line to `cfg.log_file`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time

import jax

from jblip import sharding
from jblip.train import build
from jblip.train import trainable as tr
from jblip.train.checkpoint import Checkpointer
from jblip.train.config import TrainConfig
from jblip.train.data import BatchStream, DataError, Encoder, holds_videos, read_jsonl
from jblip.train.evaluate import Evaluator
from jblip.train.finite_steps import FiniteSteps
from jblip.train.option_checks import writable_dir
from jblip.train.optim import make_optimizer
from jblip.train.state import Placement, init_state
from jblip.train.step import make_train_step


class JsonlLog:
    def __init__(self, path: str | None):
        self.file = None
        if path and jax.process_index() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a")

    def write(self, record: dict):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def _progress(total: int, initial: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def global_batch(batch: dict, placement: Placement, global_size: int) -> dict:
    """This host's rows -> global arrays sharded over the mesh's batch axes."""
    if placement.mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    target = placement.batch(global_size)
    return {k: jax.make_array_from_process_local_data(target, v, (global_size,) + v.shape[1:])
            for k, v in batch.items()}


def make_mesh(spec: str):
    """The run's mesh; a spec without -1 that needs fewer devices than there are uses the first ones."""
    devices = jax.devices()
    if "-1" not in spec:
        needed = math.prod(_fixed_sizes(spec))
        if needed > len(devices):
            raise ValueError(f"mesh {spec!r} needs {needed} devices, {len(devices)} are available")
        devices = devices[:needed]
    return sharding.make_mesh(spec, devices)


def _fixed_sizes(spec: str):
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in sharding.MESH_AXES:
            raise ValueError(f"bad mesh spec {spec!r}: unknown axis {name.strip()!r} "
                             f"(the axes are {', '.join(sharding.MESH_AXES)})")
        try:
            yield int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: {part!r} is not <axis>=<size>") from None


_STEPS: dict = {}


def _step_for(config, cfg: TrainConfig, mesh, prepend_queries: bool):
    """(optimizer, placement, jitted step), reused by later runs in this process with the same
    model, optimizer, mesh and batch (a resumed run then does not compile again)."""
    key = (config, cfg.optim, tuple(tr.set_prefixes(cfg.trainable)), mesh, cfg.batch_size, prepend_queries,
           cfg.remat, cfg.skip_nonfinite_steps)
    if key not in _STEPS:
        tx = make_optimizer(cfg.optim)
        placement = Placement(config, cfg.trainable, tx, mesh)
        step_fn = make_train_step(config, tx, cfg.optim, placement, cfg.batch_size, prepend_queries, cfg.remat,
                                  skip_nonfinite=cfg.skip_nonfinite_steps)
        _STEPS.clear()  # keep one: compiled programs hold memory
        _STEPS[key] = (tx, placement, step_fn)
    return _STEPS[key]


def train(cfg: TrainConfig, mesh=None, stop_after: int | None = None) -> dict:
    """Run the job; returns the last logged metrics (train and eval).

    `stop_after` ends the run after that many optimizer updates *in this call*
    without a final checkpoint, as if the process were killed there (tests).
    """
    cfg.check()
    _check_output_places(cfg)
    records = read_jsonl(cfg.train_data, cfg.image_root)  # every record checked before the model loads
    eval_records = read_jsonl(cfg.eval_data, cfg.image_root)[: cfg.eval_max_examples] if cfg.eval_data else None
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    config, params = build.load_params(cfg, mesh)
    tokenizer, qformer_tokenizer = build.load_tokenizers(cfg, config)
    layout = build.text_layout(cfg, config, qformer_tokenizer)
    if holds_videos(records):  # T * Q placeholders per row
        if eval_records and not holds_videos(eval_records):
            raise DataError(f"{cfg.train_data} holds videos but {cfg.eval_data} images; give held-out videos")
        layout = dataclasses.replace(layout, frames=cfg.num_frames)
    image_size = cfg.image_size or config.vision.image_size
    encoder = Encoder(layout, tokenizer, qformer_tokenizer)

    trainable, frozen = tr.split(params, cfg.trainable)
    del params
    tx, placement, step_fn = _step_for(config, cfg, mesh, layout.prepend_queries)
    finite = FiniteSteps(cfg.skip_nonfinite_steps, cfg.optim.accumulate)
    state = placement.put_state(init_state(trainable, tx))
    frozen = placement.put_frozen(frozen)

    if jax.process_count() > 1 and not any(placement.batch(cfg.batch_size).spec):
        raise ValueError(f"batch_size {cfg.batch_size} does not split over the mesh's data axes; with several "
                         "hosts each reads only its share, so the global batch must divide them")
    stream = BatchStream(records, encoder, cfg.batch_size, image_size, seed=cfg.seed,
                         train=cfg.augment and not holds_videos(records), num_frames=cfg.num_frames,
                         workers=cfg.data_threads, processes=cfg.data_processes)
    checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.keep_checkpoints) if cfg.checkpoint_dir else None
    restored = checkpointer.restore_newest(placement.abstract_state(trainable)) if checkpointer else None
    if restored is not None:
        state, data_state, _, _ = restored
        stream.restore(data_state)
    del trainable

    accumulate = cfg.optim.accumulate
    total_micro = cfg.steps * accumulate
    micro = int(jax.device_get(state.step))
    evaluator = None
    if eval_records:
        evaluator = Evaluator(config, layout, encoder, eval_records, cfg, placement, image_size, cfg.num_frames)

    meta = dict(model=cfg.model, trainable=cfg.trainable, config=cfg.to_dict())
    log = JsonlLog(cfg.log_file)
    log.write(dict(event="start", step=micro // accumulate, micro_step=micro, config=cfg.to_dict(),
                   trainable_params=tr.count(state.params), frozen_params=tr.count(frozen),
                   devices=len(mesh.devices.flat) if mesh is not None else 1,
                   mesh=dict(mesh.shape) if mesh is not None else None))
    last: dict = {}
    if evaluator and cfg.eval_at_start and micro == 0:
        last = _eval(evaluator, state, frozen, 0, log)
    bar = _progress(cfg.steps, micro // accumulate, cfg.progress)
    updates_this_call = 0
    window_start, window_examples = time.perf_counter(), 0
    first = True
    try:
        while micro < total_micro:
            batch = global_batch(next(stream), placement, cfg.batch_size)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, frozen, batch)
            finite.add(micro, metrics)
            micro += 1
            window_examples += cfg.batch_size
            if first:  # the first call compiles: report it apart from the throughput
                jax.block_until_ready(metrics)
                log.write(dict(event="compiled", compile_s=round(time.perf_counter() - t0, 2)))
                window_start, window_examples, first = time.perf_counter(), 0, False
            if micro % accumulate:
                continue
            update = micro // accumulate
            updates_this_call += 1
            if update % cfg.log_every == 0 or update == cfg.steps:
                finite.check()
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                last = dict(event="train", step=update, loss=m["loss"], grad_norm=m["grad_norm"], lr=m["lr"],
                            scored_tokens=int(m["tokens"]), skipped_steps=finite.skipped(),
                            skipped_images=stream.skipped_images,
                            examples_per_s=round(window_examples / elapsed, 3) if window_examples else None,
                            time=round(time.time(), 3))
                log.write(last)
                window_start, window_examples = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
            if bar is not None:
                bar.update(1)
            if evaluator and cfg.eval_every and update % cfg.eval_every == 0 and update != cfg.steps:
                last = {**last, **_eval(evaluator, state, frozen, update, log)}
                window_start, window_examples = time.perf_counter(), 0  # eval time is not training time
            if checkpointer and cfg.checkpoint_every and update % cfg.checkpoint_every == 0 and update != cfg.steps:
                finite.check()  # never a checkpoint of a diverged run
                checkpointer.save(update, state, stream.state(), meta)
            if stop_after is not None and updates_this_call >= stop_after and micro < total_micro:
                if checkpointer:
                    checkpointer.wait()
                return dict(last, stopped=True)
        finite.check()
        if evaluator:
            last = {**last, **_eval(evaluator, state, frozen, micro // accumulate, log)}
        if checkpointer and micro // accumulate not in checkpointer.all_steps():
            checkpointer.save(micro // accumulate, state, stream.state(), meta, force=True)
            checkpointer.wait()
        if cfg.export_dir:
            export(cfg, config, tr.merge(state.params, frozen))
            log.write(dict(event="export", path=cfg.export_dir))
    finally:
        stream.close()
        if bar is not None:
            bar.close()
        if checkpointer:
            checkpointer.close()
        log.close()
    return dict(last, state=state, frozen=frozen, config=config)


def _check_output_places(cfg: TrainConfig):
    """Checkpoint, log and export places are usable before any work (see option_checks.writable_dir)."""
    places = [("checkpoint_dir", cfg.checkpoint_dir)]
    if jax.process_index() == 0:
        places += [("log_file's folder", cfg.log_file and os.path.dirname(os.path.abspath(cfg.log_file))),
                   ("export_dir's folder", cfg.export_dir and os.path.dirname(os.path.abspath(cfg.export_dir)))]
    for name, path in places:
        if path:
            writable_dir(name, path)


def _eval(evaluator, state, frozen, update, log) -> dict:
    result = evaluator.run(state.params, frozen)
    record = dict(event="eval", step=update, **result)
    log.write(record)
    return {f"eval_{k}": v for k, v in result.items()}


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "preprocessor_config.json", "processor_config.json", "generation_config.json")


def export(cfg: TrainConfig, config, params):
    """The fine-tuned model as a HF-format checkpoint directory (the layout `load_pretrained` reads),
    with the tokenizer / processor files of the base model (or of `cfg.tokenizer`) next to it."""
    from jblip.convert.export import export_hf
    from jblip.convert.quantized import save_quantized
    if jax.process_index() != 0:
        return
    if config.quantization is not None:  # the frozen LM stays quantised: jblip's own layout
        save_quantized(config, cfg.export_dir, params=params, overwrite=True)
    else:
        export_hf(config, cfg.export_dir, params=params, overwrite=True)
    tokenizer_dir = cfg.tokenizer if cfg.tokenizer and os.path.isdir(cfg.tokenizer) else None
    for source in filter(None, (build.model_dir(cfg), tokenizer_dir)):
        if not os.path.isfile(os.path.join(source, "tokenizer.json")):
            continue
        for name in PROCESSOR_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), cfg.export_dir)
        if os.path.isdir(os.path.join(source, "qformer_tokenizer")):
            shutil.copytree(os.path.join(source, "qformer_tokenizer"),
                            os.path.join(cfg.export_dir, "qformer_tokenizer"), dirs_exist_ok=True)
        return
    if cfg.tokenizer and cfg.tokenizer.endswith(".json"):
        shutil.copy(cfg.tokenizer, os.path.join(cfg.export_dir, "tokenizer.json"))
