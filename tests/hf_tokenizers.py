"""Tiny tokenizers trained in-process with `tokenizers`, wrapped in the HF classes the released
checkpoints use, and tiny checkpoints saved with the HF processor (the real directory layout)."""
from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tests.hf_models import TINY_LLAMA, TINY_OPT, TINY_T5, tiny_blip2, tiny_instructblip

CORPUS = ["What colour is the circle?", "A short image description:", "How many squares are there in the picture?",
          "Question: where is the red triangle? Short answer:", "a photo of a blue square on the left",
          "Describe the image in detail.", "two green circles and one yellow star"] * 3
IMAGE_SIZE = 28


def _train(model, pre_tokenizer, trainer, corpus=CORPUS) -> dict:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(corpus, trainer)
    return json.loads(tok.to_str())["model"]


def _merges(model: dict):
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def llama_tokenizer():
    """LAVIS Vicuna conventions: `</s>` (2) is BOS, EOS and UNK, `[PAD]` added, left truncation."""
    from transformers import LlamaTokenizer
    m = _train(models.BPE(), pre_tokenizers.Metaspace(),
               trainers.BpeTrainer(vocab_size=110, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok = LlamaTokenizer(vocab=m["vocab"], merges=_merges(m), bos_token="</s>", unk_token="</s>",
                         eos_token="</s>", add_bos_token=True, truncation_side="left")
    tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def opt_tokenizer():
    """GPT-2 byte-level BPE with OPT's ids (<s> 0, <pad> 1, </s> 2 = BOS), left padding as batched decoding needs."""
    from transformers import GPT2Tokenizer
    m = _train(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False),
               trainers.BpeTrainer(vocab_size=110, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                   initial_alphabet=[], show_progress=False))
    return GPT2Tokenizer(vocab=m["vocab"], merges=_merges(m), bos_token="</s>", eos_token="</s>", unk_token="</s>",
                         pad_token="<pad>", add_bos_token=True, padding_side="left")


def t5_tokenizer():
    """Unigram with T5's ids (<pad> 0, </s> 1 appended, <unk> 2), right padding."""
    from transformers import T5Tokenizer
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                   pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    m = _train(models.Unigram(), pre, trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    return T5Tokenizer(vocab=[tuple(v) for v in m["vocab"]], extra_ids=0)


def bert_tokenizer():
    """Q-Former tokenizer: uncased WordPiece with [CLS]/[SEP], `[DEC]` added as BOS, left truncation."""
    from transformers import BertTokenizer
    m = _train(models.WordPiece(unk_token="[UNK]"), pre_tokenizers.BertPreTokenizer(),
               trainers.WordPieceTrainer(vocab_size=90, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                         show_progress=False), [c.lower() for c in CORPUS])
    tok = BertTokenizer(vocab=m["vocab"], truncation_side="left")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def image_processor():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def hf_processor(family: str):
    """The HF processor of a family ("vicuna", "t5" InstructBLIP; "opt", "t5-blip2" BLIP-2); adds `<image>`."""
    from transformers import Blip2Processor, InstructBlipProcessor
    from tests.hf_models import NUM_QUERIES
    if family in ("vicuna", "t5"):
        lm = llama_tokenizer() if family == "vicuna" else t5_tokenizer()
        return InstructBlipProcessor(image_processor(), lm, bert_tokenizer(), num_query_tokens=NUM_QUERIES)
    lm = opt_tokenizer() if family == "opt" else t5_tokenizer()
    return Blip2Processor(image_processor(), lm, num_query_tokens=NUM_QUERIES)


def save_checkpoint(path, family: str, seed: int = 0, legacy: bool = False):
    """A tiny HF model whose vocabulary is exactly its tokenizer's (ending in `<image>`), saved
    with its processor into `path`. Returns (hf_model, hf_processor)."""
    processor = hf_processor(family)
    vocab = len(processor.tokenizer)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token == vocab - 1
    text = {"vicuna": TINY_LLAMA, "t5": TINY_T5, "opt": TINY_OPT, "t5-blip2": TINY_T5}[family]
    text = {**text, "vocab_size": vocab}
    qformer = {"vocab_size": len(processor.qformer_tokenizer)} if family in ("vicuna", "t5") else None
    build = tiny_instructblip if family in ("vicuna", "t5") else tiny_blip2
    model = build(path, seed=seed, text=text, qformer=qformer, image_token=image_token)
    processor.save_pretrained(path)
    if legacy:  # an older config without placeholders: queries are prepended by the model
        with open(f"{path}/config.json") as f:
            config = json.load(f)
        config.pop("image_token_index", None)
        config.pop("image_token_id", None)
        with open(f"{path}/config.json", "w") as f:
            json.dump(config, f)
    return model, processor
