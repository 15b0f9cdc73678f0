"""``kvray serve CONFIG``: run a Serve config file as ``serve run`` does, and stop it gracefully.

``serve run`` stops on Ctrl-C with ``serve.shutdown()``, and Ray Serve 2.60 shuts down by
killing the HTTP proxies (Serve's own, or HAProxy) in its first step, before any replica drains:
every open connection is cut at once, whatever the timeouts say. A SIGTERM ends ``serve run``
(and the Ray instance it started) at once. ``kvray serve`` starts the same config the same way
(``ray.init``, Serve with the file's ``http_options`` and ``proxy_location``, the
applications), and on Ctrl-C or SIGTERM:

1. deletes the config's applications while the proxies still serve. Serve stops their replicas
   as it does on a scale-down: each Router refuses new requests, lets running ones go on for up
   to the app's ``graceful_shutdown_timeout_s`` and ends the rest with a ``server_shutdown``
   error (``kvray.frontend.drain``);
2. waits until the applications are gone, at most until Serve would kill their replicas
   (``drain_bound_s``);
3. shuts Serve down, and exits.

A second Ctrl-C or SIGTERM skips the wait, a third exits at once. SIGHUP reads CONFIG again and
applies it, as ``serve deploy`` would (a rolling update of what changed).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from kvray.app_config import AppArgs, ConfigError, parse_args
from kvray.platform.app import SHUTDOWN_GRACE_S

SERVE_DEFAULT_SHUTDOWN_S = 20.0  # Serve's default graceful_shutdown_timeout_s of a deployment
POLL_S = 0.05  # how soon the main loop acts on a signal
STATUS_POLL_S = 0.25  # how often the stop asks Serve whether the applications are gone


def load_config(path: Path):
    """The file as a ``ServeDeploySchema`` (what ``serve run`` and ``serve deploy`` accept)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))


def drain_bound_s(config) -> float:
    """How long a graceful stop may take at most: when Serve would kill the slowest replica of
    the config (a kvray app's Routers have ended every request by its
    ``graceful_shutdown_timeout_s``, and Serve kills them ``SHUTDOWN_GRACE_S`` later)."""
    bound = 0.0
    for app in config.applications:
        if str(app.import_path).startswith("kvray.platform"):
            try:
                timeout_s = parse_args(app.args or {}).graceful_shutdown_timeout_s
            except ConfigError:  # the app never deployed: Serve has nothing of it to stop
                timeout_s = AppArgs.model_fields["graceful_shutdown_timeout_s"].default
            bound = max(bound, timeout_s + SHUTDOWN_GRACE_S)
        else:
            bound = max(bound, SERVE_DEFAULT_SHUTDOWN_S)
        for d in app.deployments or ():
            given = getattr(d, "graceful_shutdown_timeout_s", None)
            if isinstance(given, (int, float)):
                bound = max(bound, float(given))
    return bound


class _Signals:
    """Ctrl-C / SIGTERM (counted: the second one skips the wait, a third exits at once) and
    SIGHUP, noted for the main loop."""

    def __init__(self):
        self.stops = 0
        self.reload = False
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGHUP, self._hup)

    def _stop(self, signum, frame) -> None:
        self.stops += 1
        if self.stops == 2:
            _say(f"{signal.Signals(signum).name} again: not waiting for requests any more")
        elif self.stops > 2:  # Serve's own shutdown hangs: leave (a local Ray instance ends with us)
            _say("exiting at once")
            os._exit(1)

    def _hup(self, signum, frame) -> None:
        self.reload = True


def _say(msg: str) -> None:
    print(f"kvray serve: {msg}", file=sys.stderr, flush=True)


def run(path: Path, address: str | None = None) -> int:
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.config import gRPCOptions

    try:
        config = load_config(path)
    except Exception as e:  # noqa: BLE001 - unreadable file, not YAML, not a Serve config
        _say(f"cannot use {path}: {e}")
        return 2
    ray.init(address=address, namespace=SERVE_NAMESPACE)
    signals = _Signals()  # after ray.init, which sets handlers of its own
    # what `serve run CONFIG` does (ray/serve/scripts.py)
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location,
                                   grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
                                   controller_options=config.controller_options)
    client.deploy_apps(config, _blocking=False)
    _say(f"deployed {path}; Ctrl-C or SIGTERM stops it gracefully, SIGHUP applies the file again")
    while not signals.stops:
        time.sleep(POLL_S)
        if signals.reload:
            signals.reload = False
            try:
                config = load_config(path)
                client.deploy_apps(config, _blocking=False)
                _say(f"applied {path} again")
            except Exception as e:  # noqa: BLE001 - a bad edit: keep serving the last good config
                _say(f"not applied: {e}")
    _drain(client, config, signals)
    serve.shutdown()
    _say("stopped")
    return 0


def _drain(client, config, signals: _Signals) -> None:
    """Delete the applications while the proxies still serve; wait until they are gone."""
    from ray import serve

    names = [app.name for app in config.applications]
    bound = drain_bound_s(config)
    _say(f"stopping: running requests may go on for their app's graceful_shutdown_timeout_s (waiting at most "
         f"{bound:g} s); Ctrl-C again to stop now")
    client.delete_apps(names, blocking=False)
    t0 = time.monotonic()
    while signals.stops < 2 and time.monotonic() - t0 < bound:
        if not set(names) & set(serve.status().applications):
            break
        time.sleep(STATUS_POLL_S)
    _say(f"applications stopped after {time.monotonic() - t0:.1f} s; shutting Serve down")
