"""SLO classes: which latency targets a request carries (pure Python)."""
from __future__ import annotations

from dataclasses import dataclass

CUSTOM_CLASS = "custom"


@dataclass(frozen=True)
class SLOTarget:
    name: str
    ttft_ms: float
    tpot_ms: float
    priority: float = 1.0

    def attained(self, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Both targets met (a request with no second token has no TPOT to miss)."""
        if ttft_s is None or ttft_s * 1000.0 > self.ttft_ms:
            return False
        return tpot_s is None or tpot_s * 1000.0 <= self.tpot_ms


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
    return SLOTarget(name if name is not None else CUSTOM_CLASS, ttft, tpot, base.priority)
