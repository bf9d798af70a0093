"""The client subcommands' arguments, added to `tinkerd`'s parser, and the runner that opens a
Server for one, reports its ClientError or SDK error and closes the SDK sessions it opened."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from tinkerd.client.export import export
from tinkerd.client.runs import (
    checkpoints,
    create,
    delete,
    list_runs,
    loss_functions,
    save,
    status,
)
from tinkerd.client.sampling import sample
from tinkerd.client.server import (
    DEFAULT_API_KEY,
    DEFAULT_URL,
    ClientError,
    Server,
    sdk_error_message,
)


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
