"""LAVIS checkpoint sets -> jblip, jblip -> HF export -> transformers, and the `jblip convert` CLI.

The LAVIS files are made from a tiny HF InstructBLIP-Vicuna by the inverse of
the LAVIS->HF renaming (written out here independently of convert/lavis.py).
"""
import dataclasses
import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import jblip
from jblip.convert.export import export_hf
from jblip.convert.lavis import load_lavis
from jblip.convert.readers import open_checkpoint
from jblip.convert.rules import ConversionError, flatten
from jblip.config import from_hf_config
from jblip.pretrained import VisionLanguageModel
from tests.hf_models import (IMAGE_TOKEN, NUM_QUERIES, TINY_T5, max_diff, right_padded_text, tiny_blip2,
                             tiny_instructblip)

# HF key -> LAVIS key (first match wins); q/v biases and the LLM are handled apart
HF_TO_LAVIS = [
    (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(\w+)", r"visual_encoder.patch_embed.proj.\1"),
    (r"vision_model\.post_layernorm\.(\w+)", r"ln_vision.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(\w+)", r"visual_encoder.blocks.\1.norm\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(\w+)", r"visual_encoder.blocks.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"visual_encoder.blocks.\1.attn.qkv.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(.+)", r"visual_encoder.blocks.\1.mlp.\2"),
    (r"qformer\.embeddings\.layernorm\.(\w+)", r"Qformer.bert.embeddings.LayerNorm.\1"),  # InstructBLIP
    (r"qformer\.layernorm\.(\w+)", r"Qformer.bert.embeddings.LayerNorm.\1"),             # BLIP-2
    (r"qformer\.(.+)", r"Qformer.bert.\1"),
    (r"language_projection\.(\w+)", r"llm_proj.\1"),
    (r"query_tokens", "query_tokens"),
]


def to_lavis(hf_state: dict, vit_layers: int, projection: str = "llm_proj"):
    """-> (eva_vit_g-style dict, trimmed-checkpoint dict); LLM keys are left out."""
    eva, model = {}, {}
    for key, value in hf_state.items():
        if key.startswith("language_model."):
            continue
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key)
        if m:
            d = value.shape[0] // 3
            eva[f"blocks.{m.group(1)}.attn.q_bias"] = value[:d].clone()
            eva[f"blocks.{m.group(1)}.attn.v_bias"] = value[2 * d:].clone()
            continue
        for pattern, template in HF_TO_LAVIS:
            m = re.fullmatch(pattern, key)
            if m:
                lavis = m.expand(template).replace("attention.attention.", "attention.self.")
                lavis = lavis.replace("llm_proj.", projection + ".")
                break
        else:
            raise AssertionError(f"test renaming misses {key}")
        if lavis.startswith("visual_encoder.") and not lavis.startswith("ln_vision"):
            eva[lavis[len("visual_encoder."):]] = value.clone()
        else:
            model[lavis] = value.clone()
    g = torch.Generator().manual_seed(5)
    for k in [k for k in eva if k.startswith("blocks.0.")]:  # EVA's extra, unused last block
        eva[k.replace("blocks.0.", f"blocks.{vit_layers}.")] = torch.randn(eva[k].shape, generator=g)
    model["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
    model["Qformer.cls.predictions.bias"] = torch.zeros(99)
    return eva, model


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory):
    """A tiny HF InstructBLIP-Vicuna (HF folder) and the same weights as a LAVIS checkpoint set."""
    root = tmp_path_factory.mktemp("vicuna")
    hf = tiny_instructblip(root / "hf", seed=11)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    eva, model = to_lavis(state, vit_layers=2)
    # a full checkpoint may carry ViT weights too: the .pth copy must win over EVA's file
    model["visual_encoder.blocks.0.norm1.weight"] = eva["blocks.0.norm1.weight"].clone()
    eva["blocks.0.norm1.weight"] = eva["blocks.0.norm1.weight"] + 1.0
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": model, "epoch": 3, "config": {"lr": 1e-5}}, root / "trimmed.pth")
    llm = {k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}
    llm["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(7)  # old LLaMA files carry it
    os.makedirs(root / "llm")
    torch.save(llm, root / "llm" / "pytorch_model.bin")
    return dict(hf=hf, state=state, hf_dir=str(root / "hf"), pth=str(root / "trimmed.pth"),
                vit=str(root / "eva_vit_g.pth"), llm=str(root / "llm"), root=root)


def vicuna_inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, 28, 28, 3)).astype(np.float32)
    q_ids, q_mask = right_padded_text([3, 5][:batch], 99, seed)
    ids = np.concatenate([np.full((batch, NUM_QUERIES), IMAGE_TOKEN), np.full((batch, 1), 2),
                          rng.integers(3, 120, size=(batch, 5))], axis=1)
    return pixels, q_ids, q_mask, ids


