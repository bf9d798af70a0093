"""The `tinkerd` command line: `serve` and `worker` run a server, `keys` manages its API keys;
the client commands
(create, list, sample, save, delete, checkpoints, status, loss-functions, export) talk to one
(see client/)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tinkerd.client.commands import add_client_commands
from tinkerd.config import Settings
from tinkerd.keys_cli import add_key_commands

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """A server's log is for its own events: no library progress bars or deprecation chatter."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def raise_file_limit(connections: int | None = None) -> tuple[int, int]:
    """Lift the soft open-file limit (often 1024) to the hard one, as an unprivileged process
    may: each open HTTP connection is a descriptor, and a process short of them fails to accept
    ("Too many open files") while clients wait. Logs both limits, and warns when the hard one
    leaves fewer descriptors than `connections`, the connections this process accepts.
    Returns the (soft, hard) limits now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A hard limit of "unlimited" (macOS) still caps the soft one at what the kernel allows.
    targets = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 1 << 16, 10_240]
    new = soft
    for target in targets:
        if soft != resource.RLIM_INFINITY and target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        new = target
        break
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    if new != soft:
        log.info("open files: soft limit raised from %d to %d (hard limit %s)", soft, new, shown)
    else:
        log.info("open files: soft limit %s, hard limit %s", soft, shown)
    spare = 64  # the process's own: Redis connections, logs, model files, the listener
    if connections is not None and new != resource.RLIM_INFINITY and new < connections + spare:
        log.warning(
            "open files: a limit of %d holds about %d connections, fewer than the %d this "
            "process accepts (connection_limit): raise the hard limit (ulimit -Hn, systemd "
            "LimitNOFILE=, docker --ulimit nofile=)",
            new,
            max(new - spare, 0),
            connections,
        )
    return new, hard


def main(argv: list[str] | None = None) -> int:
    from tinkerd.backends import close_backends

    parser = argparse.ArgumentParser(
        prog="tinkerd",
        description="A self-hosted Tinker API server, and a command line client for it",
        epilog="`tinkerd COMMAND --help` describes each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the API (and, without --redis, a worker) on this machine",
        description="Without --redis: the API and a worker in one process, no other service. "
        "With --redis: only the API, in gunicorn processes; `tinkerd worker` runs the models.",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--threads", type=int, help="HTTP threads, without --redis (default 128)")
    serve.add_argument("--api-workers", type=int, help="API processes, with --redis (default 2)")
    serve.add_argument(
        "--base-model",
        help="base model of the simple JSON API's adapters (default tinkerd/tiny)",
    )
    worker = commands.add_parser(
        "worker",
        help="run a GPU worker of a scaled-out cluster",
        description="A Celery worker that registers in Redis, holds models on one device and "
        "runs the requests the API routes to it.",
    )
    worker.add_argument("--name", help="worker name in the cluster (default host-pid-device)")
    for command in (serve, worker):
        command.add_argument(
            "--data-dir",
            help="data directory, shared by API and workers "
            "(default $TINKERD_DATA_DIR, else ~/.local/share/tinkerd)",
        )
        command.add_argument("--redis", help="Redis URL of the cluster, e.g. redis://host:6379/0")
        command.add_argument(
            "--device", help="cuda, cuda:N or cpu (default: a GPU if there is one)"
        )
        command.add_argument(
            "--backend",
            help="the training engine: a registered name (default hf: transformers + PEFT) "
            "or package.module:factory",
        )
        command.add_argument(
            "--tp",
            type=int,
            help="--backend megatron: tensor-parallel ranks (default 1); tp x pp processes "
            "start under torchrun",
        )
        command.add_argument(
            "--pp", type=int, help="--backend megatron: pipeline stages (default 1)"
        )
        command.add_argument(
            "--sampler",
            choices=["tinkerd", "vllm"],
            help="the sampling engine: tinkerd's own (default) or vLLM on a GPU worker "
            "(pip install 'tinkerd[vllm]'; TINKERD_VLLM_ENGINE_ARGS: JSON EngineArgs)",
        )
        command.add_argument(
            "--activation-checkpointing",
            action="store_true",
            default=None,
            help="recompute activations in backward: less memory for long sequences, about a "
            "third more compute (default off; TINKERD_ACTIVATION_CHECKPOINTING=1)",
        )
        command.add_argument("--log-level", default="INFO")
    add_client_commands(commands)
    add_key_commands(commands)

    args = parser.parse_args(argv)
    if hasattr(args, "client_command"):
        return args.client_command(args)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings.load(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        threads=getattr(args, "threads", None),
        api_workers=getattr(args, "api_workers", None),
        base_model=getattr(args, "base_model", None),
        worker_name=getattr(args, "name", None),
        data_dir=args.data_dir,
        device=args.device,
        backend=args.backend,
        tp=getattr(args, "tp", None),
        pp=getattr(args, "pp", None),
        activation_checkpointing=args.activation_checkpointing,
        sampler=args.sampler,
        redis_url=args.redis,
    )
    # A worker, or serve without Redis, runs the backend; serve with Redis is only the API.
    runs_backend = args.command == "worker" or (args.command == "serve" and not settings.redis_url)
    if runs_backend:
        from tinkerd.backends import backend_factory

        try:
            backend_factory(settings.backend)
        except ValueError as e:
            parser.error(str(e))
    megatron = runs_backend and settings.backend == "megatron"
    if settings.tp * settings.pp != 1 and not megatron:
        parser.error("--tp and --pp are options of the worker's --backend megatron")
    if megatron:
        from tinkerd.megatron.launch import as_rank

        as_rank(list(sys.argv[1:] if argv is None else argv), settings)
    # A server's clients each hold a descriptor (a waiting long-poll too), the worker its
    # model files and connections: neither should stop at a login shell's default of 1024.
    raise_file_limit(settings.connection_limit if args.command == "serve" else None)
    if args.command == "serve" and settings.redis_url:
        from tinkerd.cluster.api import serve as serve_api

        serve_api(settings)
    elif args.command == "serve":
        quiet_libraries()
        from tinkerd.serve import EmbeddedServer

        EmbeddedServer(settings).serve_forever()
        close_backends()
    elif args.command == "worker":
        if not settings.redis_url:
            parser.error("tinkerd worker needs --redis URL (or TINKERD_REDIS_URL)")
        # Several workers (and an API) often share a host's cores: OpenMP threads that spin
        # while waiting would starve the other processes' (set before torch loads OpenMP).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        quiet_libraries()
        from tinkerd.cluster.worker import WorkerProcess

        WorkerProcess(settings).run()
        close_backends()
        # Drained: results, events and checkpoints are in Redis and on disk. Leave without the
        # interpreter's teardown, in which native threads (torch's, Celery's libraries') that
        # outlive it have been seen to abort the process ("terminate called ...").
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
