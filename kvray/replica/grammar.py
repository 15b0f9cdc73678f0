"""Structured outputs: a request's ``StructuredOutputs`` as an xgrammar grammar, compiled off the
step loop and cached, and the per-request matcher whose token mask the sampler applies.

* ``build_grammar(spec)`` turns a constraint into an ``xgrammar.Grammar`` (no tokenizer needed:
  the Router calls it to refuse a schema the library cannot handle with a 400 before any replica
  sees the request); ``GrammarError`` carries the library's message, cleaned up.
* ``GrammarCache`` (one per engine) compiles grammars against the engine's vocabulary in a
  background thread, one ``Future`` per distinct constraint (LRU-bounded), so a schema sent by
  many requests compiles once and the step loop never waits for a compile: a request whose
  grammar is not ready yet waits outside the scheduler (``Compiling``).
* ``GrammarState`` (one per request) holds the matcher; ``fill_masks`` fills the token bitmasks
  of the structured rows of a batch at once (xgrammar's batch matcher, in parallel threads) and
  ``apply_masks`` applies them on the logits' device to just those rows.

JSON is generated on one line with fixed separators (``{"name": "John Smith", "age": 42}``: no
whitespace but the ``", "`` and ``": "`` separators), so a model cannot wander off into endless
whitespace, and the request ends as soon as the value is complete. A grammar cannot make a model
finish a value, though: an unbounded integer, string or array can run until ``max_tokens``
(``finish_reason: "length"``, not valid JSON), as random-weight models often do.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from kvray.replica.sampling_params import StructuredOutputs

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept per engine (by constraint)
_PREFIX = re.compile(r"^\[[0-9:]+\] [^ ]+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """The grammar library cannot compile this constraint (the message says why)."""


def _clean(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _PREFIX.sub("", msg)


def build_grammar(spec: StructuredOutputs):
    """The constraint as an ``xgrammar.Grammar``; ``GrammarError`` naming the problem."""
    import xgrammar as xgr

    try:
        if spec.json_schema is not None:
            try:
                json.loads(spec.json_schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
            return _strict_strings(xgr.Grammar.from_json_schema(spec.json_schema, any_whitespace=False))
        if spec.json_object:
            return _strict_strings(xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False))
        if spec.regex is not None:
            return xgr.Grammar.from_regex(spec.regex)
        if spec.choice is not None:  # JSON string literals are EBNF string literals
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in spec.choice))
        if spec.grammar is not None:
            return xgr.Grammar.from_ebnf(spec.grammar)
        return xgr.Grammar.from_structural_tag(spec.structural_tag)
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - the library raises RuntimeError/ValueError/its own types
        raise GrammarError(f"cannot compile the {spec.kind.replace('_', ' ')}: {_clean(e)}") from None


# xgrammar 0.2.9 writes the characters of a length-bounded JSON string (maxLength) as any but the
# quote, the backslash, CR and LF: it lets the other control characters through, which JSON
# forbids unescaped (a parser then rejects the output). Its unbounded strings exclude them all.
_LOOSE_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_CHAR = '[^\\0-\\x1f\\"\\\\]'


def _strict_strings(grammar):
    import xgrammar as xgr

    text = str(grammar)
    if _LOOSE_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHAR, _JSON_CHAR))


@functools.lru_cache(maxsize=512)
def compile_error(spec: StructuredOutputs) -> str | None:
    """Why the grammar library cannot compile ``spec`` (None: it can), without a vocabulary:
    what the Router checks before a request goes anywhere. Cached per constraint."""
    try:
        build_grammar(spec)
    except GrammarError as e:
        return str(e)
    return None


class GrammarCache:
    """Compiled grammars for one engine's vocabulary; compiles in one background thread."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int], cache_size: int = CACHE_SIZE):
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop_ids = sorted(stop_token_ids)
        self._compiler = None  # made in the worker on first use (the vocabulary scan takes a moment)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvray-grammar")
        self._cache: OrderedDict[StructuredOutputs, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._batch = None

    def get(self, spec: StructuredOutputs) -> Future:
        """A future of the compiled grammar (done at once when cached)."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None:  # a failed compile stays cached too: it fails the same way again
                self._cache.move_to_end(spec)
                return fut
            fut = self._cache[spec] = self._pool.submit(self._compile, spec)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def _compile(self, spec: StructuredOutputs):
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self._stop_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return self._compiler.compile_grammar(build_grammar(spec))

    def state(self, spec: StructuredOutputs) -> "GrammarState":
        return GrammarState(self.get(spec))

    # ---- the masks of one batch ------------------------------------------------------------
    def fill_masks(self, states: list["GrammarState"]) -> torch.Tensor:
        """The token bitmasks of ``states`` (one row each; int32 on the host)."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(states), self.vocab_size)
        if len(states) == 1:
            states[0].matcher.fill_next_token_bitmask(bitmask, 0)
        else:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
            self._batch.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask)
        return bitmask

    def apply_masks(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
        """Mask, in place, the tokens each row's grammar forbids (to -inf), on the logits' device."""
        import torch
        import xgrammar as xgr

        index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        sub = logits.index_select(0, index)
        # on the GPU, plain torch ops: xgrammar's default there is a Triton kernel that would compile
        # while serving, at the first structured request (kvray compiles nothing after startup)
        backend = "cpu" if logits.device.type == "cpu" else "torch_native"
        xgr.apply_token_bitmask_inplace(sub, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size,
                                        backend=backend)
        logits.index_copy_(0, index, sub)


class GrammarState:
    """One request's grammar: its compile future, then its matcher."""

    def __init__(self, future: Future):
        self.future = future
        self.matcher = None

    def ready(self) -> bool:
        return self.future.done()

    def start(self) -> None:
        """Make the matcher (the future is done; raises ``GrammarError`` if the compile failed)."""
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(self.future.result())

    def accept(self, token: int) -> bool:
        """Advance past ``token``; True when the grammar is now complete (the request ends)."""
        if not self.matcher.accept_token(token):
            raise ValueError(f"token {token} is not allowed by the request's grammar")
        return self.matcher.is_terminated()


class Compiling:
    """The requests whose grammar is still compiling: they wait here, outside the scheduler, so
    the step loop never waits for a compile."""

    def __init__(self):
        self._seqs: list = []

    def __len__(self) -> int:
        return len(self._seqs)

    def add(self, seq) -> None:
        self._seqs.append(seq)

    def take(self, idle: bool) -> tuple[list, list[tuple]]:
        """``(ready, failed)``: the requests whose grammar is compiled now (their matcher started),
        and ``(request, error)`` of those whose compile failed; aborted ones are dropped. With
        ``idle`` (nothing else to run) it waits a moment for a compile instead of spinning."""
        if idle:
            wait([s.grammar.future for s in self._seqs], timeout=0.01, return_when=FIRST_COMPLETED)
        ready, failed, still = [], [], []
        for seq in self._seqs:
            if seq.is_finished:
                continue  # aborted while compiling
            if not seq.grammar.ready():
                still.append(seq)
                continue
            try:
                seq.grammar.start()
            except Exception as e:  # noqa: BLE001 - the library could not compile this request's grammar
                failed.append((seq, e))
                continue
            ready.append(seq)
        self._seqs = still
        return ready, failed
