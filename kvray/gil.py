"""The GIL switch interval of kvray's serving processes.

A serving process runs several busy threads: Ray Serve's system event loop, the user-code event
loop, the engine's step loop or its reader. CPython lets a thread that wants the GIL wait up to
the switch interval (5 ms by default) while another runs Python code, and one request crosses
such hand-offs many times on its way in and its first token on the way out. kvray lowers the
interval in every serving process; 0.5 ms measured best on an H200 (0.2 ms was slower:
``benchmarks/RESULTS.md``, "Serving overhead, second pass").
"""
from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0005


def shorten_switch_interval() -> None:
    """Lower this process's GIL switch interval to ``SWITCH_INTERVAL_S`` (never raise it)."""
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
