"""jblip ModelConfig -> a HF InstructBlipConfig / Blip2Config `config.json` dict (inverse of `from_hf_config`).

The dict is what transformers' `from_pretrained` reads for
InstructBlipForConditionalGeneration / Blip2ForConditionalGeneration, and
`jblip.config.from_hf_config` reads it back to the same ModelConfig (up to the
name and precision, which are not part of a checkpoint's config).
"""
from __future__ import annotations

from jblip import families
from jblip.config import LlamaConfig, ModelConfig, OPTConfig, T5Config


def _vision(c) -> dict:
    out = dict(model_type="instructblip_vision_model", hidden_size=c.hidden_size,
               intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
               num_attention_heads=c.num_heads, patch_size=c.patch_size, image_size=c.image_size,
               num_channels=c.num_channels, layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act,
               qkv_bias=True)
    if c.post_layernorm_eps != c.layer_norm_eps:
        # LAVIS' ln_vision eps; HF has one eps for both, jblip reads this extra field back
        out["post_layernorm_eps"] = c.post_layernorm_eps
    return out


def _qformer(c) -> dict:
    return dict(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                intermediate_size=c.intermediate_size, cross_attention_frequency=c.cross_attention_frequency,
                encoder_hidden_size=c.encoder_hidden_size, vocab_size=c.vocab_size,
                max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
                hidden_act=c.hidden_act, pad_token_id=c.pad_token_id, use_qformer_text_input=c.use_text_input)


def _llama(c: LlamaConfig) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=c.vocab_size,
                hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps,
                rope_theta=c.rope_theta, rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta),
                max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
                tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
                eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)


def _t5(c: T5Config) -> dict:
    gated = "gated-" if c.is_gated_act else ""
    return dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=c.vocab_size,
                d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
                num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
                relative_attention_num_buckets=c.relative_attention_num_buckets,
                relative_attention_max_distance=c.relative_attention_max_distance,
                layer_norm_epsilon=c.layer_norm_epsilon,
                # an explicit dense_act_fn wins over the one feed_forward_proj implies (the Salesforce checkpoints use exact GELU)
                feed_forward_proj=gated + ("gelu" if c.dense_act_fn.startswith("gelu") else c.dense_act_fn),
                dense_act_fn=c.dense_act_fn, is_gated_act=c.is_gated_act,
                tie_word_embeddings=c.tie_word_embeddings, scale_decoder_outputs=c.rescales_output,
                pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
                decoder_start_token_id=c.decoder_start_token_id)


def _opt(c: OPTConfig) -> dict:
    return dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=c.vocab_size,
                hidden_size=c.hidden_size, ffn_dim=c.ffn_dim, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, max_position_embeddings=c.max_position_embeddings,
                word_embed_proj_dim=c.word_embed_proj_dim, do_layer_norm_before=c.do_layer_norm_before,
                activation_function=c.activation_function, enable_bias=c.enable_bias,
                tie_word_embeddings=True, bos_token_id=c.bos_token_id, pad_token_id=c.pad_token_id,
                eos_token_id=c.eos_token_id)


_TEXT = {"llama": _llama, "t5": _t5, "opt": _opt}


def hf_config_dict(config: ModelConfig, dtype: str | None = None) -> dict:
    """The config.json contents for `config`; `dtype` (e.g. "bfloat16") is recorded as the weights' dtype."""
    instruct = config.model_type == "instructblip"
    vision = _vision(config.vision)
    qformer = _qformer(config.qformer)
    if instruct:
        qformer["model_type"] = "instructblip_qformer"
        del qformer["use_qformer_text_input"]
    else:
        vision["model_type"] = "blip_2_vision_model"
        qformer["model_type"] = "blip_2_qformer"
    out = dict(
        architectures=["InstructBlipForConditionalGeneration" if instruct else "Blip2ForConditionalGeneration"],
        model_type="instructblip" if instruct else "blip-2",
        num_query_tokens=config.num_query_tokens,
        vision_config=vision, qformer_config=qformer, text_config=_TEXT[config.family](config.text),
        use_decoder_only_language_model=not families.family(config).encoder_decoder,
    )
    if config.video:  # InstructBLIP-Video: same towers and keys, its own names and `<video>` placeholder
        out.update(architectures=["InstructBlipVideoForConditionalGeneration"], model_type="instructblipvideo")
        vision["model_type"], qformer["model_type"] = "instructblipvideo_vision_model", "instructblipvideo_qformer"
    if config.image_token_index is not None:
        out["video_token_index" if config.video else "image_token_index"] = config.image_token_index
    if dtype is not None:
        out["dtype"] = out["torch_dtype"] = dtype  # transformers 5 / 4.x spelling
    return out
