"""`tinkerd export`: a checkpoint downloaded and written out as a PEFT adapter or a merged model."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tinkerd.client.server import ClientError, Server


def export(server: Server, args: argparse.Namespace) -> None:
    import warnings

    from tinkerd import export as exporting
    from tinkerd.storage import CheckpointPath
    from tinkerd.types import UserError

    try:
        path = CheckpointPath.parse(args.path)
    except UserError as e:
        raise ClientError(e.message) from None
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClientError(f"{out} already exists and is not an empty directory")

    def step(message: str) -> None:
        print(f"{message} ...", file=sys.stderr)

    server.check()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations
    try:
        with tempfile.TemporaryDirectory(prefix="tinkerd-export-") as tmp:
            checkpoint = exporting.download_checkpoint(
                server.url, str(path), Path(tmp), server.api_key
            )
            exporting.export_checkpoint(
                checkpoint,
                out,
                merge=args.merge,
                base_model=args.base_model,
                cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                dtype=args.dtype,
                progress=step,
            )
    except exporting.ExportError as e:
        raise ClientError(str(e)) from None
    what = "merged model" if args.merge else "PEFT adapter"
    print(f"exported {path} as a {what} to {out}")
