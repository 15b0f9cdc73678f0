"""When a request stops: the rules applied to each token the engine appends (pure Python).

In order: a structured-outputs grammar that is complete (its stop token came), an EOS token
(unless ``ignore_eos``) or one of ``stop_token_ids`` (both only after ``min_tokens``), a stop
string in the text (``kvray.replica.detokenizer.TextStream``: the same path the Router runs for
the text it sends), then ``max_tokens`` or the context length (``"length"``).
"""
from __future__ import annotations

from kvray.replica.sequence import Sequence


def stop_reason(seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int) -> tuple[str | None, str | int | None]:
    """``(finish reason, the stop string or token)`` for ``token``, just appended to ``seq``
    (``(None, None)``: it goes on). Feeds the request's text stream, if it has stop strings."""
    p = seq.params
    reason = stop = None
    n_out = seq.num_output_tokens
    if seq.grammar is not None and seq.grammar.accept(token):
        reason = "stop"  # the grammar is complete (its stop token came)
    elif n_out >= p.min_tokens:
        if not p.ignore_eos and token in eos_token_ids:
            reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            reason, stop = "stop", token
    text = seq.detokenizer
    if text is not None:  # the new token's text, cut before a stop string
        text.add((token,), False)
        if text.stop_string is not None and reason is None:
            reason, stop = "stop", text.stop_string
    if reason is None and (n_out >= p.max_tokens or seq.num_tokens >= max_model_len):
        reason = "length"
    if reason is not None and text is not None and text.stop_string is None:
        text.add((), True)  # the end: what the detokenizer held back, as the Router flushes it
    return reason, stop
