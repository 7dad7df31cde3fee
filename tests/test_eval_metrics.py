"""The evaluation metrics against values derived by hand from the official definitions (VQA
accuracy and its answer normalisation, GQA exact match, choice matching) and against
pycocoevalcap's own COCO evaluation (BLEU, CIDEr-D, ROUGE-L, METEOR)."""
from __future__ import annotations

import json

import pytest

from jblip.evaluation.metrics.breakdown import breakdown
from jblip.evaluation.metrics.exact_match import exact_match, match_choice
from jblip.evaluation.metrics.vqa_accuracy import normalise_prediction, vqa_accuracy


def ten(answer):
    return [answer] * 10


# (prediction, the ten human answers, accuracy worked out by hand from the official script)
VQA_CASES = [
    # leave-one-out averaging: with k humans giving the prediction, the k who gave it see k-1
    # matches among the other nine and the 10-k others see k; each set scores min(matches/3, 1)
    ("yes", ten("yes"), 1.0),
    ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),                    # 4 x min(3/3,1) + 6 x min(4/3,1)
    ("yes", ["yes"] * 3 + ["no"] * 7, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
    ("yes", ["yes"] * 2 + ["no"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6
    ("yes", ["yes"] + ["no"] * 9, (1 * 0 + 9 * 1 / 3) / 10),   # 0.3
    ("maybe", ten("yes"), 0.0),
    # prediction: case, whitespace, newlines and tabs
    ("Yes", ten("yes"), 1.0),
    ("  yes\n", ten("yes"), 1.0),
    ("blue\tsky", ten("blue sky"), 1.0),
    # articles a / an / the are dropped from the prediction
    ("a dog", ten("dog"), 1.0),
    ("the man in a hat", ten("man in hat"), 1.0),
    ("an apple", ten("apple"), 1.0),
    # number words zero..ten and "none" become digits
    ("two", ten("2"), 1.0),
    ("Ten", ten("10"), 1.0),
    ("none", ten("0"), 1.0),
    # ... but only in the prediction: unanimous human answers are compared untouched
    ("two", ten("two"), 0.0),
    # and differing human answers get punctuation treatment only ("two" stays a word)
    ("two", ["two"] * 5 + ["2"] * 5, 1.0),  # the five "2"s match the normalised prediction
    # contractions get their apostrophe back
    ("dont", ten("don't"), 1.0),
    ("isnt", ten("isn't"), 1.0),
    ("couldnt've", ten("couldn't've"), 1.0),
    # the table's capitalised keys never match a lower-cased word
    ("Im", ten("i'm"), 0.0),
    # a period goes unless a digit follows it
    ("yes.", ten("yes"), 1.0),
    ("e.g.", ten("eg"), 1.0),
    ("1.5", ten("1.5"), 1.0),
    ("1.5.", ten("1.5"), 1.0),
    # other punctuation: deleted when it touches a space, else replaced by one
    ("t-shirt", ten("t shirt"), 1.0),
    ("red,white", ten("red white"), 1.0),
    ("dogs, cats", ten("dogs cats"), 1.0),
    ("left - right", ten("left right"), 1.0),
    ("(yes)", ten("yes"), 1.0),
    # ... and deleted everywhere when the text has digit,comma,digit
    ("1,000", ten("1000"), 1.0),
    ("1,000 t-shirts", ten("1000 tshirts"), 1.0),
    # apostrophes and colons are not punctuation to the script
    ("10:30", ten("10:30"), 1.0),
    ("10:30", ten("1030"), 0.0),
    ("dog's", ten("dogs"), 0.0),
    # unanimous human answers keep their punctuation, so they can never match a normalised prediction
    ("t-shirt", ten("t-shirt"), 0.0),
    ("yes.", ten("yes."), 0.0),
    # differing ones lose it: 9 x "t-shirt" -> "t shirt" and 9 x "yes." -> "yes"
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0),
    ("yes", ["yes."] * 9 + ["no"], 1.0),
    ("shirt", ["t-shirt"] * 9 + ["shirt"], (1 * 0 + 9 * 1 / 3) / 10),
]


@pytest.mark.parametrize("prediction,answers,expected", VQA_CASES)
def test_vqa_accuracy_case_by_case(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vizwiz_compares_human_answers_as_written():
    # VQA: the nine "t-shirt" become "t shirt" and match the normalised prediction; VizWiz: they stay
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"], humans="vizwiz") == 0.0
    assert vqa_accuracy("T shirt", ["t shirt"] * 9 + ["shirt"], humans="vizwiz") == 1.0


def test_textvqa_evalai_normalises_both_sides():
    # unanimous human answers are normalised too (the VQA script leaves them alone)
    assert vqa_accuracy("t-shirt", ten("T-Shirt"), humans="evalai") == 1.0
    assert vqa_accuracy("t-shirt", ten("T-Shirt")) == 0.0
    assert vqa_accuracy("two", ten("two"), humans="evalai") == 1.0
    # commas and question marks go before the punctuation rules; "'s" is split off
    assert vqa_accuracy("dogs,cats", ten("dogscats"), humans="evalai") == 1.0
    assert vqa_accuracy("dogs,cats", ten("dogs cats")) == 1.0
    assert vqa_accuracy("joe's", ten("joe 's"), humans="evalai") == 1.0
    assert vqa_accuracy("coca cola", ["coca cola"] * 2 + ["coke"] * 8, humans="evalai") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="humans must be"):
        vqa_accuracy("x", ["x"], humans="gqa")


def test_vqa_normalisation_steps():
    assert normalise_prediction("The Two dogs, aren't they?") == "2 dogs aren't they"
    assert normalise_prediction("arent") == "aren't"
    assert normalise_prediction("3.14 m.") == "3.14 m"
    assert normalise_prediction("a") == ""


def test_breakdown_averages_per_type():
    scores = [(1.0, {"question_type": "what color", "answer_type": "other"}),
              (0.3, {"question_type": "what color", "answer_type": "other"}),
              (0.0, {"question_type": "how many", "answer_type": "number"})]
    result = breakdown(scores)
    assert result["overall"] == pytest.approx(100 * 1.3 / 3)
    assert result["count"] == 3
    assert result["by_question_type"]["what color"] == {"score": pytest.approx(65.0), "count": 2}
    assert result["by_answer_type"]["number"] == {"score": 0.0, "count": 1}


def test_gqa_exact_match_normalises_both_sides():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("the left one", "left one") == 1.0
    assert exact_match("two", "2") == 1.0
    assert exact_match("left", "right") == 0.0


def test_match_choice():
    choices = ["fox", "red fox", "dog"]
    assert match_choice("Red fox.", choices) == 1    # the answer is a choice
    assert match_choice("(c)", choices) == 2         # an option letter
    assert match_choice("b", choices) == 1
    assert match_choice("(a) fox", choices) == 0     # a letter in brackets first
    assert match_choice("it is a red fox", choices) == 1  # the longest choice inside
    assert match_choice("cat", choices) == -1


# ----------------------------------------------------------------------------- captions

REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "a person on a surf board riding a wave", "A man surfing on a big wave.", "Surfer in the ocean, riding a wave!"],
    2: ["Two dogs play with a frisbee in the grass.", "a couple of dogs playing in a field",
        "Two brown dogs running on the lawn.", "Dogs chasing a red frisbee on the grass.", "two dogs on green grass"],
    3: ["A plate of food with broccoli and rice.", "A white plate topped with rice and vegetables.",
        "a meal of chicken, rice and broccoli", "Food on a plate on a wooden table.", "broccoli and rice on a plate"],
    4: ["A red double decker bus on a city street.", "A bus driving down the road in London.",
        "the big red bus is parked by the curb", "A double-decker bus drives past shops.", "A red bus in the city"],
}
PREDICTIONS = {1: "a man riding a wave on a surfboard", 2: "two dogs playing with a frisbee on the grass",
               3: "a plate of rice and broccoli", 4: "a red bus driving down a street"}


