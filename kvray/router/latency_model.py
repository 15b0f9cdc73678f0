"""Step-time model of a replica and the router's view of one replica. Pure Python, no Ray.

``StepTimeModel`` predicts the duration of one engine step::

    t = a + b * batched_tokens + c * context_tokens + d * num_seqs      (seconds)

and is fitted online from the step records a replica reports in its stats
(``stats["step_times"]`` = ``[(t_end, duration_s, batched, context, num_seqs), ...]``) by
weighted least squares with optional exponential forgetting. The fit is regularised towards
prior coefficients (a ridge penalty worth ``prior_weight`` typical steps), so before enough data,
or when the data cannot separate two terms (pure decode steps have ``batched == num_seqs``), the
prior decides along the unidentified direction. Coefficients are constrained to be >= 0
(exact non-negative least squares over the 4 variables, by enumerating active sets).

``SLOReplicaState`` is the router's picture of one replica: the last polled stats dict plus what the
router itself did since (dispatches, first tokens seen, completions) and the requests it has in
flight there, so estimates stay fresh between polls. See its docstring for the call contract.

Prediction helpers (``tpot_safe_chunk``, ``predict_ttft_s``, ``predict_tpot_s``) assume a replica
running chunked prefill: each step carries all running decodes plus up to ``chunk`` prompt tokens.
"""
from __future__ import annotations

import bisect
import json
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

# Feature scales: each coefficient is fitted as "seconds contributed at a typical magnitude".
_SCALES = (1.0, 1e3, 1e5, 1e2)


@dataclass(frozen=True)
class StepCoeffs:
    a: float  # seconds per step
    b: float  # seconds per batched (new) token
    c: float  # seconds per context token (sum of the scheduled sequences' context lengths)
    d: float  # seconds per scheduled sequence

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.a, self.b, self.c, self.d)

    def predict(self, batched: float, context: float, num_seqs: float) -> float:
        return self.a + self.b * batched + self.c * context + self.d * num_seqs


# Rough H100 + Qwen3-0.6B priors (the lead replaces them with GPU-fitted values).
DEFAULT_COEFFS = StepCoeffs(a=6e-3, b=4e-5, c=2e-8, d=3e-5)


