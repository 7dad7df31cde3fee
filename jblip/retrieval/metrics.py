"""Retrieval recall exactly as LAVIS reports it (`RetrievalTask._report_metrics`, lavis/tasks/retrieval.py).

Each query's candidates are ordered by `np.argsort(score)[::-1]` (ties in that order too).
image -> text ("txt_r*"): an image's rank is the best rank of any of its ground-truth captions;
text -> image ("img_r*"): each caption has one image. R@K is the percentage of queries ranked
below K; `txt_r_mean` / `img_r_mean` average R@1/5/10 per direction, `r_mean` averages the two,
and `agg_metrics` (what LAVIS selects checkpoints by) is `txt_r_mean`.
"""
from __future__ import annotations

import numpy as np


def lavis_order(score: np.ndarray) -> np.ndarray:
    """Candidate indices best first, as LAVIS orders them (`np.argsort(score)[::-1]`)."""
    return np.argsort(score)[::-1]


def _ranks_i2t(scores: np.ndarray, img2txt) -> np.ndarray:
    ranks = np.empty(scores.shape[0], np.int64)
    for i, gts in enumerate(img2txt):
        positions = np.nonzero(np.isin(lavis_order(scores[i]), np.asarray(list(gts))))[0]
        ranks[i] = positions.min()
    return ranks


def _ranks_t2i(scores: np.ndarray, txt2img) -> np.ndarray:
    return np.array([int(np.nonzero(lavis_order(scores[t]) == txt2img[t])[0][0]) for t in range(scores.shape[0])],
                    np.int64)


def retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt) -> dict[str, float]:
    """scores_i2t [I, T], scores_t2i [T, I]; txt2img[t] = its image; img2txt[i] = its captions.
    Returns txt_r1/5/10, txt_r_mean, img_r1/5/10, img_r_mean, r_mean, agg_metrics (percent)."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    if scores_i2t.shape != scores_t2i.shape[::-1]:
        raise ValueError(f"scores_i2t {scores_i2t.shape} and scores_t2i {scores_t2i.shape} must be transposes in shape")
    if len(img2txt) != scores_i2t.shape[0] or len(txt2img) != scores_t2i.shape[0]:
        raise ValueError("img2txt / txt2img must have one entry per image / text")
    tr, ir = _ranks_i2t(scores_i2t, img2txt), _ranks_t2i(scores_t2i, txt2img)
    out = {}
    for prefix, ranks in (("txt", tr), ("img", ir)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out
