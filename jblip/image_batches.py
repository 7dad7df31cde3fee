"""The images of a batch job (caption, eval), decoded ahead of the model on a grain pipeline.

`ImageBatches(image_processor, batches, workers)` yields, batch by batch, one
`(pixels, error)` pair per path: pixels float32 [S, S, 3] (with `frames` and a video
processor: a video's [T, S, S, 3]) and None, or None and a one-line reason (unreadable, not an image, too large, not a regular file). The
paths of every batch form one `grain.MapDataset` whose map decodes and resizes;
`workers` threads read up to two batches ahead, in order.
"""
from __future__ import annotations

from typing import Iterator, Sequence


def load_or_error(image_processor, path: str, frames: int | None = None):
    """(pixels, None), or (None, why) for an image (or, with `frames`, a video sampled to that
    many frames) that cannot be used; never raises."""
    try:
        if frames is not None:
            return image_processor([path], frames)[0], None
        return image_processor.preprocess_one(path, path), None
    except (ValueError, OSError) as e:
        return None, str(e)
    except Exception as e:  # an odd decoder failure must not stop a long run either
        return None, f"cannot read {'video' if frames else 'image'} {path}: {type(e).__name__}: {e}"


class _Load:
    def __init__(self, image_processor, frames):
        self.image_processor, self.frames = image_processor, frames

    def __call__(self, path):
        return load_or_error(self.image_processor, path, self.frames)


class ImageBatches:
    def __init__(self, image_processor, batches: Sequence[Sequence[str]], workers: int = 4,
                 frames: int | None = None):
        self.sizes = [len(b) for b in batches]
        self.paths = [p for b in batches for p in b]
        self.load, self.workers = _Load(image_processor, frames), max(workers, 1)
        self._iterator = None

    def __iter__(self) -> Iterator[list[tuple]]:
        import grain
        ahead = 2 * max(self.sizes, default=1)
        self._iterator = iter(grain.MapDataset.source(self.paths).map(self.load).to_iter_dataset(
            grain.ReadOptions(num_threads=self.workers, prefetch_buffer_size=ahead), allow_nones=True))
        for size in self.sizes:
            yield [next(self._iterator) for _ in range(size)]
        self.close()

    def close(self):
        """Stop reading ahead (an interrupted job)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None
