"""HF T5ForConditionalGeneration keys (relative to `language_model.`) -> jblip/t5.py params.

`RULES` is for Flan-T5 (untied `lm_head`); `rules_for(config)` also covers
original T5, whose head is the shared embedding (no `lm_head` param).
"""
from jblip.convert.rules import IDENTITY, LINEAR, LINEAR_HEADS_IN, Rule

ENC = r"encoder\.block\.(\d+)\.layer\."
DEC = r"decoder\.block\.(\d+)\.layer\."
E = r"encoder/layers_\1/"
D = r"decoder/layers_\1/"

LM_HEAD = Rule(r"lm_head\.weight", "lm_head/kernel", LINEAR)

RULES = [
    Rule(r"shared\.weight", "shared/embedding", IDENTITY),
    # tied copies of `shared`, often absent from saved files
    Rule(r"(encoder|decoder)\.embed_tokens\.weight", "shared/embedding", IDENTITY, alias=True),
    # encoder block: layer.0 self-attention, layer.1 FFN
    Rule(ENC + r"0\.SelfAttention\.(q|k|v)\.weight", E + r"self_attn/\2/kernel", LINEAR),
    Rule(ENC + r"0\.SelfAttention\.o\.weight", E + "self_attn/o/kernel", LINEAR_HEADS_IN),
    Rule(r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
         "encoder/relative_attention_bias/embedding", IDENTITY),
    Rule(ENC + r"0\.layer_norm\.weight", E + "self_attn_norm/scale", IDENTITY),
    Rule(ENC + r"1\.DenseReluDense\.(wi_0|wi_1|wi|wo)\.weight", E + r"mlp/\2/kernel", LINEAR),
    Rule(ENC + r"1\.layer_norm\.weight", E + "mlp_norm/scale", IDENTITY),
    Rule(r"encoder\.final_layer_norm\.weight", "encoder/final_norm/scale", IDENTITY),
    # decoder block: layer.0 causal self-attention, layer.1 cross-attention, layer.2 FFN
    Rule(DEC + r"0\.SelfAttention\.(q|k|v)\.weight", D + r"self_attn/\2/kernel", LINEAR),
    Rule(DEC + r"0\.SelfAttention\.o\.weight", D + "self_attn/o/kernel", LINEAR_HEADS_IN),
    Rule(r"decoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
         "decoder/relative_attention_bias/embedding", IDENTITY),
    Rule(DEC + r"0\.layer_norm\.weight", D + "self_attn_norm/scale", IDENTITY),
    Rule(DEC + r"1\.EncDecAttention\.(q|k|v)\.weight", D + r"cross_attn/\2/kernel", LINEAR),
    Rule(DEC + r"1\.EncDecAttention\.o\.weight", D + "cross_attn/o/kernel", LINEAR_HEADS_IN),
    # cross-attention has no position bias; HF ignores this table if a checkpoint carries it
    Rule(r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight", None),
    Rule(DEC + r"1\.layer_norm\.weight", D + "cross_attn_norm/scale", IDENTITY),
    Rule(DEC + r"2\.DenseReluDense\.(wi_0|wi_1|wi|wo)\.weight", D + r"mlp/\2/kernel", LINEAR),
    Rule(DEC + r"2\.layer_norm\.weight", D + "mlp_norm/scale", IDENTITY),
    Rule(r"decoder\.final_layer_norm\.weight", "decoder/final_norm/scale", IDENTITY),
    LM_HEAD,
]

# original T5: the head is `shared`; a saved `lm_head.weight` is only its tied copy
TIED_RULES = [r for r in RULES if r is not LM_HEAD] + [Rule(r"lm_head\.weight", None)]


def rules_for(config) -> list[Rule]:
    return TIED_RULES if config.tie_word_embeddings else RULES
