"""Per-process shared router state, keyed by (application, deployment) (pure Python).

The Serve plug-in runs on Ray Serve's router event loop and the ingress on its own; both
look up the same ``LoadBook`` here, so the ingress can export per-replica gauges and (for an
SLO-aware policy) make admission decisions on the state the plug-in keeps. The plug-in
module is shipped to the handle by value (cloudpickle), so this state must live in a module
that is imported by name, like this one.
"""
from __future__ import annotations

import threading

from kvray.router.load_book import LoadBook
from kvray.router.policy import RoutingPolicy, make_policy

_lock = threading.Lock()
_books: dict[tuple[str, str], LoadBook] = {}
_policies: dict[tuple[str, str], RoutingPolicy] = {}


def get_book(app_name: str, deployment_name: str) -> LoadBook:
    key = (app_name, deployment_name)
    with _lock:
        book = _books.get(key)
        if book is None:
            book = _books[key] = LoadBook()
        return book


def set_policy(app_name: str, deployment_name: str, name: str, options: dict | None = None) -> RoutingPolicy:
    policy = make_policy(name, **(options or {}))
    with _lock:
        _policies[(app_name, deployment_name)] = policy
    return policy


def get_policy(app_name: str, deployment_name: str) -> RoutingPolicy | None:
    with _lock:
        return _policies.get((app_name, deployment_name))


def reset() -> None:
    """Forget everything (tests)."""
    with _lock:
        _books.clear()
        _policies.clear()
