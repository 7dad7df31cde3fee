"""HF `Blip2ForImageTextRetrieval` keys -> jblip RetrievalModel params.

The text embeddings sit at the top level (`embeddings.*`), outside `qformer.`; the
LayerNorm HF applies to [queries; text] is `qformer.layernorm`, jblip's
`qformer/embeddings/layernorm`. `Blip2TextModelWithProjection` and
`Blip2VisionModelWithProjection` hold subsets of the same keys.

`TRAINING_RULES`: the two LAVIS stage-1 parts HF has no place for, the ITC temperature
(`temp`) and the Q-Former's BERT LM head (`cls.predictions.*`, its output matrix a tied
copy of the word embeddings). jblip reads them when a file has them and writes them only
when asked (`export_retrieval(..., training_heads=True)`).
"""
from jblip.convert.rules import LINEAR, Rule, leading_ones, prefixed
from jblip.convert.tables import qformer, vision

HEADS = [
    Rule(rf"{name}\.weight", f"{name}/kernel", LINEAR) for name in ("vision_projection", "text_projection", "itm_head")
] + [Rule(rf"{name}\.bias", f"{name}/bias") for name in ("vision_projection", "text_projection", "itm_head")]

RULES = [
    *prefixed("vision_model.", "vision/", vision.RULES),
    Rule(r"query_tokens", "qformer/query_tokens", leading_ones(1)),
    Rule(r"embeddings\.word_embeddings\.weight", "qformer/embeddings/word_embeddings/embedding"),
    Rule(r"embeddings\.position_embeddings\.weight", "qformer/embeddings/position_embeddings/embedding"),
    Rule(r"embeddings\.position_ids", None),  # non-persistent buffer
    Rule(r"qformer\.layernorm\.weight", "qformer/embeddings/layernorm/scale"),
    Rule(r"qformer\.layernorm\.bias", "qformer/embeddings/layernorm/bias"),
    Rule(r"qformer\.embeddings\.position_ids", None),
    *prefixed("qformer.", "qformer/", qformer._layer_rules(text_ffn=True)),
    *HEADS,
]

TRAINING_RULES = [
    Rule(r"temp", "temp"),
    Rule(r"cls\.predictions\.transform\.dense\.weight", "lm_head/transform/kernel", LINEAR),
    Rule(r"cls\.predictions\.transform\.dense\.bias", "lm_head/transform/bias"),
    Rule(r"cls\.predictions\.transform\.LayerNorm\.weight", "lm_head/norm/scale"),
    Rule(r"cls\.predictions\.transform\.LayerNorm\.bias", "lm_head/norm/bias"),
    Rule(r"cls\.predictions\.bias", "lm_head/bias"),
    Rule(r"cls\.predictions\.decoder\.bias", "lm_head/bias", alias=True),
    Rule(r"cls\.predictions\.decoder\.weight", None),  # tied to the word embeddings
]

TRAINING_PATHS = ("temp", "lm_head/transform/kernel", "lm_head/transform/bias", "lm_head/norm/scale",
                  "lm_head/norm/bias", "lm_head/bias")
