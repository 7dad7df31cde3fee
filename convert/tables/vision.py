"""HF `vision_model.*` -> jblip VisionTransformer params (keys relative to `vision_model.`).

Checkpoints with separate `self_attn.q_bias` / `self_attn.v_bias` (early HF
files, LAVIS) are read through `convert.fuse.FuseQVBias`, which presents them
as the fused `self_attn.qkv.bias` this table expects.
"""
from jblip.convert.rules import CONV, FLAT, LINEAR, LINEAR_HEADS_IN, Rule, leading_ones

_LAYER = r"encoder\.layers\.(\d+)\."

RULES = [
    Rule(r"embeddings\.class_embedding", "class_embedding", leading_ones(2)),  # (1, 1, D) -> (D,)
    Rule(r"embeddings\.position_embedding", "position_embedding", leading_ones(1)),  # (1, P+1, D) -> (P+1, D)
    Rule(r"embeddings\.patch_embedding\.weight", "patch_embedding/kernel", CONV),
    Rule(r"embeddings\.patch_embedding\.bias", "patch_embedding/bias"),
    Rule(_LAYER + r"layer_norm([12])\.weight", r"layers_\1/layer_norm\2/scale"),
    Rule(_LAYER + r"layer_norm([12])\.bias", r"layers_\1/layer_norm\2/bias"),
    Rule(_LAYER + r"self_attn\.qkv\.weight", r"layers_\1/self_attn/qkv/kernel", LINEAR),  # -> (D, 3, N, H)
    Rule(_LAYER + r"self_attn\.qkv\.bias", r"layers_\1/self_attn/qkv/bias", FLAT),  # -> (3, N, H)
    Rule(_LAYER + r"self_attn\.projection\.weight", r"layers_\1/self_attn/projection/kernel", LINEAR_HEADS_IN),
    Rule(_LAYER + r"self_attn\.projection\.bias", r"layers_\1/self_attn/projection/bias"),
    Rule(_LAYER + r"mlp\.(fc[12])\.weight", r"layers_\1/mlp/\2/kernel", LINEAR),
    Rule(_LAYER + r"mlp\.(fc[12])\.bias", r"layers_\1/mlp/\2/bias"),
    Rule(r"post_layernorm\.weight", "post_layernorm/scale"),
    Rule(r"post_layernorm\.bias", "post_layernorm/bias"),
]