def _official_coco_scores(tmp_path):
    """pycocoevalcap's COCOEvalCap on the fixture, from files in the COCO formats (METEOR and
    SPICE, slow Java programs that jblip calls unchanged, replaced by stubs)."""
    pycocotools = pytest.importorskip("pycocotools.coco")
    import pycocoevalcap.eval as coco_eval

    gt = {"images": [{"id": i} for i in REFERENCES], "type": "captions", "info": {}, "licenses": [],
          "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                          for i, caps in REFERENCES.items() for k, c in enumerate(caps)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()]))
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        coco = pycocotools.COCO(str(tmp_path / "gt.json"))
        res = coco.loadRes(str(tmp_path / "res.json"))

    class Stub:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

        def method(self):
            return "stub"

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        patch.setattr(coco_eval, "Spice", Stub)
        patch.setattr(coco_eval, "Meteor", Stub)
        evaluator = coco_eval.COCOEvalCap(coco, res)
        evaluator.evaluate()
    return evaluator.eval


def test_caption_scores_equal_pycocoevalcap(tmp_path):
    pytest.importorskip("pycocoevalcap")
    from jblip.evaluation.metrics.captions import caption_scores, java_available
    if not java_available():
        pytest.skip("the COCO evaluation's tokenizer needs Java")
    official = _official_coco_scores(tmp_path)
    ours, notes = caption_scores({str(k): v for k, v in REFERENCES.items()},
                                 {str(k): v for k, v in PREDICTIONS.items()}, meteor_spice=False)
    for name, theirs in (("BLEU-1", "Bleu_1"), ("BLEU-2", "Bleu_2"), ("BLEU-3", "Bleu_3"), ("BLEU-4", "Bleu_4"),
                         ("CIDEr-D", "CIDEr"), ("ROUGE-L", "ROUGE_L")):
        assert ours[name] == pytest.approx(official[theirs], abs=1e-9), name
    assert 0.2 < ours["BLEU-4"] < 1 and 0.5 < ours["CIDEr-D"] < 5  # a fixture that is neither perfect nor empty
    assert notes == [] and "METEOR" not in ours


def test_caption_scores_without_java_tokenise_in_python():
    pytest.importorskip("pycocoevalcap")
    from jblip.evaluation.metrics.captions import caption_scores, python_tokenize
    assert python_tokenize("A dog, running; on the grass!") == ["a", "dog", "running", "on", "the", "grass"]
    same = {"1": "a man riding a wave on a surfboard"}
    scores, notes = caption_scores({"1": ["A man riding a wave on a surfboard."] * 5}, same, java=False)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # identical after tokenisation
    assert "METEOR" not in scores and "SPICE" not in scores
    assert notes and "Java" in notes[0]
