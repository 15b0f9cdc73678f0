"""Scheduling policies: the hook through which the scheduler decides order and preemption.

The scheduler asks a policy three things each step:

* ``order_waiting(waiting, now)``: the order in which to try admitting waiting sequences.
  Returning ``waiting`` itself (the scheduler's deque, unchanged) means "as queued" and takes
  the scheduler's O(admitted) fast path; any other iterable (e.g. a sorted list) is honoured
  too. Admission stops at the first sequence that cannot be admitted, so the order is strict.
* ``pick_victim(candidates)``: which running sequence to preempt when KV blocks run out.
  ``candidates`` are running sequences not yet scheduled this step, in running order, and
  always include the sequence that needs the blocks (picking it means it yields this step).
* ``prefill_token_budget(running, max_num_batched_tokens, now)``: the most prompt/recompute
  tokens (new admissions plus continuing chunked prefills) to schedule this step; decodes
  are never limited by it. A deadline-aware policy can lower it to protect running decodes.
* ``prefill_grants(prefills, waiting, prefill_budget, now, free_slots)``: each running chunked
  prefill's share of those tokens this step (``prefills`` in running order); what they leave
  goes to the waiting sequences. The default serves the running prefills first, in running
  order. A deadline-aware policy grants by urgency across running and waiting sequences, so
  that a long prompt being prefilled does not hold a more urgent one back.

Policies must not mutate the arguments.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections import deque

    from kvray.replica.sequence import Sequence


class SchedulingPolicy:
    """Base class; the defaults are first-come-first-served."""

    name = "base"

    def order_waiting(self, waiting: deque[Sequence], now: float) -> Iterable[Sequence]:
        return waiting

    def pick_victim(self, candidates: list[Sequence]) -> Sequence:
        # The most recently arrived; among equal arrival times the latest in running order.
        best = candidates[-1]
        for s in reversed(candidates):
            if s.metrics.arrival_time > best.metrics.arrival_time:
                best = s
        return best

    def prefill_token_budget(self, running: list[Sequence], max_num_batched_tokens: int, now: float) -> int:
        return max_num_batched_tokens

    def prefill_grants(self, prefills: list[Sequence], waiting: Iterable[Sequence], prefill_budget: int, now: float,
                       free_slots: int) -> list[int]:
        grants, left = [], prefill_budget
        for s in prefills:
            g = min(s.num_tokens - s.num_computed_tokens, left)
            grants.append(g)
            left -= g
        return grants


class FCFSPolicy(SchedulingPolicy):
    """Admit in arrival order (preempted sequences go back to the front); preempt the newest."""

    name = "fcfs"


_POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy}


def register_policy(name: str, cls: type[SchedulingPolicy]) -> None:
    """Make ``make_policy(name)`` build ``cls()`` (used by policies defined in other modules)."""
    _POLICIES[name] = cls


def make_policy(name: str | SchedulingPolicy | None) -> SchedulingPolicy:
    if name is None:
        return FCFSPolicy()
    if isinstance(name, SchedulingPolicy):
        return name
    cls = _POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduling policy {name!r}: available are {', '.join(sorted(_POLICIES))}")
    return cls()
