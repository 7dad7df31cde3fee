"""HF LlamaForCausalLM keys (relative to `language_model.`) -> jblip/llama.py params."""
from jblip.convert.rules import IDENTITY, LINEAR, LINEAR_HEADS_IN, Rule

L = r"model\.layers\.(\d+)\."
T = r"layers_\1/"

RULES = [
    Rule(r"model\.embed_tokens\.weight", "embed_tokens/embedding", IDENTITY),
    Rule(L + r"self_attn\.(q_proj|k_proj|v_proj)\.weight", T + r"self_attn/\2/kernel", LINEAR),
    Rule(L + r"self_attn\.o_proj\.weight", T + "self_attn/o_proj/kernel", LINEAR_HEADS_IN),
    Rule(L + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", T + r"mlp/\2/kernel", LINEAR),
    Rule(L + r"(input_layernorm|post_attention_layernorm)\.weight", T + r"\2/scale", IDENTITY),
    Rule(L + r"self_attn\.rotary_emb\.inv_freq", None),  # buffer in old checkpoints
    Rule(r"model\.norm\.weight", "norm/scale", IDENTITY),
    Rule(r"lm_head\.weight", "lm_head/kernel", LINEAR),
]
