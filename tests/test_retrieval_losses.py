"""Stage-1 losses (ITC, ITM with given hard negatives, ITG) and Q-Former gradients against a PyTorch
reference: HF `Blip2ForImageTextRetrieval` modules + LAVIS `blip2_qformer.forward`'s formulas, written
out here. Data-parallel ITC on 8 emulated devices equals one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from hf_models import TINY_QFORMER, TINY_VISION, randomize, right_padded_text
from jblip.convert import stacking
from jblip.convert.retrieval import load_retrieval_params
from jblip.convert.rules import flatten
from jblip.convert.tables.retrieval import RULES
from jblip.convert.inverse import KeyInverter
from jblip.retrieval.model import RetrievalModel
from jblip.train.retrieval_losses import itc_logits, sample_hard_negatives, smoothed_cross_entropy, stage1_losses

Q, BOS, PAD, TEMP = 6, 3, 0, 0.1
NEG_IMAGES, NEG_TEXTS = np.array([2, 0, 3, 1]), np.array([1, 3, 0, 2])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("itm-loss")
    cfg = transformers.Blip2Config(vision_config=TINY_VISION,
                                   qformer_config={**TINY_QFORMER, "use_qformer_text_input": True},
                                   num_query_tokens=Q, image_text_hidden_size=24)
    hf = randomize(transformers.Blip2ForImageTextRetrieval(cfg).eval(), seed=5)
    hf.save_pretrained(path)
    config, params = load_retrieval_params(str(path))
    rng = np.random.default_rng(1)
    head = {k: rng.normal(0, 0.2, np.shape(v)).astype(np.float32) for k, v in flatten(params["lm_head"]).items()}
    params = dict(params, temp=jnp.float32(TEMP), lm_head={
        "transform": {"kernel": head["transform/kernel"], "bias": head["transform/bias"]},
        "norm": {"scale": 1 + head["norm/scale"], "bias": head["norm/bias"]}, "bias": head["bias"]})
    pixels = rng.normal(size=(4, 28, 28, 3)).astype(np.float32)
    ids, mask = right_padded_text([3, 8, 1, 5], vocab=99)
    return dict(hf=hf, config=config, params=params, pixels=pixels, ids=ids, mask=mask)


def torch_reference(s):
    """LAVIS blip2_qformer.forward on HF modules (one rank; dropout off); returns losses and the model."""
    hf = s["hf"]
    hf.zero_grad()
    p = s["params"]["lm_head"]
    head = [torch.tensor(np.asarray(x), requires_grad=True) for x in
            (p["transform"]["kernel"], p["transform"]["bias"], p["norm"]["scale"], p["norm"]["bias"], p["bias"])]
    temp = torch.tensor(TEMP, requires_grad=True)
    pix = torch.from_numpy(s["pixels"]).permute(0, 3, 1, 2)
    ids, mask = torch.from_numpy(s["ids"]).long(), torch.from_numpy(s["mask"]).long()
    b = ids.shape[0]
    with torch.no_grad():  # frozen ViT
        image_embeds = hf.vision_model(pixel_values=pix).last_hidden_state
    query = hf.query_tokens.expand(b, -1, -1)
    query_out = hf.qformer(query_embeds=query, encoder_hidden_states=image_embeds).last_hidden_state
    image_feats = F.normalize(hf.vision_projection(query_out), dim=-1)
    text_out = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0, attention_mask=mask)
    text_feat = F.normalize(hf.text_projection(text_out.last_hidden_state[:, 0]), dim=-1)
    t = temp.clamp(0.001, 0.5)
    sim_i2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1).max(-1)[0] / t
    sim_t2i = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(-2).max(-1)[0] / t
    targets = torch.arange(b)
    itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1) + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2

    neg_i, neg_t = torch.from_numpy(NEG_IMAGES), torch.from_numpy(NEG_TEXTS)
    ids_all = torch.cat([ids, ids, ids[neg_t]])
    atts_all = torch.cat([mask, mask, mask[neg_t]])
    images_all = torch.cat([image_embeds, image_embeds[neg_i], image_embeds])
    q3 = hf.query_tokens.expand(3 * b, -1, -1)
    out = hf.qformer(query_embeds=hf.embeddings(input_ids=ids_all, query_embeds=q3), query_length=Q,
                     attention_mask=torch.cat([torch.ones(3 * b, Q, dtype=torch.long), atts_all], 1),
                     encoder_hidden_states=images_all).last_hidden_state
    logits = hf.itm_head(out[:, :Q]).mean(dim=1)
    itm = F.cross_entropy(logits, torch.cat([torch.ones(b), torch.zeros(2 * b)]).long())

    dec = ids.clone()
    dec[:, 0] = BOS
    labels = dec.masked_fill(dec == PAD, -100)
    n = Q + dec.shape[1]
    row, col = torch.arange(n)[:, None], torch.arange(n)[None]
    allowed = torch.where(row < Q, col < Q, (col < Q) | (col <= row))[None] & torch.cat(
        [torch.ones(b, Q, dtype=torch.bool), mask.bool()], 1)[:, None, :]
    bias = torch.where(allowed, 0.0, -1e9)[:, None]
    out = hf.qformer(query_embeds=hf.embeddings(input_ids=dec, query_embeds=query), query_length=Q,
                     attention_mask=bias, encoder_hidden_states=image_embeds).last_hidden_state[:, Q:]
    x = F.layer_norm(F.gelu(out @ head[0] + head[1]), (out.shape[-1],), head[2], head[3], eps=1e-12)
    scores = x @ hf.embeddings.word_embeddings.weight.T + head[4]
    itg = F.cross_entropy(scores[:, :-1].reshape(-1, scores.shape[-1]), labels[:, 1:].reshape(-1),
                          label_smoothing=0.1)
    total = itc + itm + itg
    total.backward()
    return dict(itc=itc.item(), itm=itm.item(), itg=itg.item(), loss=total.item())


def jax_losses(s, params, states):
    module = RetrievalModel(s["config"])
    return stage1_losses(module, params, None, s["ids"], s["mask"], bos_id=BOS, pad_id=PAD,
                         negatives=(NEG_IMAGES, NEG_TEXTS), vision_states=states)


def test_losses_and_qformer_gradients_match_the_torch_reference(setup):
    want = torch_reference(setup)
    trainable = {k: v for k, v in setup["params"].items() if k != "vision"}
    module = RetrievalModel(setup["config"])
    states = module.apply({"params": setup["params"]}, setup["pixels"], method=RetrievalModel.vision_states)

    def total(trainable):  # the ViT is frozen: its output enters as data, as in training
        out = jax_losses(setup, dict(trainable, vision=setup["params"]["vision"]), states)
        return out["loss"], out
    (_, got), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(trainable)
    for name in ("itc", "itm", "itg", "loss"):
        rel = abs(float(got[name]) - want[name]) / abs(want[name])
        print(f"{name}: jblip {float(got[name]):.6f} torch {want[name]:.6f} rel {rel:.1e}")
        assert rel <= 1e-5, name
    invert = KeyInverter(RULES)
    flat = stacking.PerLayerView(flatten({"qformer": grads["qformer"]}))
    torch_grads = {k: v.grad for k, v in setup["hf"].named_parameters()}
    refs = {path: rule.transform.to_flax(torch_grads[key].numpy(), tuple(np.shape(flat[path])))
            for path, (key, rule) in ((p, invert(p)) for p in flat)}
    top = max(np.abs(r).max() for r in refs.values())
    worst = 0.0
    for path, ref in refs.items():
        got_grad = np.asarray(flat[path])
        if path.endswith("key/bias"):  # no true gradient (softmax ignores a per-row shift): rounding noise
            assert max(np.abs(ref).max(), np.abs(got_grad).max()) <= 1e-6 * top, path
            continue
        worst = max(worst, float(np.abs(got_grad - ref).max() / np.abs(ref).max()))
    print(f"Q-Former gradients: worst per-tensor relative max |d| {worst:.1e} over {len(flat)} tensors")
    assert worst <= 1e-4


def test_itc_on_8_devices_equals_one_device():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 6, 24)).astype(np.float32)
    text = rng.normal(size=(16, 24)).astype(np.float32)

    def loss(image, text):
        i2t, t2i = itc_logits(image, text, 0.07)
        t = jnp.arange(16)
        return (smoothed_cross_entropy(i2t, t) + smoothed_cross_entropy(t2i, t)) / 2
    one = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(image, text)
    from jblip.sharding import make_mesh
    mesh = make_mesh("data=8,fsdp=1")
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    eight = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jax.device_put(image, spec),
                                                              jax.device_put(text, spec))
    assert len(eight[1][0].sharding.device_set) == 8
    np.testing.assert_allclose(float(eight[0]), float(one[0]), rtol=1e-6)
    for a, b in zip(eight[1], one[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_hard_negatives_never_pick_the_positive():
    sim = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)) * 0.1 + 5 * np.eye(5))
    for seed in range(5):
        neg_images, neg_texts = sample_hard_negatives(jax.random.key(seed), sim, sim.T)
        assert not np.any(np.asarray(neg_images) == np.arange(5))
        assert not np.any(np.asarray(neg_texts) == np.arange(5))
    image_ids = jnp.array([0, 0, 1, 2, 2])
    neg_images, _ = sample_hard_negatives(jax.random.key(0), sim, sim.T, image_ids)
    assert not np.any(np.asarray(image_ids)[np.asarray(neg_images)] == np.asarray(image_ids))
