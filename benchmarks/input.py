"""Training input throughput: images decoded + transformed per second at batch 64, 224 px.

    python benchmarks/input.py [--images 256] [--batches 12] [--repeats 3]

Writes `--images` JPEG photos-sized scenes (640x480, drawn by train/synthetic.py and
upscaled) and a JSONL of questions about them, then reads training batches (random
resized crop + flip to 224 px, tokenised text) from:

- `previous`: the loader jblip had before grain (a thread pool mapping the examples of
  one batch at a time, 4 threads), rebuilt here as the baseline;
- `grain-threads`: train/data.BatchStream, grain read-ahead threads (the default, 4);
- `grain-procs-1`, `grain-procs-2`: BatchStream with 1 and 2 grain worker processes.

Each case runs in its own process, the cases taking turns (`--repeats` rounds); the first batch
(worker start-up) is not timed. One line per case: images/s (median of the rounds) and the
ratio to `previous`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SIZE = 64, 224
CASES = ("previous", "grain-threads", "grain-procs-1", "grain-procs-2")


def write_data(folder: str, count: int) -> str:
    import numpy as np
    from PIL import Image
    from jblip.train import synthetic
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for i in range(count):
            scene = synthetic.single_shape_scene(64, rng)
            image = synthetic.draw_scene(scene, 64).resize((640, 480), Image.BILINEAR)
            name = os.path.join("images", f"{i:05d}.jpg")
            image.save(os.path.join(folder, name), quality=90)
            f.write(json.dumps({"image": name, "text_input": "What colour is the shape?",
                                "text_output": "red"}) + "\n")
    synthetic.write_tokenizers(os.path.join(folder, "tokenizer"))
    return folder


def _stream(case: str, folder: str):
    from jblip.config import PRESETS
    from jblip.text_processing import TextTokenizer
    from jblip.train import images
    from jblip.train.data import BatchStream, Encoder, read_jsonl
    from jblip.train.labels import TextLayout, collate
    records = read_jsonl(os.path.join(folder, "train.jsonl"))
    tok = TextTokenizer.from_dir(os.path.join(folder, "tokenizer"))
    encoder = Encoder(TextLayout.for_model(PRESETS["demo-instructblip-vicuna"]), tok, tok)
    if case == "previous":
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(4)

        def one(k):
            rec = records[k % len(records)]
            pixels = images.train_transform(images.load_rgb(rec["image"]), SIZE, np.random.default_rng([0, 1, k]))
            return encoder.example(rec), pixels

        def batches():
            for b in range(10**9):
                examples, pixels = zip(*pool.map(one, range(b * BATCH, (b + 1) * BATCH)))
                batch = collate(list(examples), encoder.layout)
                batch["pixel_values"] = np.stack(pixels)
                yield batch
        return batches()
    processes = int(case.rsplit("-", 1)[1]) if case.startswith("grain-procs") else 0
    return BatchStream(records, encoder, BATCH, SIZE, workers=4 if not processes else 1, processes=processes,
                       process_index=0, process_count=1)


def run_case(case: str, folder: str, batches: int) -> float:
    stream = _stream(case, folder)
    first = next(stream)
    assert first["pixel_values"].shape == (BATCH, SIZE, SIZE, 3)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * BATCH / (time.perf_counter() - start)
    if hasattr(stream, "close"):
        stream.close()
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one measurement, in this process
        print(json.dumps({"rate": run_case(args.case, args.data, args.batches)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_data(tmp, args.images)
        print(f"input: {args.images} JPEGs 640x480 -> batch {BATCH} at {SIZE} px (random resized crop + flip), "
              f"{args.batches} timed batches, median of {args.repeats}; {os.cpu_count()} cores")
        runs = {case: [] for case in CASES}
        for _ in range(args.repeats):  # cases interleaved: a shared machine's load drifts over the run
            for case in CASES:
                out = subprocess.run([sys.executable, __file__, "--case", case, "--data", folder,
                                      "--batches", str(args.batches)], capture_output=True, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": ROOT}, check=True)
                runs[case].append(json.loads(out.stdout.strip().splitlines()[-1])["rate"])
        rates = {case: statistics.median(r) for case, r in runs.items()}
        for case in CASES:
            print(f"{case:>14}: {rates[case]:7.1f} images/s (runs {', '.join(f'{r:.1f}' for r in runs[case])}), "
                  f"{rates[case] / rates['previous']:.2f}x previous", flush=True)

if __name__ == "__main__":
    main()
