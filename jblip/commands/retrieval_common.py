"""What `jblip index`, `jblip search`, `jblip serve --index` and the retrieval tasks of `jblip eval` share:
the retrieval model to load (default: the bundled demo retrieval model) and an index opened for search."""
from __future__ import annotations

import os

import jblip

DEMO_RETRIEVAL_MODEL = os.path.join(os.path.dirname(jblip.__file__), "assets", "retrieval_demo")


def add_retrieval_model_argument(parser):
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="HF-format BLIP-2 retrieval checkpoint (Blip2ForImageTextRetrieval) with its BERT "
                             "tokenizer (default: the bundled demo retrieval model)")
    parser.add_argument("--batch-size", type=int, default=16)


def load_engine(path: str | None, batch_size: int = 16, **options):
    from jblip.commands.common import enable_compilation_cache
    from jblip.retrieval.engine import RetrievalEngine
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    path = path or DEMO_RETRIEVAL_MODEL
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no retrieval checkpoint folder at {path}")
    enable_compilation_cache()
    return RetrievalEngine.from_pretrained(path, batch_size=batch_size, **options)  # precision, mesh, ...


def open_index(directory: str, model: str | None = None, batch_size: int = 16):
    """An `IndexSearch` over the index in `directory`, with `model` or else the model the index
    was built with (recorded in its index.json; the bundled demo when none is recorded)."""
    from jblip.retrieval.index_search import IndexSearch
    from jblip.retrieval.index_store import read_index
    meta, paths, emb = read_index(directory)
    return IndexSearch(load_engine(model or meta.get("model"), batch_size), meta, paths, emb, directory)
