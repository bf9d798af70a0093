"""The `tinkerd` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tinkerd.config import Settings


def quiet_libraries() -> None:
    """A server's log is for its own events: no library progress bars or deprecation chatter."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinkerd", description="A self-hosted Tinker API server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API and a worker on this machine")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument(
        "--data-dir", help="data directory (default $TINKERD_DATA_DIR, else ~/.local/share/tinkerd)"
    )
    serve.add_argument("--device", help="cuda, cuda:N or cpu (default: a GPU if there is one)")
    serve.add_argument("--threads", type=int, help="HTTP threads (default 128)")
    serve.add_argument("--log-level", default="INFO")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        quiet_libraries()
        from tinkerd.serve import EmbeddedServer

        settings = Settings.load(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            device=args.device,
            threads=args.threads,
        )
        EmbeddedServer(settings).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
