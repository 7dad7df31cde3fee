"""Host memory of loading: large tensors are converted a chunk of rows at a time, bit for bit as
if whole, and a stacked param is filled on its devices, never assembled on the host."""
from __future__ import annotations

import os
import sys
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest

import jblip
from jblip.convert import chunked
from jblip.convert.rules import IDENTITY, LINEAR, LINEAR_HEADS_IN, DictSource, Rule
from jblip.quantization import QArray, Quantization, is_quantized
from tests.hf_models import NUM_QUERIES, TINY_LLAMA, TINY_QFORMER, TINY_VISION

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from load import write_random  # noqa: E402

# (rule, param shape, the n_in the kernel is quantised with, or None: a float tensor)
CASES = {"q_proj [D, N, H]": (Rule("k", "k", LINEAR), (64, 4, 24), 1),
         "o_proj [N, H, D]": (Rule("k", "k", LINEAR_HEADS_IN), (4, 24, 80), 2),
         "lm_head [D, V]": (Rule("k", "k", LINEAR), (96, 333), 1),
         "embedding [V, D]": (Rule("k", "k", IDENTITY), (333, 96), None)}


def _torch_layout(shape, n_in, seed=0):
    rows = int(np.prod(shape[n_in:])) if n_in else shape[0]
    return np.random.default_rng(seed).standard_normal((rows, int(np.prod(shape)) // rows)).astype(np.float32)


@pytest.mark.parametrize("case,mode", [(case, mode) for case, (_, _, n_in) in CASES.items()
                                       for mode in ("int8", "int4", "bfloat16") if n_in or mode == "bfloat16"])
def test_row_chunks_convert_and_quantise_exactly_as_the_whole_tensor(case, mode, monkeypatch):
    rule, shape, n_in = CASES[case]
    source = DictSource({"k": _torch_layout(shape, n_in or 0)})
    like = None
    if mode != "bfloat16":
        quant = Quantization(mode, group_size=16)
        like = QArray(jax.ShapeDtypeStruct(shape, quant.qtype),
                      jax.ShapeDtypeStruct(quant.scale_shape(shape, n_in), np.float32), None, quant.qtype)
    dtype = None if like is not None else np.dtype(ml_dtypes.bfloat16)
    whole = chunked.read_converted(source, "k", rule, shape, dtype, like)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 3000)  # a few rows per chunk, the last one short
    reads = []
    monkeypatch.setattr(source, "read", lambda key: pytest.fail(f"{key} read whole"))
    monkeypatch.setattr(source, "read_rows", lambda key, a, b: reads.append(b - a) or source.tensors[key][a:b])
    parts = chunked.read_converted(source, "k", rule, shape, dtype, like)
    assert len(reads) > 2 and sum(reads) == source.tensors["k"].shape[0]
    for x, y in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(parts)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


LAYERS, WIDTH, FFN = 24, 256, 1024


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Tiny ViT and Q-Former, a LLaMA of 24 layers of width 256 (random float32, written directly)."""
    from transformers import InstructBlipConfig
    path = str(tmp_path_factory.mktemp("wide"))
    text = dict(TINY_LLAMA, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS, vocab_size=1000)
    write_random(path, InstructBlipConfig(vision_config=TINY_VISION, qformer_config=TINY_QFORMER, text_config=text,
                                          num_query_tokens=NUM_QUERIES), shard_bytes=8 * 2**20)
    return path


@pytest.mark.parametrize("quantize", ["int8", pytest.param(None, marks=pytest.mark.slow)])
def test_loading_holds_no_whole_stack_on_the_host_and_chunks_change_nothing(wide_model, quantize, monkeypatch):
    """numpy's host allocations (tracemalloc sees them; XLA's device buffers it does not) stay
    below one MLP kernel stack in its loaded dtype (int8: 6 MiB, float32: 24 MiB): no stack is
    assembled on the host and no large tensor is held whole next to its converted form. They
    peak at a few layers' worth (2.0 and 4.0 MiB measured); with each stack assembled on the
    host and placed whole, 7.5 and 55 MiB."""
    whole = jblip.load_pretrained(wide_model, quantize=quantize)  # each tensor read whole (< CHUNK_BYTES)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 256 * 1024)  # 1 MiB layers, 1 MiB head: 4 chunks each
    jblip.load_pretrained(wide_model, quantize=quantize)  # compiles outside the measurement
    tracemalloc.start()
    try:
        model = jblip.load_pretrained(wide_model, quantize=quantize)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(model.params), strict=True):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()  # chunks change nothing
    gate = model.params["llm"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert is_quantized(gate) == (quantize is not None)
    stack = sum(x.nbytes for x in jax.tree_util.tree_leaves(gate))  # int8: values and scales
    print(f"host peak {peak / 2**20:.2f} MiB of {stack / 2**20:.2f}")
    assert peak < stack, f"host peak {peak / 2**20:.1f} MiB; one stack is {stack / 2**20:.1f} MiB"
