"""Run the engine's step loop in a child process of its own.

The serving replica's process is busy with Ray Serve's work: request calls, streamed token
batches, stats polls. If the step loop shares that process, the two take turns on one GIL, and
every request's trip through the replica waits for the loop's host work (scheduling, input
building, kernel launches) to yield. In a child process the loop has a GIL to itself.

The parent starts ``python -m kvray.replica.engine_process FD`` with one end of a socket pair,
sends the ``EngineConfig``, and gets back an ``Event`` of kind ``READY`` (with the engine's info)
once the model is loaded, or ``ERROR``. From then on it sends ``kvray.records.Command``s; the
child sends an ``OUT`` event per step and ``ERROR`` if its loop dies. When the parent goes
away, the child sees the socket close and exits.

With tensor parallelism the child is rank 0 and starts the other ranks itself
(``kvray.replica.parallel``): they die with it. If one of them dies, the child sends ``ERROR``
naming the rank and how it died, and exits at once (its requests cannot finish: the model is
incomplete), so the replica fails them and exits, and Serve replaces it.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from kvray.records import Command, Event, EventKind, Op
from kvray.replica.parallel.lifecycle import exit_status, on_rank_death, spawn

logger = logging.getLogger(__name__)


CPU_ENGINE_NICENESS = 10


class EngineProcessError(RuntimeError):
    pass


class EngineProcess:
    """The parent's handle: ``send`` commands; a reader thread calls ``on_output(event)`` for each
    step and ``on_exit(error)`` once, when the child dies or its loop fails."""

    def __init__(self, config, on_output, on_exit):
        self.proc, self._conn = spawn("kvray.replica.engine_process")
        self._send_lock = threading.Lock()
        self._stopping = False
        self.send(config)
        try:
            event = self._conn.recv()
        except EOFError:
            raise EngineProcessError(f"the engine process died {exit_status(self.proc.wait())} while loading the "
                                     "model (its log is above)") from None
        if event.kind is not EventKind.READY:
            self.proc.wait()
            raise EngineProcessError(f"the engine process failed to start: {event.text}")
        self.info: dict = event.info
        self._on_output, self._on_exit = on_output, on_exit
        self._reader = threading.Thread(target=self._read, name="kvray-engine-reader", daemon=True)
        self._reader.start()

    def send(self, msg) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as e:
            raise EngineProcessError(f"the engine process is gone: {e}") from None

    def is_alive(self) -> bool:
        return self.proc.poll() is None and self._reader.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the loop to stop, wait for the child, kill it if it does not exit."""
        self._stopping = True
        try:
            self.send(Command(Op.STOP))
        except EngineProcessError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout_s)

    def _read(self) -> None:
        error = None
        try:
            while True:
                event = self._conn.recv()
                if event.kind is EventKind.OUT:
                    self._on_output(event)
                else:
                    error = EngineProcessError(f"the engine loop died: {event.text}")
                    break
        except (EOFError, OSError):
            if not self._stopping:
                error = EngineProcessError(f"the engine process died {exit_status(self.proc.wait())}")
        self._conn.close()
        self._on_exit(error)


def _sender(conn: Connection):
    """``send(event)`` for the threads that all send (the step loop, the inbox, a tensor-parallel
    rank's watcher); a rank's death is reported with it and ends this process at once: nothing
    here can finish on half a model."""
    lock = threading.Lock()

    def send(event: Event) -> None:
        with lock:
            conn.send(event)

    def rank_died(message: str) -> None:
        logger.error("%s: the engine exits", message)
        try:
            send(Event(EventKind.ERROR, text=message))
        finally:
            os._exit(1)

    on_rank_death(rank_died)
    return send


def _yield_the_cpu(engine) -> None:
    """On a CPU-only machine the model's matmuls would otherwise take the cores from the
    processes that accept requests and stream tokens (HTTP, Serve): those are latency bound, the
    step loop is throughput bound, so it yields to them, and so do its other tensor-parallel
    ranks. (With a GPU the step loop's host work is the GPU's critical path: it keeps its
    priority.)"""
    if engine.device.type != "cpu":
        return
    os.nice(CPU_ENGINE_NICENESS)
    for pid in engine.runner.ranks.pids if engine.runner.ranks is not None else ():
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0))


def _exit_with_parent(fd: int) -> None:
    """While the engine loads, the parent sends nothing: the socket turning readable means it is
    gone (a replica killed while loading). Exit then, at once, taking the tensor-parallel ranks
    along (they die with this process), instead of loading for nobody. After READY the inbox
    thread sees the end of the socket."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if sock.recv(1, socket.MSG_PEEK) == b"":
            os._exit(0)
    except OSError:
        os._exit(0)
    finally:
        sock.close()


def _child_main(fd: int) -> int:
    from kvray.gil import shorten_switch_interval
    from kvray.replica.engine import LLMEngine
    from kvray.replica.engine_loop import EngineLoop, engine_info

    # The inbox thread takes each request in while the step loop runs Python: without this it
    # can wait out CPython's 5 ms switch interval before the request reaches the loop.
    shorten_switch_interval()
    conn = Connection(fd)
    send = _sender(conn)
    config = conn.recv()
    threading.Thread(target=_exit_with_parent, args=(fd,), name="kvray-engine-parent", daemon=True).start()
    try:
        engine = LLMEngine(config)
    except BaseException as e:
        logger.exception("the engine failed to load")
        send(Event(EventKind.ERROR, text=f"{type(e).__name__}: {e}"))
        return 1
    _yield_the_cpu(engine)  # after loading, which runs at full speed
    # What loading made (modules, weights' Python objects, CUDA graphs) lives as long as the
    # process: out of the collector's sight, so full collections in the step loop stay short.
    gc.collect()
    gc.freeze()
    send(Event(EventKind.READY, info=engine_info(engine)))
    loop = EngineLoop(engine, send)

    def receive():
        try:
            while True:
                loop.put(conn.recv())
        except (EOFError, OSError):  # the parent is gone: nobody will read what we make
            os._exit(0)

    threading.Thread(target=receive, name="kvray-engine-inbox", daemon=True).start()
    try:
        loop.run()
    except BaseException as e:
        logger.exception("engine loop died")
        send(Event(EventKind.ERROR, text=f"{type(e).__name__}: {e}"))
        return 1
    engine.runner.close()  # the other tensor-parallel ranks, if any
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kvray-engine %(levelname)s %(message)s")
    raise SystemExit(_child_main(int(sys.argv[1])))
