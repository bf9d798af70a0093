"""What one request may carry: the most datums, tokens, samples and top-k logprobs, and the
413 a request past them gets.

The per-server limits (datums, tokens per sequence and per request) are `InputLimits` in
`tinkerd.config`; the fixed ones are here.
"""

from __future__ import annotations

from tinkerd.config import InputLimits
from tinkerd.types import UserError

MAX_NUM_SAMPLES = 1024
DEFAULT_LIMITS = InputLimits()
MAX_TOPK = 1024


def check_datum_count(n: int, limits: InputLimits) -> None:
    if n > limits.max_datums:
        raise UserError(
            f"{n} datums in one request; the server takes at most {limits.max_datums} "
            "(split the batch)",
            status=413,
        )


def check_sequence_tokens(n: int, limits: InputLimits, where: str) -> None:
    if n > limits.max_sequence_tokens:
        raise UserError(
            f"{where} has {n} tokens; the server takes at most {limits.max_sequence_tokens} "
            "per sequence",
            status=413,
        )
