"""The client side of `tinkerd`: create, list, sample, save, delete, checkpoints, status,
loss-functions and export, each talking to a server over HTTP (`--url`, else $TINKERD_URL).

The official SDK does what it covers (creating runs, sampling, listing and deleting checkpoints);
plain REST does the rest: a run's status and worker (the SDK's TrainingRun drops them), saving a
run from a process that does not track its seq_ids, health, the loss registry, and checkpoint
archives. Nothing here loads a model except `export --merge`; the SDK is imported only by the
commands that use it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
log = logging.getLogger(__name__)
DEFAULT_API_KEY = "tml-local"


class ClientError(Exception):
    """What went wrong, for the user; the command exits with status 1."""


class Server:
    """A tinkerd server: plain REST calls, and SDK clients on the same URL and key."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._sessions: list[Any] = []  # ServiceClients to close before the process exits

    def close(self, status: str) -> None:
        """End the SDK sessions this command opened: their background thread must not be
        writing (a heartbeat warning) while the interpreter shuts down, which aborts it."""
        for client in self._sessions:
            try:
                client.close(status).result(timeout=10)
            except Exception as e:  # the server is gone: nothing left to end
                log.debug("closing an SDK session: %s", e)

    def request(self, method: str, path: str, timeout: float = 30.0, **kwargs: Any) -> Any:
        import httpx

        try:
            response = httpx.request(
                method,
                self.url + path,
                headers={"X-API-Key": self.api_key},
                timeout=httpx.Timeout(timeout, connect=5.0),
                **kwargs,
            )
        except httpx.HTTPError as e:
            raise ClientError(
                f"cannot reach tinkerd at {self.url} ({e}); start one with `tinkerd serve` "
                "or point --url / TINKERD_URL at it"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and "error" in body:
                raise ClientError(str(body["error"]))
            raise ClientError(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
        return body

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any], timeout: float = 30.0) -> Any:
        return self.request("POST", path, json=body, timeout=timeout)

    def check(self) -> None:
        """Fail fast with a clear message when no server answers (the SDK would keep retrying)."""
        self.get("/api/v1/healthz")

    def wait(self, request_id: str) -> dict[str, Any]:
        """A future's result (long-polled); ClientError if the request failed."""
        while True:
            result = self.post("/api/v1/retrieve_future", {"request_id": request_id}, 60.0)
            if result.get("type") != "try_again":
                break
        if "error" in result:
            raise ClientError(str(result["error"]))
        return result

    def service_client(self):
        import tinker

        self.check()
        client = tinker.ServiceClient(base_url=self.url, api_key=self.api_key)
        self._sessions.append(client)
        return client

    def rest_client(self):
        import tinker

        self.check()
        return tinker.RestClient(base_url=self.url, api_key=self.api_key)


def sdk_error_message(e: BaseException) -> str:
    """The server's own message inside an SDK exception, when it has one."""
    body = getattr(e, "body", None)
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    # A failed future: the SDK wraps the server's message in its own reprs.
    failed = re.fullmatch(r"Request failed: (.*) for self\.request_id=.*", str(e), re.S)
    if failed:
        return failed.group(1)
    return str(e) or type(e).__name__


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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ttl(text: str) -> float:
    """`save --ttl`: refused here, as the server would (a 400), before anything is sent."""
    import math

    from tinkerd.storage import MAX_TTL_SECONDS

    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TTL_SECONDS:  # NaN and inf too
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds in (0, {MAX_TTL_SECONDS}] (10 years), got {text!r}"
        )
    return seconds


def _time(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else "-"


# -- commands ------------------------------------------------------------------------------------


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


def sample(server: Server, args: argparse.Namespace) -> None:
    from tinker import types

    from tinkerd.export import default_cache_dir
    from tinkerd.text import stop_cut, text_codec
    from tinkerd.types import UserError

    with server.service_client() as service:
        if args.checkpoint:
            sampler = service.create_sampling_client(model_path=args.checkpoint).result()
        else:
            model = args.model or _default_model(server)
            sampler = service.create_sampling_client(base_model=model).result()
        base_model = sampler.get_base_model()
        try:
            codec = text_codec(base_model, default_cache_dir())
        except UserError as e:
            raise ClientError(f"cannot load the tokenizer of {base_model} here: {e}") from None
        params = types.SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        )
        prompt = types.ModelInput.from_ints(codec.encode(args.prompt))
        result = sampler.sample(prompt, num_samples=args.num_samples, sampling_params=params)
        sequences = result.result().sequences
    for i, sequence in enumerate(sequences):
        if len(sequences) > 1:
            print(f"--- sample {i + 1} ---")
        text = codec.decode(list(sequence.tokens))
        print(text[: stop_cut(text, args.stop or ())])  # without the stop string, as /sample


def _default_model(server: Server) -> str:
    """The server's first listed model: its default (the built-in tiny model unless set)."""
    models = server.rest_client().get_server_capabilities().result().supported_models
    return next((m.model_name for m in models if m.model_name), "tinkerd/tiny")


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


# -- the parser ----------------------------------------------------------------------------------


