"""`tinkerd create|list|save|delete|checkpoints|status|loss-functions`: training runs, their
checkpoints and the server's state, printed as tables (or JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tinkerd.client.server import ClientError, Server


@contextmanager
def waiting(description: str) -> Iterator[None]:
    """A ticking progress line on stderr (when it is a terminal) while the server works."""
    from tqdm import tqdm

    bar = tqdm(desc=description, bar_format="{desc}: {elapsed}", disable=None, file=sys.stderr)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def table(headers: list[str] | None, rows: list[list[Any]]) -> str:
    """Left-aligned columns, two spaces apart, under an optional header row."""
    cells = [[str(c) for c in row] for row in ([headers] if headers else []) + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _time(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else "-"


def create(server: Server, args: argparse.Namespace) -> None:
    with server.service_client() as service, waiting(f"creating a LoRA run on {args.model}"):
        training = service.create_lora_training_client(
            base_model=args.model, rank=args.rank, seed=args.seed
        ).result()
    print(training.model_id)


def all_runs(server: Server) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    while True:
        page = server.get("/api/v1/training_runs", limit=100, offset=len(runs))
        runs += page["training_runs"]
        if not page["training_runs"] or len(runs) >= page["cursor"]["total_count"]:
            return runs


def list_runs(server: Server, args: argparse.Namespace) -> None:
    runs = all_runs(server)
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    if not runs:
        print("no training runs")
        return
    rows = []
    for run in runs:
        status = run.get("status", "-")
        if run.get("worker"):
            status += f" ({run['worker']})"
        last = run.get("last_checkpoint") or run.get("last_sampler_checkpoint") or {}
        rows.append(
            [
                run["training_run_id"],
                run["base_model"],
                run.get("lora_rank") or "-",
                status,
                last.get("tinker_path", "-"),
                _time(run.get("last_request_time")),
            ]
        )
    headers = ["RUN", "BASE MODEL", "RANK", "STATUS", "LAST CHECKPOINT", "LAST REQUEST (UTC)"]
    print(table(headers, rows))


def save(server: Server, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {
        "name": args.name,
        "kind": "sampler_weights" if args.sampler else "weights",
        "overwrite": args.overwrite,
    }
    if args.ttl is not None:
        body["ttl_seconds"] = args.ttl
    future = server.post(f"/api/v1/training_runs/{args.run}/save", body)
    with waiting(f"saving {future['path']}"):
        result = server.wait(future["request_id"])
    print(result["path"])


def delete(server: Server, args: argparse.Namespace) -> None:
    rest = server.rest_client()
    if args.target.startswith("tinker://"):
        paths = [args.target]
    else:
        checkpoints = rest.list_checkpoints(args.target).result().checkpoints
        paths = [c.tinker_path for c in checkpoints]
        if not paths:
            print(f"{args.target} has no checkpoints")
            return
    if not args.yes:
        if not sys.stdin.isatty():
            raise ClientError(f"this deletes {len(paths)} checkpoint(s); pass --yes to confirm")
        print("\n".join(paths))
        try:
            answer = input(f"delete these {len(paths)} checkpoint(s)? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise ClientError("nothing deleted")
    for path in paths:
        rest.delete_checkpoint_from_tinker_path(path).result()
        print(f"deleted {path}")


def checkpoints(server: Server, args: argparse.Namespace) -> None:
    rest = server.rest_client()
    if args.run:
        found = rest.list_checkpoints(args.run).result().checkpoints
    else:
        found = rest.list_user_checkpoints(limit=1000).result().checkpoints
    if args.json:
        print(json.dumps([c.model_dump(mode="json") for c in found], indent=2))
        return
    if not found:
        print("no checkpoints")
        return
    rows = [
        [
            c.tinker_path,
            c.checkpoint_type,
            _time(c.time.isoformat()),
            _size(c.size_bytes or 0),
            _time(c.expires_at.isoformat()) if c.expires_at else "never",
        ]
        for c in found
    ]
    print(table(["PATH", "TYPE", "CREATED (UTC)", "SIZE", "EXPIRES (UTC)"], rows))


def status(server: Server, args: argparse.Namespace) -> None:
    health = server.get("/api/v1/healthz")
    runs = all_runs(server)
    models = server.get("/api/v1/get_server_capabilities")["supported_models"]
    by_status = Counter(run.get("status", "unknown") for run in runs)
    by_worker = Counter(run["worker"] for run in runs if run.get("worker"))
    if args.json:
        summary = {
            "url": server.url,
            **health,
            "models": [m["model_name"] for m in models],
            "runs": dict(by_status),
            "workers": dict(by_worker),
        }
        print(json.dumps(summary, indent=2))
        return
    counts = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
    rows = [
        ["server", f"{server.url} {health.get('status', '?')}"],
        ["queue depth", health.get("queue_depth", "?")],
        ["base models", ", ".join(m["model_name"] for m in models) or "-"],
        ["training runs", f"{len(runs)}" + (f" ({counts})" if counts else "")],
        [
            "workers",
            ", ".join(f"{w} ({n} active runs)" for w, n in sorted(by_worker.items()))
            or "none holding a run",
        ],
    ]
    print(table(None, rows))


def loss_functions(server: Server, args: argparse.Namespace) -> None:
    losses = server.get("/api/v1/loss_functions")["loss_functions"]
    if args.json:
        print(json.dumps(losses, indent=2))
        return
    rows = [
        [
            loss["name"],
            ", ".join(loss["loss_fn_inputs"]),
            ", ".join(f"{k}={v}" for k, v in (loss.get("loss_fn_config") or {}).items()) or "-",
        ]
        for loss in losses
    ]
    print(table(["LOSS", "LOSS_FN_INPUTS", "LOSS_FN_CONFIG (DEFAULTS)"], rows))
    for loss in losses:
        print(f"\n{loss['name']}: {loss['description']}")
