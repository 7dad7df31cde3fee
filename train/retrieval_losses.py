"""BLIP-2 stage-1 losses as LAVIS `blip2_qformer.Blip2Qformer.forward` defines them.

- ITC: each image's best query against each text, divided by the learned temperature
  (clamped to [0.001, 0.5] as LAVIS does), cross-entropy both ways with label smoothing 0.1,
  over the GLOBAL batch. Under `jit` on a mesh the batch axis is sharded and XLA gathers the
  features, so the loss is the same on one device or many. (LAVIS gathers other ranks'
  features without gradient; the loss value is the same, the gradient here also flows into the
  gathered copies, as a single large batch would.)
- ITM: each text gets one negative image and each image one negative text, drawn from
  softmax(ITC similarity) with the positives excluded (`sample_hard_negatives`, or passed in);
  the Q-Former's multimodal mode scores [pos; neg-image; neg-text] triples, labels [1, 0, 0].
- ITG: the texts with their first token ([CLS]) replaced by the decoder BOS, padding ignored;
  the Q-Former's causal decoder mode predicts token i+1 from the queries and tokens <= i
  (BERT LM head, cross-entropy with label smoothing 0.1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jblip.retrieval.model import RetrievalModel, l2_normalize

LABEL_SMOOTHING = 0.1
TEMP_RANGE = (0.001, 0.5)
NEG = -10000.0  # LAVIS' fill value for the positives before sampling negatives


def smoothed_cross_entropy(logits, targets, valid=None, smoothing: float = LABEL_SMOOTHING):
    """torch's cross_entropy(label_smoothing=s), mean over `valid` rows."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    loss = (1 - smoothing) * nll - smoothing * logp.mean(axis=-1)
    if valid is None:
        return loss.mean()
    return jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.maximum(valid.sum(), 1)


def itc_logits(image_embeds, text_embeds, temp):
    """(sim_i2t [B, B], sim_t2i [B, B]) divided by the clamped temperature."""
    temp = jnp.clip(temp, *TEMP_RANGE)
    sim = jnp.einsum("iqe,te->iqt", image_embeds, text_embeds).max(axis=1)
    return sim / temp, sim.T / temp


def sample_hard_negatives(key, sim_i2t, sim_t2i, image_ids=None):
    """(negative image per text [B], negative text per image [B]) drawn from softmax of the ITC
    similarities with every positive excluded (the diagonal, or every pair of the same `image_ids`)."""
    b = sim_i2t.shape[0]
    same = jnp.eye(b, dtype=bool) if image_ids is None else image_ids[:, None] == image_ids[None, :]
    k1, k2 = jax.random.split(key)
    sim_i2t = jax.lax.stop_gradient(jnp.where(same, NEG, sim_i2t))
    sim_t2i = jax.lax.stop_gradient(jnp.where(same, NEG, sim_t2i))
    return jax.random.categorical(k1, sim_t2i, axis=-1), jax.random.categorical(k2, sim_i2t, axis=-1)


def _stage1(module: RetrievalModel, pixel_values, text_ids, text_mask, neg_images, neg_texts, bos_id, pad_id,
            key, image_ids, states):
    text_ids, text_mask = jnp.asarray(text_ids), jnp.asarray(text_mask)
    if states is None:
        states = module.vision_states(pixel_values)
    image_embeds = l2_normalize(module.vision_projection(module.image_features(states)))
    text_embeds = module.text_embeddings(text_ids, text_mask)
    sim_i2t, sim_t2i = itc_logits(image_embeds, text_embeds, module.temperature())
    targets = jnp.arange(sim_i2t.shape[0])
    itc = (smoothed_cross_entropy(sim_i2t, targets) + smoothed_cross_entropy(sim_t2i, targets)) / 2

    if neg_images is None:
        neg_images, neg_texts = sample_hard_negatives(key, sim_i2t, sim_t2i, image_ids)
    ids_all = jnp.concatenate([text_ids, text_ids, text_ids[neg_texts]])
    mask_all = jnp.concatenate([text_mask, text_mask, text_mask[neg_texts]])
    states_all = jnp.concatenate([states, states[neg_images], states])
    logits = module.itm_logits(states_all, ids_all, mask_all)
    b = text_ids.shape[0]
    labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    itm = smoothed_cross_entropy(logits, labels, smoothing=0.0)

    decoder_ids = text_ids.at[:, 0].set(bos_id)
    lm = module.itg_logits(states, decoder_ids, text_mask)
    labels = decoder_ids[:, 1:]
    itg = smoothed_cross_entropy(lm[:, :-1], labels, valid=(labels != pad_id) & (text_mask[:, 1:] > 0))
    return dict(itc=itc, itm=itm, itg=itg, loss=itc + itm + itg)


def stage1_losses(module: RetrievalModel, params, pixel_values, text_ids, text_mask, *, bos_id: int,
                  pad_id: int = 0, key=None, negatives=None, image_ids=None, vision_states=None):
    """{"itc", "itm", "itg", "loss"} (loss = their sum, as LAVIS). `negatives`: (negative image per
    text, negative text per image) index arrays; None draws them with `key`, never picking a pair of
    the same `image_ids` (LAVIS' `image_id`) when given. `vision_states`: the frozen ViT's output,
    computed once outside the gradient (then `pixel_values` is unused)."""
    neg_images, neg_texts = (None, None) if negatives is None else negatives
    if negatives is None and key is None:
        raise ValueError("stage1_losses needs a PRNG key to draw the ITM negatives, or negatives=(...)")
    return module.apply({"params": params}, pixel_values, text_ids, text_mask, neg_images, neg_texts, bos_id,
                        pad_id, key, image_ids, vision_states, method=_stage1)
