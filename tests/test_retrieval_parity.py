"""BLIP-2 retrieval vs HF at fp32: `Blip2ForImageTextRetrieval` (ITC scores, ITM logits) and its
halves `Blip2VisionModelWithProjection` / `Blip2TextModelWithProjection` (embeddings), tiny random
models saved with `save_pretrained`, texts of different lengths; export back; full-size key lists; the engine; LAVIS files."""
import jax
import numpy as np
import pytest
import torch
import transformers

from hf_models import TINY_QFORMER, TINY_VISION, max_diff, randomize, right_padded_text
from jblip.convert import stacking
from jblip.convert.retrieval import export_retrieval, hf_config_dict, load_retrieval_params, retrieval_rules
from jblip.convert.rules import flatten, plan
from jblip.convert.tables.retrieval import TRAINING_PATHS
from jblip.model import count_params
from jblip.retrieval.config import from_hf_config, retrieval_preset
from jblip.retrieval.model import RetrievalModel, abstract_params, itc_similarity

NUM_QUERIES, EMBED = 6, 24
TOL = 1e-4


def hf_config():
    return transformers.Blip2Config(vision_config=TINY_VISION,
                                    qformer_config={**TINY_QFORMER, "use_qformer_text_input": True},
                                    num_query_tokens=NUM_QUERIES, image_text_hidden_size=EMBED)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("itm")
    hf = randomize(transformers.Blip2ForImageTextRetrieval(hf_config()).eval(), seed=3)
    hf.save_pretrained(path)
    config, params = load_retrieval_params(str(path))
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 28, 28, 3)).astype(np.float32)
    ids, mask = right_padded_text([2, 14, 5], vocab=99)  # 16 wide: the engine's bucket for the texts below
    # every head in one compiled call: image / text embeddings, ITM and ITG logits, temperature
    image, text, itm, itg, _ = jax.jit(RetrievalModel(config).apply)({"params": params}, pixels, ids, mask)
    got = dict(image=np.asarray(image), text=np.asarray(text), itm=np.asarray(itm), itg=np.asarray(itg))
    return dict(hf=hf, path=path, config=config, params=params, pixels=pixels, ids=ids, mask=mask, got=got)


def torch_pixels(pixels):
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def test_config_reads_back():
    config = from_hf_config(hf_config().to_dict())
    assert (config.num_query_tokens, config.embed_dim, config.qformer.use_text_input) == (NUM_QUERIES, EMBED, True)
    assert from_hf_config(hf_config_dict(config)) == config


