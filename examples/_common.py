"""What every example shares: which server (`--url`, else `$TINKERD_URL`, else
http://127.0.0.1:8000), and a quick check that it answers before the SDK is pointed at it.

Without the check a wrong URL is not an error for minutes: the SDK retries a refused or silent
connection with backoff before it gives up.
"""

from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000"
CHECK_TIMEOUT = 5.0  # seconds: a server that is up answers healthz at once


def add_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("TINKERD_URL") or DEFAULT_URL,
        help=f"the tinkerd server (default $TINKERD_URL, else {DEFAULT_URL})",
    )


def check_server(url: str, timeout: float = CHECK_TIMEOUT) -> str:
    """`url` without a trailing slash, once its /api/v1/healthz answers ok; else exit with one
    line that names the URL and what went wrong."""
    url = url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=timeout):
            return url  # any 2xx: the Tinker service answers healthz too
    except urllib.error.HTTPError as e:
        problem = f"healthz answered HTTP {e.code} {e.read()[:200].decode(errors='replace')}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        problem = str(reason) or type(reason).__name__
    problem = " ".join(problem.split())  # one line
    raise SystemExit(
        f"tinkerd is not reachable at {url}: {problem} (start one with `tinkerd serve`, or pass "
        "--url / set TINKERD_URL)"
    )


def server_url(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, str]:
    """Parse the command line (with --url added) and check the server: (args, url)."""
    add_url_argument(parser)
    args = parser.parse_args()
    return args, check_server(args.url)
