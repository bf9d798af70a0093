"""Answering an OpenAI request: queue its samples as asample does, decode each sequence into
text pieces (one per token) cut at a stop string, and reply as one JSON response or as
server-sent events.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flask import Response, jsonify, stream_with_context

from tinkerd.api import service
from tinkerd.api.openai_request import Target
from tinkerd.api.queueing import submit_unordered, wait
from tinkerd.text import TextCodec, stop_cut
from tinkerd.types import (
    Sample,
    SampleResult,
    SamplingParams,
    ServerError,
    TinkerdError,
    error_body,
)

log = logging.getLogger(__name__)


# -- sampling --------------------------------------------------------------------------------


def submit(target: Target, prompt: list[int], params: SamplingParams, n: int) -> str:
    """Queue one prompt's n samples as asample does. OpenAI requests are never retried by seq_id,
    so each takes a random one under its own key (never clashing with an SDK client's)."""
    sample = Sample(target.weights, np.asarray(prompt, dtype=np.int64), n, params)
    return submit_unordered(
        f"openai:{target.weights.key}", secrets.randbits(62), sample, uuid.uuid4().hex
    )


def sampled(request_id: str) -> SampleResult | None:
    """The request's SampleResult, None if it is still running after a long-poll interval;
    raises the error the worker settled it with."""
    result = wait(request_id, service().settings.long_poll_seconds)
    if result is None:
        return None
    return result.sample()


@dataclass
class Choice:
    """One generated sequence as text: `pieces[i]` is the text token i adds (joined, `text`)."""

    text: str
    finish_reason: str  # "stop" | "length"
    tokens: list[int]
    logprobs: list[float]
    pieces: list[str]


def choices(codec: TextCodec, result: SampleResult, stops: tuple[str, ...]) -> list[Choice]:
    out = []
    for seq in result.sequences:
        tokens = [int(t) for t in seq.tokens]
        pieces = token_pieces(codec, tokens)
        text = "".join(pieces)
        cut = stop_cut(text, stops)
        if cut is not None:  # the sampler stopped on it: the stop string is not returned
            text, pieces = text[:cut], _clip(pieces, cut)
        reason = "stop" if seq.stop_reason == "stop" or cut is not None else "length"
        out.append(Choice(text, reason, tokens, [float(x) for x in seq.logprobs], pieces))
    return out


def token_pieces(codec: TextCodec, tokens: list[int]) -> list[str]:
    """The text each token adds, so that the pieces join to codec.decode(tokens): a token that
    ends inside a character adds "" and the one completing it the whole character. Decodes a
    short window per token (as vLLM does), not the whole prefix."""
    pieces: list[str] = []
    start = done = 0  # decode tokens[start:] from there; tokens[start:done] already emitted
    for i in range(len(tokens)):
        before = codec.decode(tokens[start:done])
        after = codec.decode(tokens[start : i + 1])
        if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before) :])
            start, done = done, i + 1
        else:
            pieces.append("")
    full, joined = codec.decode(tokens), "".join(pieces)
    if tokens and full.startswith(joined):  # bytes that never became a character: "\ufffd"
        pieces[-1] += full[len(joined) :]
    elif tokens:  # a decoder whose output is not prefix-stable: the text as one last piece
        pieces = [""] * (len(tokens) - 1) + [full]
    return pieces


def _clip(pieces: list[str], length: int) -> list[str]:
    out, used = [], 0
    for piece in pieces:
        piece = piece[: max(0, length - used)]
        out.append(piece)
        used += len(piece)
    return out


def usage(prompts: list[list[int]], results: list[Choice]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.tokens) for c in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- answers ---------------------------------------------------------------------------------


