"""VQA accuracy with the answer normalisation of the official VQA evaluation script.

The script (the VQA challenge's `vqaEval.py`, also shipped inside LAVIS as
`lavis/common/vqa_tools/vqa_eval.py`) scores one predicted answer against the
ten human answers of a question like this:

1. the prediction: newlines and tabs become spaces, ends are stripped, then
   `normalise_punctuation` and `normalise_words` (below) are applied;
2. the human answers: left as they are when all ten are the same string; when
   they differ, each gets `normalise_punctuation` only (no lower-casing, no number
   words, no articles: the dataset's answers are already in that form, e.g. "2");
3. for each annotator, the prediction is matched against the other nine:
   min(matches / 3, 1); the question's accuracy is the mean over the ten
   leave-one-out sets. A prediction given by 3 or more of the other humans gets 1.

Punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted
when it touches a space somewhere in the text (or the text has a digit,comma,digit
group, as in "1,000"), else replaced by a space. Apostrophes and colons are
kept. Then every "." that is not followed by a digit is deleted ("1.5" keeps
its point); the script passes `re.UNICODE` (32) where `re.sub` takes its count,
so at most 32 such periods go, which this module keeps for equal results.

Words: lower-cased and split on whitespace; "none"/"zero".."ten" become digits;
the articles "a", "an", "the" are dropped; apostrophe-less contractions get
their apostrophe back ("dont" -> "don't"). The table's few capitalised keys
("Im", "Ive", ...) can never match lower-cased words; that too is kept.

Two benchmarks use ports of the script that differ in how the human answers are
treated (`vqa_accuracy(..., humans=...)`):
  * "vizwiz": VizWiz's port compares them as written (no step 2);
  * "evalai": TextVQA's EvalAI evaluator (MMF's `EvalAIAnswerProcessor` with the
    `TextVQAAccuracyEvaluator`) normalises the prediction and every human answer
    the same way: lower-cased, every "," and "?" deleted and "'s" split off as
    its own word ("it's" -> "it 's") first, then the steps of (1).

Scores are reported in percent, unrounded (the script rounds to 2 decimals).
Per type, the script in the VQA repository averages the last leave-one-out
value instead of the question's mean (a known slip, fixed in LAVIS' copy);
here every breakdown averages the question's accuracy, as LAVIS does.
"""
from __future__ import annotations

import re
from typing import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = re.UNICODE  # what the official script's third positional argument to `sub` amounts to

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))


def _contractions() -> dict[str, str]:
    """Written without an apostrophe -> with it: the official table, rebuilt from its spellings.
    One-apostrophe words are listed without it; words with more have each single omission
    listed (never the omission of all of them); then the table's few odd entries."""
    single = """ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd
        how'll how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock
        oughtn't shan't should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd
        something'll that's there'd there're there's they'd they'll they're they've wasn't we've weren't what'll
        what're what's what've when's where'd where's where've who'd who'll who's who've why'll why're why's
        won't would've wouldn't y'all you'd you'll you're you've""".split()
    several = """couldn't've hadn't've he'd've I'd've it'd've mightn't've she'd've shouldn't've somebody'd've
        someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've
        you'd've""".split()
    table = {word.replace("'", ""): word for word in single}
    for word in several:
        cuts = [i for i, c in enumerate(word) if c == "'"]
        table.update({word[:i] + word[i + 1:]: word for i in cuts})
    table.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd", "twas": "'twas",
                  "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at"})
    return table


CONTRACTIONS = _contractions()


def normalise_punctuation(text: str) -> str:
    out = text
    drop = bool(_DIGIT_COMMA_DIGIT.search(text))
    for p in PUNCTUATION:
        if drop or (p + " ") in text or (" " + p) in text:  # decided on the original text, as the script does
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_COUNT)


def normalise_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalise_prediction(answer: str) -> str:
    """A model's answer as the script compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalise_words(normalise_punctuation(answer))


def normalise_references(answers: Sequence[str]) -> list[str]:
    """The human answers as the script compares them (punctuation only, and only when they differ)."""
    answers = list(answers)
    if len(set(answers)) > 1:
        return [normalise_punctuation(a) for a in answers]
    return answers


def normalise_evalai(answer: str) -> str:
    """An answer (model's or human's) as TextVQA's EvalAI evaluator compares it."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalise_prediction(answer)


HUMAN_ANSWERS = ("vqa", "vizwiz", "evalai")


def vqa_accuracy(prediction: str, answers: Sequence[str], humans: str = "vqa") -> float:
    """One question's accuracy in [0, 1]: the mean over leave-one-out annotator sets of
    min(#matches among the others / 3, 1). `humans`: how the answers are normalised before
    they are compared, "vqa" (the VQA script), "vizwiz" or "evalai" (see above)."""
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    if humans == "evalai":
        pred, refs = normalise_evalai(prediction), [normalise_evalai(a) for a in answers]
    elif humans in ("vqa", "vizwiz"):
        pred = normalise_prediction(prediction)
        refs = normalise_references(answers) if humans == "vqa" else list(answers)
    else:
        raise ValueError(f"humans must be one of {HUMAN_ANSWERS}, got {humans!r}")
    matches = sum(r == pred for r in refs)
    # leaving out annotator i removes one match exactly when annotator i gave the prediction
    return sum(min((matches - (r == pred)) / 3, 1.0) for r in refs) / len(refs)
