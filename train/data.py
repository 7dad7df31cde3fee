"""JSONL image-instruction data: records, deterministic resumable order, host sharding, batches.

A data file has one JSON object per line:
    {"image": "images/0001.jpg", "text_input": "What colour is the shape?", "text_output": "red"}
or, for a video model, `"video": "clips/0001.mp4"` instead of "image" (a video file, animated GIF
or folder of frames, `jblip.video_processing`; one file holds one kind of record). Video frames
get the eval transform, not the random crop + flip: flipping would reverse the motion.
Image paths are relative to the JSONL file (or `image_root`). Instead of text,
a record may carry token ids (no special tokens): "input_ids", "output_ids"
and optionally "qformer_ids"; then no tokenizer is needed.

Order (BatchStream, a grain pipeline): the records shuffled per epoch with the
run's seed; the data position is the number of examples the whole job (all
hosts) consumed, so resuming from a saved position replays exactly the same
examples, crops and flips (the augmentation is a grain random map, seeded by the
run's seed and the example's stream index). Global batch b is the b-th local
batch of every host, in host order.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from jblip import bounded_json
from jblip.text_processing import TextTokenizer
from jblip.train import images
from jblip.train.labels import TextLayout, collate, encode_example, encode_prompt
from jblip.train.loss import IGNORE

TEXT_KEYS = ("text_input", "text_output")
ID_KEYS = ("input_ids", "output_ids")


class DataError(ValueError):
    pass


MAX_LISTED = 10  # bad lines named in one error


def _problem(rec, root: str) -> str | None:
    """What is wrong with one parsed record, or None."""
    if not isinstance(rec, dict):
        return "a record must be a JSON object"
    if ("image" in rec) == ("video" in rec):
        return "a record needs an \"image\" or a \"video\" (one of the two)"
    key = "image" if "image" in rec else "video"
    image = rec[key]
    if not isinstance(image, str) or not image:
        return f"\"{key}\" must be a path string, got {image!r}"
    if all(k in rec for k in ID_KEYS):
        for name in (*ID_KEYS, "qformer_ids"):
            ids = rec.get(name, [])
            if not (isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids)):
                return f"\"{name}\" must be a list of token ids (non-negative integers)"
    elif all(k in rec for k in TEXT_KEYS):
        for name in TEXT_KEYS:
            if not isinstance(rec[name], str):
                return f"\"{name}\" must be a string, got {rec[name]!r}"
    else:
        return "a record needs \"text_input\" and \"text_output\" (or token ids \"input_ids\" and \"output_ids\")"
    found = os.path.isfile if key == "image" else os.path.exists  # a video may be a folder of frames
    if not found(os.path.join(root, image)):
        return f"{key} file not found: {os.path.join(root, image)}"
    return None


def read_jsonl(path: str, image_root: str | None = None) -> list[dict]:
    """Records with absolute image paths, every one checked before training starts (types, image
    files present): one DataError names the file and lists the bad lines."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    records, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = bounded_json.loads(line, "the record")
            except ValueError as e:
                problems.append(f"line {line_no}: not valid JSON ({e})")
                continue
            problem = _problem(rec, root)
            if problem:
                problems.append(f"line {line_no}: {problem}")
                continue
            key = "image" if "image" in rec else "video"
            records.append(dict(rec, **{key: os.path.join(root, rec[key])}))
    if problems:
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{path}: {len(problems)} bad record(s): " + "; ".join(problems[:MAX_LISTED]) + more)
    if not records:
        raise DataError(f"{path}: no records")
    videos = sum("video" in r for r in records)
    if 0 < videos < len(records):
        raise DataError(f"{path}: {videos} video and {len(records) - videos} image records; a data file holds "
                        "one kind (a batch is either images or videos)")
    return records


def holds_videos(records: list[dict]) -> bool:
    return "video" in records[0]


