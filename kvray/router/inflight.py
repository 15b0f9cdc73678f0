"""What the replica book keeps of each request this router has in flight at a replica (pure Python)."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass
class InFlight:
    """A request this router sent to the replica and has not seen finish."""

    request_id: str
    prompt_tokens: int
    uncached_tokens: int
    cost: int                          # outstanding tokens it adds: uncached prompt + budgeted decode
    deadline: float | None = None      # absolute TTFT deadline
    tpot_s: float | None = None
    priority: float = 1.0
    first_token_at: float | None = None


class Pending:
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
