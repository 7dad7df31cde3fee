"""Flan-T5 and OPT families (InstructBLIP-T5, BLIP-2 OPT, BLIP-2 T5): jblip matches torch in float32."""
import numpy as np
import pytest
import torch

import jblip
from tests.hf_models import (IMAGE_TOKEN, NUM_QUERIES, TINY_T5, left_padded_prompts, max_diff,
                             positions_from_mask, right_padded_text, tiny_blip2, tiny_instructblip)

TOL = 1e-4
BUILDERS = {
    "instructblip-t5": lambda p: tiny_instructblip(p, seed=3, text=TINY_T5),
    "blip2-opt": lambda p: tiny_blip2(p, seed=4),
    "blip2-t5": lambda p: tiny_blip2(p, seed=5, text=TINY_T5),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = BUILDERS[request.param](path)
    return request.param, hf, jblip.load_pretrained(str(path))


def right_padded_prompts(lengths, vocab, eos_id=1, seed=0):
    """T5 encoder inputs: [<image>*Q | prompt | </s> | pad...]."""
    rng = np.random.default_rng(seed)
    width = max(lengths) + 1
    ids, mask = [], []
    for n in lengths:
        body = [IMAGE_TOKEN] * NUM_QUERIES + rng.integers(3, vocab - 2, size=n).tolist() + [eos_id]
        pad = NUM_QUERIES + width - len(body)
        ids.append(body + [0] * pad)
        mask.append([1] * len(body) + [0] * pad)
    return np.array(ids), np.array(mask)


def test_logits_match_torch(pair):
    name, hf, model = pair
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
    t = torch.tensor
    kwargs, ours = {}, {}
    if model.config.qformer.use_text_input:
        q_ids, q_mask = right_padded_text([2, 6, 4], 99, 1)
        kwargs = dict(qformer_input_ids=t(q_ids), qformer_attention_mask=t(q_mask))
        ours = dict(qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
    if model.config.family == "t5":
        ids, mask = right_padded_prompts([5, 2, 8], 128)
        dec = np.array([[0, 5, 9, 11], [0, 7, 7, 1], [0, 3, 4, 5]])
        with torch.no_grad():
            ref = hf(pixel_values=t(pixels), input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                     **kwargs).logits.numpy()
        logits = model.forward(pixels, ids, mask, decoder_input_ids=dec, **ours)
        valid = np.ones(dec.shape, bool)
    else:
        ids, mask = left_padded_prompts([4, 1, 6], 128, pad_id=1, bos_id=2, seed=2, image_token=IMAGE_TOKEN)
        with torch.no_grad():
            ref = hf(pixel_values=t(pixels), input_ids=t(ids), attention_mask=t(mask),
                     position_ids=t(positions_from_mask(mask)), **kwargs).logits.numpy()
        logits = model.forward(pixels, ids, mask, **ours)
        valid = mask.astype(bool)
    with torch.no_grad():
        args = (t(pixels),) + ((kwargs["qformer_input_ids"], kwargs["qformer_attention_mask"]) if kwargs else ())
        feats = hf.get_image_features(*args, return_dict=True)
    projected = model.encode_image(pixels, **ours)
    diffs = dict(projection=max_diff(projected, feats.pooler_output.numpy()), logits=max_diff(logits, ref, where=valid))
    print(name, "max |delta|:", diffs)
    assert all(v <= TOL for v in diffs.values()), diffs


def test_t5_checkpoint_with_its_own_lm_head_loads_untied(tmp_path):
    """Released Flan-T5 checkpoints carry a separate lm_head although transformers 5 writes tie=true."""
    from safetensors.numpy import load_file, save_file
    hf = tiny_instructblip(tmp_path, seed=6, text=TINY_T5)
    head = torch.randn(hf.language_model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.3
    hf.language_model.lm_head.weight = torch.nn.Parameter(head)  # untie in the reference too
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["language_model.lm_head.weight"] = head.numpy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = jblip.load_pretrained(str(tmp_path))
    assert not model.config.text.tie_word_embeddings and "lm_head" in model.params["llm"]
    rng = np.random.default_rng(2)
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    q_ids, q_mask = right_padded_text([2, 5], 99, 3)
    ids, mask = right_padded_prompts([3, 6], 128)
    dec = np.array([[0, 4, 9], [0, 8, 1]])
    t = torch.tensor
    with torch.no_grad():
        ref = hf(pixel_values=t(pixels), qformer_input_ids=t(q_ids), qformer_attention_mask=t(q_mask),
                 input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec)).logits.numpy()
    logits = model.forward(pixels, ids, mask, q_ids, q_mask, decoder_input_ids=dec)
    assert max_diff(logits, ref) <= TOL
