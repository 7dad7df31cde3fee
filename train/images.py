"""Image transforms of the InstructBLIP recipe (LAVIS' train and eval processors), NHWC float32 out.

Eval (`blip_image_eval`): bicubic resize to S x S (aspect not kept), /255,
CLIP mean/std: exactly `jblip.image_processing.ImageProcessor`, the
preprocessing used at inference. Train (`blip2_image_train`, the Vicuna
recipe): torchvision's RandomResizedCrop(S, scale=(0.5, 1.0), ratio=(3/4, 4/3),
bicubic) and a random horizontal flip, then the same resize + normalisation.
Randomness comes from a numpy Generator the caller seeds per example, so a
resumed run sees the same crops.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from jblip.image_processing import ImageProcessor, load_image, to_rgb


def load_rgb(path) -> Image.Image:
    """An image file as RGB (EXIF orientation applied, transparency on white, as at inference)."""
    return to_rgb(load_image(path))


def as_rgb(frame) -> Image.Image:
    """A decoded video frame (PIL image or uint8 array) as an RGB PIL image."""
    return to_rgb(frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)))


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
    return ImageProcessor(size).preprocess_one(img)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height), sampled like torchvision's RandomResizedCrop:
    ten tries at a random area fraction and log-uniform aspect ratio, else a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img: Image.Image, size: int, rng: np.random.Generator, scale=(0.5, 1.0),
                    flip: bool = True) -> np.ndarray:
    img = to_rgb(img)
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng, scale)
    img = img.crop((left, top, left + w, top + h))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageProcessor(size).preprocess_one(img)  # bicubic resize of the crop + normalisation
