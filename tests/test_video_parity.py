"""InstructBLIP-Video equals HF `InstructBlipVideoForConditionalGeneration` in float32: per-frame
ViT, Q-Former and projected outputs, logits for T = 1 and 4 with prompts of different lengths,
and greedy / beam-search tokens of `generate` (LLaMA and Flan-T5 language models)."""
from functools import partial

import jax
import numpy as np
import pytest
import torch

import jblip
from jblip.model import BlipModel
from tests.hf_models import NUM_QUERIES, TINY_T5, max_diff, positions_from_mask, right_padded_text
from tests.hf_video import VIDEO_TOKEN, tiny_instructblip_video, video_prompts

TOL = 1e-4
NEW = 8
BUILDERS = {"llama": lambda p: tiny_instructblip_video(p, seed=11),
            "t5": lambda p: tiny_instructblip_video(p, seed=12, text=TINY_T5)}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("video-" + request.param)
    hf = BUILDERS[request.param](path)
    return request.param, hf, jblip.load_pretrained(str(path))


def video_inputs(family, frames, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((3, frames, 3, 28, 28)).astype(np.float32)  # HF layout [B, T, C, H, W]
    q_ids, q_mask = right_padded_text([3, 7, 2], 99, seed)
    ids, mask = video_prompts(family, [4, 1, 6], frames, seed)
    return dict(pixel_values=pixels, qformer_input_ids=q_ids, qformer_attention_mask=q_mask,
                input_ids=ids, attention_mask=mask)


def test_config_reads_the_video_checkpoint(pair):
    family, _, model = pair
    config = model.config
    assert config.video and config.image_token_index == VIDEO_TOKEN and config.family == family
    from dataclasses import replace
    from jblip.config import from_hf_config
    from jblip.convert.hf_config import hf_config_dict
    exported = hf_config_dict(config)  # export writes the video config back, HF reads it
    assert exported["model_type"] == "instructblipvideo" and exported["video_token_index"] == VIDEO_TOKEN
    assert replace(from_hf_config(exported), name=config.name, precision=config.precision) == config
    from transformers import InstructBlipVideoConfig
    assert InstructBlipVideoConfig.from_dict(exported).video_token_index == VIDEO_TOKEN


@pytest.mark.parametrize("frames", [4, 1])
def test_towers_and_logits_match_torch(pair, frames):
    family, hf, model = pair
    inputs = video_inputs(family, frames, seed=frames)
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    extra = {}
    if family == "t5":
        dec = np.array([[0, 5, 9, 11], [0, 7, 7, 1], [0, 3, 4, 5]])
        extra = dict(decoder_input_ids=dec)
        t["decoder_input_ids"] = torch.tensor(dec)
        valid = np.ones(dec.shape, bool)
    else:
        valid = inputs["attention_mask"].astype(bool)
    with torch.no_grad():
        ref = hf(**t)
        feats = hf.get_video_features(t["pixel_values"], t["qformer_input_ids"], t["qformer_attention_mask"])
        ref_logits = ref.logits.numpy()
        if family != "t5":  # left padding: positions from the mask, as HF generate counts them
            embeds = hf.get_input_embeddings()(t["input_ids"]).clone()
            embeds[t["input_ids"] == VIDEO_TOKEN] = feats.pooler_output.reshape(-1, embeds.shape[-1])
            ref_logits = hf.language_model(inputs_embeds=embeds, attention_mask=t["attention_mask"],
                                           position_ids=torch.tensor(positions_from_mask(inputs["attention_mask"]))
                                           ).logits.numpy()
    logits = model.forward(**inputs, **extra)
    nhwc = np.moveaxis(inputs["pixel_values"], 2, -1)
    params = {"params": model.params}
    diffs = dict(logits=max_diff(logits, ref_logits, where=valid))
    if frames > 1:  # the towers see B*T frames; T=1 runs the same programs on fewer of them
        frames_nhwc = nhwc.reshape((-1,) + nhwc.shape[2:])
        vision = jax.jit(partial(model.module.apply, method=BlipModel.image_features))(params, frames_nhwc)
        queries = jax.jit(partial(model.module.apply, method=BlipModel.query_features))(
            params, nhwc, inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
        diffs.update(vision=max_diff(vision, ref.vision_outputs.last_hidden_state.numpy()),
                     qformer=max_diff(queries, ref.qformer_outputs.last_hidden_state[:, :NUM_QUERIES].numpy()))
    print(family, frames, "max |delta|:", diffs)
    assert all(v <= TOL for v in diffs.values()), diffs


def hf_generate(hf, inputs, family, **options):
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = hf.generate(**t, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **options).numpy()
    return out[:, 1 if family == "t5" else inputs["input_ids"].shape[1]:]


def assert_same_tokens(ours, ref, eos):
    for row, (a, b) in enumerate(zip(np.asarray(ours.tokens), ref)):
        stop = next((i + 1 for i, tok in enumerate(b) if tok == eos), len(b))
        assert a[:stop].tolist() == b[:stop].tolist(), f"row {row}: jblip {a.tolist()} vs HF {b.tolist()}"


def test_greedy_and_beam_tokens_match_hf(pair):
    family, hf, model = pair
    inputs = video_inputs(family, 4, seed=5)
    eos = int(hf_generate(hf, inputs, family, eos_token_id=127)[0, 2])  # a token it emits: early stops happen
    greedy = hf_generate(hf, inputs, family, eos_token_id=eos)
    assert (greedy == eos).any()
    assert_same_tokens(model.generate(**inputs, max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=0), greedy, eos)
    opts = dict(num_beams=3, repetition_penalty=1.5, length_penalty=1.0)
    beams = hf_generate(hf, inputs, family, eos_token_id=eos, **opts)
    ours = model.generate(**inputs, strategy="beam", max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=0, **opts)
    assert_same_tokens(ours, beams, eos)
