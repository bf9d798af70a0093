"""Starting the Megatron backend's ranks: `tinkerd serve|worker --backend megatron --tp N --pp M`
starts N x M processes on this host running the same command, with torchrun's environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); rank 0 goes on as the server or worker,
the others follow it. The starting process stays as their supervisor:

- SIGTERM or SIGINT goes to rank 0 alone, which saves its models through the other ranks (a clean
  stop, as `tinkerd serve|worker` does with any backend) and then lets them exit; the supervisor
  exits with rank 0's status.
- A rank that dies takes the others with it (SIGKILL): its requests fail and its models are
  reported lost, exactly as when a worker of the HF backend dies.

Under torchrun (RANK set: across hosts, `torchrun --nnodes ...` with the same tinkerd command on
each), nothing is started: each process is already a rank.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from tinkerd.backends import BackendOptions
from tinkerd.config import Settings
from tinkerd.local_cluster import free_port

log = logging.getLogger(__name__)


def as_rank(argv: list[str], settings: Settings) -> None:
    """Return in rank 0; never return elsewhere (outside torchrun: supervise the ranks)."""
    if "RANK" not in os.environ:
        sys.exit(supervise(argv, settings.tp * settings.pp))
    if int(os.environ["RANK"]) == 0:
        return
    from tinkerd.megatron.backend import follow, start_rank

    options = BackendOptions(settings.data_dir, settings.device, tp=settings.tp, pp=settings.pp)
    follow(start_rank(options))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """In each rank, before it starts: a SIGKILL of the supervisor kills the rank too (Linux),
    so no rank outlives a killed worker holding its port or its models."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def supervise(argv: list[str], size: int, grace_seconds: float = 60.0) -> int:
    """Run `tinkerd argv` as `size` ranks until rank 0 ends; its exit status."""
    env = {
        **os.environ,
        "WORLD_SIZE": str(size),
        "LOCAL_WORLD_SIZE": str(size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks share this host's cores
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "tinkerd.cli", *argv],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            preexec_fn=_die_with_parent,
        )
        for rank in range(size)
    ]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            ranks[0].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for rank, process in enumerate(ranks):
            code = process.poll()
            if code is None or (rank > 0 and code == 0):  # running, or stopped by rank 0
                continue
            if rank == 0:  # done: the others were told to stop, or are lost with it
                deadline = time.monotonic() + (grace_seconds if code == 0 else 0)
                for other in ranks[1:]:
                    try:
                        other.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        other.kill()
                        other.wait()
                return code
            log.critical(
                "megatron rank %d exited (status %s): stopping every rank; the models they held "
                "are lost",
                rank,
                code,
            )
            for other in ranks:
                if other.poll() is None:
                    other.kill()
                    other.wait()
            return code if code > 0 else 1
        time.sleep(0.2)
