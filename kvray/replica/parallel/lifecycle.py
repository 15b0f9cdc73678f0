"""How the engine's child processes start, die with their parent, and report how they died.

Light on purpose (no torch): the serving replica imports it through ``engine_process``.

* ``spawn``: ``python -m <module> FD`` with one end of a socket pair (the engine process, and
  the tensor-parallel rank processes), with kvray importable from the same source tree.
* ``die_with_parent``: a child asks the kernel to SIGKILL it when its parent goes
  (``PR_SET_PDEATHSIG``), so a rank never outlives the engine that drives it, even while it is
  blocked in a collective. (It fires when the *thread* that started the child ends: kvray starts
  rank processes from the thread that builds the engine, which lives as long as the engine.)
* ``RankFailure``: a rank process died; the engine cannot go on. ``on_rank_death``: what the
  process does about it at once (the serving engine process reports and exits; by default the
  engine fails its next step).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Callable

PR_SET_PDEATHSIG = 1


class RankFailure(RuntimeError):
    """A tensor-parallel rank process died or failed: the engine's model is incomplete."""


_death_handler: Callable[[str], None] | None = None


def on_rank_death(handler: Callable[[str], None] | None) -> None:
    """Install the process-wide reaction to a rank's death (called with the message, from the
    thread that noticed it). The serving engine process reports the error and exits."""
    global _death_handler
    _death_handler = handler


def rank_death_handler() -> Callable[[str], None] | None:
    return _death_handler


def exit_status(code: int) -> str:
    """``with exit code 1``, or ``(killed by SIGKILL)`` for a negative code (the signal's number)."""
    if code < 0:
        try:
            return f"(killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"(killed by signal {-code})"
    return f"with exit code {code}"


def spawn(module: str) -> tuple[subprocess.Popen, Connection]:
    """Start ``python -m module FD``; returns the process and the parent's end of its socket."""
    ours, theirs = socket.socketpair()
    src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", module, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                            env=env)
    theirs.close()
    return proc, Connection(ours.detach())


def die_with_parent(parent_pid: int) -> bool:
    """SIGKILL this process when its parent exits. False if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == parent_pid
