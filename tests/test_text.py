"""tinkerd/text.py: tokenizers and chat templates without torch, against transformers' own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tinkerd.text import PLAIN_TEMPLATE, text_codec, validate_messages
from tinkerd.types import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6 of course"},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_built_in_tokenizer_is_the_workers(tmp_path: Path, hf_tokenizer) -> None:
    """tinkerd/tiny's tokenizer, trained in the API process, equals the one the model is built
    with (the fixture builds that model with the same code)."""
    codec = text_codec("tinkerd/tiny", tmp_path)
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert codec.render(CHAT) == text
    assert codec.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert codec.eos_token_ids == {hf_tokenizer.eos_token_id}


def test_a_local_model_directory(tiny_model_dir: Path, hf_tokenizer) -> None:
    codec = text_codec(str(tiny_model_dir), tiny_model_dir.parent)
    prompt = hf_tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=False)
    assert codec.prompt(CHAT[:2]) == hf_tokenizer.encode(prompt, add_special_tokens=False)
    assert codec.decode(codec.encode("the cat sees a dog")) == "the cat sees a dog"
    assert codec.has_chat_template


def test_only_assistant_replies_carry_weight(tmp_path: Path) -> None:
    codec = text_codec("tinkerd/tiny", tmp_path)
    tokens, weights = codec.training_tokens(CHAT)
    assert tokens == codec.encode(codec.render(CHAT))
    assert len(weights) == len(tokens)
    trained = codec.decode([t for t, w in zip(tokens, weights, strict=True) if w])
    assert trained == "4\n6 of course\n"  # each reply and its end of turn (<|im_end|> is special)
    assert "user" not in trained and "assistant" not in trained


def test_end_of_turn_is_the_templates_closing_token(tmp_path: Path) -> None:
    codec = text_codec("tinkerd/tiny", tmp_path)
    (token,) = codec.end_of_turn()
    assert codec.tokenizer.id_to_token(token) == "<|im_end|>"


def test_a_model_without_a_chat_template_gets_the_plain_one(tmp_path: Path, tiny_model_dir) -> None:
    import json
    import shutil

    model = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    codec = text_codec(str(model), tmp_path)
    assert codec.chat_template == PLAIN_TEMPLATE and not codec.has_chat_template
    assert codec.render(CHAT[1:3]) == "user: What is 2 + 2?\nassistant: 4\n"
    assert codec.end_of_turn() == ()
    _, weights = codec.training_tokens(CHAT[1:3])
    assert sum(weights) == len(codec.encode("4\n"))


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([["user", "hi"]], "must be an object"),
        ([{"role": "wizard", "content": "hi"}], "role must be one of"),
        ([{"role": "user", "content": ""}], "non-empty string"),
        ([{"role": "user", "content": 3}], "non-empty string"),
    ],
)
def test_malformed_messages_are_refused(messages: object, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        validate_messages(messages)


def test_no_torch_is_imported() -> None:
    code = (
        "import sys, tempfile, pathlib; from tinkerd.text import text_codec; "
        "text_codec('tinkerd/tiny', pathlib.Path(tempfile.mkdtemp())).encode('hi'); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