def record_pixels(rec: dict, image_size: int, num_frames: int, load_image: Callable = images.load_rgb,
                  transform: Callable | None = None) -> np.ndarray:
    """A record's pixels: [S, S, 3] for an image (`transform`, default the eval one), or
    [T, S, S, 3] for a video (T = `num_frames` uniformly sampled, each through the eval transform)."""
    if "video" in rec:
        from jblip.video_processing import load_frames
        frames = load_frames(rec["video"], num_frames, rec["video"])
        return np.stack([images.eval_transform(images.as_rgb(f), image_size) for f in frames])
    img = load_image(rec["image"])
    return transform(img) if transform is not None else images.eval_transform(img, image_size)


@dataclass
class Encoder:
    """Record -> token lists (LLM and Q-Former tokenizers; or ids from the record)."""
    layout: TextLayout
    tokenizer: TextTokenizer | None = None
    qformer_tokenizer: TextTokenizer | None = None

    def _ids(self, rec: dict, text_key: str, id_key: str, tok) -> list[int]:
        if id_key in rec:
            return list(rec[id_key])
        if tok is None:
            raise DataError(f"record has text but no tokenizer was given (or give token ids {ID_KEYS})")
        return tok.encode_plain(rec[text_key])

    def instruction(self, rec):
        return self._ids(rec, "text_input", "input_ids", self.tokenizer)

    def answer(self, rec):
        return self._ids(rec, "text_output", "output_ids", self.tokenizer)

    def qformer_instruction(self, rec):
        if not self.layout.use_qformer_text:
            return None
        return self._ids(rec, "text_input", "qformer_ids", self.qformer_tokenizer or self.tokenizer)

    def example(self, rec: dict) -> dict:
        return encode_example(self.instruction(rec), self.answer(rec), self.layout, self.qformer_instruction(rec))

    def prompt(self, rec: dict) -> dict:
        return encode_prompt(self.instruction(rec), self.layout, self.qformer_instruction(rec))


class _Example:
    """Record index -> (encoded example, pixels, unreadable record indices passed over): the
    per-example map of the grain pipeline. An image that fails to decode is replaced by the next
    record in file order whose image decodes (so batches stay full and a resumed run replaces it
    the same way); the indices passed over travel with the example to the main process."""

    def __init__(self, records, encoder, image_size: int, train: bool, load_image: Callable, num_frames: int):
        self.records, self.encoder, self.image_size = records, encoder, image_size
        self.train, self.load_image, self.num_frames = train, load_image, num_frames

    def __call__(self, index: int, rng: np.random.Generator | None = None):
        n, passed = len(self.records), []
        augment = (lambda img: images.train_transform(img, self.image_size, rng)) if self.train else None  # noqa: E731
        for i in (int(index) + j for j in range(n)):
            rec = self.records[i % n]
            try:
                pixels = record_pixels(rec, self.image_size, self.num_frames, self.load_image, augment)
                return self.encoder.example(rec), pixels, passed
            except (OSError, ValueError) as e:  # ImageError is a ValueError
                passed.append((i % n, str(e)))
        raise DataError("no training image can be read")


class _Collate:
    """Examples -> one host batch (a class, not a closure: grain's worker processes pickle it)."""

    def __init__(self, layout, lengths):
        self.layout, self.lengths = layout, lengths

    def __call__(self, examples) -> dict:
        batch = collate([e for e, _, _ in examples], self.layout, self.lengths)
        batch["pixel_values"] = np.stack([p for _, p, _ in examples])
        batch["_passed_over"] = [x for _, _, passed in examples for x in passed]
        return batch


