"""Reading an OpenAI request: the `model` it samples from, its options as SamplingParams, its
prompts as token ids and its messages as text.

Every refusal is an OpenAIError naming the param, raised before anything is queued; options
tinkerd does not support are refused unless absent or at a value that changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinkerd.api import limits, service
from tinkerd.api.validation import get_bool, get_float, get_int
from tinkerd.api.weights import checkpoint_meta
from tinkerd.base_models import resolve_base_model
from tinkerd.text import TextCodec, text_codec
from tinkerd.types import OpenAIError, SamplerWeights, SamplingParams, UserError
from tinkerd.wire.limits import MAX_NUM_SAMPLES

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
    n = option(body, "n", 1, lambda: get_int(body, "n", minimum=1))
    if n > MAX_NUM_SAMPLES:
        raise OpenAIError(f"'n' must be at most {MAX_NUM_SAMPLES}, got {n}", param="n")
    if body.get("best_of") not in (None, n):
        raise OpenAIError("best_of is not supported by this server (leave it out)", param="best_of")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OpenAIError(f"'seed' must be an integer, got {seed!r}", param="seed")
    max_tokens = option(
        body, max_tokens_key, default_max, lambda: get_int(body, max_tokens_key, minimum=1)
    )
    top_k = option(body, "top_k", -1, lambda: get_int(body, "top_k", minimum=-1))  # vLLM's
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=option(body, "temperature", 1.0, lambda: get_float(body, "temperature")),
        top_k=top_k or -1,
        top_p=option(body, "top_p", 1.0, lambda: _top_p(body)),
        seed=seed,
        stop_strings=_stop(body.get("stop")),
    )
    return params, n


def option(body: dict[str, Any], key: str, default: Any, get: Callable[[], Any]) -> Any:
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


def stream_options(body: dict[str, Any]) -> dict[str, bool]:
    """Reply's `stream` and `include_usage`, checked before anything is queued."""
    stream = option(body, "stream", False, lambda: get_bool(body, "stream", False))
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


def text_messages(raw: Any) -> Any:
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
