"""SLO classes: the latency targets a request carries, how one is chosen for a request, whether
a request met it, and what the router does when no replica can (pure Python, a leaf module)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

CUSTOM_CLASS = "custom"
ON_INFEASIBLE = ("queue", "reject", "best_effort")


@dataclass(frozen=True)
class SLOTarget:
    """A request's latency targets: the one record of them, carried from the Router's ``prepare``
    through the ``RoutingHint`` (the router's policies and book) and ``SamplingParams`` (the
    engine's deadline scheduler and its stats) to the scheduler.

    One class: TTFT and TPOT targets (ms, as configured and as the headers give them; ``ttft_s``
    and ``tpot_s`` are the same in seconds, the unit every consumer computes in; None: no
    target), its weight for deadline scheduling, and what the SLO-aware router does with a
    request no replica can serve in time: hold it until it can (``queue``; refused once it no
    longer could), refuse it at once with a 429 (``reject``), or send it to the best replica
    anyway (``best_effort``). ``NO_SLO`` is a request without targets."""

    name: str
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    priority: float = 1.0
    on_infeasible: str = "queue"
    ttft_s: float | None = field(init=False, repr=False, compare=False)
    tpot_s: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.on_infeasible not in ON_INFEASIBLE:
            raise ValueError(f"SLO class {self.name!r}: on_infeasible must be one of {', '.join(ON_INFEASIBLE)}")
        for name in ("ttft_ms", "tpot_ms", "priority"):
            v = getattr(self, name)
            if v is None and name != "priority":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"invalid SLO target {name}={v!r}: must be a finite number > 0")
        object.__setattr__(self, "ttft_s", self.ttft_ms / 1000.0 if self.ttft_ms else None)
        object.__setattr__(self, "tpot_s", self.tpot_ms / 1000.0 if self.tpot_ms else None)

    def deadline(self, arrival: float) -> float | None:
        """The absolute TTFT deadline of a request that arrived at ``arrival`` (None: no target)."""
        return arrival + self.ttft_s if self.ttft_s else None

    def attained(self, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Both targets met (a request with no second token has no TPOT to miss; one that never
        produced a token missed)."""
        if ttft_s is None or (self.ttft_ms is not None and ttft_s * 1000.0 > self.ttft_ms):
            return False
        return tpot_s is None or not self.tpot_ms or tpot_s * 1000.0 <= self.tpot_ms


NO_SLO = SLOTarget("none")


def urgency(deadline: float | None, priority: float, now: float) -> float:
    """The order in which requests waiting for a slot are served, lowest first: slack to the
    TTFT deadline divided by the class weight; requests already late go last, by deadline; no
    target at all goes after every on-time one. The engine's deadline scheduler and the router
    both order by it."""
    if deadline is None:
        return float("inf")
    slack = deadline - now
    return slack / max(priority, 1e-9) if slack >= 0 else 1e9 + deadline


class SLOError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _positive_ms(value: str, header: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SLOError(f"header {header} must be a number of milliseconds, got {value!r}", header) from None
    if not (v > 0) or v == float("inf"):
        raise SLOError(f"header {header} must be > 0, got {value!r}", header)
    return v


def resolve_slo(classes: dict[str, SLOTarget], default_class: str, *, header_class: str | None = None,
                body_class: str | None = None, header_ttft_ms: str | None = None,
                header_tpot_ms: str | None = None) -> SLOTarget:
    """Pick the request's targets.

    Precedence: the ``x-slo-class`` header, then the ``slo_class`` body field, then explicit
    ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` headers (a target left out comes from the default
    class; the class is reported as ``custom``), else the default class. Explicit headers
    given together with a class override that class's targets.
    """
    name = header_class if header_class else body_class
    if name is not None:
        if name not in classes:
            param = "x-slo-class" if header_class else "slo_class"
            raise SLOError(f"unknown SLO class {name!r}; known: {', '.join(sorted(classes))}", param)
        base = classes[name]
    else:
        base = classes[default_class]
    if header_ttft_ms is None and header_tpot_ms is None:
        return base
    ttft = _positive_ms(header_ttft_ms, "x-slo-ttft-ms") if header_ttft_ms is not None else base.ttft_ms
    tpot = _positive_ms(header_tpot_ms, "x-slo-tpot-ms") if header_tpot_ms is not None else base.tpot_ms
    return SLOTarget(name if name is not None else CUSTOM_CLASS, ttft, tpot, base.priority, base.on_infeasible)