class BatchStream:
    """Host-local training batches in a deterministic, resumable order, on a grain pipeline.

    `grain.MapDataset` over the record indices: shuffled with `seed` (each epoch differently),
    repeated, the train transform as a seeded random map (crops and flips depend only on the
    seed and the example's stream index), batched into this host's `global_batch / hosts`
    rows, every host's batches interleaved (`[host::hosts]`: global batch b is the hosts'
    b-th local batches in host order), then read ahead by `workers` threads, or by
    `processes` worker processes (grain's `mp_prefetch`) when that is > 0.

    `position` = examples consumed by the whole job, saved in the orbax checkpoint with the
    seed: the iterator is the MapDataset read from batch `position / global_batch` on, so a
    resumed run replays exactly the same examples, crops and flips, whatever the worker count.
    `skipped_images` counts the distinct unreadable images met so far; each is reported once
    on stderr.
    """

    def __init__(self, records: list[dict], encoder: Encoder, global_batch: int, image_size: int,
                 seed: int = 0, position: int = 0, train: bool = True, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None,
                 lengths: dict[str, int] | None = None, workers: int = 4, processes: int = 0,
                 load_image: Callable = images.load_rgb, num_frames: int = 4):
        import grain
        import jax
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise DataError(f"global batch {global_batch} does not split evenly over {self.process_count} hosts")
        self.seed, self.global_batch, self.position = seed, global_batch, position
        self.workers, self.processes = workers, processes
        self.unreadable: set[int] = set()  # record indices whose image failed to decode
        example = _Example(records, encoder, image_size, train, load_image, num_frames)
        ds = grain.MapDataset.range(len(records))
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat()
        ds = ds.random_map(example, seed=seed) if train else ds.map(example)
        self._batches = ds.batch(global_batch // self.process_count, batch_fn=_Collate(encoder.layout, lengths))
        self._iterator = None

    @property
    def skipped_images(self) -> int:
        return len(self.unreadable)

    def _iter(self):
        if self._iterator is None:  # started lazily, at the (possibly restored) position
            import grain
            first = self.position // self.global_batch * self.process_count + self.process_index
            ds = self._batches[first::self.process_count].to_iter_dataset(
                grain.ReadOptions(num_threads=max(self.workers, 0), prefetch_buffer_size=max(2 * self.workers, 1)))
            if self.processes > 0:
                from absl import flags
                if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults here)
                    flags.FLAGS.mark_as_parsed()
                ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.processes))
            self._iterator = iter(ds)
        return self._iterator

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter())
        for index, error in batch.pop("_passed_over"):
            if index not in self.unreadable:
                self.unreadable.add(index)
                print(f"train: skipped an unreadable training image ({error}); "
                      f"{len(self.unreadable)} skipped so far", file=sys.stderr)
        self.position += self.global_batch
        return batch

    def close(self):
        """Stop the read-ahead threads or worker processes."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def state(self) -> dict:
        return {"position": int(self.position), "seed": int(self.seed)}

    def restore(self, state: dict):
        if int(state.get("seed", self.seed)) != self.seed:
            raise DataError(f"checkpoint data order used seed {state['seed']}, this run seed {self.seed}: "
                            "resuming would not replay the same examples")
        self.close()
        self.position = int(state["position"])


def eval_batches(records: list[dict], encoder: Encoder, batch_size: int, image_size: int,
                 lengths: dict[str, int] | None = None, load_image: Callable = images.load_rgb, num_frames: int = 4):
    """(loss batch, prompt batch, answers, count) for consecutive slices of a held-out set.

    The last slice is padded up to `batch_size` with copies of its first record
    (so shapes stay fixed); `count` says how many rows are real.
    """
    for start in range(0, len(records), batch_size):
        real = records[start:start + batch_size]
        recs = real + [real[0]] * (batch_size - len(real))
        pixels = np.stack([record_pixels(r, image_size, num_frames, load_image) for r in recs])
        batch = collate([encoder.example(r) for r in recs], encoder.layout, lengths)
        batch["labels"][len(real):] = IGNORE  # filler rows do not count in the loss
        batch["target_labels"][len(real):] = IGNORE
        batch["pixel_values"] = pixels
        prompts = [encoder.prompt(r) for r in recs]
        answers = [encoder.answer(r) for r in recs]
        yield batch, prompts, answers, len(real)