def test_lavis_set_loads_to_the_hf_logits(vicuna):
    config = from_hf_config(vicuna["hf_dir"])
    model = load_lavis(vicuna["pth"], vicuna["vit"], vicuna["llm"], config=config)
    assert model.config.vision.post_layernorm_eps == 1e-5 and model.config.vision.layer_norm_eps == 1e-6

    hf_params = jblip.load_pretrained(vicuna["hf_dir"]).params
    pixels, q_ids, q_mask, ids = vicuna_inputs()
    lavis_logits = model.forward(pixels, ids, None, q_ids, q_mask)
    lavis_params, model.params = model.params, hf_params  # same config and jitted entry, HF-folder weights
    d = max_diff(lavis_logits, model.forward(pixels, ids, None, q_ids, q_mask))
    print("LAVIS set vs HF folder, logits max |delta|:", d)
    assert d <= 1e-5
    a, b = flatten(lavis_params), flatten(hf_params)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)

    report = model.conversion_report
    text = str(report)
    print(text)
    n_vit = sum(k.startswith("vision_model.") and k != "vision_model.post_layernorm.weight"
                and k != "vision_model.post_layernorm.bias" for k in vicuna["state"])
    n_llm = sum(k.startswith("language_model.") for k in vicuna["state"])
    assert report.used == {"vit": n_vit - 1, "llm": n_llm, "model": len(vicuna["state"]) - n_vit + 1 - n_llm}
    assert report.overridden == [("vision_model.encoder.layers.0.layer_norm1.weight", "vit", "model")]
    dropped = {k for d in report.dropped.values() for k in d}
    assert {"Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.bias",
            "model.layers.0.self_attn.rotary_emb.inv_freq", "blocks.2.attn.qkv.weight"} <= dropped
    assert "EVA's last block is unused" in text and "overridden by model" in text


