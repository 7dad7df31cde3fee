"""Token ids arriving one piece at a time -> text deltas, with OpenAI's stop strings.

The text of an answer is always `tokenizer.decode(all ids so far)` (what `generate_text`
returns for the same ids); a delta is the part of it not sent yet. Text is held back while
it ends in an incomplete UTF-8 sequence (U+FFFD) or in what could be the start of a stop
string, so the deltas concatenate to exactly the final text.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False     # a stop string was found: the answer ends here
        self.text = ""

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that may still change or begin a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        if text.endswith("\ufffd"):
            hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
        return hold

    def add(self, ids: list[int]) -> str:
        """Feed new ids; returns the text that can be sent now ("" if none)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, text = True, text[:cut]
            self.text = text
            return self._delta(text)
        self.text = text
        return self._delta(text[:len(text) - self._held_back(text)])

    def finish(self) -> str:
        """The rest of the text once the answer is complete."""
        return self._delta(self.text)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):
            # the decoder rewrote text already sent (rare: a tokenizer whose decode is not
            # prefix-stable); send nothing now, the final text is still self.text
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