@dataclass
class Reply:
    """One request's samples, answered as a whole response or as server-sent events."""

    kind: str  # "text_completion" | "chat.completion"
    target: Target
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    logprobs: bool
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = ("cmpl-" if self.kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex

    def respond(self) -> Response:
        request_ids = [submit(self.target, p, self.params, self.n) for p in self.prompts]
        if not self.stream:
            results = [c for rid in request_ids for c in self.choices(rid)]
            answer = self._frame(self.kind, [self._choice(i, c) for i, c in enumerate(results)])
            return jsonify(answer | {"usage": usage(self.prompts, results)})
        events = stream_with_context(self._events(request_ids))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(events, mimetype="text/event-stream", headers=headers)

    def choices(self, request_id: str) -> list[Choice]:
        while (result := sampled(request_id)) is None:
            pass
        return choices(self.target.codec, result, self.params.stop_strings)

    def _frame(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.target.name,
            "choices": choices,
        }

    def _choice(self, index: int, choice: Choice) -> dict[str, Any]:
        lps = self._logprobs(choice, range(len(choice.tokens))) if self.logprobs else None
        out: dict[str, Any] = {"index": index}
        if self.kind == "text_completion":
            out["text"] = choice.text
        else:
            out["message"] = {"role": "assistant", "content": choice.text}
        return out | {"logprobs": lps, "finish_reason": choice.finish_reason}

    def _logprobs(self, choice: Choice, positions: range) -> dict[str, Any]:
        """The sampled tokens' logprobs (log softmax of logits / temperature), in the
        completions shape (with each piece's offset in the text) or the chat shape."""
        codec = self.target.codec
        tokens = [codec.decode([choice.tokens[j]]) for j in positions]
        lps = [choice.logprobs[j] for j in positions]
        if self.kind == "text_completion":
            offsets = np.cumsum([0] + [len(p) for p in choice.pieces])
            return {
                "tokens": tokens,
                "token_logprobs": lps,
                "top_logprobs": [{t: lp} for t, lp in zip(tokens, lps, strict=True)],
                "text_offset": [int(offsets[j]) for j in positions],
            }
        return {
            "content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                for t, lp in zip(tokens, lps, strict=True)
            ]
        }

    def _events(self, request_ids: list[str]) -> Iterator[str]:
        """Chat's role delta at once, then each sequence's pieces (one token each) once it is
        generated and its finish_reason; SSE comments keep the connection alive meanwhile."""
        chat = self.kind == "chat.completion"
        kind = "chat.completion.chunk" if chat else "text_completion"
        results: list[Choice] = []
        try:
            if chat:
                first = {"role": "assistant", "content": ""}
                for i in range(len(request_ids) * self.n):
                    yield _event(self._frame(kind, [self._delta(i, first)]))
            for k, request_id in enumerate(request_ids):
                while (result := sampled(request_id)) is None:
                    yield ": generating\n\n"
                for j, choice in enumerate(
                    choices(self.target.codec, result, self.params.stop_strings)
                ):
                    results.append(choice)
                    index = k * self.n + j
                    for t, piece in enumerate(choice.pieces):
                        if piece or self.logprobs:
                            lps = self._logprobs(choice, range(t, t + 1)) if self.logprobs else None
                            delta = {"content": piece} if chat else {"text": piece}
                            yield _event(self._frame(kind, [self._delta(index, delta, lps)]))
                    end = {} if chat else {"text": ""}
                    yield _event(
                        self._frame(kind, [self._delta(index, end, None, choice.finish_reason)])
                    )
            if self.include_usage:
                yield _event(self._frame(kind, []) | {"usage": usage(self.prompts, results)})
            yield "data: [DONE]\n\n"
        except TinkerdError as e:  # the status line is sent: report it in the stream
            yield _event(error_body(e, openai=True))
        except Exception as e:  # noqa: BLE001
            log.exception("streaming failed")
            error = ServerError(f"internal error: {type(e).__name__}: {e}")
            yield _event(error_body(error, openai=True))

    def _delta(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        if self.kind == "chat.completion":
            out = {"index": index, "delta": delta}
        else:
            out = {"index": index} | delta
        return out | {"logprobs": logprobs, "finish_reason": finish_reason}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
