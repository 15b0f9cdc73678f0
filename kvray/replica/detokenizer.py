"""Token ids to text: the one detokenizer and stop-string path of kvray.

``TextStream`` is what both sides run: the engine, for the requests with stop strings, to stop
generating where one appears (and for the offline API's text); the Router (and the async
engine's own outputs), for the text it sends. Same tokens, same code, same text. Underneath,
``IncrementalDetokenizer`` decodes a growing token list without splitting a multi-byte UTF-8
character, and ``FastDecoder`` calls a fast tokenizer's Rust backend directly.
"""
from __future__ import annotations

_CONTEXT_TOKENS = 6  # prompt tokens decoded as context, so leading-space rules match a full decode


class FastDecoder:
    """``decode``/``len`` straight from a Hugging Face fast tokenizer's Rust backend.

    transformers' ``decode`` wraps the backend's and adds ~6 us of Python per call; the
    detokenizer calls it twice per token. Only used when the wrapper would not change the
    text (no ``clean_up_tokenization_spaces``); otherwise the tokenizer itself is used.
    """

    def __init__(self, tokenizer):
        self._backend = tokenizer._tokenizer
        self._len = len(tokenizer)

    def __len__(self) -> int:
        return self._len

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @staticmethod
    def wrap(tokenizer):
        backend = getattr(tokenizer, "_tokenizer", None)
        if (backend is None or not hasattr(backend, "decode")
                or getattr(tokenizer, "clean_up_tokenization_spaces", True)):
            return tokenizer
        return FastDecoder(tokenizer)


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


class TextStream:
    """One request's generated text, cut before its first stop string.

    ``add(token_ids, finished)`` returns the text that may be sent now. While the request runs,
    the last ``len(longest stop) - 1`` characters are held back, so a stop string split across
    calls is never sent in part; once a stop string appears, ``text`` ends just before it (what
    followed it in the same token is dropped) and ``stop_string`` names it. ``finished`` flushes
    what the detokenizer still holds (an incomplete UTF-8 sequence at the very end).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int] | None, stop_strings: list[str] | None = None):
        """``tokenizer``: anything with ``decode(ids, skip_special_tokens)`` and ``len()`` (pass
        ``FastDecoder.wrap(hf_tokenizer)``, made once, not per request)."""
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stops = [s for s in (stop_strings or []) if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.sent = 0  # characters of ``text`` already returned
        self.stop_string: str | None = None  # set once a stop string ended the text

    def add(self, token_ids, finished: bool) -> str:
        """Add generated tokens; return the text that may be sent now."""
        if self.stop_string is None:
            before = len(self.text)
            if token_ids:
                self._detok.add(token_ids)
            if finished:
                self._detok.flush()
            self.text = self._detok.text
            if self._stops and len(self.text) > before:
                self._cut_at_stop(before)
        if self.stop_string is not None or finished:
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - max(0, self._longest - 1))
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def _cut_at_stop(self, before: int) -> None:
        start = max(0, before - self._longest + 1)
        best = None
        for s in self._stops:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            self.text = self.text[:best[0]]
            self.stop_string = best[1]
            self.sent = min(self.sent, len(self.text))
