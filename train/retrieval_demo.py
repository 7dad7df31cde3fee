"""`jblip train --recipe retrieval-demo`: BLIP-2 stage 1 on the demo world's scenes.

Every scene shows one shape; its caption names the colour, the shape, the side and the
background ("red circle on the left in the white background"): 72 distinct captions. The
ViT and the Q-Former start from the bundled demo model (its ViT stays frozen, as in BLIP-2
stage 1); the Q-Former and the ITC/ITM/ITG heads train on freshly drawn scenes (the
`retrieval-stage1` trainable set, the shared AdamW schedule). The held-out set is one new
scene per caption (another seed), scored with LAVIS' recall.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jblip.image_processing import ImageProcessor
from jblip.retrieval.config import DEMO_RETRIEVAL
from jblip.retrieval.model import RetrievalModel, init_params, itc_similarity
from jblip.retrieval.k_test import pairs_per_image, score_matrices, top_candidates
from jblip.retrieval.metrics import retrieval_metrics
from jblip.text_processing import TextTokenizer
from jblip.train import synthetic, trainable
from jblip.train.checkpoint import Checkpointer
from jblip.train.optim import OptimConfig, make_optimizer
from jblip.train.retrieval_losses import stage1_losses
from jblip.train.state import TrainState

SIDES = ("left", "right")
BOS = "</s>"  # the demo vocabulary has no [DEC]; its `</s>` is the decoder's start token
RECIPE = dict(steps=1500, batch_size=32, seed=0, eval_seed=1234, size=64, text_length=16,
              optim=dict(lr=3e-4, warmup_lr=1e-6, warmup_steps=100, total_steps=1500, weight_decay=0.05,
                         min_lr=1e-5))


def _demo_dir() -> str:
    import jblip
    return os.path.join(os.path.dirname(jblip.__file__), "assets", "demo")


# Training captions: the full one half the time, else one naming fewer attributes, so that short
# queries ("blue square") find their scenes too.
TEMPLATES = ("{colour} {shape} on the {side} in the {background} background", "{colour} {shape}",
             "{colour} {shape} on the {side}", "{colour} {shape} in the {background} background", "{shape}",
             "{colour} {shape} in the {background}", "{shape} on the {side}")


def caption(scene: synthetic.Scene, size: int, rng=None) -> str:
    """The full caption, or with `rng` a random template (the full one with probability 1/2)."""
    item = scene.items[0]
    side = "left" if item.cx < size / 2 else "right"
    template = TEMPLATES[0] if rng is None or rng.random() < 0.5 else TEMPLATES[1 + int(rng.integers(len(TEMPLATES) - 1))]
    return template.format(colour=item.colour, shape=item.shape, side=side, background=scene.background)


def combos():
    return [(c, s, side, b) for c in synthetic.COLOURS for s in synthetic.SHAPES for side in SIDES
            for b in synthetic.BACKGROUNDS]


def scene_for(colour, shape, side, background, size, rng) -> synthetic.Scene:
    base = synthetic.single_shape_scene(size, rng, side=side)
    item = dataclasses.replace(base.items[0], colour=colour, shape=shape)
    return synthetic.Scene(background, (item,))


def random_batch(n: int, size: int, rng):
    """n scenes of random captions: (PIL images, captions, scene kind index: the ITM negatives
    never pair two scenes of one kind, whose captions fit both)."""
    table = combos()
    picks = rng.integers(len(table), size=n)
    scenes = [scene_for(*table[k], size, rng) for k in picks]
    return [synthetic.draw_scene(s, size) for s in scenes], [caption(s, size, rng) for s in scenes], picks


def held_out(size: int, seed: int):
    """One scene per caption: (PIL images, captions)."""
    rng = np.random.default_rng(seed)
    scenes = [scene_for(*c, size, rng) for c in combos()]
    return [synthetic.draw_scene(s, size) for s in scenes], [caption(s, size) for s in scenes]


def initial_params(config, seed: int):
    """Random heads; the ViT and Q-Former of the bundled demo model."""
    from jblip.convert.load import load_params
    demo_config, demo = load_params(_demo_dir())
    config = dataclasses.replace(config, vision=demo_config.vision, qformer=demo_config.qformer)
    params = init_params(config, seed)
    params["vision"], params["qformer"] = demo["vision"], demo["qformer"]
    return config, params


def encode(tokenizer: TextTokenizer, texts, width: int):
    rows = tokenizer.encode(list(texts))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        r = r[:width]
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def evaluate(module, params, processor, tokenizer, size, seed, width, k_test: int = 8) -> dict:
    """LAVIS recall on the held-out scenes, by ITC alone and after ITM re-ranking of the top k_test."""
    images, texts = held_out(size, seed)
    pixels = processor(images)
    ids, mask = encode(tokenizer, texts, width)
    apply = lambda method, *a: np.asarray(jax.jit(lambda p, *x: module.apply({"params": p}, *x, method=method))(params, *a))  # noqa: E731
    image = apply(RetrievalModel.image_embeddings, pixels)
    text = apply(RetrievalModel.text_embeddings, ids, mask)
    sim = np.asarray(itc_similarity(image, text))  # [I, T]
    n = len(texts)
    truth = list(range(n))
    out = {f"itc_{k}": v for k, v in retrieval_metrics(sim, sim.T, truth, [[i] for i in truth]).items()}
    states = apply(RetrievalModel.vision_states, pixels)
    i2t, t2i = top_candidates(sim, k_test)  # each image's top texts and each text's top images (LAVIS k_test)
    pairs = pairs_per_image(i2t, t2i, n)
    pi = np.concatenate([np.full(len(p), i) for i, p in enumerate(pairs)])
    pt = np.concatenate(pairs)
    logits = apply(RetrievalModel.itm_logits, states[pi], ids[pt], mask[pt])[:, 1]
    i2t, t2i = score_matrices(sim, i2t, t2i, pi, pt, logits)
    out.update({f"itm_{k}": v for k, v in retrieval_metrics(i2t, t2i, truth, [[i] for i in truth]).items()})
    return out


def train(out_dir: str, steps: int | None = None, log=print, checkpoint_dir: str | None = None,
          checkpoint_every: int = 100, stop_after: int | None = None) -> dict:
    """Train the demo retrieval model and write it to `out_dir`. With `checkpoint_dir`, params and
    optimizer state are saved every `checkpoint_every` steps (orbax, as `jblip train` does) and a
    rerun resumes from the newest one: each step's batch and key depend only on the seed and the
    step, so a resumed run ends as an uninterrupted one. `stop_after`: return after that many
    steps of this call (a test's stand-in for a kill)."""
    r = dict(RECIPE)
    steps = steps or r["steps"]
    optim = OptimConfig(**{**r["optim"], "total_steps": steps})
    tokenizer = TextTokenizer.from_dir(os.path.join(_demo_dir(), "qformer_tokenizer"))
    bos, pad = tokenizer.token_id(BOS), tokenizer.special_id("pad_token") or 0
    config, params = initial_params(DEMO_RETRIEVAL, r["seed"])
    module = RetrievalModel(config)
    processor = ImageProcessor(config.vision.image_size)
    train_params, frozen = trainable.split(params, "retrieval-stage1")
    tx = make_optimizer(optim)
    opt_state = tx.init(train_params)

    @jax.jit
    def step(train_params, opt_state, pixels, ids, mask, image_ids, key):
        states = module.apply({"params": trainable.merge(train_params, frozen)}, pixels,
                              method=RetrievalModel.vision_states)  # frozen ViT: outside the gradient

        def loss(tp):
            out = stage1_losses(module, trainable.merge(tp, frozen), None, ids, mask, bos_id=bos, pad_id=pad,
                                key=key, image_ids=image_ids, vision_states=states)
            return out["loss"], out
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(train_params)
        updates, opt_state = tx.update(grads, opt_state, train_params)
        return jax.tree_util.tree_map(lambda p, u: p + u, train_params, updates), opt_state, out

    key, first = jax.random.key(r["seed"]), 0
    checkpointer = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    if checkpointer is not None:
        state = TrainState(jnp.zeros((), jnp.int32), train_params, opt_state)
        restored = checkpointer.restore_newest(jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
        if restored is not None:
            state, _, _, first = restored
            train_params, opt_state = state.params, state.opt_state
            log(f"resumed from the checkpoint of step {first} in {checkpoint_dir}")
    start = time.perf_counter()
    try:
        for i in range(first, steps):
            images, texts, picks = random_batch(r["batch_size"], r["size"], np.random.default_rng([r["seed"], i]))
            ids, mask = encode(tokenizer, texts, r["text_length"])
            train_params, opt_state, out = step(train_params, opt_state, processor(images), ids, mask,
                                                jnp.asarray(picks), jax.random.fold_in(key, i))
            if i % 100 == 0 or i == steps - 1:
                log(json.dumps({"step": i, **{k: round(float(v), 4) for k, v in out.items()},
                                "seconds": round(time.perf_counter() - start, 1)}))
            done = i + 1
            if checkpointer is not None and (done % checkpoint_every == 0 or done == steps):
                checkpointer.save(done, TrainState(jnp.asarray(done, jnp.int32), train_params, opt_state), {})
            if stop_after is not None and done - first >= stop_after and done < steps:
                return {"stopped": done}
    finally:
        if checkpointer is not None:
            checkpointer.close()
    params = trainable.merge(train_params, frozen)
    metrics = evaluate(module, params, processor, tokenizer, r["size"], r["eval_seed"], r["text_length"])
    log(json.dumps({"eval": {k: round(v, 2) for k, v in metrics.items()}}))
    save(config, params, out_dir)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"steps": steps, **{k: round(v, 2) for k, v in metrics.items()}}, f, indent=1)
    return metrics


def save(config, params, out_dir: str):
    """HF `Blip2ForImageTextRetrieval` layout (training heads kept) + the demo's Q-Former tokenizer."""
    from jblip.convert.retrieval import export_retrieval
    export_retrieval(config, params, out_dir, training_heads=True, overwrite=True)
    tokdir = os.path.join(out_dir, "qformer_tokenizer")
    shutil.copytree(os.path.join(_demo_dir(), "qformer_tokenizer"), tokdir, dirs_exist_ok=True)


def run(out_dir: str, steps: int | None = None, checkpoint_dir: str | None = None) -> int:
    """`jblip train --recipe retrieval-demo --output DIR [--steps N]`: the model goes to DIR (or
    --export), checkpoints to DIR/checkpoints (a rerun resumes)."""
    metrics = train(out_dir, steps, log=lambda line: print(line, file=sys.stderr, flush=True),
                    checkpoint_dir=checkpoint_dir)
    print(json.dumps({k: round(v, 2) for k, v in metrics.items()}))
    return 0


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="jblip train --recipe retrieval-demo")
    parser.add_argument("--output", default="jblip-retrieval-demo")
    parser.add_argument("--steps", type=int)
    args, _ = parser.parse_known_args(argv)
    return run(args.output, args.steps)
