"""Incremental detokenization with stop strings, for streaming.

A streamed text must never contain any part of a stop string, so the stream holds back the longest
tail of the text that could still become a stop string, and the bytes of an incomplete UTF-8
character, until the next token decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Feed the growing token list; get the new text that is safe to show, and whether a stop hit."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""  # final text so far (cut at the stop string once one is found)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, ids: Sequence[int], *, final: bool = False) -> str:
        """Return the text delta after the token list grew to `ids`; `final` flushes what is held back."""
        if self.tokenizer is None or self.stopped:
            return ""
        full = self.tokenizer.decode(list(ids))
        if self.stop:
            start = max(0, self.emitted - max(map(len, self.stop)))
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = full[:min(hits)]
                return self._emit(len(self.text))
        self.text = full
        if final:
            return self._emit(len(full))
        ready = len(full)
        if full.endswith("\ufffd"):  # an incomplete multi-byte character
            ready = len(full.rstrip("\ufffd"))
        ready -= self._stop_prefix_tail(full[:ready])
        return self._emit(max(ready, self.emitted))

    def _stop_prefix_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-k:]):
                    best = k
                    break
        return best

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
