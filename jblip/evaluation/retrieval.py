"""Image-text retrieval: Flickr30K 1K test and COCO Karpathy 5K test, with BLIP-2's protocol.

Files: the retrieval annotation files of LAVIS and BLIP (LAVIS downloads them in
`lavis/configs/datasets/flickr30k/defaults.yaml` and `coco/defaults_ret.yaml`:
`flickr30k_test.json`, `coco_karpathy_test.json` from the BLIP release). The test split is a
JSON list with one object per image:

    [{"image": "flickr30k-images/1007129816.jpg", "caption": ["The man with ...", ...]}, ...]
    [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [...], ...}, ...]

"image" is relative to the image root (LAVIS' `vis_root`, jblip's --images; the bare file name
in --images is accepted too), "caption" the image's captions (5 for Flickr30K; 5 to 7 for
COCO), other keys are ignored. This is how LAVIS' `RetrievalEvalDataset` reads them: images in
file order, texts = every image's captions in order, `img2txt[i]` the indices of image i's
captions, `txt2img[t]` the image of caption t. Karpathy's `dataset_coco.json` /
`dataset_flickr30k.json` ({"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]})
are read as well, the images of --split (default test) in file order.

Captions go through LAVIS' `blip_caption` text processor (`pre_caption`: lower case, the
characters .!"()*#:;~ replaced by spaces, runs of spaces joined, stripped, at most 50 words),
then BERT tokenisation with truncation at 35 tokens ([CLS] and [SEP] included), as LAVIS'
`compute_sim_matrix` tokenises them. Images: the checkpoint's eval transform (LAVIS
`blip_image_eval`: bicubic resize to the model's size, CLIP mean/std; 364 px for the COCO
fine-tuned `blip2-itm-vit-g-coco` that LAVIS' configs evaluate).

Protocol (LAVIS `lavis/projects/blip2/eval/ret_flickr_eval.yaml` and `ret_coco_eval.yaml`:
task retrieval, `k_test: 128` for both): ITC similarity of every pair (the best of the 32 query
embeddings against the text's [CLS] embedding), then each image's 128 best texts and each
text's 128 best images re-scored as ITM "match" logit (averaged over the queries) + ITC
similarity; every other pair scores -100. ITM alone is not used: LAVIS adds the two
(`score_matrix_i2t[...] = score + topk_sim`). See `jblip.retrieval.k_test`.

Metric: recall as LAVIS' `_report_metrics` computes it (`jblip.retrieval.metrics`):
image -> text R@1/5/10 ("txt_r*": an image is found at the best rank of any of its captions),
text -> image R@1/5/10 ("img_r*"), their means and `r_mean`, the overall score. Recall by ITC
alone is reported too. An unreadable image is reported, kept out of the candidates, and its
queries count as misses. There is no official results format (LAVIS writes only the metrics);
`retrieval_results.json` holds each query's 10 best candidates as indices into the file's
images and (flattened) captions.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from jblip.evaluation.task import find_image, read_json

K_TEST = 128          # LAVIS ret_*_eval.yaml
MAX_TEXT_TOKENS = 35  # LAVIS compute_sim_matrix: padding="max_length", truncation=True, max_length=35
MAX_WORDS = 50        # LAVIS BlipCaptionProcessor default


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS' `BlipCaptionProcessor.pre_caption` (the `blip_caption` eval text processor)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


@dataclass
class RetrievalData:
    names: list[str]            # the images as the file names them
    images: list[str]           # their paths
    texts: list[str]            # every caption, processed, image by image
    txt2img: list[int]
    img2txt: list[list[int]]

    def first(self, n: int) -> "RetrievalData":
        """The first `n` images with their captions (--limit)."""
        n = max(min(n, len(self.names)), 0)
        texts = self.img2txt[n - 1][-1] + 1 if n else 0
        return RetrievalData(self.names[:n], self.images[:n], self.texts[:texts], self.txt2img[:texts],
                             self.img2txt[:n])


class RetrievalTask:
    """Base of the retrieval tasks (not a generation `Task`: `jblip eval` runs them with a retrieval
    checkpoint through `jblip.evaluation.retrieval_runner`)."""
    name = ""
    summary = ""
    results_file = "retrieval_results.json"
    default_split = "test"
    k_test = K_TEST

    def __init__(self, split: str | None = None):
        self.split = split or self.default_split

    def load(self, files, images: str) -> RetrievalData:
        if len(files) != 1:
            raise ValueError(f"task {self.name} takes one --data file (the retrieval annotation JSON)")
        data = read_json(files[0])
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            entries = [(os.path.join(im.get("filepath", ""), im["filename"]), [s["raw"] for s in im["sentences"]])
                       for im in data["images"] if im.get("split") == self.split]
            if not entries:
                raise ValueError(f"no images of split {self.split!r} in {files[0]}")
        elif isinstance(data, list) and all(isinstance(a, dict) and isinstance(a.get("image"), str)
                                            and isinstance(a.get("caption"), list) for a in data):
            entries = [(a["image"], a["caption"]) for a in data]
        else:
            raise ValueError(f"{files[0]} is not a retrieval annotation file (a list of "
                             "{\"image\": path, \"caption\": [captions]}) nor a Karpathy dataset_*.json")
        out = RetrievalData([], [], [], [], [])
        for i, (name, captions) in enumerate(entries):
            if not captions:
                raise ValueError(f"image {name!r} in {files[0]} has no captions")
            out.names.append(name)
            out.images.append(find_image(images, name, os.path.basename(name)))
            out.img2txt.append(list(range(len(out.texts), len(out.texts) + len(captions))))
            out.texts.extend(pre_caption(str(c)) for c in captions)
            out.txt2img.extend([i] * len(captions))
        if len(set(out.names)) != len(out.names):
            raise ValueError(f"{files[0]} lists an image twice")
        return out

    def headline(self, metrics: dict) -> str:
        return (f"r_mean {metrics['r_mean']:.2f} (image->text R@1/5/10 {metrics['txt_r1']:.2f}/{metrics['txt_r5']:.2f}/"
                f"{metrics['txt_r10']:.2f}, text->image {metrics['img_r1']:.2f}/{metrics['img_r5']:.2f}/"
                f"{metrics['img_r10']:.2f})")


class Flickr30K(RetrievalTask):
    name = "flickr30k"
    summary = "Flickr30K 1K test retrieval (LAVIS flickr30k_test.json), recall@1/5/10 with ITM re-ranking"


class COCORetrieval(RetrievalTask):
    name = "coco-retrieval"
    summary = "COCO Karpathy 5K test retrieval (LAVIS coco_karpathy_test.json), recall@1/5/10 with ITM re-ranking"
