"""InstructBLIP-Vicuna: tiny random HF models loaded by jblip match torch in float32."""
import numpy as np
import pytest
import torch

import jblip
from jblip.model import BlipModel
from tests.hf_models import (IMAGE_TOKEN, NUM_QUERIES, TINY_LLAMA, left_padded_prompts, max_diff,
                             positions_from_mask, right_padded_text, tiny_instructblip)

TOL = 1e-4

CASES = {
    # seed, text overrides, vision overrides, run image size
    "base": (0, {}, {}, 28),
    "odd_widths": (1, dict(hidden_size=60, intermediate_size=84, num_attention_heads=5, num_key_value_heads=5), dict(hidden_size=36, num_attention_heads=3, intermediate_size=52), 28),
    "other_image_size": (2, {}, dict(image_size=20), 20),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    seed, text, vision, size = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    qformer = dict(encoder_hidden_size=vision.get("hidden_size", 48))
    hf = tiny_instructblip(path, seed=seed, text={**TINY_LLAMA, **text}, vision=vision, qformer=qformer)
    return hf, jblip.load_pretrained(str(path)), size, seed


def inputs(size, seed, batch=3):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    q_ids, q_mask = right_padded_text([3, 7, 1][:batch], 99, seed)
    ids, mask = left_padded_prompts([4, 1, 6][:batch], 128, pad_id=0, bos_id=2, seed=seed, image_token=IMAGE_TOKEN)
    return pixels, q_ids, q_mask, ids, mask


def test_towers_and_logits_match_torch(pair):
    hf, model, size, seed = pair
    pixels, q_ids, q_mask, ids, mask = inputs(size, seed)
    t = lambda x: torch.tensor(x)
    with torch.no_grad():
        feats = hf.get_image_features(t(pixels), t(q_ids), t(q_mask), return_dict=True)
        ref = hf(pixel_values=t(pixels), qformer_input_ids=t(q_ids), qformer_attention_mask=t(q_mask),
                 input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions_from_mask(mask))).logits.numpy()
    nhwc = pixels.transpose(0, 2, 3, 1)
    apply = lambda method, *a: model.module.apply({"params": model.params}, *a, method=method)
    vision = apply(BlipModel.image_features, nhwc)
    projected = model.encode_image(nhwc, q_ids, q_mask)
    logits = model.forward(nhwc, ids, mask, q_ids, q_mask)
    valid = mask.astype(bool)
    diffs = dict(
        vision=max_diff(vision, feats.last_hidden_state.numpy()),
        qformer_queries=max_diff(
            model.module.apply({"params": model.params}, vision, q_ids, q_mask,
                               method=lambda m, v, i, k: m.qformer(v, i, k))[:, :NUM_QUERIES],
            feats.qformer_outputs.last_hidden_state[:, :NUM_QUERIES].numpy()),
        projection=max_diff(projected, feats.pooler_output.numpy()),
        logits=max_diff(logits, ref, where=valid),
    )
    print("max |delta|:", diffs)
    assert all(v <= TOL for v in diffs.values()), diffs


def test_legacy_prepended_layout_equals_placeholder_layout(pair):
    hf, model, size, seed = pair
    pixels, q_ids, q_mask, ids, mask = inputs(size, seed)
    with_placeholders = model.forward(pixels, ids, mask, q_ids, q_mask)  # NCHW accepted too
    legacy = model.forward(pixels, ids[:, NUM_QUERIES:], mask[:, NUM_QUERIES:], q_ids, q_mask)
    assert legacy.shape == with_placeholders.shape
    assert max_diff(legacy, with_placeholders, where=mask.astype(bool)) <= 1e-5


def test_wrong_placeholder_count_is_refused(pair):
    hf, model, size, seed = pair
    pixels, q_ids, q_mask, ids, mask = inputs(size, seed)
    ids = ids.copy()
    ids[0, 0] = 5
    with pytest.raises(ValueError, match="exactly 6 image placeholder"):
        model.forward(pixels, ids, mask, q_ids, q_mask)