def test_image_embeddings_match_vision_with_projection(pair):
    hf = transformers.Blip2VisionModelWithProjection(hf_config()).eval()
    missing, _ = hf.load_state_dict(pair["hf"].state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        want = hf(pixel_values=torch_pixels(pair["pixels"])).image_embeds.numpy()
    got = pair["got"]["image"]
    assert got.shape == (3, NUM_QUERIES, EMBED)
    print(f"image embeddings max |d| {max_diff(got, want):.2e}")
    assert max_diff(got, want) <= TOL


def test_text_embeddings_match_text_with_projection(pair):
    hf = transformers.Blip2TextModelWithProjection(hf_config()).eval()
    missing, _ = hf.load_state_dict(pair["hf"].state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(pair["ids"]), attention_mask=torch.from_numpy(pair["mask"]))
    got = pair["got"]["text"]
    assert got.shape == (3, EMBED)
    print(f"text embeddings max |d| {max_diff(got, out.text_embeds[:, 0].numpy()):.2e}")
    assert max_diff(got, out.text_embeds[:, 0].numpy()) <= TOL


def test_itc_scores_and_itm_logits_match_retrieval_model(pair):
    args = dict(pixel_values=torch_pixels(pair["pixels"]), input_ids=torch.from_numpy(pair["ids"]),
                attention_mask=torch.from_numpy(pair["mask"]))
    with torch.no_grad():
        itc = pair["hf"](**args, use_image_text_matching_head=False).logits_per_image.numpy()
        itm = pair["hf"](**args, use_image_text_matching_head=True).logits_per_image.numpy()
    got_itc = np.asarray(itc_similarity(pair["got"]["image"], pair["got"]["text"]))
    got_itm = pair["got"]["itm"]
    assert got_itc.shape == (3, 3) and got_itm.shape == (3, 2)
    d_itc, d_itm = max_diff(got_itc, itc), max_diff(got_itm, itm)
    print(f"ITC max |d| {d_itc:.2e}, ITM max |d| {d_itm:.2e}")
    assert d_itc <= TOL and d_itm <= TOL
    assert np.std(itm) > 1e-2  # the comparison is not between flat outputs


def test_export_loads_in_transformers(pair, tmp_path):
    keys = export_retrieval(pair["config"], pair["params"], str(tmp_path))
    assert set(keys) == set(pair["hf"].state_dict()) - {"embeddings.position_ids"}
    back = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    for name, tensor in pair["hf"].state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_training_heads_round_trip(pair, tmp_path):
    params = dict(pair["params"], temp=np.float32(0.05))
    keys = export_retrieval(pair["config"], params, str(tmp_path), training_heads=True)
    assert {"temp", "cls.predictions.bias", "cls.predictions.transform.dense.weight"} <= set(keys)
    _, back = load_retrieval_params(str(tmp_path))
    assert float(back["temp"]) == pytest.approx(0.05)
    for path in TRAINING_PATHS:
        np.testing.assert_array_equal(flatten(back)[path], flatten(params)[path])


@pytest.mark.parametrize("name, total", [("blip2-itm-vit-g", 1_172_032_258), ("blip2-itm-vit-g-coco", 1_172_623_618)])
def test_full_size_key_list_and_total(name, total):
    config = retrieval_preset(name)
    hf_cfg = transformers.Blip2Config.from_dict(hf_config_dict(config))
    with torch.device("meta"):
        model = transformers.Blip2ForImageTextRetrieval(hf_cfg)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    targets = flatten(abstract_params(config))
    assignment = plan(shapes, retrieval_rules(), targets, optional=TRAINING_PATHS)
    assert set(assignment) | set(TRAINING_PATHS) == set(stacking.per_layer_specs(targets))
    hf_total = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith("position_ids"))
    heads = sum(int(np.prod(flatten(targets)[p].shape)) for p in TRAINING_PATHS)
    assert hf_total == count_params(targets) - heads == total


# ---------------------------------------------------------------------- the engine (model-object API)

@pytest.fixture(scope="module")
def engine(pair):
    import os

    import jblip
    from jblip.retrieval.engine import RetrievalEngine
    from jblip.text_processing import TextTokenizer
    demo_tok = os.path.join(os.path.dirname(jblip.__file__), "assets", "demo", "qformer_tokenizer")
    return RetrievalEngine(pair["config"], pair["params"], TextTokenizer.from_dir(demo_tok), batch_size=4)


def test_engine_matches_the_module_and_hf(pair, engine):
    np.testing.assert_allclose(engine.image_embeddings(pair["pixels"]), pair["got"]["image"], atol=1e-5)
    text = engine.text_embeddings_ids(pair["ids"], pair["mask"])
    np.testing.assert_allclose(text, pair["got"]["text"], atol=1e-5)
    texts = ["the red circle", "a blue square on the left in the grey background", "green"]
    ids, mask = engine.tokenize(texts)
    assert ids.shape == (3, 16) and mask.sum(1).tolist() == [5, 12, 3]  # [CLS] words [SEP]; "a" is <unk>
    args = dict(pixel_values=torch_pixels(pair["pixels"]), input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long())
    with torch.no_grad():
        itc = pair["hf"](**args).logits_per_image.numpy()
        itm = torch.softmax(pair["hf"](**args, use_image_text_matching_head=True).logits_per_image, -1)[:, 1].numpy()
    np.testing.assert_allclose(engine.itc_scores(pair["pixels"], texts), itc, atol=1e-4)
    scores = engine.itm_scores(pair["pixels"], texts)
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(np.diag(scores), itm, atol=1e-4)  # HF pairs row i with row i


def test_engine_on_an_8_device_mesh_matches_one_device(pair, engine):
    from jblip.retrieval.engine import RetrievalEngine
    from jblip.sharding import make_mesh
    sharded = RetrievalEngine(pair["config"], pair["params"], engine.tokenizer, mesh=make_mesh("data=2,fsdp=4"),
                              batch_size=4)
    assert len(sharded.params["qformer"]["query_tokens"].sharding.device_set) == 8
    np.testing.assert_allclose(sharded.text_embeddings_ids(pair["ids"], pair["mask"]), pair["got"]["text"], atol=1e-5)


