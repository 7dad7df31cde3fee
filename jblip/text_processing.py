"""Tokenizers read from a checkpoint directory with the HF `tokenizers` library.

A HF processor saved with `save_pretrained` lays its files out as
`tokenizer.json` + `tokenizer_config.json` (the language model's tokenizer) and,
for InstructBLIP, `qformer_tokenizer/tokenizer.json` + `tokenizer_config.json`
(the BERT tokenizer with `[DEC]`). Older saves keep special tokens in
`special_tokens_map.json`; both are read.

Special tokens (BOS for Vicuna/OPT, `</s>` appended for T5, [CLS]/[SEP] for BERT)
come from the post-processor template in `tokenizer.json`. As in transformers
5.x, `add_bos_token` / `add_eos_token` in `tokenizer_config.json` are ignored
when a `tokenizer.json` exists (it is always required here). Also as in
transformers 5, a LLaMA tokenizer's normalizer / pre-tokenizer / decoder are
rebuilt rather than read from older files (`_llama_pipeline`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from tokenizers import Tokenizer, decoders, pre_tokenizers

from jblip import bounded_json

QFORMER_SUBDIR = "qformer_tokenizer"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return bounded_json.load(f, path)


def _token_text(value):
    """Special tokens are saved as plain strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _wordpiece_cleanup(text: str) -> str:
    """transformers' `clean_up_tokenization` (only applied to non-BPE tokenizers that ask for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens named in its config files."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str | None], clean_up_spaces: bool = False,
                 source: str = "tokenizer"):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.backend = tokenizer
        self.special_tokens = special_tokens
        self.source = source
        is_bpe = type(tokenizer.model).__name__ == "BPE"
        self.clean_up_spaces = clean_up_spaces and not is_bpe  # as transformers: never for BPE

    def __repr__(self):
        return f"TextTokenizer({self.source!r}, vocab={len(self)})"

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    @classmethod
    def from_dir(cls, directory: str, what: str = "tokenizer") -> "TextTokenizer":
        """From a folder holding tokenizer.json (and its config files), or from a tokenizer.json path."""
        file = directory if directory.endswith(".json") else os.path.join(directory, "tokenizer.json")
        directory = os.path.dirname(file)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json in {directory or '.'} ({what}); save the checkpoint's "
                                    "processor with transformers' save_pretrained, which writes it")
        try:
            tokenizer = Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"cannot read {file}: {e}") from None
        config = {**_read_json(os.path.join(directory, "special_tokens_map.json")),
                  **_read_json(os.path.join(directory, "tokenizer_config.json"))}
        if config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
            _llama_pipeline(tokenizer, config)
        special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
        return cls(tokenizer, special, bool(config.get("clean_up_tokenization_spaces", False)), file)

    # ------------------------------------------------------------------ ids
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def special_id(self, name: str) -> int | None:
        """Id of a named special token ("pad_token", "bos_token", ...), None when undefined."""
        return self.token_id(self.special_tokens.get(name))

    @property
    def num_special_tokens(self) -> int:
        """Special tokens the template adds to one sequence (BOS, EOS, [CLS]+[SEP])."""
        return self.backend.num_special_tokens_to_add(False)

    @contextmanager
    def _truncating(self, max_length: int | None):
        if max_length is None:
            yield
            return
        # left: keep the end of a long instruction, where the question usually is (LAVIS)
        self.backend.enable_truncation(max_length=max_length, direction="left")
        try:
            yield
        finally:
            self.backend.no_truncation()

    def encode(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids with special tokens, each sequence cut from the left to `max_length` (specials kept)."""
        with self._truncating(max_length):
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=True)]

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of one text without special tokens (training lays out BOS/EOS itself)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text with special tokens removed and surrounding whitespace stripped (as LAVIS does)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.clean_up_spaces:
            text = _wordpiece_cleanup(text)
        return text.strip()


def _llama_pipeline(tokenizer: Tokenizer, config: dict):
    """Text -> pieces as transformers 5 does for LLaMA, whatever the file says.

    transformers 5 rebuilds a LLaMA tokenizer around the file's vocabulary and merges: no
    normalizer, a Metaspace pre-tokenizer. Hub files saved earlier (Vicuna's) carry a
    sentencepiece-style normalizer (prepend "▁", spaces -> "▁") that tokenizes text starting
    with a space differently; ids must match the HF processor's, so follow transformers.
    """
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))


def load_tokenizers(path: str, needs_qformer: bool) -> tuple[TextTokenizer, TextTokenizer | None]:
    """(language-model tokenizer, Q-Former tokenizer or None) from a checkpoint directory."""
    text = TextTokenizer.from_dir(path, "language-model tokenizer")
    if not needs_qformer:
        return text, None
    qdir = os.path.join(path, QFORMER_SUBDIR)
    if not os.path.isdir(qdir):
        raise FileNotFoundError(f"no {QFORMER_SUBDIR}/ folder in {path}: InstructBLIP needs the Q-Former's BERT "
                                "tokenizer (InstructBlipProcessor.save_pretrained writes it there)")
    return text, TextTokenizer.from_dir(qdir, "Q-Former tokenizer")
