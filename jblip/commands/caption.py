"""`jblip caption --images DIR_OR_GLOB --out results.jsonl`: caption many images, resumably.

Each output line is `{"image": resolved absolute path, "caption": text}`, written
and flushed one batch at a time, so an interrupted run loses at most the batch in
flight and a rerun (from any folder) skips every image already in the file and
never writes a second line for it. The output is checked whole and locked first
(caption_output.py): a file that is not a caption file is refused untouched, a
second writer is refused, and only a partial last record is dropped. Unreadable
images are reported on stderr, not written, and retried by the next run. A short
last batch is padded to the next power of two, not to --batch-size.

`--videos DIR_OR_GLOB --frames T` captions video files instead (T frames sampled from each, see
`jblip.video_processing`); their records name the video in the same `image` field.
"""
from __future__ import annotations

import glob
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jblip.commands.caption_output import CaptionOutput, image_key
from jblip.commands.common import (add_decoding_arguments, add_model_arguments, checkpoint_path, decoding_options,
                                   load_model)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
DEFAULT_PROMPTS = {"instructblip": "A short image description:", "blip2": ""}  # LAVIS captioning prompts


def add_arguments(parser):
    add_model_arguments(parser)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", metavar="DIR_OR_GLOB",
                        help=f"a folder (searched recursively for {', '.join(IMAGE_EXTENSIONS)}) or a glob such as "
                             "'photos/**/*.jpg' (quote it)")
    inputs.add_argument("--videos", metavar="DIR_OR_GLOB",
                        help=f"videos instead: a folder (searched recursively for {', '.join(VIDEO_EXTENSIONS)}) "
                             "or a glob")
    parser.add_argument("--frames", type=int, default=4, help="frames sampled uniformly from each video (default 4)")
    parser.add_argument("--prompt", default=None,
                        help="instruction (default: 'A short image description:' for InstructBLIP, '' for BLIP-2)")
    parser.add_argument("--out", required=True, help="JSONL output; appended to, and resumed from, if it exists")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding and resizing images ahead of the model")
    add_decoding_arguments(parser)


def list_images(spec: str, extensions=IMAGE_EXTENSIONS, what: str = "image") -> list[str]:
    if os.path.isdir(spec):
        found = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                 if name.lower().endswith(extensions)]
        if not found:
            raise FileNotFoundError(f"no {what} files ({', '.join(extensions)}) in {spec}")
    else:
        found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"no files match {spec!r}")
    return sorted({image_key(p) for p in found})  # resolved absolute paths: what the output records


class Progress:
    """One status line on stderr: done/total, images/s, unreadable count."""

    def __init__(self, total: int, skipped: int):
        self.total, self.skipped = total, skipped
        self.done = self.bad = 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self):
        line = (f"caption: {self.done + self.bad}/{self.total} images, {self.rate():.2f} images/s"
                + (f", {self.bad} unreadable" if self.bad else ""))
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def summary(self, out: str, interrupted: bool = False) -> str:
        if self.tty:
            print(file=sys.stderr)
        took = time.perf_counter() - self.start
        text = (f"caption: {'interrupted: ' if interrupted else ''}captioned {self.done} images in {took:.1f} s "
                f"({self.rate():.2f} images/s); {self.skipped} already in {out}; {self.bad} unreadable")
        if interrupted:
            text += "; run the same command again to continue"
        elif self.bad:
            text += " (not written; the next run retries them)"
        return text


def _load(processor, path, frames=None):
    try:
        if frames is not None:
            return processor.video_processor([path], frames)[0], None
        return processor.image_processor.preprocess_one(path, path), None
    except (ValueError, OSError) as e:
        return None, str(e)
    except Exception as e:  # a decoder failing in an unexpected way must not stop a long run either
        return None, f"cannot read image {path}: {type(e).__name__}: {e}"


def run(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.videos is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    paths = (list_images(args.images) if args.videos is None
             else list_images(args.videos, VIDEO_EXTENSIONS, "video"))
    with CaptionOutput(args.out) as out:  # checked whole and locked before anything else happens
        return _run(args, paths, out)


def _run(args, paths: list[str], out: CaptionOutput) -> int:
    from jblip.pipeline import sampler_for
    from jblip.processing import Processor

    todo = [p for p in paths if p not in out.done]
    path = checkpoint_path(args)
    processor = Processor.from_pretrained(path)
    prompt = DEFAULT_PROMPTS[processor.config.model_type] if args.prompt is None else args.prompt
    options = decoding_options(args)
    # the same prompt for every image: its token ids are built once, for a full batch
    frames = None if args.videos is None else args.frames
    text = processor.text_inputs(prompt, args.batch_size, options.pop("max_length"), options.pop("truncation"),
                                 frames=frames)
    progress = Progress(len(todo), len(paths) - len(todo))
    if not todo:
        print(f"caption: all {len(paths)} images are already in {args.out}", file=sys.stderr)
        return 0
    model = load_model(path, args, processor)
    seed, preset = options.pop("seed"), options.pop("preset")
    sampler = sampler_for(model, preset, **options)
    if sampler.num_return_sequences != 1:
        raise ValueError("caption writes one caption per image (num_return_sequences must be 1)")
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    progress.start = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        submit = lambda batch: [pool.submit(_load, processor, p, frames) for p in batch]  # noqa: E731
        ahead = submit(batches[0])
        try:
            for i, batch in enumerate(batches):
                loaded = [f.result() for f in ahead]
                if i + 1 < len(batches):
                    ahead = submit(batches[i + 1])  # decode the next batch while this one runs
                good = []
                for p, (pixels, error) in zip(batch, loaded):
                    if error is None:
                        good.append((p, pixels))
                    else:
                        progress.bad += 1
                        print(f"caption: skipped {error}", file=sys.stderr)
                if good:
                    captions = _caption(model, processor, text, sampler, seed, [x for _, x in good], args.batch_size)
                    out.write(zip([p for p, _ in good], captions))
                    progress.done += len(good)
                progress.update()
        except KeyboardInterrupt:
            for f in ahead:
                f.cancel()
            print(progress.summary(args.out, interrupted=True), file=sys.stderr)
            return 130
    print(progress.summary(args.out), file=sys.stderr)
    return 0


def bucket(n: int, batch_size: int) -> int:
    """The batch shape `n` images run at: the next power of two, at most `batch_size`, so a short
    last batch costs about its own size while only log2(batch_size) + 1 shapes ever compile."""
    return min(1 << max(n - 1, 0).bit_length(), batch_size)


def _caption(model, processor, text, sampler, seed, pixels, batch_size) -> list[str]:
    """Captions of up to `batch_size` images; the batch is filled with copies of its last image up
    to its bucket (few shapes, so little recompilation), and the copies are dropped."""
    n = len(pixels)
    rows = bucket(n, batch_size)
    pixels = np.stack(pixels + [pixels[-1]] * (rows - n))
    text = {k: None if v is None else v[:rows] for k, v in text.items()}  # one prompt: every row is the same
    output = model.generate(pixel_values=pixels, **text, sampler=sampler, seed=seed)
    return processor.decode(output)[:n]