def test_recall_as_lavis_reports_it():
    from jblip.retrieval.metrics import retrieval_metrics
    # 3 images, 4 texts (image 0 has captions 0 and 1)
    i2t = np.array([[0.1, 0.9, 0.0, 0.2], [0.8, 0.1, 0.3, 0.2], [0.0, 0.1, 0.2, 0.9]])
    t2i = i2t.T.copy()
    m = retrieval_metrics(i2t, t2i, txt2img=[0, 0, 1, 2], img2txt=[[0, 1], [2], [3]])
    # i2t ranks: image 0 -> caption 1 first (0); image 1 -> caption 2 at rank 1; image 2 -> 0
    assert m["txt_r1"] == pytest.approx(200 / 3) and m["txt_r5"] == 100
    # t2i ranks: t0 -> [1,0,2] rank 1; t1 -> rank 0; t2 -> [1,...] rank 0; t3 -> rank 0
    assert m["img_r1"] == 75 and m["img_r10"] == 100
    assert m["r_mean"] == pytest.approx(((200 / 3 + 200) / 3 + (75 + 200) / 3) / 2)


# ---------------------------------------------------------------------- LAVIS stage-1 files

def lavis_names(hf_state: dict) -> dict:
    """The HF retrieval state dict under LAVIS' names (what blip2_feature_extractor saves)."""
    import re
    out = {}
    for key, t in hf_state.items():
        if key.endswith("position_ids"):
            continue
        for pattern, repl in [
            (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
            (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
            (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
            (r"^vision_model\.post_layernorm\.", "ln_vision."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.", r"visual_encoder.blocks.\1.norm\2."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.", r"visual_encoder.blocks.\1.attn."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
            (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
            (r"^embeddings\.", "Qformer.bert.embeddings."),
            (r"attention\.attention\.", "attention.self."),
            (r"^qformer\.", "Qformer.bert."),
            (r"^vision_projection\.", "vision_proj."),
            (r"^text_projection\.", "text_proj."),
        ]:
            key = re.sub(pattern, repl, key)
        if key.endswith("attn.qkv.bias"):  # EVA keeps q and v biases apart (k has none)
            q, _, v = t.chunk(3)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q.clone(), v.clone()
        else:
            out[key] = t.clone()
    return out


def test_lavis_stage1_checkpoint_loads_like_hf(pair, tmp_path):
    from jblip.convert.retrieval_lavis import load_lavis_retrieval
    state = lavis_names(pair["hf"].state_dict())
    vit = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    vit["blocks.2.norm1.weight"] = torch.ones(48)  # EVA's 40th block, which LAVIS does not build
    model = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    head = {"Qformer.cls.predictions.transform.dense.weight": torch.randn(40, 40),
            "Qformer.cls.predictions.transform.dense.bias": torch.randn(40),
            "Qformer.cls.predictions.transform.LayerNorm.weight": torch.randn(40),
            "Qformer.cls.predictions.transform.LayerNorm.bias": torch.randn(40),
            "Qformer.cls.predictions.bias": torch.randn(99), "Qformer.cls.predictions.decoder.bias": torch.randn(99),
            "Qformer.cls.predictions.decoder.weight": model["Qformer.bert.embeddings.word_embeddings.weight"]}
    model.update(head, temp=torch.tensor(0.06))
    torch.save({"model": model}, tmp_path / "blip2_pretrained.pth")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    config, params = load_lavis_retrieval(tmp_path / "blip2_pretrained.pth", tmp_path / "eva_vit_g.pth",
                                          pair["config"])
    assert config.vision.post_layernorm_eps == 1e-5  # LAVIS' ln_vision
    got, want = flatten(params), flatten(pair["params"])
    for path in want:
        if path not in TRAINING_PATHS:
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
    assert float(got["temp"]) == pytest.approx(0.06)
    np.testing.assert_array_equal(got["lm_head/bias"], head["Qformer.cls.predictions.bias"].numpy())
    np.testing.assert_array_equal(got["lm_head/transform/kernel"],
                                  head["Qformer.cls.predictions.transform.dense.weight"].numpy().T)
