"""`jblip generate --model M --image IMG --prompt TEXT [decoding options]`: print the answer
(`--video CLIP --frames T` instead of `--image`: a question about T frames sampled from a video)."""
from __future__ import annotations

import sys

from jblip.commands.common import (add_decoding_arguments, add_model_arguments, checkpoint_path, decoding_options,
                                   load_model, planned_new_tokens)


def add_arguments(parser):
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="image file")
    source.add_argument("--video", help="video file (PyAV: pip install 'jblip[video]'), animated GIF or folder of frames")
    parser.add_argument("--frames", type=int, default=4, help="frames sampled uniformly from --video (default 4)")
    parser.add_argument("--prompt", required=True,
                        help='question or instruction, e.g. "What colour is the circle?" ("" allowed for BLIP-2)')
    add_decoding_arguments(parser)


def run(args) -> int:
    from jblip.image_processing import load_image
    from jblip.pipeline import answer
    from jblip.processing import Processor
    from jblip.video_processing import load_frames

    # every input check (image or video, checkpoint files, prompt) before the slow weight load
    frames = None if args.video is None else args.frames
    if frames is None:
        inputs = dict(images=[load_image(args.image)])
    else:
        inputs = dict(images=None, videos=[load_frames(args.video, frames, args.video)], num_frames=frames)
    path = checkpoint_path(args)
    processor = Processor.from_pretrained(path)
    options = decoding_options(args)
    new_tokens = planned_new_tokens(options)
    processor.text_inputs(args.prompt, 1, options["max_length"], options["truncation"], new_tokens, frames=frames)
    limit, _ = processor.limits(options["max_length"], new_tokens, frames or 1)
    length = len(processor.tokenizer.encode([args.prompt])[0])
    if limit is not None and length > limit:
        print(f"generate: note: the prompt is {length} tokens, cut to {limit} keeping its end "
              "(--max-length to change, --no-truncation to refuse)", file=sys.stderr)
    model = load_model(path, args, processor)
    for text in answer(model, prompts=args.prompt, processor=processor, **inputs, **options):
        print(text)
    return 0
