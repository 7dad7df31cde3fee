"""Retrieval recall as LAVIS reports it (`_report_metrics` of its retrieval task).

image -> text: an image's rank is the best rank of any of its ground-truth captions among all
texts sorted by score; text -> image: each caption has one image. R@K is the percentage of
queries ranked below K; `r_mean` is the mean of the six recalls' two directional means.
"""
from __future__ import annotations

import numpy as np


def _ranks_i2t(scores: np.ndarray, img2txt) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty(scores.shape[0], np.int64)
    for i, gts in enumerate(img2txt):
        positions = np.nonzero(np.isin(order[i], np.asarray(list(gts))))[0]
        ranks[i] = positions.min()
    return ranks


def _ranks_t2i(scores: np.ndarray, txt2img) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array([int(np.nonzero(order[t] == txt2img[t])[0][0]) for t in range(scores.shape[0])])


def retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt) -> dict[str, float]:
    """scores_i2t [I, T], scores_t2i [T, I]; txt2img[t] = its image; img2txt[i] = its captions.
    Returns txt_r1/5/10, txt_r_mean, img_r1/5/10, img_r_mean, r_mean (percent)."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    if scores_i2t.shape != scores_t2i.shape[::-1]:
        raise ValueError(f"scores_i2t {scores_i2t.shape} and scores_t2i {scores_t2i.shape} must be transposes in shape")
    if len(img2txt) != scores_i2t.shape[0] or len(txt2img) != scores_t2i.shape[0]:
        raise ValueError("img2txt / txt2img must have one entry per image / text")
    tr, ir = _ranks_i2t(scores_i2t, img2txt), _ranks_t2i(scores_t2i, txt2img)
    out = {}
    for prefix, ranks in (("txt", tr), ("img", ir)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
