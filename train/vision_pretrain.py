"""Stage 1 of the demo recipe: the demo's ViT alone learns the synthetic scenes first.

InstructBLIP starts from a pretrained image encoder (EVA-CLIP). Trained from scratch end to
end, the demo's tiny ViT never learnt where a shape is: "left or right?" stayed at chance for
3000 steps, and asking it slowed shape learning too. Pretrained here for a few minutes to
classify a single-shape scene's shape, colour, background and side from mean-pooled features,
it lets the whole model learn every question kind in a few hundred steps.
"""
from __future__ import annotations

import time
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
import optax

from jblip.config import ModelConfig
from jblip.image_processing import ImageProcessor
from jblip.vision import VisionTransformer
from jblip.train import synthetic
from jblip.train.build import initial_params

# label -> number of classes, for one single-shape scene placed in the left or right half
CLASSES = {"shape": len(synthetic.SHAPES), "colour": len(synthetic.COLOURS),
           "background": len(synthetic.BACKGROUNDS), "side": 2}


class _Classifier(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, pixels):
        pooled = VisionTransformer(self.config.vision, name="vision")(pixels).mean(axis=1)
        return {k: nn.Dense(n, name=k)(pooled) for k, n in CLASSES.items()}


def _scenes(count: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    scenes = [synthetic.single_shape_scene(size, rng, side=("left", "right")[i % 2]) for i in range(count)]
    processor = ImageProcessor(size)
    pixels = np.stack([processor.preprocess_one(synthetic.draw_scene(s, size)) for s in scenes])
    item = [s.items[0] for s in scenes]
    labels = {"shape": [synthetic.SHAPES.index(i.shape) for i in item],
              "colour": [list(synthetic.COLOURS).index(i.colour) for i in item],
              "background": [list(synthetic.BACKGROUNDS).index(s.background) for s in scenes],
              "side": [int(i.cx >= size / 2) for i in item]}
    return pixels, {k: np.asarray(v) for k, v in labels.items()}


def pretrain_vision(config: ModelConfig, vision_params: dict, steps: int = 800, batch: int = 64, lr: float = 1e-3,
                    seed: int = 0, log: Callable[[str], None] = print, scenes: int = 5000) -> dict:
    """`vision_params` after `steps` AdamW steps on `scenes` scenes (500 more held out, reported)."""
    size = config.vision.image_size
    pixels, labels = _scenes(scenes + 500, size, seed)
    model = _Classifier(config)
    params = nn.unbox(model.init(jax.random.key(seed), pixels[:1])["params"])
    params["vision"] = vision_params
    tx = optax.adamw(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss(p):
            out = model.apply({"params": p}, x)
            return sum(optax.softmax_cross_entropy_with_integer_labels(out[k], y[k]).mean() for k in CLASSES)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    rng, start = np.random.default_rng(seed), time.time()
    for i in range(1, steps + 1):
        idx = rng.integers(0, scenes, batch)
        params, opt, value = step(params, opt, pixels[idx], {k: v[idx] for k, v in labels.items()})
        if i % 200 == 0 or i == steps:
            out = model.apply({"params": params}, pixels[scenes:])
            acc = {k: round(float((out[k].argmax(-1) == labels[k][scenes:]).mean()), 3) for k in CLASSES}
            log(f"vision pretraining {i}/{steps}: loss {float(value):.3f}, held-out {acc}, {time.time() - start:.0f} s")
    return params["vision"]


def initial_model(config: ModelConfig, out_dir: str, seed: int = 0, init_std: float = 0.1,
                  log: Callable[[str], None] = print, steps: int = 800, scenes: int = 5000) -> str:
    """A HF-format checkpoint to start the demo from: the pretrained ViT, every other tower random,
    the synthetic data's tokenizers."""
    from jblip.convert.export import export_hf
    params = initial_params(config, seed, init_std)
    params["vision"] = pretrain_vision(config, params["vision"], steps=steps, seed=seed, log=log, scenes=scenes)
    export_hf(config, out_dir, params=params, overwrite=True)
    synthetic.write_tokenizers(out_dir)
    return out_dir
