"""A tensor-parallel rank other than 0: ``python -m kvray.replica.parallel.worker FD``.

It is started by rank 0 (``launcher.RankProcesses``) with one end of a control socket, asks the
kernel to kill it when rank 0's process exits, reads its ``WorkerSpec``, says hello, joins the
process group, loads its shard of the model (``ModelRunner``), reports how much memory loading
took, then follows rank 0: each control message is a step to run (``ModelRunner.follow``), a
call to answer (profiling, KV-cache allocation, graph capture), or the order to stop. The socket
closing (rank 0 is gone) also ends it. A step that fails kills the rank: rank 0 sees it die.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
from multiprocessing.connection import Connection

from kvray.replica.parallel.launcher import CALL, STEP, STOP, WorkerSpec
from kvray.replica.parallel.lifecycle import die_with_parent


def serve(runner, conn: Connection) -> int:
    """Follow rank 0 until it says stop or goes away."""
    from kvray.replica.step_inputs import StepHeader

    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return 0
        tag, body = msg[:1], msg[1:]
        if tag == STEP:  # the header, then the rows of the step's prompt log-probs, if any
            runner.follow(StepHeader.unpack(body[:StepHeader.SIZE]), body[StepHeader.SIZE:])
        elif tag == CALL:
            name, args = pickle.loads(body)
            try:
                reply = ("ok", getattr(runner, name)(*args))
            except Exception as e:  # noqa: BLE001 - rank 0 raises it, naming this rank
                logging.getLogger(__name__).exception("%s failed", name)
                reply = ("error", f"{type(e).__name__}: {e}")
            conn.send(reply)
        elif tag == STOP:
            return 0


def main(fd: int) -> int:
    conn = Connection(fd)
    spec: WorkerSpec = conn.recv()
    if not die_with_parent(spec.parent_pid):
        return 1  # rank 0 died before we could tie ourselves to it
    import torch

    from kvray.replica.model_runner import ModelRunner

    conn.send(("ok", os.getpid()))  # alive and imported: rank 0 may join the group now
    try:
        runner = ModelRunner(spec.config, spec.model_path, spec.dtype, torch.device(spec.device), rank=spec.rank,
                             store_port=spec.store_port)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
        logging.getLogger(__name__).exception("rank %d failed to load", spec.rank)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        # Stay until rank 0 lets go: it usually fails the same way, and its own error (not "rank 1
        # died") is the one to report.
        while True:
            try:
                if conn.recv_bytes() == STOP:
                    return 1
            except (EOFError, OSError):
                return 1
    conn.send(("ok", runner.load_report))
    return serve(runner, conn)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kvray-rank %(levelname)s %(message)s")
    sys.exit(main(int(sys.argv[1])))
