"""OpenAI-compatible serving under /v1: completions, chat completions and the model list.

Text in, text out over the SDK's own sampling path: a view tokenizes the prompt (or renders the
conversation with the chat template) with the base model's TextCodec, queues a `Sample` on the
scheduler's unordered queue exactly as asample does, waits on its future and decodes the tokens.
The engine returns whole sequences, so `stream=true` sends a sequence's chunks once it is
generated. Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, request, stream_with_context

from tinkerd.api import limits, registry, service
from tinkerd.api.queueing import submit_unordered, wait
from tinkerd.api.validation import get_bool, get_float, get_int, json_body
from tinkerd.api.weights import checkpoint_meta
from tinkerd.base_models import TINY_MODEL, resolve_base_model
from tinkerd.text import TextCodec, stop_cut, text_codec, validate_messages
from tinkerd.types import (
    OpenAIError,
    Sample,
    SampleResult,
    SamplerWeights,
    SamplingParams,
    ServerError,
    TinkerdError,
    UserError,
    error_body,
)
from tinkerd.wire import MAX_NUM_SAMPLES

log = logging.getLogger(__name__)

bp = Blueprint("openai", __name__, url_prefix="/v1")

# Options refused unless absent or at a value that changes nothing, rather than silently ignored.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "suffix": ("",),
    "echo": (False,),
    "tools": ([],),
    "functions": ([],),
    "response_format": ({"type": "text"},),
}


@bp.errorhandler(TinkerdError)
def tinkerd_error(e: TinkerdError):
    return jsonify(error_body(e, openai=True)), e.status


@bp.after_app_request
def openai_errors(response: Response) -> Response:
    """The app's other error answers under /v1 (`{"error": "...", "category"}`: an unknown
    method or path, an internal error, a cluster's Redis being down) in OpenAI's shape, status
    and headers kept. An app hook, as a path no route matches never reaches the blueprint's."""
    if request.path != bp.url_prefix and not request.path.startswith(f"{bp.url_prefix}/"):
        return response
    body = response.get_json(silent=True) if response.is_json else None
    if (
        response.status_code >= 400
        and isinstance(body, dict)
        and isinstance(body.get("error"), str)
    ):
        error = TinkerdError(body["error"], response.status_code)
        response.set_data(json.dumps(error_body(error, openai=True)))
    return response


# -- what to sample from ---------------------------------------------------------------------


@dataclass
class Target:
    """A request's `model`: the weights it names and its base model's tokenizer."""

    name: str  # as the request gave it, reported back
    weights: SamplerWeights
    codec: TextCodec


def resolve_target(model: object) -> Target:
    """A base model (`tinkerd/tiny`, a local model directory, a hub name this server can load)
    or a checkpoint path `tinker://<model_id>/sampler_weights/<name>`; 404 otherwise."""
    if not isinstance(model, str) or not model:
        raise OpenAIError("'model' must be a non-empty string", param="model")
    data_dir = service().settings.data_dir
    try:
        if model.startswith("tinker://"):
            path, meta = checkpoint_meta(model)
            weights = SamplerWeights(meta.base_model, model_path=str(path))
        else:
            weights = SamplerWeights(resolve_base_model(model, data_dir).name)
    except UserError as e:
        raise _not_found(model, e) from None
    source = resolve_base_model(weights.base_model, data_dir)
    try:
        codec = text_codec(weights.base_model, data_dir)
    except UserError as e:  # a hub name that cannot be loaded here is a model we do not have
        if source.builtin or Path(source.location).is_dir():
            raise OpenAIError(f"model {model!r}: {e.message}", param="model") from None
        raise _not_found(model, e) from None
    return Target(model, weights, codec)


def _not_found(model: str, e: UserError) -> OpenAIError:
    message = f"model {model!r} does not exist on this server: {e.message}"
    return OpenAIError(message, 404, "model", "model_not_found")


# -- request options -------------------------------------------------------------------------


