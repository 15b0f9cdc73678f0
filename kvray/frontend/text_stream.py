"""Router-side text for a token stream: incremental detokenization, stop strings, logprobs (pure).

Replicas stream token ids; the router turns them into text. Stop strings are cut the same way
the engine cuts them (the engine stops generating there; the router removes the stop string
and whatever followed it in the last token), and while a request runs, the last
``len(longest stop) - 1`` characters are held back so a stop string split across chunks is
never sent.
"""
from __future__ import annotations

from kvray.replica.detokenizer import IncrementalDetokenizer


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


class TextStream:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop_strings: list[str] | None = None):
        """``tokenizer``: anything with ``decode(ids, skip_special_tokens)`` and ``len()``
        (pass ``FastDecoder.wrap(hf_tokenizer)`` once, not per request)."""
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stops = [s for s in (stop_strings or []) if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.sent = 0  # characters of ``text`` already returned
        self.stop_string: str | None = None  # set once a stop string ended the text

    def add(self, token_ids: list[int], finished: bool) -> str:
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


class TokenStrings:
    """Token id -> its text, cached (for logprobs)."""

    def __init__(self, tokenizer, max_entries: int = 200_000):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}
        self._max = max_entries

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            try:
                s = self._tok.decode([token_id], skip_special_tokens=False)
            except Exception:  # an id past the tokenizer (padded vocabulary)
                s = ""
            if len(self._cache) < self._max:
                self._cache[token_id] = s
        return s


def by_string(strings: TokenStrings, pairs) -> dict[str, float]:
    """``{token text: log-prob}`` from ``(token id, log-prob)`` pairs; tokens of the same text
    (byte pieces of one character, say) keep the highest."""
    out: dict[str, float] = {}
    for t, lp in pairs:
        s = strings(t)
        if lp > out.get(s, float("-inf")):
            out[s] = lp
    return out


def completion_logprobs(strings: TokenStrings, token_ids: list[int], logprobs: list[float],
                        tops: list[dict[int, float] | None] | None, text_offset: int) -> tuple[dict, int]:
    """The legacy completions ``logprobs`` object for these tokens, and the next text offset."""
    tokens = [strings(t) for t in token_ids]
    offsets = []
    for s in tokens:
        offsets.append(text_offset)
        text_offset += len(s)
    top = None
    if tops is not None:
        top = [by_string(strings, (d or {}).items()) for d in tops]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top,
            "text_offset": offsets}, text_offset


def chat_logprobs(strings: TokenStrings, token_ids: list[int], logprobs: list[float],
                  tops: list[dict[int, float] | None] | None) -> dict:
    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        s = strings(t)
        alts = []
        if tops is not None and i < len(tops) and tops[i]:
            for at, alp in tops[i].items():
                a = strings(at)
                alts.append({"token": a, "logprob": alp, "bytes": list(a.encode("utf-8"))})
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": alts})
    return {"content": content}


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely of a prompt position's ``{token: log-prob}`` (the engine keeps the
    prompt token and its top alternatives)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def prompt_completion_logprobs(strings: TokenStrings, prompt_ids: list[int], plp: list[dict[int, float] | None],
                               k: int) -> dict:
    """The legacy completions ``logprobs`` object of an echoed prompt: nothing predicts its first
    token (``None``); the top ``k`` per position with the prompt token itself (none for k=0)."""
    tokens = [strings(t) for t in prompt_ids]
    offsets, at = [], 0
    for s in tokens:
        offsets.append(at)
        at += len(s)
    lps = [None] + [plp[i][prompt_ids[i]] for i in range(1, len(prompt_ids))]
    top = None
    if k:
        top = [None] + [by_string(strings, _top(plp[i], k) + [(prompt_ids[i], plp[i][prompt_ids[i]])])
                        for i in range(1, len(prompt_ids))]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def vllm_prompt_logprobs(strings: TokenStrings, prompt_ids: list[int], plp: list[dict[int, float] | None],
                         k: int) -> list[dict | None]:
    """vLLM's ``prompt_logprobs`` field: per prompt token ``{token id: {logprob, rank,
    decoded_token}}`` with its top ``k``; ``rank`` is known within the top ``k`` (else null)."""
    out: list[dict | None] = [None]
    for i in range(1, len(prompt_ids)):
        top = _top(plp[i], k)
        d = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": strings(t)} for r, (t, v) in enumerate(top)}
        t = prompt_ids[i]
        d.setdefault(str(t), {"logprob": plp[i][t], "rank": None, "decoded_token": strings(t)})
        out.append(d)
    return out
