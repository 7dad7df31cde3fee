"""Caption metrics of the COCO caption evaluation (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D, SPICE.

As the COCO evaluation server does, references and predictions are first
tokenised with the Stanford PTB tokenizer (lower-cased, punctuation tokens
removed), then scored corpus-wide: BLEU with the "closest" reference length,
CIDEr-D with its document frequencies taken from these references (so a subset
scored alone, e.g. one NoCaps domain, has its own), METEOR and SPICE through
their Java programs. Java is needed by the PTB tokenizer, METEOR and SPICE;
without it a Python tokenizer that removes the same punctuation is used (scores
can then differ slightly from the server's) and METEOR/SPICE are skipped with a
note. SPICE also needs the Stanford CoreNLP models that pycocoevalcap downloads
on first use; when they are absent it is skipped with a note.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from typing import Mapping, Sequence

# tokens the PTB tokenizer step of the COCO evaluation drops
PTB_PUNCTUATION = frozenset(("''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"))


def java_available() -> bool:
    return shutil.which("java") is not None


def _pycocoevalcap():
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'jblip[eval]'") from None


def python_tokenize(text: str) -> list[str]:
    """Lower-cased words with the PTB punctuation tokens removed (used when Java is absent)."""
    tokens = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", text.lower())
    return [t for t in tokens if t not in PTB_PUNCTUATION]


def tokenize(captions: Mapping[str, Sequence[str]], use_java: bool) -> dict[str, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        with contextlib.redirect_stdout(io.StringIO()):
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [" ".join(python_tokenize(c)) for c in v] for k, v in captions.items()}


def _spice_models_present() -> bool:
    import pycocoevalcap.spice as spice
    lib = os.path.join(os.path.dirname(spice.__file__), "lib")
    return os.path.isdir(lib) and any(n.startswith("stanford-corenlp") for n in os.listdir(lib))


def caption_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                   java: bool | None = None, meteor_spice: bool = True) -> tuple[dict[str, float], list[str]]:
    """({metric: value}, notes) for one prediction per image against its references; images are
    the keys of `references` (each must have a prediction). `java`: use the Java tools (default:
    when Java is found); `meteor_spice=False` skips the two slow Java scorers."""
    _pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = [k for k in references if k not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} images have no predicted caption, e.g. {missing[0]!r}")
    java = java_available() if java is None else java
    notes = [] if java else ["Java not found: captions tokenised in Python (scores may differ slightly "
                             "from the COCO server's); METEOR and SPICE skipped"]
    keys = list(references)
    refs = tokenize({k: list(references[k]) for k in keys}, java)
    preds = tokenize({k: [predictions[k]] for k in keys}, java)
    scores = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        bleu, _ = Bleu(4).compute_score(refs, preds)
        scores.update({f"BLEU-{n + 1}": b for n, b in enumerate(bleu)})
        scores["ROUGE-L"], _ = Rouge().compute_score(refs, preds)
        scores["CIDEr-D"], _ = Cider().compute_score(refs, preds)
        if java and meteor_spice:
            from pycocoevalcap.meteor.meteor import Meteor
            scores["METEOR"], _ = Meteor().compute_score(refs, preds)
            if _spice_models_present():
                from pycocoevalcap.spice.spice import Spice
                scores["SPICE"], _ = Spice().compute_score(refs, preds)
            else:
                notes.append("SPICE skipped: pycocoevalcap's Stanford CoreNLP models are not installed")
    return {k: float(v) for k, v in scores.items()}, notes