def sampling_params(
    body: dict[str, Any], max_tokens_key: str, default_max: int | None
) -> tuple[SamplingParams, int]:
    """OpenAI's options as SamplingParams, and n. Stop strings go to the sampler, which stops
    on them; options that would change the output and are not supported are refused."""
    for key, no_ops in NO_OP_VALUES.items():
        if body.get(key) is not None and body[key] not in no_ops:
            raise OpenAIError(f"{key} is not supported by this server", param=key)
    n = _option(body, "n", 1, lambda: get_int(body, "n", minimum=1))
    if n > MAX_NUM_SAMPLES:
        raise OpenAIError(f"'n' must be at most {MAX_NUM_SAMPLES}, got {n}", param="n")
    if body.get("best_of") not in (None, n):
        raise OpenAIError("best_of is not supported by this server (leave it out)", param="best_of")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OpenAIError(f"'seed' must be an integer, got {seed!r}", param="seed")
    max_tokens = _option(
        body, max_tokens_key, default_max, lambda: get_int(body, max_tokens_key, minimum=1)
    )
    top_k = _option(body, "top_k", -1, lambda: get_int(body, "top_k", minimum=-1))  # vLLM's
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_option(body, "temperature", 1.0, lambda: get_float(body, "temperature")),
        top_k=top_k or -1,
        top_p=_option(body, "top_p", 1.0, lambda: _top_p(body)),
        seed=seed,
        stop_strings=_stop(body.get("stop")),
    )
    return params, n


def _option(body: dict[str, Any], key: str, default: Any, get: Callable[[], Any]) -> Any:
    """get() when `key` is given (not null), else `default`; a bad value names the param."""
    if body.get(key) is None:
        return default
    try:
        return get()
    except UserError as e:
        raise OpenAIError(e.message, param=key) from None


def _top_p(body: dict[str, Any]) -> float:
    top_p = get_float(body, "top_p")
    if not 0 < top_p <= 1:
        raise UserError(f"'top_p' must be in (0, 1], got {top_p}")
    return top_p


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError("'stop' must be a non-empty string or a list of them", param="stop")
    return tuple(stops)


def check_length(target: Target, prompt: list[int], max_tokens: int | None, param: str) -> None:
    """Room in the context for the prompt and max_tokens (or at least one generated token)."""
    if not prompt:
        raise OpenAIError("the prompt is empty", param=param)
    most = limits().max_sequence_tokens
    if len(prompt) > most:
        raise OpenAIError(
            f"the prompt has {len(prompt)} tokens; the server takes at most {most} per sequence",
            status=413,
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        what = f"the prompt ({len(prompt)} tokens) plus one generated token"
    else:
        what = f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens})"
    try:
        target.codec.check_length(len(prompt) + (max_tokens or 1), what)
    except UserError as e:
        raise OpenAIError(e.message, param=param, code="context_length_exceeded") from None


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


# -- the routes ------------------------------------------------------------------------------


@bp.get("/models")
def list_models():
    """The built-in model, the base models of live training runs, and every run's sampler
    checkpoints (each with its base model as `parent`)."""
    svc = service()
    cards = {TINY_MODEL: _card(TINY_MODEL, 0)}
    for model in sorted(registry().models(), key=lambda m: m.created_at):
        cards.setdefault(model.base_model, _card(model.base_model, model.created_at))
    for run in registry().runs():
        for meta in svc.store.list(run.model_id):
            if meta.kind == "sampler_weights":
                cards[meta.tinker_path] = _card(meta.tinker_path, meta.created_at, meta.base_model)
    return jsonify({"object": "list", "data": list(cards.values())})


@bp.get("/models/<path:model>", merge_slashes=False)
def get_model(model: str):
    if model.startswith("tinker:/") and not model.startswith("tinker://"):
        model = "tinker://" + model[len("tinker:/") :]  # a proxy merged the slashes
    target = resolve_target(model)
    if target.weights.model_path is None:
        return jsonify(_card(model, 0))
    meta = checkpoint_meta(target.weights.model_path)[1]
    return jsonify(_card(model, meta.created_at, meta.base_model))


def _card(name: str, created: float, parent: str | None = None) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": int(created), "owned_by": "tinkerd"}
    return card | ({"parent": parent} if parent else {})


