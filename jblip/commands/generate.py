"""`jblip generate --model M --image IMG --prompt TEXT [decoding options]`: print the answer."""
from __future__ import annotations

import sys

from jblip.commands.common import (add_decoding_arguments, add_model_arguments, checkpoint_path, decoding_options,
                                   load_model, planned_new_tokens)


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True,
                        help='question or instruction, e.g. "What colour is the circle?" ("" allowed for BLIP-2)')
    add_decoding_arguments(parser)


def run(args) -> int:
    from jblip.image_processing import load_image
    from jblip.pipeline import answer
    from jblip.processing import Processor

    # every input check (image, checkpoint files, prompt) before the slow weight load
    image = load_image(args.image)
    path = checkpoint_path(args)
    processor = Processor.from_pretrained(path)
    options = decoding_options(args)
    new_tokens = planned_new_tokens(options)
    processor.text_inputs(args.prompt, 1, options["max_length"], options["truncation"], new_tokens)
    limit, _ = processor.limits(options["max_length"], new_tokens)
    length = len(processor.tokenizer.encode([args.prompt])[0])
    if limit is not None and length > limit:
        print(f"generate: note: the prompt is {length} tokens, cut to {limit} keeping its end "
              "(--max-length to change, --no-truncation to refuse)", file=sys.stderr)
    model = load_model(path, args, processor)
    for text in answer(model, [image], args.prompt, processor=processor, **options):
        print(text)
    return 0
