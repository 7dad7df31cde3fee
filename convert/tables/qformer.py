"""HF `qformer.*` -> jblip QFormer params (keys relative to `qformer.`).

`query_tokens` is a top-level HF key (not under `qformer.`); the composite
model's table maps it to `qformer/query_tokens`.
"""
from jblip.convert.rules import FLAT, LINEAR, LINEAR_HEADS_IN, Rule

_LAYER = r"encoder\.layer\.(\d+)\."


def _layer_rules(text_ffn: bool) -> list[Rule]:
    rules = []
    # attention.* is self-attention, crossattention.* cross-attention (even layers only).
    for hf, ours in (("attention", "self_attn"), ("crossattention", "cross_attn")):
        rules += [
            Rule(_LAYER + hf + r"\.attention\.(query|key|value)\.weight", rf"layers_\1/{ours}/\2/kernel", LINEAR),
            Rule(_LAYER + hf + r"\.attention\.(query|key|value)\.bias", rf"layers_\1/{ours}/\2/bias", FLAT),
            Rule(_LAYER + hf + r"\.output\.dense\.weight", rf"layers_\1/{ours}/output/kernel", LINEAR_HEADS_IN),
            Rule(_LAYER + hf + r"\.output\.dense\.bias", rf"layers_\1/{ours}/output/bias"),
            Rule(_LAYER + hf + r"\.output\.LayerNorm\.weight", rf"layers_\1/{ours}_norm/scale"),
            Rule(_LAYER + hf + r"\.output\.LayerNorm\.bias", rf"layers_\1/{ours}_norm/bias"),
        ]
    # intermediate_query/output_query: FFN of query positions; intermediate/output: of text positions.
    ffns = [("_query", "query_ffn")] + ([("", "text_ffn")] if text_ffn else [])
    for suffix, ours in ffns:
        rules += [
            Rule(_LAYER + rf"intermediate{suffix}\.dense\.weight", rf"layers_\1/{ours}/intermediate/kernel", LINEAR),
            Rule(_LAYER + rf"intermediate{suffix}\.dense\.bias", rf"layers_\1/{ours}/intermediate/bias"),
            Rule(_LAYER + rf"output{suffix}\.dense\.weight", rf"layers_\1/{ours}/output/kernel", LINEAR),
            Rule(_LAYER + rf"output{suffix}\.dense\.bias", rf"layers_\1/{ours}/output/bias"),
            Rule(_LAYER + rf"output{suffix}\.LayerNorm\.weight", rf"layers_\1/{ours}_norm/scale"),
            Rule(_LAYER + rf"output{suffix}\.LayerNorm\.bias", rf"layers_\1/{ours}_norm/bias"),
        ]
    return rules


INSTRUCT_RULES = [
    Rule(r"embeddings\.word_embeddings\.weight", "embeddings/word_embeddings/embedding"),
    Rule(r"embeddings\.position_embeddings\.weight", "embeddings/position_embeddings/embedding"),
    Rule(r"embeddings\.layernorm\.weight", "embeddings/layernorm/scale"),
    Rule(r"embeddings\.layernorm\.bias", "embeddings/layernorm/bias"),
    Rule(r"embeddings\.position_ids", None),  # non-persistent buffer; dropped if a file carries it
    *_layer_rules(text_ffn=True),
]

BLIP2_RULES = [
    Rule(r"layernorm\.weight", "layernorm/scale"),
    Rule(r"layernorm\.bias", "layernorm/bias"),
    Rule(r"embeddings\.position_ids", None),
    *_layer_rules(text_ffn=False),
]
