"""Weight-only int8 / int4 (jblip.quantization, qwix): layout, accuracy against float32, every
decoding strategy, a mesh, saved checkpoints, memory of the released 13B, the demo model."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest

import jblip
from jblip import sharding
from jblip.config import PRESETS
from jblip.config_checks import ConfigError
from jblip.convert.errors import CheckpointError
from jblip.convert.quantized import pack_int4, save_quantized, unpack_int4
from jblip.convert.rules import flatten
from jblip.model import abstract_params, count_params
from jblip.quantization import Quantization, is_quantized
from tests.hf_models import tiny_instructblip

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from quant_accuracy import compare, inputs_for  # noqa: E402

GROUP = 16  # int4 groups on the tiny widths (56 -> groups of 14, 96 -> 16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-vicuna"))
    tiny_instructblip(path, seed=1)
    loaded = {mode: jblip.load_pretrained(path, quantize=mode, group_size=GROUP) for mode in (None, "int8", "int4")}
    return path, loaded


def test_kernels_become_int_with_scales_and_the_rest_stays_float(models):
    _, m = models
    layer = m["int4"].params["llm"]["layers"]
    down = layer["mlp"]["down_proj"]["kernel"]  # [L, F=96, D=56], contracted F
    assert is_quantized(down) and down.qvalue.dtype == np.dtype("int4") and down.scale.dtype == np.float32
    assert down.qvalue.shape == (2, 96, 56) and down.scale.shape == (2, 96 // GROUP, 56)
    o = m["int8"].params["llm"]["layers"]["self_attn"]["o_proj"]["kernel"]  # [L, N, H, D]: per output channel
    assert o.qvalue.dtype == np.int8 and o.scale.shape == (2, 1, 1, 56)
    assert is_quantized(m["int8"].params["llm"]["lm_head"]["kernel"])
    for tree in (m["int8"].params["vision"], m["int8"].params["qformer"], m["int8"].params["llm"]["embed_tokens"]):
        assert not any(is_quantized(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized))
    assert count_params(m["int8"].params) == count_params(m[None].params)
    # the int values are qwix's: dequantised, they are the float kernel to within half a step
    float_down = np.asarray(m[None].params["llm"]["layers"]["mlp"]["down_proj"]["kernel"])
    q = m["int8"].params["llm"]["layers"]["mlp"]["down_proj"]["kernel"]
    back = np.asarray(q.qvalue, np.float32) * np.asarray(q.scale)
    assert np.abs(back - float_down).max() <= np.asarray(q.scale).max() / 2 + 1e-7


def test_logits_and_greedy_tokens_against_float32(models):
    _, m = models
    inputs = inputs_for(m[None])
    got = {"int8": compare(m[None], m["int8"], inputs, steps=32), "int4": compare(m[None], m["int4"], inputs, steps=0)}
    print("vs float32:", got)
    assert got["int8"]["kl"] < 1e-3 and got["int8"]["max_abs"] < 0.3 and got["int8"]["agreement"] >= 0.5
    assert got["int4"]["kl"] < 0.1 and got["int4"]["max_abs"] < 3


def test_beam_search_runs_quantised(models):
    """Beam search reorders the KV cache, not the weights: with int4 it gives the top beam it
    scores best (greedy runs in the test above, sampling in the demo-model test)."""
    _, m = models
    inputs = inputs_for(m[None], batch=2)
    beams = m["int4"].generate(**inputs, strategy="beam", num_beams=2, max_new_tokens=4, min_new_tokens=4)
    assert beams.tokens.shape == (2, 4) and np.all(beams.tokens < m[None].config.text.vocab_size)


def test_sharded_load_splits_values_and_scales_and_matches_one_device(models):
    path, m = models
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    sharded = jblip.load_pretrained(path, quantize="int4", group_size=GROUP, mesh=mesh)
    gate = sharded.params["llm"]["layers"]["mlp"]["gate_proj"]["kernel"]  # [L, D=56 (fsdp), F=96 (tensor)]
    assert {s.data.shape for s in gate.qvalue.addressable_shards} == {(2, 14, 48)}
    assert {s.data.shape for s in gate.scale.addressable_shards} == {(2, 1, 48)}  # 4 groups over fsdp=4
    inputs = inputs_for(m[None])
    diff = np.abs(np.asarray(sharded.forward(**inputs)) - np.asarray(m["int4"].forward(**inputs))).max()
    assert diff < 1e-5, diff


def test_saved_quantised_checkpoint_round_trips_bit_for_bit(models, tmp_path):
    _, m = models
    out = str(tmp_path / "int4")
    save_quantized(m["int4"], out)
    again = jblip.load_pretrained(out)
    assert again.config.quantization == Quantization("int4", GROUP)
    a, b = flatten(m["int4"].params), flatten(again.params)
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(jax.tree_util.tree_leaves(a[k]), jax.tree_util.tree_leaves(b[k])):
            assert x.dtype == y.dtype and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)), k
    with pytest.raises(ValueError, match="already quantised"):
        jblip.load_pretrained(out, quantize="int8")


def test_corrupt_or_mismatched_quantised_checkpoint_is_one_clear_error(models, tmp_path):
    _, m = models
    out = str(tmp_path / "int8")
    save_quantized(m["int8"], out)
    config = json.load(open(os.path.join(out, "config.json")))
    config["jblip_quantization"]["mode"] = "int4"  # the tensors are int8
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"(?s)does not fit .*mismatch: llm/layers/mlp/up_proj/kernel/qvalue"):
        jblip.load_pretrained(out)
    weights = os.path.join(out, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(CheckpointError):
        jblip.load_pretrained(out)


def test_convert_cli_writes_a_quantised_checkpoint_with_its_tokenizers(tmp_path, capsys):
    from jblip.cli import main
    from jblip.pipeline import DEFAULT_MODEL
    out = str(tmp_path / "demo-int8")
    assert main(["convert", DEFAULT_MODEL, out, "--quantize", "int8"]) == 0
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert os.path.isfile(os.path.join(out, "qformer_tokenizer", "tokenizer.json"))
    size, original = (os.path.getsize(os.path.join(d, "model.safetensors")) for d in (out, DEFAULT_MODEL))
    assert size < 0.9 * original, (size, original)
    assert jblip.load_pretrained(out).config.quantization == Quantization("int8")
    assert main(["info", "--model", out]) == 0
    assert "int4" in capsys.readouterr().out


def test_int4_packing_round_trips_odd_lengths():
    q = np.arange(-8, 8).reshape(2, 8)[:, :7].astype(np.dtype("int4"))
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (2, 4)
    assert np.array_equal(unpack_int4(packed, 7).astype(np.int8), q.astype(np.int8))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_vicuna_13b_weight_memory_per_device(mode):
    """From abstract shapes: the LM's kernels at 1 byte (int8) or half a byte (int4), their bf16
    scales (int8: one per output channel; int4: one per 128 values), everything else bf16."""
    config = dataclasses.replace(PRESETS["instructblip-vicuna-13b"].with_precision("bfloat16"),
                                 quantization=Quantization(mode))
    t = config.text
    D, F, L, V = t.hidden_size, t.intermediate_size, t.num_layers, t.vocab_size
    kernels = L * (4 * D * D + 3 * D * F) + D * V
    scales = L * (5 * D + 2 * F) + V if mode == "int8" else kernels // 128
    float_params = count_params(abstract_params(config)) - kernels
    expected = kernels * (1 if mode == "int8" else 0.5) + 2 * scales + 2 * float_params
    boxed = abstract_params(config, boxed=True)
    total = sharding.per_device_bytes(boxed, {"fsdp": 1})
    assert total == expected
    print(f"13B {mode}: {total / 2**30:.2f} GiB, " + ", ".join(
        f"fsdp={n} {sharding.per_device_bytes(boxed, {'fsdp': n}) / 2**30:.2f} GiB" for n in (4, 8)))
    for n in (4, 8):
        assert total / n <= sharding.per_device_bytes(boxed, {"fsdp": n}) <= total / n * 1.01
    assert total / 2**30 < (14.5 if mode == "int8" else 8.7)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="unknown quantisation 'int3'"):
        Quantization.parse("int3")
    with pytest.raises(ConfigError, match="quantize_towers"):
        Quantization("int8", towers=("qformer",))
    from jblip.train.build import check_frozen_quantized
    config = dataclasses.replace(PRESETS["tiny-instructblip-vicuna"], quantization=Quantization("int8"))
    check_frozen_quantized(config, "qformer")
    with pytest.raises(ValueError, match="would train"):
        check_frozen_quantized(config, "qformer+llm")


@pytest.mark.parametrize("mode,goal,options", [("int8", 0.99, {}), ("int4", 0.95, dict(do_sample=True, top_k=1))])
def test_demo_model_held_out_accuracy(mode, goal, options):
    """The fp32 demo model answers 250/250; int4 decodes through the sampler (top-k 1: greedy)."""
    from jblip.pipeline import DEFAULT_MODEL, answer
    from tests.test_demo import held_out
    data = held_out()
    model = jblip.load_pretrained(DEFAULT_MODEL, quantize=mode)
    got = answer(model, [s[0] for s in data], [s[1] for s in data], **options)
    right = sum(g == s[2] for g, s in zip(got, data))
    print(f"demo model {mode}: {right}/{len(data)} held-out answers right")
    assert right / len(data) >= goal