def add_client_commands(commands: Any) -> None:
    """Add the client subcommands to `tinkerd`'s subparsers; each sets
    `client_command(args) -> exit status`."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url",
        default=os.environ.get("TINKERD_URL", DEFAULT_URL),
        help=f"the tinkerd server (default $TINKERD_URL, else {DEFAULT_URL})",
    )
    connection.add_argument(
        "--api-key",
        default=os.environ.get("TINKER_API_KEY", DEFAULT_API_KEY),
        help=f"API key (default $TINKER_API_KEY, else {DEFAULT_API_KEY})",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def command(name: str, handler: Callable, summary: str, *parents: Any, **kwargs: Any) -> Any:
        parser = commands.add_parser(
            name,
            help=summary,
            description=kwargs.pop("description", summary),
            parents=[connection, *parents],
        )
        parser.set_defaults(client_command=lambda args: _run(handler, args))
        return parser

    p = command(
        "create",
        create,
        "create a LoRA training run and print its id",
        description="Create a LoRA training run on a base model and print its run id. The run "
        "stays loaded in the server after this command exits: save it with `tinkerd save`.",
    )
    p.add_argument(
        "--model", required=True, help="base model: tinkerd/tiny, a directory, a hub name"
    )
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--seed", type=int, help="seed of the adapter's initial weights")

    command("list", list_runs, "list training runs (with status and worker)", as_json)

    p = command(
        "sample",
        sample,
        "sample text from a base model or a checkpoint",
        description="Print the text sampled after PROMPT. Without --model or --checkpoint, "
        "samples from the server's default model (the first it lists; tinkerd/tiny unless set).",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a base model to sample from")
    source.add_argument("--checkpoint", help="tinker://RUN/(weights|sampler_weights)/NAME")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1)")
    p.add_argument("--seed", type=int, help="the same seed gives the same text")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples (default 1)")
    p.add_argument(
        "--stop", action="append", help="stop at this string (repeatable; default: at EOS)"
    )

    p = command(
        "save",
        save,
        "save a training run's weights as a checkpoint",
        description="Save RUN's current weights (and optimizer state) as tinker://RUN/weights/NAME "
        "(--sampler: tinker://RUN/sampler_weights/NAME, the adapter alone). Use it on runs that "
        "no SDK TrainingClient is still driving: the save takes the run's next request number.",
    )
    p.add_argument("run", metavar="RUN", help="training run id")
    p.add_argument("name", metavar="NAME", help="checkpoint name (letters, digits, '.', '_', '-')")
    p.add_argument("--sampler", action="store_true", help="save sampler weights (no optimizer)")
    p.add_argument(
        "--ttl", type=_ttl, help="delete the checkpoint after this many seconds (at most 10 years)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint of this name")

    p = command(
        "delete",
        delete,
        "delete a run's checkpoints, or one checkpoint",
        description="Delete every checkpoint of training run TARGET, or the one checkpoint "
        "TARGET names (tinker://...). The run's record stays listed, and a run still loaded in "
        "the server keeps its weights in memory.",
    )
    p.add_argument(
        "target", metavar="TARGET", help="a training run id, or a tinker:// checkpoint path"
    )
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    p = command("checkpoints", checkpoints, "list a run's checkpoints (or everyone's)", as_json)
    p.add_argument("run", metavar="RUN", nargs="?", help="training run id (default: all runs)")

    command(
        "status",
        status,
        "server health, queue depth, base models, runs and workers",
        as_json,
        description="Server health and queue depth, the base models it lists, its training "
        "runs by status, and the workers that hold them (in a cluster, each worker's name).",
    )
    command("loss-functions", loss_functions, "list the server's loss functions", as_json)

    p = command(
        "export",
        export,
        "export a checkpoint as a PEFT adapter or a merged model",
        description="Download checkpoint PATH and write OUT: a PEFT adapter directory "
        "(adapter_config.json + adapter_model.safetensors, for peft.PeftModel.from_pretrained), "
        "or with --merge a Hugging Face model directory with the adapter merged into the base "
        "weights, plus the tokenizer (for transformers.AutoModelForCausalLM). The base model is "
        "loaded on this machine: tinkerd/tiny is rebuilt into the cache directory.",
    )
    p.add_argument("path", metavar="PATH", help="tinker://RUN/(weights|sampler_weights)/NAME")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist, or be empty)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base model")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the merged weights (default: the base model's)",
    )
    p.add_argument(
        "--base-model", help="load the base model from here instead of the name the run gave"
    )
    p.add_argument(
        "--cache-dir",
        help="where tinkerd/tiny is rebuilt (default $TINKERD_CACHE_DIR, else ~/.cache/tinkerd)",
    )


def _run(handler: Callable[[Server, argparse.Namespace], None], args: argparse.Namespace) -> int:
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    server = Server(args.url, args.api_key)
    status = "errored"
    try:
        handler(server, args)
        status = "success"
    except ClientError as e:
        print(f"tinkerd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        status = "interrupted"
        return 130
    except Exception as e:
        import tinker

        if isinstance(e, tinker.TinkerError):
            print(f"tinkerd {args.command}: error: {sdk_error_message(e)}", file=sys.stderr)
            return 1
        raise
    finally:
        server.close(status)
    return 0


__all__ = ["ClientError", "Server", "add_client_commands"]
