"""Image captioning: COCO Karpathy test and NoCaps, scored with the COCO caption metrics.

Files:
  * COCO Karpathy test (`coco-karpathy`): Karpathy's `dataset_coco.json`
    ({"images": [{"filepath", "filename", "cocoid", "split", "sentences": [{"raw"}]}]};
    the images of --split, default test: 5,000), or any COCO caption annotation file
    ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]},
    e.g. LAVIS' `coco_karpathy_test_gt.json` with its "images" list).
    Images: `<filepath>/<filename>` (e.g. val2014/COCO_val2014_...jpg) or
    `<filename>` in --images.
  * NoCaps (`nocaps`): `nocaps_val_4500_captions.json` (COCO format; each image
    has a "domain": in-domain, near-domain, out-domain); the test file has no
    annotations and is only written out for the evaluation server.
    Images: `<file_name>` in --images or its `validation/` (`test/`) folder.

Protocol: `protocols.caption` (BLIP-2: "a photo of", 5 beams, 8-30 new tokens;
InstructBLIP: "A short image description:", 5 beams, 10-80 new tokens,
repetition penalty 1.5; sources there). The caption is the generated text,
stripped.

Metric: BLEU-4 and CIDEr-D (the headline), with BLEU-1..3, ROUGE-L, and METEOR
and SPICE when Java (and SPICE's models) are present (`metrics.captions`);
NoCaps also per domain, each domain scored on its own as NoCaps' evaluation
does. Results file: `[{"image_id", "caption"}]`, what the COCO caption and
NoCaps evaluation tools take.
"""
from __future__ import annotations

import collections
import os

from jblip.evaluation import protocols
from jblip.evaluation.metrics.captions import caption_scores
from jblip.evaluation.task import Example, Task, find_image, read_json


class COCOKarpathy(Task):
    name = "coco-karpathy"
    summary = "COCO Karpathy test (dataset_coco.json or COCO caption JSON), BLEU-4 / CIDEr-D"
    results_file = "caption_results.json"
    default_split = "test"
    folders = ()

    def __init__(self, split: str | None = None):
        self.split = split or self.default_split

    def load(self, files, images):
        if len(files) != 1:
            raise ValueError(f"task {self.name} takes one --data file (captions JSON)")
        data = read_json(files[0])
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return self._from_coco_format(data, images)
        if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] and \
                "sentences" in data["images"][0]:
            return self._from_karpathy(data, images)
        raise ValueError(f"{files[0]} is neither Karpathy's dataset_coco.json nor a COCO caption annotation file")

    def _from_karpathy(self, data, images):
        examples = []
        for im in data["images"]:
            if im.get("split") != self.split:
                continue
            path = find_image(images, os.path.join(im.get("filepath", ""), im["filename"]), im["filename"])
            examples.append(Example(key=str(im["cocoid"]), id=im["cocoid"], image=path,
                                    reference=[s["raw"] for s in im["sentences"]]))
        if not examples:
            raise ValueError(f"no images of split {self.split!r} in the Karpathy file")
        return examples

    def _from_coco_format(self, data, images):
        captions = collections.defaultdict(list)
        for a in data["annotations"]:
            captions[a["image_id"]].append(a["caption"])
        examples = []
        for im in data["images"]:
            name = im["file_name"]
            path = find_image(images, name, *(f"{d}/{name}" for d in self.folders))
            examples.append(Example(key=str(im["id"]), id=im["id"], image=path,
                                    reference=captions.get(im["id"]) or None,
                                    groups={"domain": im.get("domain")}))
        return examples

    def protocol(self, model_type, family):
        return protocols.caption(model_type)

    def prompt(self, example, template):
        return template  # one prompt for every image

    def score(self, examples, answers):
        refs = {e.key: e.reference for e in examples}
        scores, notes = caption_scores(refs, {k: answers.get(k, "") for k in refs})
        result = dict(scores, overall=scores["CIDEr-D"], count=len(examples), notes=notes)
        domains = collections.defaultdict(list)
        for e in examples:
            if e.groups.get("domain"):
                domains[e.groups["domain"]].append(e)
        if len(domains) > 1:
            result["by_domain"] = {}
            for d, members in sorted(domains.items()):
                part, _ = caption_scores({e.key: e.reference for e in members},
                                         {e.key: answers.get(e.key, "") for e in members})
                result["by_domain"][d] = dict(part, count=len(members))
        return result

    def headline(self, metrics):
        return f"CIDEr-D {100 * metrics['CIDEr-D']:.2f} BLEU-4 {100 * metrics['BLEU-4']:.2f}"

    def official_results(self, examples, answers):
        return [{"image_id": e.id, "caption": answers[e.key]} for e in examples if e.key in answers]


class NoCaps(COCOKarpathy):
    name = "nocaps"
    summary = "NoCaps val (COCO-format captions JSON with domains), CIDEr-D / BLEU-4 per domain"
    results_file = "nocaps_results.json"
    folders = ("validation", "test")

    def load(self, files, images):
        if len(files) != 1:
            raise ValueError(f"task {self.name} takes --data nocaps_val_4500_captions.json")
        data = read_json(files[0])
        if not (isinstance(data, dict) and "images" in data):
            raise ValueError(f"{files[0]} is not a NoCaps file (COCO caption format)")
        data.setdefault("annotations", [])
        return self._from_coco_format(data, images)