@pytest.fixture(scope="module")
def blip2_opt(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2_opt")
    hf = tiny_blip2(root / "hf", seed=4)
    return dict(hf=hf, hf_dir=str(root / "hf"), root=root)


def test_lavis_blip2_opt_set_gives_the_hf_params(blip2_opt):
    """BLIP-2 naming: opt_proj, Qformer embeddings LayerNorm -> qformer.layernorm, no text embeddings."""
    root = blip2_opt["root"]
    state = {k: v.detach().clone() for k, v in blip2_opt["hf"].state_dict().items()}
    eva, model = to_lavis(state, vit_layers=2, projection="opt_proj")
    model["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(99, 40)  # stage-1 leftover
    torch.save(eva, root / "eva.pth")
    torch.save({"model": model}, root / "blip2.pth")
    blip2_opt["hf"].language_model.save_pretrained(root / "opt")  # safetensors, tied lm_head left out
    lavis = load_lavis(str(root / "blip2.pth"), str(root / "eva.pth"), str(root / "opt"),
                       config=from_hf_config(blip2_opt["hf_dir"]))
    a, b = flatten(lavis.params), flatten(jblip.load_pretrained(blip2_opt["hf_dir"]).params)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert "removed from BLIP-2's Q-Former" in str(lavis.conversion_report)


def test_missing_files_are_named_in_one_error(vicuna):
    with pytest.raises(ConversionError) as e:
        load_lavis(vicuna["pth"], None, vicuna["llm"], config=from_hf_config(vicuna["hf_dir"]))
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "vision/layers_1/mlp/fc2/kernel" in msg
    assert "eva_vit_g.pth" in msg and "files read: llm " in msg


def test_vicuna_pad_row_is_added(vicuna, tmp_path):
    """An LLM folder with one row fewer than the model (Vicuna 32000 vs LAVIS' 32001 with [PAD])."""
    llm = {k: v for k, v in torch.load(os.path.join(vicuna["llm"], "pytorch_model.bin")).items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        llm[k] = llm[k][:-1].clone()
    os.makedirs(tmp_path / "llm")
    torch.save(llm, tmp_path / "llm" / "pytorch_model.bin")
    model = load_lavis(vicuna["pth"], vicuna["vit"], str(tmp_path / "llm"), config=from_hf_config(vicuna["hf_dir"]))
    embed = np.asarray(model.params["llm"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(embed[-1], llm["model.embed_tokens.weight"].double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(embed[:-1], llm["model.embed_tokens.weight"].numpy())
    assert set(model.conversion_report.padded) == {"language_model.model.embed_tokens.weight",
                                                   "language_model.lm_head.weight"}


# ------------------------------------------------------------------ export -> transformers

def perturbed(model, seed):
    """The model's params, every one moved (as if fine-tuned), so an export cannot echo the source files."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(x.dtype), model.params)


def hf_logits(hf, pixels, ids, q_ids=None, q_mask=None, dec=None):
    t = torch.tensor
    kw = dict(pixel_values=t(pixels.transpose(0, 3, 1, 2)), input_ids=t(ids))
    if q_ids is not None:
        kw.update(qformer_input_ids=t(q_ids), qformer_attention_mask=t(q_mask))
    if dec is not None:
        kw["decoder_input_ids"] = t(dec)
    with torch.no_grad():
        return hf(**kw).logits.numpy()


def check_export(model, params, out, cls, dec=None):
    """Export, reload with transformers, compare logits and params; returns max |delta| of the logits."""
    summary = export_hf(model.config, out, params=params, max_shard_bytes="150KB")
    assert len(summary.files) > 3 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    hf, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched key
    ours = VisionLanguageModel(model.config, params)
    pixels, q_ids, q_mask, ids = vicuna_inputs()
    if not model.config.qformer.use_text_input:
        q_ids = q_mask = None
    if dec is not None:
        ids[:, NUM_QUERIES] = 5  # no BOS in T5 encoder inputs
    logits = ours.forward(pixels, ids, None, q_ids, q_mask, decoder_input_ids=dec)
    d = max_diff(logits, hf_logits(hf, pixels, ids, q_ids, q_mask, dec))
    back = flatten(jblip.load_pretrained(out).params)  # and back into jblip: bit-exact
    sent = flatten(params)
    assert set(back) == set(sent) and all(np.array_equal(np.asarray(back[k]), np.asarray(sent[k])) for k in sent)
    return d


def test_export_vicuna_loads_in_transformers(vicuna, tmp_path):
    from transformers import InstructBlipForConditionalGeneration
    model = jblip.load_pretrained(vicuna["hf_dir"])
    d = check_export(model, perturbed(model, 1), str(tmp_path), InstructBlipForConditionalGeneration)
    print("instructblip-vicuna export: jblip vs transformers logits max |delta|:", d)
    assert d <= 1e-4
    written = json.load(open(tmp_path / "config.json"))
    assert written["image_token_index"] == IMAGE_TOKEN and written["num_query_tokens"] == NUM_QUERIES
    assert written["text_config"]["model_type"] == "llama"


def test_export_blip2_opt_and_untied_t5(blip2_opt, tmp_path):
    from transformers import Blip2ForConditionalGeneration
    model = jblip.load_pretrained(blip2_opt["hf_dir"])
    d_opt = check_export(model, perturbed(model, 2), str(tmp_path / "opt_out"), Blip2ForConditionalGeneration)
    with open_checkpoint(str(tmp_path / "opt_out")) as src:
        assert "language_model.lm_head.weight" not in src.keys()  # tied: written once, as HF does

    # Flan-T5 style untied head: the exported lm_head must stay a separate matrix in transformers
    tiny_blip2(tmp_path / "t5", seed=5, text=TINY_T5)
    tied = jblip.load_pretrained(str(tmp_path / "t5"))
    text = dataclasses.replace(tied.config.text, tie_word_embeddings=False, scale_decoder_outputs=False)
    config = dataclasses.replace(tied.config, text=text)
    params = perturbed(tied, 3)
    params["llm"]["lm_head"] = {"kernel": np.random.default_rng(4).normal(0, 0.2, (40, 131)).astype(np.float32)}
    untied = VisionLanguageModel(config, params)
    dec = np.array([[0, 5, 9, 11], [0, 7, 7, 1]])
    d_t5 = check_export(untied, params, str(tmp_path / "t5_out"), Blip2ForConditionalGeneration, dec=dec)
    print("export: jblip vs transformers logits max |delta|: blip2-opt", d_opt, "blip2-t5 (untied)", d_t5)
    assert d_opt <= 1e-4 and d_t5 <= 1e-4


def test_bfloat16_export_is_bit_exact(vicuna, tmp_path):
    from transformers import InstructBlipForConditionalGeneration
    hf = InstructBlipForConditionalGeneration.from_pretrained(vicuna["hf_dir"], dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model = jblip.load_pretrained(str(tmp_path / "bf16"), precision="bfloat16")
    summary = export_hf(model, str(tmp_path / "out"))
    assert summary.dtypes == {"bfloat16": summary.tensors}
    original = {k: v for k, v in hf.state_dict().items()}
    with open_checkpoint(str(tmp_path / "out")) as src:
        assert set(src.keys()) <= set(original)
        for key in src.keys():
            ours = src.read(key)
            assert ours.dtype == ml_dtypes.bfloat16, key
            assert np.array_equal(ours.view(np.uint16), original[key].view(torch.uint16).numpy()), key
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"


def test_vocab_rows_padded_for_a_mesh_are_cut_off(vicuna, tmp_path):
    model = jblip.load_pretrained(vicuna["hf_dir"])
    text = dataclasses.replace(model.config.text, padded_vocab_size=136)
    params = jax.tree_util.tree_map(np.asarray, model.params)
    llm = params["llm"]
    llm["embed_tokens"]["embedding"] = np.pad(llm["embed_tokens"]["embedding"], ((0, 5), (0, 0)))
    llm["lm_head"]["kernel"] = np.pad(llm["lm_head"]["kernel"], ((0, 0), (0, 5)))
    export_hf(dataclasses.replace(model.config, text=text), str(tmp_path), params=params)
    with open_checkpoint(str(tmp_path)) as ours, open_checkpoint(vicuna["hf_dir"]) as hf:
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            assert np.array_equal(ours.read(key), hf.read(key)), key
    assert json.load(open(tmp_path / "config.json"))["text_config"]["vocab_size"] == 131


# ------------------------------------------------------------------ the CLI

def test_convert_cli_bin_and_lavis(vicuna, tmp_path, capsys):
    from jblip.cli import main
    src = tmp_path / "bin"
    os.makedirs(src)
    torch.save(vicuna["hf"].state_dict(), src / "pytorch_model.bin")
    with open(os.path.join(vicuna["hf_dir"], "config.json")) as f:
        (src / "config.json").write_text(f.read())
    assert main(["convert", str(src), str(tmp_path / "out"), "--max-shard-size", "200KB"]) == 0
    out, err = capsys.readouterr()
    print(out)
    with open_checkpoint(os.path.join(vicuna["hf_dir"], "model.safetensors")) as hf_file:
        n = len(hf_file.keys())
        with open_checkpoint(str(tmp_path / "out")) as ours:
            assert sorted(ours.keys()) == sorted(hf_file.keys())  # the same keys HF's save_pretrained writes
            for key in ours.keys():
                assert np.array_equal(ours.read(key), hf_file.read(key)), key
    assert re.search(rf"wrote {n} tensors \({n} float32\), [\d.]+ MB, in \d+ file\(s\)", out)
    assert f"converting: {n}/{n} tensors" in err

    assert main(["convert", "--lavis", vicuna["pth"], "--vit", vicuna["vit"], "--llm", vicuna["llm"],
                 "--config", vicuna["hf_dir"], "--dtype", "bfloat16", str(tmp_path / "lavis_out")]) == 0
    out, _ = capsys.readouterr()
    assert "LAVIS checkpoint set:" in out and f"wrote {n} tensors ({n} bfloat16)" in out
    assert "post_layernorm_eps" in out  # the ln_vision eps HF cannot express is reported
    with open_checkpoint(str(tmp_path / "lavis_out")) as ours:
        w = "vision_model.encoder.layers.1.self_attn.qkv.bias"
        expected = vicuna["state"][w].numpy().astype(ml_dtypes.bfloat16)
        assert np.array_equal(ours.read(w).view(np.uint16), expected.view(np.uint16))
    assert from_hf_config(str(tmp_path / "lavis_out")).vision.post_layernorm_eps == 1e-5

    assert main(["convert", str(src)]) == 2
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2  # refuses to overwrite
    err = capsys.readouterr().err
    assert "expected SRC DST" in err and "already holds a checkpoint" in err


# ------------------------------------------------------------------ released sizes, no memory

TIED_COPIES = {"language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight"}


@pytest.mark.parametrize("name", ["instructblip-vicuna-7b", "blip2-opt-2.7b", "blip2-flan-t5-xl"])
def test_export_layout_of_released_checkpoints(name):
    """Export keys and shapes = the HF state dict's, less the tied copies save_pretrained leaves out."""
    from jblip.convert.export import export_layout, param_shapes
    from jblip.config import preset
    from tests.test_full_size import hf_key_shapes
    config = preset(name)
    metas = {p: (shape, np.dtype(np.float32)) for p, shape in param_shapes(config).items()}
    exported = {key: shape for key, shape, *_ in export_layout(config, metas)}
    reference = hf_key_shapes(name)
    tied = TIED_COPIES | ({"language_model.lm_head.weight"} if config.family == "opt" else set())
    assert exported == {k: s for k, s in reference.items() if k not in tied}
