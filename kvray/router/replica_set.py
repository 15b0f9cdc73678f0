"""Serve's replica set of a deployment, from the request-router plug-in to the Router's replica
book (pure Python, no Ray).

Serve gives the replica set, with each replica's latest ``record_routing_stats`` (a
``ReplicaStats``), only to the request-router plug-in (``kvray.router.serve_router``), on Serve's
router loop (a thread of its own). The book it belongs in lives on the Router's event loop. So
the plug-in ``publish``es each broadcast to the deployment's ``ReplicaSetFeed``, which posts it to
the loop of the Router that ``subscribe``d, where the book takes it in (``ReplicaBook.sync``):
the book is only ever touched on one thread.

One feed per (application, deployment) and process (``feed``). The plug-in module is shipped
to the handle by value, so this state lives in a module that is imported by name.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

_feeds: dict[tuple[str, str], "ReplicaSetFeed"] = {}
_feeds_lock = threading.Lock()


class ReplicaSetFeed:
    def __init__(self):
        self._lock = threading.Lock()  # publish (Serve's router thread) against subscribe (the Router's loop)
        self._latest: dict[str, Any] | None = None
        self._sink: tuple[asyncio.AbstractEventLoop, Callable[[dict], None]] | None = None

    def publish(self, stats_by_replica: dict[str, Any]) -> None:
        """Serve's latest replica set: ``{replica id: ReplicaStats or None}``."""
        with self._lock:
            self._latest = stats_by_replica
            sink = self._sink
        if sink is not None:
            _post(sink, stats_by_replica)

    def subscribe(self, loop: asyncio.AbstractEventLoop, on_replicas: Callable[[dict], None]) -> None:
        """Call ``on_replicas(stats_by_replica)`` on ``loop`` with every broadcast from now on
        (and the latest one, if any, at once)."""
        with self._lock:
            self._sink = sink = (loop, on_replicas)
            latest = self._latest
        if latest is not None:
            _post(sink, latest)


def _post(sink, stats_by_replica: dict) -> None:
    loop, fn = sink
    try:
        loop.call_soon_threadsafe(fn, stats_by_replica)
    except RuntimeError:  # that Router's loop is closed: nobody reads the book any more
        pass


def feed(app_name: str, deployment_name: str) -> ReplicaSetFeed:
    """The process's feed for one deployment (made on first use)."""
    with _feeds_lock:
        f = _feeds.get((app_name, deployment_name))
        if f is None:
            f = _feeds[(app_name, deployment_name)] = ReplicaSetFeed()
        return f
