"""`jblip serve --model M [--host H --port P] [--index INDEX_DIR] [limits]`: an OpenAI-compatible
HTTP server (and, with --index, text -> image search over an index of `jblip index`).

Needs the serve extra (pip install 'jblip[serve]'): FastAPI, uvicorn, prometheus_client.
"""
from __future__ import annotations

import sys

from jblip.commands.common import add_model_arguments, checkpoint_path, enable_compilation_cache


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model name clients send (default: the checkpoint "
                                                    "folder's name, e.g. 'demo')")
    parser.add_argument("--mesh", help='device mesh for the weights, e.g. "tensor=4" or "fsdp=-1" '
                                       "(default: one device)")
    parser.add_argument("--warm-up", action="store_true",
                        help="compile continuous batching's programs (admission at every batch size, the step) "
                             "before listening, instead of on the first requests")
    g = parser.add_argument_group("search (text -> image over an index built by `jblip index`)")
    g.add_argument("--index", metavar="INDEX_DIR", help="serve POST /v1/search over this index and a search tab "
                                                        "in the playground (off by default)")
    g.add_argument("--retrieval-model", metavar="DIR", help="the retrieval checkpoint to embed queries with "
                                                            "(default: the one the index was built with, as "
                                                            "`jblip search`; the bundled demo retrieval model)")
    g = parser.add_argument_group("limits")
    g.add_argument("--max-batch", type=int, default=8, help="most answers decoded at once (default 8)")
    g.add_argument("--engine", choices=("continuous", "static"), default="continuous",
                   help="continuous batching in decode slots (default; beam search and Flan-T5 are batched "
                        "statically), or static batching only (a batch waits for its longest answer)")
    g.add_argument("--slots", type=int, help="decode slots of continuous batching (default: --max-batch)")
    g.add_argument("--slot-length", type=int, default=256,
                   help="KV-cache columns per slot: a request fits when its prompt (bucketed, image queries "
                        "included) plus max_tokens fit; longer ones are batched statically (default 256)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting; more are answered 429 (default 64)")
    g.add_argument("--max-prompt-tokens", type=int, default=128,
                   help="longest prompt in tokens; longer ones are refused (default 128, LAVIS' max_txt_len)")
    g.add_argument("--default-max-tokens", type=int, default=64,
                   help="max_tokens of requests that name none (cut to the model's positions; default 64)")
    g.add_argument("--max-tokens-limit", type=int, default=1024, help="the most max_tokens any request may ask")
    g.add_argument("--max-image-bytes", type=int, default=20 << 20, help="largest image upload (default 20 MiB)")
    g.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="largest image, width x height (default 40 M)")
    g.add_argument("--allow-local-files", metavar="DIR",
                   help="also accept image paths (or file:// URLs) inside DIR; off by default")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to finish open requests after SIGTERM (default 30)")


def settings_from(args, model_name: str):
    import os

    from jblip.serve.images import ImageLimits
    from jblip.serve.prepare import ServerSettings
    for name in ("max_batch", "max_queue", "max_prompt_tokens", "default_max_tokens", "max_tokens_limit",
                 "max_image_bytes", "max_image_pixels", "slots", "slot_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.allow_local_files is not None and not os.path.isdir(args.allow_local_files):
        raise FileNotFoundError(f"--allow-local-files: no folder at {args.allow_local_files}")
    images = ImageLimits(args.max_image_bytes, args.max_image_pixels, args.allow_local_files)
    return ServerSettings(model_name=model_name, max_batch=args.max_batch, max_queue=args.max_queue,
                          engine=args.engine, slots=args.slots, slot_length=args.slot_length, warm_up=args.warm_up,
                          max_prompt_tokens=args.max_prompt_tokens, default_max_tokens=args.default_max_tokens,
                          max_tokens_limit=args.max_tokens_limit, images=images,
                          shutdown_timeout=args.shutdown_timeout)


def run(args) -> int:
    try:
        from jblip.serve import build_app, run as serve
        from jblip.serve.server import default_model_name
    except ModuleNotFoundError as e:
        raise ValueError(f"jblip serve needs the serve extra ({e.name} is missing): "
                         "pip install 'jblip[serve]'") from None
    from jblip.pretrained import load_pretrained
    from jblip.processing import Processor

    path = checkpoint_path(args)
    settings = settings_from(args, args.served_model_name or default_model_name(path))
    processor = Processor.from_pretrained(path)
    mesh = None
    if args.mesh:
        from jblip.sharding import make_mesh
        mesh = make_mesh(args.mesh)
    enable_compilation_cache()
    search = None
    if args.index:  # before the model: a wrong index fails in seconds
        from jblip.commands.retrieval_common import open_index
        search = open_index(args.index, args.retrieval_model)
        search.warm_up()
        print(f"jblip serve: searching {len(search)} images of {args.index} with {search.engine.path}", file=sys.stderr)
    print(f"jblip serve: loading {path}", file=sys.stderr)
    model = load_pretrained(path, precision=args.precision, mesh=mesh, quantize=args.quantize)
    app = build_app(model, processor, settings, search=search)
    print(f"jblip serve: model {settings.model_name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    print(f"jblip serve: playground on http://{args.host}:{args.port}/", file=sys.stderr)
    if search is not None:
        print(f"jblip serve: search on http://{args.host}:{args.port}/v1/search", file=sys.stderr)
    serve(app, args.host, args.port, settings.shutdown_timeout)
    return 0
