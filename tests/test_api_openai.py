"""OpenAI-compatible serving (/v1) through the official `openai` client over real HTTP:
completions and chat completions on the built-in tiny model and on a sampler checkpoint trained
through the Tinker SDK, seeds, n, stop strings, max_tokens, usage, streaming, the model list and
bad input. The tokens match the SDK's asample for the same prompt tokens, SamplingParams and seed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import tinker
from tinker import types

from tinkerd.api import openai_request
from tinkerd.api.openai_response import token_pieces
from tinkerd.text import text_codec
from tinkerd.types import UserError

pytestmark = pytest.mark.timeout(180)

WAIT = 60
TINY = "tinkerd/tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat sees"}]
TRAIN = [[5, 17, 42, 99, 300, 7, 64, 12], [9, 8, 7, 6, 5, 4, 3]]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="tml-test", max_retries=0)


@pytest.fixture(scope="module")
def codec(server):
    return text_codec(TINY, server.settings.data_dir)


@pytest.fixture(scope="module")
def trained(server, tiny_model_dir):
    """A LoRA model on a local base model, trained one step and saved for sampling."""
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    tc = sc.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0).result(
        timeout=WAIT
    )
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(t[:-1]),
            loss_fn_inputs={"target_tokens": t[1:], "weights": [1.0] * (len(t) - 1)},
        )
        for t in TRAIN
    ]
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=5e-3))
    fb.result(timeout=WAIT), opt.result(timeout=WAIT)
    path = tc.save_weights_for_sampler("openai").result(timeout=WAIT).path
    yield SimpleNamespace(
        sc=sc,
        path=path,
        base=str(tiny_model_dir),
        codec=text_codec(str(tiny_model_dir), server.settings.data_dir),
    )
    sc.close("success").result(timeout=WAIT)


def sdk_sample(sampler, prompt: list[int], **params) -> types.SampledSequence:
    response = sampler.sample(
        types.ModelInput.from_ints(prompt),
        num_samples=1,
        sampling_params=types.SamplingParams(**params),
    ).result(timeout=WAIT)
    return response.sequences[0]


def ascii_word(text: str, start: int = 2) -> str:
    """A run of 2+ ASCII letters or digits in `text` after `start`, to use as a stop string."""
    match = re.compile(r"[A-Za-z0-9]{2,}").search(text, start)
    assert match is not None, text
    return match.group()[:2]


# -- completions -------------------------------------------------------------------------------


def test_completion_on_the_tiny_model(client, codec) -> None:
    out = client.completions.create(model=TINY, prompt="The cat sees", max_tokens=8, seed=2)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.model == TINY and isinstance(out.created, int)
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert isinstance(choice.text, str) and choice.text
    prompt_tokens = len(codec.tokenizer.encode("The cat sees").ids)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == prompt_tokens + 8


def test_default_max_tokens_is_16(client) -> None:
    out = client.completions.create(model=TINY, prompt="The cat", seed=2)
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


def test_seeds_are_reproducible(client) -> None:
    def text(seed: int) -> str:
        out = client.completions.create(model=TINY, prompt="A dog", max_tokens=10, seed=seed)
        return out.choices[0].text

    assert text(7) == text(7)
    assert text(7) != text(8)


def test_n_samples_and_several_prompts(client, codec) -> None:
    out = client.completions.create(model=TINY, prompt="A dog", max_tokens=6, n=3, seed=4)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 3  # one seed, three different samples
    assert out.usage.prompt_tokens == len(codec.tokenizer.encode("A dog").ids)
    assert out.usage.completion_tokens == 18

    # Two prompts (one as token ids) x n=2: prompt-major indices, each prompt counted once.
    ids = codec.tokenizer.encode("The sun").ids
    both = client.completions.create(model=TINY, prompt=[ids, "A dog"], max_tokens=6, n=2, seed=4)
    alone = client.completions.create(model=TINY, prompt="A dog", max_tokens=6, n=2, seed=4)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices[2:]] == [c.text for c in alone.choices]
    assert both.usage.prompt_tokens == len(ids) + out.usage.prompt_tokens
    assert both.usage.completion_tokens == 24


def test_stop_strings(client) -> None:
    full = client.completions.create(model=TINY, prompt="The moon", max_tokens=24, seed=5)
    text = full.choices[0].text
    stop = ascii_word(text)
    out = client.completions.create(
        model=TINY, prompt="The moon", max_tokens=24, seed=5, stop=[stop, "never-seen"]
    )
    [choice] = out.choices
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.index(stop)]  # cut before the stop string
    assert out.usage.completion_tokens < 24  # the sampler stopped there, it did not run on


def test_max_tokens_finishes_with_length(client) -> None:
    for max_tokens in (1, 5):
        out = client.completions.create(model=TINY, prompt="Two", max_tokens=max_tokens, seed=4)
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == max_tokens


def test_logprobs_zero_gives_the_sampled_tokens(client, codec) -> None:
    out = client.completions.create(model=TINY, prompt="Red", max_tokens=6, seed=9, logprobs=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert [list(d.values())[0] for d in lp.top_logprobs] == lp.token_logprobs
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


# -- chat --------------------------------------------------------------------------------------


def test_chat_completion_on_the_tiny_model(client, codec) -> None:
    out = client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=8, seed=1, n=2)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.model == TINY and len(out.choices) == 2
    for i, choice in enumerate(out.choices):
        assert choice.index == i and choice.message.role == "assistant"
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(codec.prompt(CHAT))
    again = client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=8, seed=1, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_chat_max_completion_tokens_and_content_parts(client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "The cat sees"}]}]
    out = client.chat.completions.create(
        model=TINY, messages=parts, max_completion_tokens=3, seed=2, logprobs=True
    )
    plain = client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "The cat sees"}], max_tokens=3, seed=2
    )
    assert out.choices[0].message.content == plain.choices[0].message.content
    assert out.usage.completion_tokens <= 3
    assert len(out.choices[0].logprobs.content) == out.usage.completion_tokens


# -- streaming ---------------------------------------------------------------------------------


def test_streamed_completion_equals_the_whole_one(client) -> None:
    kwargs = dict(model=TINY, prompt="The river", max_tokens=12, seed=11, n=2)
    whole = client.completions.create(**kwargs)
    texts, finish = ["", ""], [None, None]
    for chunk in client.completions.create(**kwargs, stream=True):
        assert chunk.object == "text_completion" and chunk.model == TINY
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]


def test_streamed_chat_equals_the_whole_one(client) -> None:
    kwargs = dict(model=TINY, messages=CHAT, max_tokens=12, seed=12, stop=["zz"])
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_wire_format(server) -> None:
    body = {"model": TINY, "prompt": "Blue", "max_tokens": 3, "seed": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=WAIT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"


def test_token_pieces_join_to_the_text(codec) -> None:
    tokens = codec.tokenizer.encode("caf\u00e9 \u4e16\u754c ok").ids  # multi-byte characters
    pieces = token_pieces(codec, tokens)
    assert len(pieces) == len(tokens) and "".join(pieces) == codec.decode(tokens)
    assert "\ufffd" not in "".join(pieces)


# -- sampler checkpoints and parity with the SDK ------------------------------------------------


def test_completion_from_a_sampler_checkpoint_matches_the_sdk(client, trained) -> None:
    prompt = trained.codec.tokenizer.encode("The cat sees the dog").ids
    sampler = trained.sc.create_sampling_client(model_path=trained.path).result(timeout=WAIT)
    expected = sdk_sample(sampler, prompt, max_tokens=10, temperature=0.9, top_p=0.95, seed=21)
    for given in (prompt, "The cat sees the dog"):  # token ids, and the same text
        out = client.completions.create(
            model=trained.path,
            prompt=given,
            max_tokens=10,
            temperature=0.9,
            top_p=0.95,
            seed=21,
            logprobs=0,
        )
        [choice] = out.choices
        assert out.model == trained.path
        assert out.usage.prompt_tokens == len(prompt)
        assert out.usage.completion_tokens == len(expected.tokens)
        assert choice.text == trained.codec.decode(expected.tokens)
        assert choice.logprobs.tokens == [trained.codec.decode([t]) for t in expected.tokens]
        np.testing.assert_allclose(choice.logprobs.token_logprobs, expected.logprobs, atol=1e-5)
        assert choice.finish_reason == ("stop" if expected.stop_reason == "stop" else "length")


def test_chat_from_a_sampler_checkpoint_matches_the_sdk(client, trained) -> None:
    codec = trained.codec
    im_end = codec.tokenizer.token_to_id("<|im_end|>")
    sampler = trained.sc.create_sampling_client(model_path=trained.path).result(timeout=WAIT)
    # A chat reply stops at EOS and at the template's end of turn, as `stop` token ids do.
    expected = sdk_sample(sampler, codec.prompt(CHAT), max_tokens=12, seed=5, stop=[im_end])
    out = client.chat.completions.create(model=trained.path, messages=CHAT, max_tokens=12, seed=5)
    assert out.choices[0].message.content == codec.decode(expected.tokens)
    assert out.usage.completion_tokens == len(expected.tokens)
    assert out.usage.prompt_tokens == len(codec.prompt(CHAT))


def test_base_model_completion_matches_the_sdk(client, server) -> None:
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    try:
        sampler = sc.create_sampling_client(base_model=TINY).result(timeout=WAIT)
        prompt = [5, 17, 42, 99, 300, 7]
        expected = sdk_sample(sampler, prompt, max_tokens=9, seed=13, stop=["ab", "cd"])
        out = client.completions.create(
            model=TINY, prompt=prompt, max_tokens=9, seed=13, stop=["ab", "cd"]
        )
        text = text_codec(TINY, server.settings.data_dir).decode(expected.tokens)
        cut = min([text.index(s) for s in ("ab", "cd") if s in text], default=len(text))
        assert out.choices[0].text == text[:cut]
        assert out.usage.completion_tokens == len(expected.tokens)
    finally:
        sc.close("success").result(timeout=WAIT)


def test_the_model_list(client, trained) -> None:
    models = {m.id: m for m in client.models.list()}
    assert TINY in models and trained.base in models
    assert trained.path in models and models[trained.path].model_extra["parent"] == trained.base
    assert all(m.object == "model" and m.owned_by == "tinkerd" for m in models.values())
    assert client.models.retrieve(TINY).id == TINY
    assert client.models.retrieve(trained.path).id == trained.path


# -- bad input ---------------------------------------------------------------------------------


def bad(call, error: type[openai.APIStatusError], *fragments: str, param: str | None = None):
    with pytest.raises(error) as info:
        call()
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error", body
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    if param is not None:
        assert body["param"] == param
    return body


def test_unknown_models_are_not_found(client) -> None:
    for model in ("no-such/model", "/no/such/dir", "tinker://nobody/sampler_weights/x"):
        body = bad(
            lambda m=model: client.completions.create(model=m, prompt="x", max_tokens=2),
            openai.NotFoundError,
            model,
            param="model",
        )
        assert body["code"] == "model_not_found"
    bad(
        lambda: client.chat.completions.create(model="gone/model", messages=CHAT, max_tokens=2),
        openai.NotFoundError,
        "gone/model",
    )
    bad(lambda: client.models.retrieve("no-such/model"), openai.NotFoundError, "no-such/model")


@pytest.mark.parametrize(
    "options, fragment, param",
    [
        ({"max_tokens": "ten"}, "'max_tokens' must be an integer", "max_tokens"),
        ({"max_tokens": 0}, "'max_tokens' must be an integer >= 1", "max_tokens"),
        ({"temperature": -1}, "'temperature'", "temperature"),
        ({"top_p": 1.5}, "'top_p' must be in (0, 1]", "top_p"),
        ({"n": 0}, "'n'", "n"),
        ({"seed": "x"}, "'seed' must be an integer", "seed"),
        ({"stop": [""]}, "'stop'", "stop"),
        ({"logprobs": 2}, "logprobs > 0", "logprobs"),
        ({"echo": True}, "echo is not supported", "echo"),
        ({"frequency_penalty": 0.5}, "frequency_penalty is not supported", "frequency_penalty"),
        ({"best_of": 3}, "best_of", "best_of"),
        ({"prompt": ""}, "the prompt is empty", "prompt"),
        ({"prompt": [1, "x"]}, "'prompt' must be", "prompt"),
        ({"prompt": [5, 99999]}, "prompt token ids must be in [0, 909)", "prompt"),
        ({"stream": "yes"}, "'stream' must be true or false", "stream"),
    ],
)
def test_bad_completion_requests(server, client, options, fragment, param) -> None:
    pending = server.scheduler.futures.pending()
    request = {"model": TINY, "prompt": "x", "max_tokens": 2} | options
    bad(lambda: client.completions.create(**request), openai.BadRequestError, fragment, param=param)
    assert server.scheduler.futures.pending() == pending  # nothing was queued


def test_prompt_over_the_context_length(server, client) -> None:
    long_text = "cat " * 2100
    body = bad(
        lambda: client.completions.create(model=TINY, prompt=long_text, max_tokens=2),
        openai.BadRequestError,
        "over the model's context length of 2048",
    )
    assert body["code"] == "context_length_exceeded"
    bad(
        lambda: client.completions.create(model=TINY, prompt="cat", max_tokens=2048),
        openai.BadRequestError,
        "plus max_tokens (2048)",
    )
    messages = [{"role": "user", "content": long_text}]
    bad(
        lambda: client.chat.completions.create(model=TINY, messages=messages),
        openai.BadRequestError,
        "context length",
        param="messages",
    )


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "messages must be a non-empty list"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role must be one of"),
        ([{"role": "user", "content": ""}], "messages[0].content must be a non-empty string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content parts"),
        ("hello", "messages must be a non-empty list"),
    ],
)
def test_bad_messages(server, client, messages, fragment) -> None:
    pending = server.scheduler.futures.pending()
    bad(
        lambda: client.chat.completions.create(model=TINY, messages=messages, max_tokens=2),
        openai.BadRequestError,
        fragment,
        param="messages",
    )
    assert server.scheduler.futures.pending() == pending


def test_unsupported_chat_options(client) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for options, fragment in (
        ({"tools": [tool]}, "tools is not supported"),
        ({"top_logprobs": 2, "logprobs": True}, "top_logprobs is not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format is not supported"),
    ):
        bad(
            lambda o=options: client.chat.completions.create(
                model=TINY, messages=CHAT, max_tokens=2, **o
            ),
            openai.BadRequestError,
            fragment,
        )


def test_a_body_that_is_not_json(server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=b"{nope", timeout=WAIT)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the request body must be a JSON object"


def test_the_server_keeps_serving_after_bad_input(client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY, prompt="x", max_tokens="ten")  # type: ignore[arg-type]
    out = client.completions.create(model=TINY, prompt="x", max_tokens=2, seed=2)
    assert out.usage.completion_tokens == 2


def test_a_failed_sample_is_reported(server, client, monkeypatch) -> None:
    """An error the worker settles a sample with: a 4xx, or an error event once streaming."""
    monkeypatch.setattr(
        server.backend, "sample_start", lambda request, done: done(UserError("no room"))
    )
    bad(
        lambda: client.completions.create(model=TINY, prompt="x", max_tokens=2),
        openai.BadRequestError,
        "no room",
    )
    with pytest.raises(openai.APIError, match="no room"):
        list(client.chat.completions.create(model=TINY, messages=CHAT, stream=True))


def test_an_internal_error_in_openai_shape(server, client, monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(openai_request, "text_codec", broken)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=TINY, prompt="x", max_tokens=2)
    assert info.value.body == {
        "message": "internal error: RuntimeError: boom",
        "type": "server_error",
        "param": None,
        "code": None,
    }


# -- plumbing ----------------------------------------------------------------------------------


def test_the_api_never_imports_torch(tmp_path) -> None:
    code = (
        "import sys, tinkerd.app, tinkerd.api.openai\n"
        "from tinkerd.config import Settings\n"
        "from tinkerd.tasks import Scheduler\n"
        f"tinkerd.app.create_app(Settings.load(data_dir={str(tmp_path)!r}), Scheduler())\n"
        "assert 'torch' not in sys.modules, 'the API imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT)