def load_coeffs(path: str) -> StepCoeffs:
    """Read ``{"a":..,"b":..,"c":..,"d":..}`` (extra keys such as ``device``/``source`` ignored)."""
    with open(path) as f:
        raw = json.load(f)
    raw = raw.get("coeffs", raw)
    return StepCoeffs(*(float(raw[k]) for k in "abcd"))


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when (numerically) singular."""
    n = len(v)
    aug = [row[:] + [v[i]] for i, row in enumerate(m)]
    scale = max((abs(x) for row in m for x in row), default=0.0) or 1.0
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(aug[r][col]))
        if abs(aug[piv][col]) < 1e-12 * scale:
            return None
        aug[col], aug[piv] = aug[piv], aug[col]
        p = aug[col][col]
        for r in range(col + 1, n):
            f = aug[r][col] / p
            if f:
                for k in range(col, n + 1):
                    aug[r][k] -= f * aug[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (aug[r][n] - sum(aug[r][k] * x[k] for k in range(r + 1, n))) / aug[r][r]
    return x


def _nnls_quadratic(a: list[list[float]], g: list[float]) -> list[float] | None:
    """argmin_{x >= 0} x'Ax - 2g'x for a small positive-definite A (exact: every active set;
    the unconstrained solution first, which is the answer when it is non-negative)."""
    n = len(g)
    best, best_obj = None, math.inf
    for mask in range((1 << n) - 1, 0, -1):
        free = [i for i in range(n) if mask >> i & 1]
        sub = _solve([[a[i][j] for j in free] for i in free], [g[i] for i in free])
        if sub is None or any(x < 0 for x in sub):
            continue
        x = [0.0] * n
        for i, xi in zip(free, sub):
            x[i] = xi
        if mask == (1 << n) - 1:
            return x
        obj = sum(x[i] * a[i][j] * x[j] for i in range(n) for j in range(n)) - 2 * sum(g[i] * x[i] for i in range(n))
        if obj < best_obj:
            best, best_obj = x, obj
    return best if best is not None else [0.0] * n


class StepTimeModel:
    """Online (weighted, forgetting) non-negative least-squares fit of the step time.

    ``observe(batched, context, num_seqs, duration_s, weight=1)`` adds a record;
    ``observe_records(stats["step_times"])`` adds the replica's records not seen before (by
    ``t_end``). ``coeffs`` is the current fit (the prior until ``min_samples`` records);
    ``predict(batched, context, num_seqs)`` the predicted seconds. ``forgetting`` in (0, 1]
    multiplies the old statistics at each record (1.0: plain least squares).
    ``fixed=True`` freezes the prior (a simulator's ground truth).
    """

    def __init__(self, prior: StepCoeffs = DEFAULT_COEFFS, *, forgetting: float = 1.0, prior_weight: float = 2.0,
                 min_samples: int = 8, fixed: bool = False):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        self.prior = prior
        self.forgetting = forgetting
        self.prior_weight = prior_weight
        self.min_samples = min_samples
        self.fixed = fixed
        self._ata = [[0.0] * 4 for _ in range(4)]
        self._aty = [0.0] * 4
        self.num_samples = 0
        self._last_t_end = -math.inf
        self._coeffs: StepCoeffs | None = prior

    @classmethod
    def fixed_coeffs(cls, coeffs: StepCoeffs) -> StepTimeModel:
        return cls(coeffs, fixed=True)

    def observe(self, batched: float, context: float, num_seqs: float, duration_s: float, weight: float = 1.0) -> None:
        if self.fixed or not (duration_s >= 0 and math.isfinite(duration_s)) or weight <= 0:
            return
        z = (1.0, batched / _SCALES[1], context / _SCALES[2], num_seqs / _SCALES[3])
        lam = self.forgetting
        ata, aty = self._ata, self._aty
        for i in range(4):
            row = ata[i]
            wzi = weight * z[i]
            for j in range(4):
                row[j] = lam * row[j] + wzi * z[j]
            aty[i] = lam * aty[i] + wzi * duration_s
        self.num_samples += 1
        self._coeffs = None

    def observe_records(self, records) -> int:
        """Feed ``(t_end, duration_s, batched, context, num_seqs)`` tuples newer than the last seen."""
        n = 0
        for t_end, dur, batched, context, seqs in records:
            if t_end > self._last_t_end:
                self.observe(batched, context, seqs, dur)
                self._last_t_end = t_end
                n += 1
        return n

    @property
    def coeffs(self) -> StepCoeffs:
        if self._coeffs is None:
            self._coeffs = self._fit()
        return self._coeffs

    def _fit(self) -> StepCoeffs:
        if self.num_samples < self.min_samples:
            return self.prior
        mu = self.prior_weight
        prior = [p * s for p, s in zip(self.prior.as_tuple(), _SCALES)]
        a = [[self._ata[i][j] + (mu if i == j else 0.0) for j in range(4)] for i in range(4)]
        g = [self._aty[i] + mu * prior[i] for i in range(4)]
        theta = _nnls_quadratic(a, g)
        if theta is None or not all(math.isfinite(t) for t in theta):
            return self.prior
        return StepCoeffs(*(t / s for t, s in zip(theta, _SCALES)))

    def predict(self, batched: float, context: float, num_seqs: float) -> float:
        return self.coeffs.predict(batched, context, num_seqs)


# ---- predictions for a candidate replica ----------------------------------------------------

def tpot_safe_chunk(model, num_decodes: int, context_tokens: float, tpot_s: float | None, max_chunk: int,
                    min_chunk: int = 64) -> int:
    """The largest prompt chunk per step that keeps a step with ``num_decodes`` decodes within
    ``tpot_s`` (what a deadline-aware replica schedules), in [min_chunk, max_chunk]."""
    if tpot_s is None:
        return max_chunk
    base = model.predict(num_decodes, context_tokens, num_decodes + 1)
    per_tok = max((model.predict(num_decodes + 1000, context_tokens + 1000, num_decodes + 1) - base) / 1000, 1e-9)
    n = int((tpot_s - base) / per_tok)
    return max(min(max_chunk, min_chunk), min(max_chunk, n))


def predict_ttft_s(model, prefill_ahead: float, uncached_tokens: float, num_decodes: int, context_tokens: float,
                   chunk: int) -> float:
    """Seconds until the first token of a request whose ``uncached_tokens`` prompt tokens are
    processed after ``prefill_ahead`` queued prompt tokens, ``chunk`` tokens per step alongside
    ``num_decodes`` running decodes (plus half of the step in progress)."""
    chunk = max(1, int(chunk))
    total = max(0.0, prefill_ahead) + max(1.0, uncached_tokens)
    n_full = int(total // chunk)
    rem = total - n_full * chunk
    seqs = num_decodes + 1
    t = 0.5 * model.predict(num_decodes + min(chunk, prefill_ahead), context_tokens, seqs)
    t += n_full * model.predict(num_decodes + chunk, context_tokens + chunk, seqs)
    if rem > 0:
        t += model.predict(num_decodes + rem, context_tokens + rem, seqs)
    return t


def predict_tpot_s(model, num_decodes: int, context_tokens: float, prefill_chunk: float) -> float:
    """Mean seconds per output token for the running decodes when each step also carries
    ``prefill_chunk`` prompt tokens (0 when no prompt work is queued)."""
    return model.predict(num_decodes + prefill_chunk, context_tokens + prefill_chunk, num_decodes + (prefill_chunk > 0))


# ---- the router's view of a replica ---------------------------------------------------------

@dataclass
class InFlight:
    """A request this router sent to the replica and has not seen finish."""

    request_id: str
    prompt_tokens: int
    uncached_tokens: int
    max_tokens: int
    dispatched_at: float
    deadline: float | None = None      # absolute TTFT deadline (router clock)
    tpot_s: float | None = None
    priority: float = 1.0
    first_token_at: float | None = None


class _Pending:
    """Own requests waiting for their first token, of one priority, sorted by deadline."""

    __slots__ = ("deadlines", "tokens", "ids")

    def __init__(self):
        self.deadlines: list[float] = []
        self.tokens: list[int] = []
        self.ids: list[str] = []

    def add(self, r: InFlight) -> None:
        d = math.inf if r.deadline is None else r.deadline
        i = bisect.bisect_right(self.deadlines, d)
        self.deadlines.insert(i, d)
        self.tokens.insert(i, r.uncached_tokens)
        self.ids.insert(i, r.request_id)

    def remove(self, r: InFlight) -> None:
        d = math.inf if r.deadline is None else r.deadline
        i = bisect.bisect_left(self.deadlines, d)
        while self.ids[i] != r.request_id:
            i += 1
        del self.deadlines[i], self.tokens[i], self.ids[i]

    def tokens_between(self, lo: float, hi: float) -> int:
        """Tokens of requests with lo <= deadline <= hi."""
        a = bisect.bisect_left(self.deadlines, lo)
        b = bisect.bisect_right(self.deadlines, hi)
        return sum(self.tokens[a:b]) if b > a else 0


@dataclass
class SLOReplicaState:
    """What the router knows about one replica (pure data; the router owns and mutates it).

    Call contract (router clock ``now`` in seconds, the same clock for every call):

    * ``update_stats(stats, taken_at)`` whenever a poll of the replica's routing stats
      (``LLMEngine.stats()`` keys; optional extras ``max_num_batched_tokens``,
      ``scheduling_policy``, ``min_tpot_ms``) returns; ``taken_at`` is when the replica produced
      them. Router events at or before ``taken_at`` are folded into the snapshot; later ones stay
      as deltas. Step records feed ``model``.
    * ``on_dispatch(request_id, prompt_tokens, max_tokens, block_hashes, now, cached_tokens=,
      deadline=, tpot_s=, priority=)`` right after sending a request there;
      ``on_first_token(request_id, now)`` when its first token comes back;
      ``on_complete(request_id, now, num_output_tokens)`` when it ends (any reason).
    * Estimates (``num_requests``, ``queued_prefill_tokens``, ``num_decoding``,
      ``context_tokens``, ``free_blocks``, ``min_tpot_s()``, ``prefill_ahead_of()``,
      ``prefill_rates()``, ``prefix_hit_blocks()``) combine the snapshot with those deltas and
      the router's own in-flight requests; each costs O(classes), not O(requests).
    """

    replica_id: str
    stats: dict = field(default_factory=dict)
    stats_time: float = -math.inf
    max_num_batched_tokens: int = 8192
    scheduler: str = "deadline"   # the replica's scheduling policy ("fcfs": no reordering, no TPOT guard)
    rate_window_s: float = 10.0   # time constant of the per-class dispatch-rate estimate
    prefix_capacity: int = 65536  # block hashes remembered (LRU); capped by the replica's pool
    model: StepTimeModel = field(default_factory=StepTimeModel)
    inflight: dict[str, InFlight] = field(default_factory=dict)
    _prefix: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _events: deque = field(default_factory=deque, repr=False)   # (t, d_req, d_prefill, d_decoding, d_tokens)
    _delta: list = field(default_factory=lambda: [0, 0, 0, 0], repr=False)
    _rates: dict = field(default_factory=dict, repr=False)    # priority -> [tokens/s, as of time]
    _pending: dict = field(default_factory=dict, repr=False)  # priority -> _Pending
    _own: list = field(default_factory=lambda: [0, 0], repr=False)  # [pending prompt tokens, decoding]
    _tpots: dict = field(default_factory=dict, repr=False)    # tpot_s -> count of own requests

    # ---- updates ---------------------------------------------------------------------------
    def update_stats(self, stats: dict, taken_at: float) -> None:
        self.stats = stats
        self.stats_time = taken_at
        ev = self._events
        while ev and ev[0][0] <= taken_at:
            _, *d = ev.popleft()
            self._delta[:] = [x - y for x, y in zip(self._delta, d)]
        self.max_num_batched_tokens = int(stats.get("max_num_batched_tokens", self.max_num_batched_tokens))
        self.scheduler = str(stats.get("scheduling_policy", self.scheduler))
        total = stats.get("num_total_blocks")
        if total:
            self.prefix_capacity = min(self.prefix_capacity, int(total))
        if stats.get("step_times"):
            self.model.observe_records(stats["step_times"])

    def _event(self, now: float, *d: int) -> None:  # d = (requests, prefill tokens, decoding, tokens)
        self._events.append((now, *d))
        self._delta[:] = [x + y for x, y in zip(self._delta, d)]

    def on_dispatch(self, request_id: str, prompt_tokens: int, max_tokens: int, block_hashes=(), now: float = 0.0,
                    *, cached_tokens: int = 0, deadline: float | None = None, tpot_s: float | None = None,
                    priority: float = 1.0) -> None:
        if request_id in self.inflight:
            self.on_complete(request_id, now)  # re-dispatched: forget the first placement
        uncached = max(1, prompt_tokens - cached_tokens)
        r = InFlight(request_id, prompt_tokens, uncached, max_tokens, now, deadline, tpot_s, priority)
        self.inflight[request_id] = r
        self._event(now, 1, uncached, 0, prompt_tokens)
        self._pending.setdefault(priority, _Pending()).add(r)
        self._own[0] += uncached
        if tpot_s:
            self._tpots[tpot_s] = self._tpots.get(tpot_s, 0) + 1
        rate = self._rates.setdefault(priority, [0.0, now])
        rate[0] = rate[0] * math.exp(-max(0.0, now - rate[1]) / self.rate_window_s) + uncached / self.rate_window_s
        rate[1] = now
        prefix = self._prefix
        for h in block_hashes:
            prefix[h] = None
            prefix.move_to_end(h)
        while len(prefix) > self.prefix_capacity:
            prefix.popitem(last=False)

    def on_first_token(self, request_id: str, now: float) -> None:
        r = self.inflight.get(request_id)
        if r is None or r.first_token_at is not None:
            return
        r.first_token_at = now
        self._pending[r.priority].remove(r)
        self._own[0] -= r.uncached_tokens
        self._own[1] += 1
        self._event(now, 0, -r.uncached_tokens, 1, 0)

    def on_complete(self, request_id: str, now: float, num_output_tokens: int = 0) -> None:
        r = self.inflight.pop(request_id, None)
        if r is None:
            return
        if r.tpot_s:
            self._tpots[r.tpot_s] -= 1
            if not self._tpots[r.tpot_s]:
                del self._tpots[r.tpot_s]
        if r.first_token_at is None:  # ended before its first token (abort/error)
            self._pending[r.priority].remove(r)
            self._own[0] -= r.uncached_tokens
            self._event(now, -1, -r.uncached_tokens, 0, -r.prompt_tokens - num_output_tokens)
        else:
            self._own[1] -= 1
            self._event(now, -1, 0, -1, -r.prompt_tokens - num_output_tokens)

    # ---- estimates -------------------------------------------------------------------------
    @property
    def num_ongoing(self) -> int:
        """Requests this router sent there and has not seen finish (Ray Serve's queue length)."""
        return len(self.inflight)

    @property
    def num_requests(self) -> int:
        s = self.stats
        return max(len(self.inflight), s.get("num_running", 0) + s.get("num_waiting", 0) + self._delta[0])

    @property
    def queued_prefill_tokens(self) -> int:
        return max(self._own[0], self.stats.get("queued_prefill_tokens", 0) + self._delta[1])

    @property
    def num_decoding(self) -> int:
        return max(self._own[1], self.stats.get("num_running", 0) + self._delta[2])

    @property
    def context_tokens(self) -> int:
        """Tokens held or queued on the replica (KV in use + queued prompts), estimated."""
        return max(0, self.stats.get("tokens_in_flight", 0) + self._delta[3])

    outstanding_tokens = context_tokens

    @property
    def free_blocks(self) -> int | None:
        s = self.stats
        if "num_free_blocks" not in s:
            return None
        return s["num_free_blocks"] - self._delta[3] // s.get("block_size", 16)

    @property
    def max_num_seqs(self) -> int:
        return int(self.stats.get("max_num_seqs", 256))

    def min_tpot_s(self) -> float | None:
        """The tightest TPOT target among requests there (router's own, plus a stats hint)."""
        hint = self.stats.get("min_tpot_ms")
        vals = list(self._tpots) + ([hint / 1000.0] if hint else [])
        return min(vals) if vals else None

    def prefill_rates(self, now: float, priority: float) -> tuple[float, float]:
        """Prompt tokens per second recently sent here: (by every class, by classes above
        ``priority`` -- which a deadline-ordered replica serves first even when they arrive later)."""
        w = self.rate_window_s
        total = above = 0.0
        for p, (r, t) in self._rates.items():
            x = r * math.exp(-(now - t) / w) if now > t else r
            total += x
            if p > priority:
                above += x
        return total, above

    def prefill_ahead_of(self, deadline: float | None, priority: float, now: float) -> int:
        """Queued prompt tokens the replica would process before a new request with this TTFT
        ``deadline``/``priority``: all of them for FCFS; for a deadline-ordered replica (slack
        divided by priority, late requests last), own pending requests that are more urgent plus
        what the snapshot shows that the router cannot attribute (assumed ahead)."""
        if self.scheduler == "fcfs":
            return self.queued_prefill_tokens
        key = _urgency(deadline, priority, now)
        ahead = 0
        for p, pend in self._pending.items():
            if not pend.ids:
                continue
            if key < 1e9:  # on time: on-time requests with (d - now) / p <= key
                ahead += pend.tokens_between(now, now + key * p)
            elif deadline is not None:  # late: every on-time request, then late ones by deadline
                ahead += pend.tokens_between(now, math.inf) + pend.tokens_between(-math.inf, min(deadline, now))
            else:
                ahead += sum(pend.tokens)
        unknown = max(0, self.stats.get("queued_prefill_tokens", 0) + self._delta[1] - self._own[0])
        return ahead + unknown

    def prefix_hit_blocks(self, block_hashes) -> int:
        """How many leading block hashes of a prompt the replica is believed to hold."""
        n = 0
        prefix = self._prefix
        for h in block_hashes:
            if h not in prefix:
                break
            n += 1
        return n


def _urgency(deadline: float | None, priority: float, now: float) -> float:
    """Slack to the TTFT deadline divided by the class weight (lower = more urgent); the key a
    deadline-ordered replica sorts by (kvray.replica.deadline_policy uses the same rule)."""
    if deadline is None:
        return math.inf
    slack = deadline - now
    return slack / max(priority, 1e-9) if slack >= 0 else 1e9 + deadline  # late ones go last
