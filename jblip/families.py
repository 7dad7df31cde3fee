"""The language-model families jblip runs, and what the rest of the code needs to know of each.

This is the one place that maps a family name (`config.text.family`) to its
module class (implementing `jblip.language_model`'s contract), its HF
conversion table and its defaults; code elsewhere asks the registry instead of
comparing family names.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    module: str             # "package.module:Class" of the language model
    table: str              # conversion table module (HF keys relative to `language_model.`)
    encoder_decoder: bool   # the prompt feeds an encoder; generated tokens feed a decoder
    head_always_tied: bool = False  # the output head is always the token-embedding table

    @property
    def prompt_padding_side(self) -> str:
        """Decoder-only prompts are left-padded (the next token follows every row's last one);
        encoder inputs are right-padded as HF does."""
        return "right" if self.encoder_decoder else "left"

    @property
    def prompt_uses_positions(self) -> bool:
        """Whether prompt and generated tokens share the LM's position table
        (`max_position_embeddings` bounds their sum)."""
        return not self.encoder_decoder

    def module_class(self):
        path, name = self.module.split(":")
        return getattr(importlib.import_module(path), name)

    def hf_rules(self, text_config) -> list:
        """The table's rules for this text config (tables may pick rules by config: `rules_for`)."""
        table = importlib.import_module(self.table)
        return table.rules_for(text_config) if hasattr(table, "rules_for") else table.RULES


FAMILIES = {
    "llama": Family("llama", "jblip.llama:LlamaModel", "jblip.convert.tables.llama", encoder_decoder=False),
    "opt": Family("opt", "jblip.opt:OPTModel", "jblip.convert.tables.opt", encoder_decoder=False,
                  head_always_tied=True),
    "t5": Family("t5", "jblip.t5:T5Model", "jblip.convert.tables.t5", encoder_decoder=True),
}


def family(name_or_config) -> Family:
    """The registry entry for a family name, a text config or a ModelConfig."""
    name = name_or_config if isinstance(name_or_config, str) else name_or_config.family
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown language-model family {name!r}; jblip supports "
                         f"{', '.join(FAMILIES)}") from None


def tied_head(config) -> bool:
    """Whether the LM's output head is its token-embedding table (a ModelConfig or text config)."""
    text = getattr(config, "text", config)
    return family(text).head_always_tied or bool(getattr(text, "tie_word_embeddings", False))
