"""Text in and out for the API's text routes (the seed's JSON API, OpenAI-compatible serving):
a base model's tokenizer and chat template, loaded without torch.

The API never imports torch, and transformers' tokenizer classes do, so this reads the model's
`tokenizer.json` with `tokenizers` and renders its chat template with jinja2 (as transformers does,
in a sandbox). A model without a chat template gets a documented plain one (`PLAIN_TEMPLATE`).
Only the tokens of assistant messages carry loss weight.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tinkerd.base_models import TINY_MODEL, resolve_base_model
from tinkerd.types import UserError

ROLES = ("system", "user", "assistant", "tool")

# For a model whose tokenizer has no chat template: each message as "<role>: <content>" on its
# own line, then "assistant: " when a reply is to be generated.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def validate_messages(raw: Any, where: str = "messages") -> list[dict[str, str]]:
    """A conversation: a non-empty list of {"role", "content"} with a known role and non-empty
    string content."""
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where} must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise UserError(f"{where}[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{where}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content:
            raise UserError(f"{where}[{i}].content must be a non-empty string")
        messages.append({"role": role, "content": content})
    return messages


@dataclass
class TextCodec:
    """A base model's tokenizer, chat template, stop tokens and context length."""

    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str
    eos_token_ids: frozenset[int]
    context_length: int
    has_chat_template: bool

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokens of a conversation, ready for the assistant's reply."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def training_tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], list[float]]:
        """The tokens of a whole conversation and a weight per token: 1 for an assistant
        message's content and the template's end of it, 0 for everything else (the prompt, and
        the header that add_generation_prompt would add before an assistant reply).

        Each message's text is what rendering the conversation up to it adds to rendering it up
        to the one before, so the weights follow the chat template whatever its markup."""
        tokens: list[int] = []
        weights: list[float] = []
        before = ""
        for i, message in enumerate(messages):
            upto = self.render(messages[: i + 1])
            if not upto.startswith(before):
                raise UserError("the chat template does not render conversations incrementally")
            added, header = upto[len(before) :], ""
            if message["role"] == "assistant":
                prompt = self.render(messages[:i], add_generation_prompt=True)
                if prompt.startswith(before) and upto.startswith(prompt):
                    header, added = prompt[len(before) :], upto[len(prompt) :]
            for text, weight in ((header, 0.0), (added, float(message["role"] == "assistant"))):
                piece = self.encode(text) if text else []
                tokens += piece
                weights += [weight] * len(piece)
            before = upto
        return tokens, weights

    def end_of_turn(self) -> tuple[int, ...]:
        """The special token the chat template closes an assistant message with (`<|im_end|>`,
        `<|eot_id|>`, ...): a chat reply stops there as it does at EOS. () if there is none."""
        user = [{"role": "user", "content": "hi"}]
        try:
            prompt = self.render(user, add_generation_prompt=True)
            full = self.render(user + [{"role": "assistant", "content": "ok"}])
        except Exception:  # noqa: BLE001 - a template that cannot render this has no marker
            return ()
        if not full.startswith(prompt + "ok"):
            return ()
        tail = self.encode(full[len(prompt) + 2 :])
        return tuple(tail[:1]) if tail and self.decode(tail[:1]) == "" else ()

    def check_length(self, n_tokens: int, what: str = "the prompt") -> None:
        if n_tokens > self.context_length:
            raise UserError(
                f"{what} is {n_tokens} tokens, over the model's context length "
                f"of {self.context_length}"
            )


def stop_cut(text: str, stops: Iterable[str]) -> int | None:
    """Where a completion's text ends: the start of the first stop string in it, else None.

    The sampler stops on the token that completes a stop string and returns that token, so the
    text holds the stop string; /sample, /v1 and `tinkerd sample` all return it cut here, as
    OpenAI does."""
    return min((i for s in stops if (i := text.find(s)) >= 0), default=None)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, **kw)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


_codecs: dict[str, TextCodec] = {}
_lock = threading.Lock()


def text_codec(base_model: str, data_dir: Path) -> TextCodec:
    """The TextCodec of `base_model` (cached per location)."""
    source = resolve_base_model(base_model, data_dir)
    with _lock:
        codec = _codecs.get(source.location)
        if codec is None:
            codec = _codecs[source.location] = (
                _tiny_codec() if source.builtin else _load(source.location)
            )
        return codec


def _tiny_codec() -> TextCodec:
    """The built-in model's tokenizer, trained here exactly as the worker trains it."""
    from tinkerd.tiny_model import CHAT_TEMPLATE, EOS_TOKEN, MAX_POSITIONS, train_tokenizer

    tokenizer = train_tokenizer()
    return TextCodec(
        tokenizer,
        CHAT_TEMPLATE,
        frozenset({tokenizer.token_to_id(EOS_TOKEN)}),
        MAX_POSITIONS,
        has_chat_template=True,
    )


def _load(location: str) -> TextCodec:
    from tokenizers import Tokenizer

    directory = Path(location)
    if not directory.is_dir():
        directory = _hub_files(location)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"{location} has no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    config = _read_json(directory / "tokenizer_config.json")
    model_config = _read_json(directory / "config.json")
    template = config.get("chat_template") or _saved_template(directory)
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eos_ids: set[int] = set()
    eos = model_config.get("eos_token_id")
    eos_ids.update([eos] if isinstance(eos, int) else (eos or []))
    eos_token = config.get("eos_token")
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    eos_token_id = tokenizer.token_to_id(eos_token) if isinstance(eos_token, str) else None
    if eos_token_id is not None:
        eos_ids.add(eos_token_id)
    return TextCodec(
        tokenizer,
        template or PLAIN_TEMPLATE,
        frozenset(eos_ids),
        int(model_config.get("max_position_embeddings") or 2048),
        has_chat_template=bool(template),
    )


def _saved_template(directory: Path) -> str | list | None:
    """The chat template that newer transformers save beside tokenizer_config.json."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return _read_json(directory / "chat_template.json").get("chat_template")


def _hub_files(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name,
                allow_patterns=[
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "config.json",
                    "chat_template.jinja",
                    "chat_template.json",
                ],
            )
        )
    except Exception as e:  # noqa: BLE001 - offline, unknown model: one clear error
        raise UserError(f"cannot load the tokenizer of {name!r}: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


__all__ = ["PLAIN_TEMPLATE", "ROLES", "TINY_MODEL", "TextCodec", "text_codec", "validate_messages"]
