"""BLIP-2 as an embedding and retrieval engine (the stage-1 Q-Former with its ITC/ITM/ITG heads).

`config` (RetrievalConfig, presets, `from_hf_config`), `model` (the Linen module),
`engine` (the model object with jitted `image_embeddings` / `text_embeddings` /
`itc_scores` / `itm_scores`), `metrics` (recall@K as LAVIS reports it), `index_store` (the
on-disk image index of `jblip index`).
"""
