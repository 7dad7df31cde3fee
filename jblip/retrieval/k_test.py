"""The BLIP-2 retrieval protocol's re-ranking (LAVIS `compute_sim_matrix`, lavis/models/blip2_models/blip2.py).

1. The ITC similarity of every (image, text) pair: the best of the image's query embeddings.
2. For each image, its `k_test` most similar texts; for each text, its `k_test` most similar
   images (LAVIS: `sims.topk(k=k_test)`).
3. Each such candidate pair is re-scored as ITM + ITC, where ITM is the "match" logit of the ITM
   head averaged over the query outputs (LAVIS `compute_itm`: `itm_head(...)[:, :, 1].mean(1)`, a
   logit, not a softmax) and ITC the pair's similarity from step 1 (`score + topk_sim`).
4. Every other pair scores -100 (LAVIS fills its score matrices with -100.0).

A pair that is a candidate in both directions has one ITM logit (LAVIS computes it twice, with
the same inputs). The ITM logits are computed grouped by image (`pairs_per_image`), so each
image's ViT output is needed once.
"""
from __future__ import annotations

import numpy as np

FILL = -100.0  # the score of a pair that is not re-ranked


def top_candidates(sims: np.ndarray, k: int, rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """ITC sims [I, T] -> (i2t [I, min(k, T)] text indices, t2i [T, min(k, I)] image indices), best
    first (ties: the lower index first). Sorted `rows` queries at a time, to bound memory."""
    if k < 1:
        raise ValueError(f"k_test must be >= 1, got {k}")
    sims = np.asarray(sims)

    def top(matrix):
        return np.concatenate([np.argsort(-matrix[s:s + rows], axis=1, kind="stable")[:, :k]
                               for s in range(0, matrix.shape[0], rows)] or [np.zeros((0, 0), np.int64)])
    return top(sims), top(sims.T)


def itc_matrix(image_embeds: np.ndarray, text_embeds: np.ndarray, rows: int = 64) -> np.ndarray:
    """[I, Q, E] x [T, E] -> ITC sims [I, T] (`model.itc_similarity`, `rows` images at a time: the
    [rows, Q, T] intermediate stays small for a 25k-caption gallery)."""
    import jax.numpy as jnp
    from jblip.retrieval.model import itc_similarity
    text = jnp.asarray(text_embeds)
    return np.concatenate([np.asarray(itc_similarity(jnp.asarray(image_embeds[s:s + rows]), text))
                           for s in range(0, len(image_embeds), rows)])


def pairs_per_image(i2t: np.ndarray, t2i: np.ndarray, images: int) -> list[np.ndarray]:
    """For each image, the sorted texts it is re-ranked with, in either direction."""
    texts = [set(row.tolist()) for row in i2t] + [set() for _ in range(images - len(i2t))]
    for t, row in enumerate(t2i):
        for i in row.tolist():
            texts[i].add(t)
    return [np.array(sorted(s), np.int64) for s in texts]


def score_matrices(sims: np.ndarray, i2t: np.ndarray, t2i: np.ndarray, pair_images, pair_texts,
                   pair_itm) -> tuple[np.ndarray, np.ndarray]:
    """(score_i2t [I, T], score_t2i [T, I]) as LAVIS returns them, from the ITM logits of the
    candidate pairs (three flat arrays: image, text, logit; any order, each needed pair once)."""
    sims = np.asarray(sims, np.float32)
    n_img, n_txt = sims.shape
    keys = np.asarray(pair_images, np.int64) * n_txt + np.asarray(pair_texts, np.int64)
    order = np.argsort(keys, kind="stable")
    keys, logits = keys[order], np.asarray(pair_itm, np.float32)[order]

    def itm(images, texts):
        want = images.astype(np.int64) * n_txt + texts.astype(np.int64)
        at = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
        if len(keys) == 0 or not np.array_equal(keys[at], want):
            missing = want[keys[at] != want] if len(keys) else want
            i, t = divmod(int(missing.ravel()[0]), n_txt)
            raise KeyError(f"no ITM score for the candidate pair (image {i}, text {t})")
        return logits[at]

    score_i2t = np.full((n_img, n_txt), FILL, np.float32)
    rows = np.repeat(np.arange(n_img), i2t.shape[1])
    score_i2t[rows, i2t.ravel()] = itm(rows, i2t.ravel()) + sims[rows, i2t.ravel()]
    score_t2i = np.full((n_txt, n_img), FILL, np.float32)
    rows = np.repeat(np.arange(n_txt), t2i.shape[1])
    score_t2i[rows, t2i.ravel()] = itm(t2i.ravel(), rows) + sims[t2i.ravel(), rows]
    return score_i2t, score_t2i
