"""HF OPTForCausalLM keys (relative to `language_model.`) -> jblip/opt.py params."""
from jblip.convert.rules import FLAT, IDENTITY, LINEAR, LINEAR_HEADS_IN, Rule

L = r"model\.decoder\.layers\.(\d+)\."
T = r"layers_\1/"

RULES = [
    Rule(r"model\.decoder\.embed_tokens\.weight", "embed_tokens/embedding", IDENTITY),
    Rule(r"model\.decoder\.embed_positions\.weight", "embed_positions/embedding", IDENTITY),  # 2 + max positions rows
    Rule(r"model\.decoder\.(project_in|project_out)\.weight", r"\1/kernel", LINEAR),  # only when word_embed_proj_dim != hidden
    Rule(L + r"self_attn\.(q_proj|k_proj|v_proj)\.weight", T + r"self_attn/\2/kernel", LINEAR),  # (D, N, H)
    Rule(L + r"self_attn\.(q_proj|k_proj|v_proj)\.bias", T + r"self_attn/\2/bias", FLAT),  # (N, H)
    Rule(L + r"self_attn\.out_proj\.weight", T + "self_attn/out_proj/kernel", LINEAR_HEADS_IN),  # (N, H, D)
    Rule(L + r"self_attn\.out_proj\.bias", T + "self_attn/out_proj/bias", IDENTITY),
    Rule(L + r"(fc1|fc2)\.weight", T + r"mlp/\2/kernel", LINEAR),
    Rule(L + r"(fc1|fc2)\.bias", T + r"mlp/\2/bias", IDENTITY),
    Rule(L + r"(self_attn_layer_norm|final_layer_norm)\.weight", T + r"\2/scale", IDENTITY),
    Rule(L + r"(self_attn_layer_norm|final_layer_norm)\.bias", T + r"\2/bias", IDENTITY),
    Rule(r"model\.decoder\.final_layer_norm\.weight", "final_layer_norm/scale", IDENTITY),  # pre-LN models only
    Rule(r"model\.decoder\.final_layer_norm\.bias", "final_layer_norm/bias", IDENTITY),
    # Tied to embed_tokens: a second copy (state dicts keep it, safetensors files may not).
    Rule(r"lm_head\.weight", "embed_tokens/embedding", IDENTITY, alias=True),
]
