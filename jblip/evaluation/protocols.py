"""Prompt templates and decoding settings shared by the tasks, per model kind, with their sources.

Short-answer VQA (VQAv2, OK-VQA, GQA, A-OKVQA, VizWiz, TextVQA, and the
multiple-choice tasks, which add their options):
  * beam search, 5 beams, 1 to 10 new tokens: every LAVIS VQA evaluation config
    (`lavis/projects/blip2/eval/*_zeroshot_*_eval.yaml`, and
    `lavis/projects/instructblip/qa_okvqa_*_eval.yaml`: num_beams 5, max_len 10, min_len 1).
  * prompts: BLIP-2 paper (zero-shot VQA): "Question: {} Answer:" for OPT and
    "Question: {} Short answer:" for Flan-T5 (LAVIS' OPT config uses the Flan-T5
    wording; we follow the paper). InstructBLIP, every LLM: "Question: {} Short answer:",
    the short-answer template of its held-out evaluation, as LAVIS'
    `qa_okvqa_*_eval.yaml` write it (there "Short Answer:").
  * length penalty: -1 (favours short answers) for Flan-T5, as `blip2_t5.predict_answers`
    and `blip2_t5_instruct.predict_answers` default to; 0 for BLIP-2 OPT
    (`blip2_opt.predict_answers`); -1 for InstructBLIP Vicuna (LAVIS'
    `qa_okvqa_vicuna7b_eval.yaml`).
  * repetition penalty: 1.5 for InstructBLIP (its `generate`, which `predict_answers`
    calls without overriding it), 1.0 for BLIP-2.

Captioning (COCO Karpathy test, NoCaps):
  * BLIP-2: prompt "a photo of" (LAVIS' `blip2_caption_*` model configs), 5 beams,
    8 to 30 new tokens, length penalty 1 (`caption_coco_opt2.7b_eval.yaml`).
  * InstructBLIP: prompt "A short image description:" (the paper's captioning
    template; LAVIS' instructblip caption configs write "A short image caption."),
    5 beams, 10 to 80 new tokens, length penalty 1, repetition penalty 1.5
    (`lavis/projects/instructblip/caption_*_eval*.yaml` and its `generate` default).

LAVIS' max_len/min_len count generated tokens only (they reach HF generation
with the prompt given as embeddings), which is jblip's max/min_new_tokens.
"""
from __future__ import annotations

from jblip.evaluation.task import Decoding, Protocol

# the words after the question: the BLIP-2 paper's for OPT, "Short answer:" everywhere else
ANSWER_CUE = {"blip2-opt": "Answer:"}
DEFAULT_CUE = "Short answer:"

SHORT_ANSWER_DECODING = {
    "blip2-opt": Decoding(length_penalty=0.0),
    "blip2-t5": Decoding(length_penalty=-1.0),
    "instructblip-llama": Decoding(length_penalty=-1.0, repetition_penalty=1.5),
    "instructblip-t5": Decoding(length_penalty=-1.0, repetition_penalty=1.5),
}

CAPTION = {
    "blip2": Protocol("a photo of", Decoding(max_new_tokens=30, min_new_tokens=8, length_penalty=1.0)),
    "instructblip": Protocol("A short image description:",
                             Decoding(max_new_tokens=80, min_new_tokens=10, length_penalty=1.0, repetition_penalty=1.5)),
}


def short_answer(model_type: str, family: str, question: str = "Question: {question}") -> Protocol:
    """The VQA protocol of a model kind: `question` (a task may add context or options around
    the question) followed by the kind's answer cue. Kinds without a published setting
    (InstructBLIP with OPT) take InstructBLIP Vicuna's."""
    kind = f"{model_type}-{family}"
    fallback = "instructblip-llama" if model_type == "instructblip" else ("blip2-t5" if family == "t5" else "blip2-opt")
    decoding = SHORT_ANSWER_DECODING.get(kind, SHORT_ANSWER_DECODING[fallback])
    return Protocol(f"{question} {ANSWER_CUE.get(kind, DEFAULT_CUE)}", decoding)


def caption(model_type: str) -> Protocol:
    return CAPTION["instructblip" if model_type == "instructblip" else "blip2"]