@bp.post("/completions")
def completions():
    body = json_body()
    target = resolve_target(body.get("model"))
    params, n = sampling_params(body, "max_tokens", default_max=16)  # OpenAI's default
    logprobs = _option(body, "logprobs", None, lambda: get_int(body, "logprobs"))
    if logprobs:
        raise OpenAIError(
            "logprobs > 0 (each token's top alternatives) is not supported by this server; "
            "logprobs=0 returns the sampled tokens' logprobs",
            param="logprobs",
        )
    prompts = completion_prompts(target.codec, body.get("prompt"))
    if len(prompts) * n > MAX_NUM_SAMPLES:
        raise OpenAIError(f"at most {MAX_NUM_SAMPLES} completions (prompts x n) per request")
    for prompt in prompts:
        check_length(target, prompt, params.max_tokens, "prompt")
    options = stream_options(body)
    return Reply(
        "text_completion", target, prompts, params, n, logprobs is not None, **options
    ).respond()


@bp.post("/chat/completions")
def chat_completions():
    body = json_body()
    target = resolve_target(body.get("model"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params, n = sampling_params(body, key, default_max=None)  # up to the context, as OpenAI
    params = replace(params, stop_tokens=target.codec.end_of_turn() or None)
    logprobs = _option(body, "logprobs", False, lambda: get_bool(body, "logprobs", False))
    if _option(body, "top_logprobs", 0, lambda: get_int(body, "top_logprobs")):
        raise OpenAIError(
            "top_logprobs is not supported by this server; logprobs=true returns the sampled "
            "tokens' logprobs",
            param="top_logprobs",
        )
    try:
        messages = validate_messages(_text_messages(body.get("messages")))
    except UserError as e:
        raise OpenAIError(e.message, param="messages") from None
    prompt = target.codec.prompt(messages)
    check_length(target, prompt, params.max_tokens, "messages")
    options = stream_options(body)
    return Reply("chat.completion", target, [prompt], params, n, logprobs, **options).respond()


def stream_options(body: dict[str, Any]) -> dict[str, bool]:
    """Reply's `stream` and `include_usage`, checked before anything is queued."""
    stream = _option(body, "stream", False, lambda: get_bool(body, "stream", False))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise OpenAIError("'stream_options' must be an object", param="stream_options")
    return {"stream": stream, "include_usage": options.get("include_usage") is True}


def completion_prompts(codec: TextCodec, prompt: Any) -> list[list[int]]:
    """A completion's prompts as token ids: a string, a list of strings, a list of token ids or
    a list of such lists. Text is encoded as the tokenizer's encode(text) does (BOS added where
    its post-processor adds one), as transformers' tokenizer(text) and vLLM do."""
    if isinstance(prompt, str) or _is_ids(prompt):
        items = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or _is_ids(p) for p in prompt)
    ):
        items = prompt
    else:
        raise OpenAIError(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids",
            param="prompt",
        )
    vocab = codec.tokenizer.get_vocab_size(with_added_tokens=True)
    prompts = []
    for item in items:
        tokens = list(codec.tokenizer.encode(item).ids) if isinstance(item, str) else item
        if any(not 0 <= t < vocab for t in tokens):
            raise OpenAIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        prompts.append(tokens)
    return prompts


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _text_messages(raw: Any) -> Any:
    """OpenAI's text content parts joined into one string, and the "developer" role read as
    "system"; validate_messages checks the rest."""
    if not isinstance(raw, list):
        return raw
    messages = []
    for message in raw:
        if isinstance(message, dict):
            message = dict(message)
            if message.get("role") == "developer":
                message["role"] = "system"
            content = message.get("content")
            if isinstance(content, list):
                if not all(
                    isinstance(p, dict)
                    and p.get("type") == "text"
                    and isinstance(p.get("text"), str)
                    for p in content
                ):
                    raise OpenAIError("only text content parts are supported", param="messages")
                message["content"] = "".join(p["text"] for p in content)
        messages.append(message)
    return messages


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
