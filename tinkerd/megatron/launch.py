"""Starting the Megatron backend's ranks: `tinkerd serve|worker --backend megatron --tp N --pp M`
runs itself again under torchrun, N x M processes on this host; rank 0 goes on as the server or
worker, the others follow it.

Under a torchrun of your own (RANK set, e.g. across hosts with --nnodes), nothing is started:
each process is already a rank.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from tinkerd.backends import BackendOptions
from tinkerd.config import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(argv: list[str], settings: Settings) -> None:
    """Return in rank 0; never return elsewhere. Outside torchrun, replace this process with a
    torchrun of tp x pp ranks running the same command (signals sent to it reach every rank)."""
    if "RANK" not in os.environ:
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc-per-node", str(settings.tp * settings.pp),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            "-m", "tinkerd.cli", *argv,
        ]  # fmt: skip
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, command)
    if int(os.environ["RANK"]) == 0:
        return
    from tinkerd.megatron.backend import follow, start_rank

    options = BackendOptions(settings.data_dir, settings.device, tp=settings.tp, pp=settings.pp)
    follow(start_rank(options))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
