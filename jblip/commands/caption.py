"""`jblip caption --images DIR_OR_GLOB --out results.jsonl`: caption many images, resumably.

Each output line is `{"image": resolved absolute path, "caption": text}`, written
and flushed one batch at a time, so an interrupted run loses at most the batch in
flight and a rerun (from any folder) skips every image already in the file and
never writes a second line for it. The output is checked whole and locked first
(caption_output.py): a file that is not a caption file is refused untouched, a
second writer is refused, and only a partial last record is dropped. Unreadable
images are reported on stderr, not written, and retried by the next run. A short
last batch is padded to the next power of two, not to --batch-size.

On several processes (`--distributed`, or a program that has called
`jax.distributed.initialize` first) every process walks the same batches, reads
the images of its share of each batch's rows, and the model runs on the global
batch over a mesh spanning every process. Process i appends its records to
`OUT.p<i>of<n>`; when all are done, process 0 moves the records it does not
have yet into OUT and removes the parts (jblip/commands/process_outputs.py), so
an interrupted run (any process) resumes from OUT plus the parts (with any
process count), and every image ends in OUT exactly once.

`--videos DIR_OR_GLOB --frames T` captions video files instead (T frames sampled from each, see
`jblip.video_processing`); their records name the video in the same `image` field.
"""
from __future__ import annotations

import glob
import os
import sys
import time

import numpy as np

from jblip.commands.caption_output import CaptionFiles, image_key
from jblip.commands.common import (add_decoding_arguments, add_model_arguments, checkpoint_path, decoding_options,
                                   load_model, planned_new_tokens)
from jblip.commands.process_outputs import ProcessOutputs
from jblip.image_batches import ImageBatches

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
    parser.add_argument("--mesh", help='device mesh for the model and batch, e.g. "data=2,fsdp=4" '
                                       "(default: one device; on several processes, fsdp over all devices)")
    parser.add_argument("--distributed", action="store_true",
                        help="join the other processes of a multi-host run (jax.distributed.initialize with "
                             "the cluster's environment) and caption on all of them")
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


def run(args) -> int:
    from jblip.evaluation.hosts import Hosts
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.videos is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    paths = (list_images(args.images) if args.videos is None
             else list_images(args.videos, VIDEO_EXTENSIONS, "video"))
    if args.distributed:
        import jax
        jax.distributed.initialize()
    hosts = Hosts.current()
    hosts.share(args.batch_size)  # a batch size the processes cannot split is refused before any work
    # checked whole and locked before anything else happens
    with ProcessOutputs(args.out, hosts, CaptionFiles, "caption") as out:
        code = _run(args, paths, out, hosts)
        if code == 0:
            out.merge(paths)
        return code


def _run(args, paths: list[str], out: ProcessOutputs, hosts) -> int:
    from jblip.pipeline import sampler_for
    from jblip.processing import Processor

    talk = hosts.index == 0
    todo = [p for p in paths if p not in out.done]
    path = checkpoint_path(args)
    processor = Processor.from_pretrained(path)
    prompt = DEFAULT_PROMPTS[processor.config.model_type] if args.prompt is None else args.prompt
    options = decoding_options(args)
    # the same prompt for every image: its token ids are built once, for a full batch
    frames = None if args.videos is None else args.frames
    text = processor.text_inputs(prompt, args.batch_size, options.pop("max_length"), options.pop("truncation"),
                                 planned_new_tokens(options), frames=frames)
    progress = Progress(len(todo), len(paths) - len(todo))
    if not todo:
        if talk:
            print(f"caption: all {len(paths)} images are already in {args.out}", file=sys.stderr)
        return 0
    model = load_model(path, args, processor, mesh=_mesh(args, hosts))
    seed, preset = options.pop("seed"), options.pop("preset")
    sampler = sampler_for(model, preset, **options)
    if sampler.num_return_sequences != 1:
        raise ValueError("caption writes one caption per image (num_return_sequences must be 1)")
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    progress.start = time.perf_counter()
    rows = [_rows(batch, args.batch_size, hosts) for batch in batches]
    mine = [range(len(r))[hosts.share(len(r))] for r in rows]  # this process's rows of each batch
    images = ImageBatches(processor.video_processor if frames else processor.image_processor,
                          [[r[i] for i in m] for r, m in zip(rows, mine)], args.workers, frames)
    try:
        for batch, batch_rows, my_rows, loaded in zip(batches, rows, mine, images):
            for r, (_, error) in zip(my_rows, loaded):
                if error is not None and r < len(batch):
                    progress.bad += 1
                    print(f"caption: skipped {error}", file=sys.stderr)
            ok = hosts.gather(np.asarray([error is None for _, error in loaded], np.int32))
            if ok.any():
                pixels = hosts.gather(np.stack([_blank(processor, frames) if e else p for p, e in loaded]))
                captions = _caption(model, processor, text, sampler, seed, pixels, hosts)
                good = [r for r in my_rows if r < len(batch) and ok[r]]
                out.write((batch_rows[r], captions[r]) for r in good)
                progress.done += len(good)
            if talk:
                progress.update()
    except KeyboardInterrupt:
        images.close()
        print(progress.summary(args.out, interrupted=True), file=sys.stderr)
        return 130
    if talk:
        print(progress.summary(args.out), file=sys.stderr)
    return 0


def bucket(n: int, batch_size: int, processes: int = 1) -> int:
    """The batch shape `n` images run at: the next power of two, at most `batch_size`, so a short
    last batch costs about its own size while only log2(batch_size) + 1 shapes ever compile
    (rounded up to a multiple of the processes, which each read an equal share)."""
    rows = min(1 << max(n - 1, 0).bit_length(), batch_size)
    return -(-rows // processes) * processes


def _rows(batch: list[str], batch_size: int, hosts) -> list[str]:
    """The batch's images, filled with copies of its last one up to its bucket (copies not written)."""
    return batch + [batch[-1]] * (bucket(len(batch), batch_size, hosts.count) - len(batch))


def _blank(processor, frames: int | None) -> np.ndarray:
    """Pixels of an unreadable row (its output is dropped): an image's, or a video's of `frames`."""
    size = processor.image_processor.image_size
    return np.zeros(((frames,) if frames else ()) + (size, size, 3), np.float32)


def _mesh(args, hosts):
    if args.mesh or hosts.count > 1:
        from jblip.sharding import make_mesh
        return make_mesh(args.mesh) if args.mesh else make_mesh()
    return None


def _caption(model, processor, text, sampler, seed, pixels: np.ndarray, hosts) -> list[str]:
    """Captions of the global batch `pixels` (every row, copies and unreadable rows included)."""
    rows = pixels.shape[0]
    text = {k: None if v is None else v[:rows] for k, v in text.items()}  # one prompt: every row is the same
    output = model.generate(pixel_values=pixels, **text, sampler=sampler, seed=seed)
    return processor.decode(hosts.fetch(output.tokens), hosts.fetch(output.lengths))
