"""Per-request sampling options (the shape vLLM users know)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvray.slo import NO_SLO, SLOTarget

MAX_INT = 2**31 - 1              # bound of every count a request may carry (max_tokens, top_k, ...)
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_GRAMMAR_CHARS = 1 << 20      # the largest schema / regex / grammar text a request may carry
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on what a request may generate: exactly one of these is set. The engine
    compiles it (``kvray.replica.grammar``, with xgrammar) off its step loop, caches it by this
    record, and masks every sampled token of the request to what the grammar allows; the
    request finishes (``"stop"``) when the grammar is complete.

    * ``json_schema``: a JSON schema, as JSON text; ``json_object``: any JSON object;
    * ``regex``; ``choice``: one of these strings, exactly;
    * ``grammar``: an EBNF grammar (xgrammar's dialect, GBNF-like, ``root ::= ...``);
    * ``structural_tag``: xgrammar's structural-tag JSON (free text with tagged, schema-checked
      regions: how tool calls are enforced).
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        set_ = [n for n in ("json_schema", "regex", "choice", "grammar", "structural_tag") if getattr(self, n) is not None]
        set_ += ["json_object"] if self.json_object is True else []
        if len(set_) != 1:
            raise ValueError(f"invalid structured outputs: exactly one constraint must be set, got {set_ or 'none'}")
        for n in ("json_schema", "regex", "grammar", "structural_tag"):
            v = getattr(self, n)
            if v is not None and (not isinstance(v, str) or not v or len(v) > MAX_GRAMMAR_CHARS):
                raise ValueError(f"invalid structured outputs: {n} must be a non-empty string of at most "
                                 f"{MAX_GRAMMAR_CHARS} characters")
        if self.choice is not None:
            if (not isinstance(self.choice, tuple) or not 1 <= len(self.choice) <= MAX_CHOICES
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise ValueError(f"invalid structured outputs: choice must be 1 to {MAX_CHOICES} non-empty strings")
        if not isinstance(self.json_object, bool):
            raise ValueError("invalid structured outputs: json_object must be a boolean")

    @property
    def kind(self) -> str:
        return "json_object" if self.json_object else next(
            n for n in ("json_schema", "regex", "choice", "grammar", "structural_tag") if getattr(self, n) is not None)


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature=0`` means greedy.

    Construction validates (a ``ValueError`` naming the bad field), once. Every integer has a
    range: nothing a client sends can overflow a tensor or a random generator in the step loop.
    A field assigned afterwards marks the params unchecked, and the engine's door
    (``AsyncLLMEngine.submit``, ``LLMEngine.make_sequence``) validates unchecked params again
    (``check``) before the request touches any shared state: each request is validated once,
    wherever it enters, however many processes it crosses.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives to return per token; 0 = only the chosen
    min_tokens: int = 0
    # The request's latency targets (kvray.slo): what deadline-aware scheduling reads. The Router
    # passes the same record its RoutingHint carries.
    slo: SLOTarget = NO_SLO
    structured_outputs: StructuredOutputs | None = None
    # vLLM's extension: the log-prob of every prompt token after the first, with this many top
    # alternatives per position (0: the prompt token's own only). Computed while the prompt is
    # prefilled; such a request uses the prefix cache only where it has them already.
    prompt_logprobs: int | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name != "_checked":
            object.__setattr__(self, "_checked", False)  # changed since it was validated

    def check(self) -> None:
        """Validate, unless nothing changed since the last validation (the engine's door)."""
        if not self._checked:
            self.validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        if isinstance(self.stop, str):
            stops = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            stops = list(self.stop)
        elif self.stop is not None:
            raise ValueError(f"invalid sampling parameter stop={self.stop!r}: must be a string or a list of strings")
        else:
            stops = []
        self._check_numbers()
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"invalid sampling parameter stop: at most {MAX_STOP_STRINGS} stop strings")
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"invalid sampling parameter stop={self.stop!r}: stop strings must be non-empty strings")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise self._bad("stop_token_ids", "must be a list of token ids")
            for t in self.stop_token_ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= MAX_INT:
                    raise self._bad("stop_token_ids", f"must be integers in [0, {MAX_INT}]")
        if not isinstance(self.slo, SLOTarget):
            raise self._bad("slo", "must be a kvray.slo.SLOTarget")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise self._bad("structured_outputs", "must be a kvray.StructuredOutputs")
        object.__setattr__(self, "_stop_list", stops)
        object.__setattr__(self, "_checked", True)

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

    def _check_numbers(self) -> None:
        def integer(name: str, lo: int, hi: int, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise self._bad(name, f"must be an integer in [{lo}, {hi}]")

        def number(name: str, ok, why: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise self._bad(name, why)

        integer("max_tokens", 1, MAX_INT)
        number("temperature", lambda v: v >= 0.0, "must be a finite number >= 0")
        number("top_p", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
        integer("top_k", -1, MAX_INT)
        if self.top_k == 0:
            raise self._bad("top_k", "must be -1 (disabled) or an integer >= 1")
        integer("logprobs", 0, MAX_LOGPROBS, allow_none=True)
        integer("prompt_logprobs", 0, MAX_LOGPROBS, allow_none=True)
        integer("seed", SEED_MIN, SEED_MAX, allow_none=True)
        integer("min_tokens", 0, self.max_tokens)
        if not isinstance(self.ignore_eos, bool):
            raise self._bad("ignore_eos", "must be a boolean")
