"""Tiny random HF reference models, saved with `save_pretrained` for jblip to load."""
from __future__ import annotations

import numpy as np
import torch

TINY_VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                   patch_size=4, image_size=28, layer_norm_eps=1e-6, qkv_bias=True)
TINY_QFORMER = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                    encoder_hidden_size=48, vocab_size=99, max_position_embeddings=64, cross_attention_frequency=2)
TINY_LLAMA = dict(model_type="llama", vocab_size=131, hidden_size=56, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                  bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
NUM_QUERIES = 6
IMAGE_TOKEN = 130  # last row of the tiny vocab, like <image> in the updated hub files


def randomize(model: torch.nn.Module, seed: int, std: float = 0.15):
    """Random weights with enough spread that outputs are not flat (norm scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_scale else noise)
        for name, module in model.named_modules():  # the ViT key bias is zero by construction
            if name.endswith("self_attn.qkv") and module.bias is not None and module.bias.numel() % 3 == 0:
                d = module.bias.numel() // 3
                module.bias[d:2 * d] = 0
    return model


def tiny_instructblip(path, seed=0, text=None, vision=None, qformer=None, image_token=IMAGE_TOKEN, **kw):
    """An InstructBlipForConditionalGeneration with tiny towers, saved to `path`."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration
    torch.manual_seed(seed)
    config = InstructBlipConfig(vision_config={**TINY_VISION, **(vision or {})},
                                qformer_config={**TINY_QFORMER, **(qformer or {})},
                                text_config=dict(text or TINY_LLAMA), num_query_tokens=NUM_QUERIES,
                                image_token_index=image_token, **kw)
    model = randomize(InstructBlipForConditionalGeneration(config).eval(), seed)
    model.save_pretrained(path)
    return model


def left_padded_prompts(lengths, vocab, pad_id, bos_id, seed=0, image_token=None, num_queries=NUM_QUERIES):
    """[<image>*Q | pad... | bos | prompt] ids and masks for prompts of the given lengths."""
    rng = np.random.default_rng(seed)
    width = max(lengths) + 1
    prefix = [image_token] * num_queries if image_token is not None else []
    ids, mask = [], []
    for n in lengths:
        body = [bos_id] + rng.integers(3, vocab - 2, size=n).tolist()
        pad = width - len(body)
        ids.append(prefix + [pad_id] * pad + body)
        mask.append([1] * len(prefix) + [0] * pad + [1] * len(body))
    return np.array(ids), np.array(mask)


def right_padded_text(lengths, vocab, seed=0, cls_id=1, sep_id=2, pad_id=0):
    """Q-Former style [CLS] text [SEP] [PAD]... ids and masks."""
    rng = np.random.default_rng(seed + 100)
    width = max(lengths) + 2
    ids, mask = [], []
    for n in lengths:
        body = [cls_id] + rng.integers(3, vocab, size=n).tolist() + [sep_id]
        ids.append(body + [pad_id] * (width - len(body)))
        mask.append([1] * len(body) + [0] * (width - len(body)))
    return np.array(ids), np.array(mask)


def positions_from_mask(mask):
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def max_diff(a, b, where=None):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[where].max() if where is not None else d.max())


TINY_OPT = dict(model_type="opt", vocab_size=131, hidden_size=40, ffn_dim=72, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=100, word_embed_proj_dim=40,
                do_layer_norm_before=True, bos_token_id=2, pad_token_id=1, eos_token_id=50, tie_word_embeddings=True)
TINY_T5 = dict(model_type="t5", vocab_size=131, d_model=40, d_kv=12, d_ff=72, num_layers=2, num_decoder_layers=2,
               num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               dense_act_fn="gelu", feed_forward_proj="gated-gelu", is_gated_act=True, tie_word_embeddings=False,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def tiny_blip2(path, seed=0, text=None, vision=None, qformer=None, image_token=IMAGE_TOKEN, **kw):
    """A Blip2ForConditionalGeneration (OPT or T5 text config) with tiny towers, saved to `path`."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    torch.manual_seed(seed)
    q = {k: v for k, v in {**TINY_QFORMER, **(qformer or {})}.items()}
    config = Blip2Config(vision_config={**TINY_VISION, **(vision or {})}, qformer_config=q,
                         text_config=dict(text or TINY_OPT), num_query_tokens=NUM_QUERIES,
                         image_token_index=image_token, **kw)
    model = randomize(Blip2ForConditionalGeneration(config).eval(), seed)
    model.save_pretrained(path)
    return model


def tiny_instructblip_t5(path, seed=0, **kw):
    return tiny_instructblip(path, seed=seed, text=TINY_T5, **kw)
