"""Per-request event timestamps across kvray's serving processes, for latency breakdowns.

Off unless ``KVRAY_TRACE_DIR`` is set in the environment of the processes (``serve run`` passes
its environment to the Ray workers it starts). Each process then appends
``<request_id> <event> <time.monotonic()>`` lines to ``$KVRAY_TRACE_DIR/<pid>.events``; the
monotonic clock is one clock for every process of a machine. ``benchmarks/latency_breakdown.py``
turns the files into per-hop latencies. ``EVENTS`` is the order a request meets them.
"""
from __future__ import annotations

import os
import time

EVENTS = (
    "router_in",            # the Router's HTTP handler starts
    "router_submitted",     # request parsed, tokenized, admitted; the LLMReplica call is made
    "route_chosen",         # kvray's RequestRouter plug-in is asked for a replica
    "route_sent",           # Serve has sent the call to the replica (which accepted it)
    "replica_in",           # LLMReplica.generate starts
    "engine_submit",        # AsyncLLMEngine.submit sends it to the step loop
    "engine_add",           # the step loop takes the request in
    "engine_first_token",   # its first token is sampled (the step's end)
    "engine_emit",          # the step's results leave the step loop
    "engine_delta",         # AsyncLLMEngine hands its first results to its sink, on the event loop
    "router_channel_recv",  # the Router reads the first batch from its token channel
    "router_first_out",     # the Router has the first output, about to answer
)

_DIR = os.environ.get("KVRAY_TRACE_DIR")
ENABLED = bool(_DIR)
_file = None
_seen: set = set()


def trace(request_id: str, event: str, t: float | None = None, first_only: bool = False) -> None:
    """Record ``event`` of ``request_id`` (at ``t``, default now); ``first_only`` keeps only the first."""
    global _file
    if not ENABLED:
        return
    if first_only:
        key = (request_id, event)
        if key in _seen:
            return
        if len(_seen) > 1_000_000:
            _seen.clear()
        _seen.add(key)
    if _file is None:
        os.makedirs(_DIR, exist_ok=True)
        _file = open(os.path.join(_DIR, f"{os.getpid()}.events"), "a", buffering=1)
    _file.write(f"{request_id} {event} {time.monotonic() if t is None else t:.6f}\n")
