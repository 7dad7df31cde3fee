"""bfloat16, what TPU users run: every family's logits against the float32 PyTorch reference within
a stated bound, and greedy tokens equal to float32 decoding on peaked models.

Bound: max |logit(bf16 jblip) - logit(fp32 torch)| <= BF16_LOGIT_BOUND (15%) x the reference's
logit standard deviation. bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); through the
rounded weights and activations of the tiny models the error measured here was 4.0% (BLIP-2 OPT),
7.6% (InstructBLIP Vicuna), 10.5% (BLIP-2 Flan-T5) and 11.9% (InstructBLIP Flan-T5) of the logits'
spread (printed with -s); T5 has no 1/sqrt(d) score scaling and larger activations.
"""
import numpy as np
import pytest
import torch

import jblip
from tests.hf_models import (IMAGE_TOKEN, TINY_T5, left_padded_prompts, positions_from_mask, right_padded_text,
                             tiny_blip2, tiny_instructblip)
from tests.test_families_parity import right_padded_prompts

BF16_LOGIT_BOUND = 0.15
# Greedy tokens can only agree where the float32 model's top two tokens are further apart than
# bf16's error; random tiny models have near-ties (InstructBLIP-Vicuna seeds 11 and 24 flip a
# token at steps 2 and 6; scaling the head does not help, the error scales with the logits), so
# the seeds below are ones whose six-token answers have no near-tie.
BUILDERS = {
    "instructblip-vicuna": lambda p: tiny_instructblip(p, seed=23),
    "instructblip-t5": lambda p: tiny_instructblip(p, seed=12, text=TINY_T5),
    "blip2-opt": lambda p: tiny_blip2(p, seed=13),
    "blip2-t5": lambda p: tiny_blip2(p, seed=14, text=TINY_T5),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = BUILDERS[request.param](path)
    return (request.param, hf, jblip.load_pretrained(str(path)),
            jblip.load_pretrained(str(path), precision="bfloat16"))


def batch(model, rng):
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    inputs = dict(pixel_values=pixels)
    if model.config.qformer.use_text_input:
        q_ids, q_mask = right_padded_text([3, 5], 99, 1)
        inputs.update(qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
    if model.config.family == "t5":
        ids, mask = right_padded_prompts([4, 6], 128)
    else:
        ids, mask = left_padded_prompts([5, 2], 128, pad_id=1, bos_id=2, seed=3, image_token=IMAGE_TOKEN)
    inputs.update(input_ids=ids, attention_mask=mask)
    return inputs


def test_bf16_logits_within_the_bound_of_the_fp32_reference(models):
    name, hf, fp32, bf16 = models
    inputs = batch(fp32, np.random.default_rng(5))
    torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
    extra = {}
    if fp32.config.family == "t5":
        dec = np.array([[0, 5, 9, 11], [0, 7, 7, 1]])
        extra = dict(decoder_input_ids=dec)
        torch_inputs["decoder_input_ids"] = torch.tensor(dec)
    else:
        torch_inputs["position_ids"] = torch.tensor(positions_from_mask(inputs["attention_mask"]))
    with torch.no_grad():
        ref = hf(**torch_inputs).logits.numpy().astype(np.float64)
    got = np.asarray(bf16.forward(**inputs, **extra), np.float64)
    assert got.dtype == np.float64 and np.isfinite(got).all()
    valid = (np.ones(ref.shape[:2], bool) if fp32.config.family == "t5"
             else inputs["attention_mask"].astype(bool)[:, -ref.shape[1]:])
    delta = np.abs(got - ref)[valid].max()
    spread = ref[valid].std()
    print(f"{name}: bf16 max |d logits| {delta:.4f} = {delta / spread:.3%} of the logits' std {spread:.3f}")
    assert delta <= BF16_LOGIT_BOUND * spread


def test_bf16_greedy_tokens_equal_fp32(models):
    name, _, fp32, bf16 = models
    inputs = batch(fp32, np.random.default_rng(6))
    options = dict(max_new_tokens=6, min_new_tokens=6)
    a = fp32.generate(**inputs, **options)
    b = bf16.generate(**inputs, **options)
    print(f"{name}: fp32 {np.asarray(a.tokens).tolist()} bf16 {np.asarray(b.tokens).tolist()}")
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
