"""Log-probs as the APIs show them: token ids to their strings (cached), and the completions,
chat and prompt log-prob objects (pure). The text itself comes from
``kvray.replica.detokenizer.TextStream``, the engine's own stop-string path."""
from __future__ import annotations


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
