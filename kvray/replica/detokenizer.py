"""Incremental detokenization that never splits a multi-byte UTF-8 character."""
from __future__ import annotations

_CONTEXT_TOKENS = 6  # prompt tokens decoded as context, so leading-space rules match a full decode


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each call decodes only a short window: the tokens since the last emitted boundary, with the
    previous boundary's tokens as context. Text is held back while the window ends in an
    incomplete UTF-8 sequence (the tokenizer renders it as U+FFFD), so a character split across
    tokens appears once, whole.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids or [])[-_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._vocab_limit = len(tokenizer)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i < self._vocab_limit]  # padded model vocabularies: ids past the tokenizer are blank
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens and return the newly completed text (possibly empty)."""
        self._ids.extend(new_ids)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a request: emit whatever is held back, replacement chars included."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def add_until_stop(self, new_ids: list[int], stops: list[str]) -> str | None:
        """``add(new_ids)``; if that makes one of ``stops`` appear, cut the text just before the
        earliest one and return it (None: no stop string yet)."""
        before = len(self.text)
        if not self.add(new_ids):
            return None
        window_start = max(0, before - max(len(s) for s in stops) + 1)
        best = None
        for s in stops:
            i = self.text.find(s, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[:best[0]]
        return best[1]
