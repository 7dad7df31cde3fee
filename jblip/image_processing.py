"""Image preprocessing, numerically equal to HF's PIL-based BLIP image processor.

The steps and their order are those of `BlipImageProcessorPil` (transformers 5.x; the
torchvision backend's bicubic resize differs from PIL's by a few grey levels, so parity
needs PIL): convert to RGB (transparency composited onto
white), bicubic resize with PIL on uint8 to (S, S) without keeping the aspect
ratio, rescale by 1/255 in float64 then cast to float32, normalise with the
OpenAI CLIP mean/std in float32. Output: float32 NHWC numpy, which is what
`VisionLanguageModel` takes.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from jblip import bounded_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 1 / 255

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image that cannot be read or used, with a message naming it."""


# Decoded-pixel bounds: a huge image is decoded at a reduced scale where the format allows it
# (JPEG's DCT scaling via `draft`) and shrunk right after decoding otherwise, so each decode
# worker holds at most about REDUCE_ABOVE pixels afterwards; files whose decode would still need
# more than MAX_DECODED_PIXELS are refused before any pixel is decoded. Images at or below
# REDUCE_ABOVE are decoded exactly as HF does.
REDUCE_ABOVE = 4096 * 4096
MAX_DECODED_PIXELS = 8192 * 8192  # about 200 MB as RGB


def _check_regular_file(path: str) -> None:
    import stat
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"{path} is a directory, not an image file")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise ImageError(f"{path} is not a regular file (a pipe, socket or device); give an image file")


def _decode_bounded(image: Image.Image, path: str) -> Image.Image:
    w, h = image.size
    if w * h > REDUCE_ABOVE and image.format == "JPEG":
        scale = (REDUCE_ABOVE / (w * h)) ** 0.5
        image.draft(image.mode, (max(1, int(w * scale)), max(1, int(h * scale))))  # never below that size
    w, h = image.size
    if w * h > MAX_DECODED_PIXELS:
        raise ImageError(f"{path}: image is {w}x{h} ({w * h / 1e6:.0f} megapixels); images that must be decoded "
                         f"whole are limited to {MAX_DECODED_PIXELS / 1e6:.0f} megapixels: downscale it first")
    image.load()  # decode now so corrupt data fails here, not later in a batch
    if w * h > REDUCE_ABOVE:
        factor = math.ceil(((w * h) / REDUCE_ABOVE) ** 0.5)
        try:
            image = image.reduce(factor)  # box-average down right away, before more copies are made
        except ValueError:  # a mode reduce() does not take (palette, 1-bit): transparency kept via RGBA
            image = image.convert("RGBA").reduce(factor)
    return image


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file (EXIF orientation applied, as HF `load_image` does).

    Raises FileNotFoundError for a missing file and ImageError for anything that is not a
    readable image file (not a regular file, wrong format, truncated or corrupt data, more
    decoded pixels than MAX_DECODED_PIXELS)."""
    path = os.fspath(path)
    _check_regular_file(path)
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(_decode_bounded(image, path))
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"cannot read image {path}: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency (alpha band or palette transparency) onto white.

    Same rule as HF `convert_to_rgb`; plain `convert("RGB")` would drop alpha instead."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def as_pil(image: ImageLike, name: str = "image") -> Image.Image:
    """A PIL image from a path, a PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ImageError(f"{name}: arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4); "
                             f"got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    raise ImageError(f"{name}: expected a file path, a PIL image or a uint8 array, got {type(image).__name__}")


class ImageProcessor:
    """Images -> float32 [B, S, S, 3] pixel values for the vision tower."""

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 rescale_factor: float = RESCALE):
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.rescale_factor = float(rescale_factor)

    def __repr__(self):
        return f"ImageProcessor(image_size={self.image_size})"

    @classmethod
    def from_pretrained(cls, path: str, image_size: int) -> "ImageProcessor":
        """The checkpoint's mean/std/rescale from its processor files when present (CLIP
        stats otherwise); the size always follows the vision tower (`image_size`), since the
        model cannot take any other without interpolating its position embeddings."""
        settings = _saved_image_settings(path)
        return cls(image_size, settings.get("image_mean", CLIP_MEAN), settings.get("image_std", CLIP_STD),
                   settings.get("rescale_factor", RESCALE))

    def preprocess_one(self, image: ImageLike, name: str = "image") -> np.ndarray:
        """One image -> float32 [S, S, 3]."""
        rgb = to_rgb(as_pil(image, name))
        resized = rgb.resize((self.image_size, self.image_size), resample=Image.Resampling.BICUBIC)
        pixels = (np.asarray(resized).astype(np.float64) * self.rescale_factor).astype(np.float32)
        return (pixels - self.mean) / self.std

    def __call__(self, images: ImageLike | Iterable[ImageLike]) -> np.ndarray:
        if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
            images = [images]
        images = list(images)
        if not images:
            raise ImageError("no images given")
        names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"image {i}" for i, x in enumerate(images)]
        return np.stack([self.preprocess_one(x, n) for x, n in zip(images, names)])


def _saved_image_settings(path: str) -> dict:
    """The image-processor dict of a checkpoint: `preprocessor_config.json` (older saves) or the
    `image_processor` (or `video_processor`) entry of `processor_config.json` (transformers 5.x)."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor"),
                      ("processor_config.json", "video_processor")):  # InstructBLIP-Video saves
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                data = bounded_json.load(f, file)
            data = data.get(key, {}) if key else data
            if data:
                return data
    return {}
