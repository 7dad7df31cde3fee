"""from_hf_config reads both hub revisions of every family; presets cover all released checkpoints."""
import pytest

from jblip.config import ConfigError, PRESETS, from_hf_config

VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
              patch_size=14, image_size=224, layer_norm_eps=1e-6)


def test_old_vicuna_revision_without_image_token_is_legacy_layout():
    cfg = from_hf_config(dict(
        model_type="instructblip", num_query_tokens=32, vision_config=VISION, qformer_config={},
        text_config=dict(architectures=["LLaMAForCausalLM"], model_type="llama", vocab_size=32001,
                         hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=-1)))
    assert cfg.image_token_index is None and cfg.family == "llama" and cfg.model_type == "instructblip"
    assert cfg.text.vocab_size == 32001 and cfg.text.num_kv_heads == 32
    assert (cfg.text.bos_token_id, cfg.text.eos_token_id, cfg.text.pad_token_id) == (2, 2, 0)  # LAVIS ids


def test_new_hub_revisions_opt_and_t5():
    opt = from_hf_config(dict(model_type="blip-2", image_token_index=50265, vision_config=VISION,
                              text_config=dict(model_type="opt", vocab_size=50304, hidden_size=2560,
                                               ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                                               word_embed_proj_dim=2560, eos_token_id=50118)))
    assert opt.model_type == "blip2" and not opt.qformer.use_text_input
    assert (opt.image_token_index, opt.text.vocab_size, opt.text.eos_token_id) == (50265, 50304, 50118)
    assert opt.text == PRESETS["blip2-opt-2.7b-hub"].text
    t5 = from_hf_config(dict(model_type="blip-2", image_token_index=32100, vision_config=VISION,
                             text_config=dict(model_type="t5", d_model=2048, d_ff=5120, num_heads=32, d_kv=64,
                                              num_layers=24, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                                              tie_word_embeddings=False)))
    assert t5.text.dense_act_fn == "gelu" and t5.text.is_gated_act and not t5.text.tie_word_embeddings
    assert t5.image_token_index == 32100


def test_t5_gated_gelu_alone_means_tanh_gelu():
    t5 = from_hf_config(dict(model_type="instructblip", vision_config=VISION,
                             text_config=dict(model_type="t5", feed_forward_proj="gated-gelu")))
    assert t5.text.dense_act_fn == "gelu_new"


def test_coco_presets_are_364_px_and_all_checkpoints_have_presets():
    names = ["instructblip-vicuna-7b", "instructblip-vicuna-13b", "instructblip-flan-t5-xl", "instructblip-flan-t5-xxl",
             "blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-opt-2.7b-coco", "blip2-opt-6.7b-coco", "blip2-flan-t5-xl",
             "blip2-flan-t5-xl-coco", "blip2-flan-t5-xxl"]
    for name in names:
        assert name in PRESETS and name + "-hub" in PRESETS
        assert PRESETS[name].vision.image_size == (364 if "coco" in name else 224)


def test_unknown_text_family_is_refused():
    with pytest.raises(ConfigError, match="unknown language-model family"):
        from_hf_config(dict(model_type="blip-2", text_config=dict(model_type="gpt2")))


def test_blip2_opt_with_narrow_token_embeddings_is_refused_naming_both_widths():
    """OPT-350m's layout (word_embed_proj_dim 512 < hidden_size 1024) cannot take BLIP-2's projected
    queries: refused when the config is read, not deep inside the first trace."""
    with pytest.raises(ConfigError, match=r"512 wide \(word_embed_proj_dim\) but its hidden size is 1024"):
        from_hf_config(dict(model_type="blip-2", vision_config=VISION,
                            text_config=dict(model_type="opt", vocab_size=50272, hidden_size=1024, ffn_dim=4096,
                                             num_hidden_layers=24, num_attention_heads=16, word_embed_proj_dim=512)))
