"""Sampling as a server, through the official SDK over real HTTP: sampling sessions (an unnamed
snapshot, a named sampler checkpoint, a base model alone), GET samplers/{id}, sample_sequence_ids,
batching of concurrent requests, the sampler-checkpoint cache, and bad input.

Bad input gets a clear user error (a 4xx with a JSON body, or a failed future of category "user"),
changes nothing, and the server and the same SamplingClient keep serving.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tinkerd import checkpoint_io, sampling

pytestmark = pytest.mark.timeout(120)

WAIT = 60
VOCAB = 909  # the tiny model's vocabulary (tinkerd/tiny_model.py)
CONTEXT = 2048  # and its max_position_embeddings
HEADERS = {"X-API-Key": "tml-test"}
PROMPT = [5, 17, 42, 99, 300, 7]
TRAIN = [[5, 17, 42, 99, 300, 7, 64, 12], [9, 8, 7, 6, 5, 4, 3]]


# -- helpers -------------------------------------------------------------------------------------


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def train_step(tc, lr: float = 5e-3) -> None:
    fb = tc.forward_backward([datum(t) for t in TRAIN], "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=lr))
    fb.result(timeout=WAIT), opt.result(timeout=WAIT)


def trainer_logprobs(tc, tokens: list[int]) -> np.ndarray:
    out = tc.forward([datum(tokens)], "cross_entropy").result(timeout=WAIT)
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def scored(sampler, tokens: list[int]) -> np.ndarray:
    """compute_logprobs without its leading None."""
    lps = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result(timeout=WAIT)
    assert len(lps) == len(tokens) and lps[0] is None
    return np.asarray(lps[1:], dtype=np.float32)


def submit(sampler, prompt, num_samples=1, **kwargs):
    """A sample future; keyword arguments go to SamplingParams, except the logprob options."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in types.SamplingParams.model_fields}
    return sampler.sample(
        types.ModelInput.from_ints(prompt),
        num_samples=num_samples,
        sampling_params=types.SamplingParams(**kwargs),
        **options,
    )


def greedy(sampler, prompt=PROMPT) -> list[int]:
    response = submit(sampler, prompt, max_tokens=12, temperature=0.0, stop=[]).result(timeout=WAIT)
    return response.sequences[0].tokens


def outcome(response: types.SampleResponse) -> list[tuple]:
    """The parts of a SampleResponse that must not depend on what else was batched."""
    return [(s.tokens, s.stop_reason, len(s.logprobs)) for s in response.sequences]


def assert_same_response(got: types.SampleResponse, expected: types.SampleResponse) -> None:
    assert outcome(got) == outcome(expected)
    for g, e in zip(got.sequences, expected.sequences, strict=True):
        np.testing.assert_allclose(g.logprobs, e.logprobs, rtol=0, atol=1e-5)
    if expected.prompt_logprobs is None:
        assert got.prompt_logprobs is None
    else:
        assert got.prompt_logprobs[0] is None and expected.prompt_logprobs[0] is None
        np.testing.assert_allclose(
            got.prompt_logprobs[1:], expected.prompt_logprobs[1:], rtol=0, atol=1e-5
        )


def post(server, path: str, body: dict[str, Any]) -> httpx.Response:
    content = json.dumps(body)  # json.dumps writes NaN and Infinity, as a careless client might
    headers = {**HEADERS, "Content-Type": "application/json"}
    return httpx.post(f"{server.url}/api/v1/{path}", content=content, headers=headers, timeout=WAIT)


def get(server, path: str) -> httpx.Response:
    return httpx.get(f"{server.url}/api/v1/{path}", headers=HEADERS, timeout=WAIT)


def assert_user_error(r: httpx.Response, *fragments: str, status: int = 400) -> str:
    """A 4xx answer with a JSON body {"error": <message>, "category": "user"}."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["category"] == "user" and isinstance(body["error"], str) and body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


def user_error(future, *fragments: str, status: int | None = None) -> str:
    """The SDK's error for a refused request: a 4xx at submit (with `status`), or a failed future
    of category user (status None). Returns the message."""
    with pytest.raises((tinker.APIStatusError, tinker.RequestFailedError)) as info:
        future.result(timeout=WAIT)
    error = info.value
    if isinstance(error, tinker.APIStatusError):
        assert status is not None, f"expected a failed future, got a {error.status_code}: {error}"
        assert error.status_code == status, error
        assert isinstance(error.body, dict) and error.body["category"] == "user", error.body
        message = error.body["error"]
    else:
        assert status is None, f"expected a {status} at submit, got a failed future: {error}"
        assert error.category == "user", error
        message = error.message
    for fragment in fragments:
        assert fragment in message, message
    return message


class Batches:
    """Records how the worker's sampling engine batches: per engine step, the requests in it
    (decoding or joining) and their adapters. Closed, it holds the sampling thread before it
    takes the waiting requests until `release_when_queued`, so that concurrent requests meet in
    the engine's batch."""

    def __init__(self, server, monkeypatch, closed: bool) -> None:
        self.server = server
        self.steps: list[tuple[int, set]] = []  # (requests in the step, their adapters)
        self._open = threading.Event()
        if not closed:
            self._open.set()
        real_take, real_pass = server.scheduler.take_unordered, sampling.Engine._pass

        def take_unordered(timeout):
            parked.set()
            assert self._open.wait(WAIT)
            return real_take(timeout)

        def record(engine, model, routed, decoding, joining):
            requests = {id(r.request): r.request for r in decoding} | {id(q): q for q in joining}
            self.steps.append((len(requests), {q.adapter for q in requests.values()}))
            return real_pass(engine, model, routed, decoding, joining)

        parked = threading.Event()
        monkeypatch.setattr(server.scheduler, "take_unordered", take_unordered)
        monkeypatch.setattr(sampling.Engine, "_pass", record)
        # the sampling thread may be inside the real take_unordered: wait until it is held
        assert parked.wait(WAIT)

    def release_when_queued(self, n: int) -> None:
        """Open once all `n` submitted requests are queued."""
        deadline = time.monotonic() + WAIT
        while self.server.scheduler.queue_depth() < n:
            assert time.monotonic() < deadline, self.server.scheduler.queue_depth()
            time.sleep(0.01)
        self._open.set()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(server, tiny_model_dir):
    """A model trained one step, an unnamed snapshot sampler of it, and a base-model sampler."""
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    tc = sc.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0).result(
        timeout=WAIT
    )
    train_step(tc)
    snapshot = tc.save_weights_and_get_sampling_client().result(timeout=WAIT)
    base = sc.create_sampling_client(base_model=str(tiny_model_dir)).result(timeout=WAIT)
    yield SimpleNamespace(sc=sc, tc=tc, snapshot=snapshot, base=base, model=str(tiny_model_dir))
    sc.close("success").result(timeout=WAIT)


@pytest.fixture(scope="module")
def rest(server):
    return tinker.RestClient(base_url=server.url, api_key="tml-test")


@pytest.fixture(scope="module")
def small_context_model(tmp_path_factory) -> Path:
    from tinkerd.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "ctx64", max_positions=64)


# -- sampling sessions ---------------------------------------------------------------------------


def test_unnamed_save_gives_a_session_on_a_snapshot(
    server, rest, training_client, tiny_model_dir
) -> None:
    train_step(training_client)
    sampler = training_client.save_weights_and_get_sampling_client().result(timeout=WAIT)
    session_id = sampler._sampling_session_id  # what the server answered the unnamed save with
    info = rest.get_sampler(session_id).result(timeout=WAIT)
    base = str(tiny_model_dir)
    assert (info.sampler_id, info.base_model, info.model_path) == (session_id, base, None)
    assert sampler.get_base_model() == base

    before = trainer_logprobs(training_client, PROMPT)
    np.testing.assert_allclose(scored(sampler, PROMPT), before, rtol=0, atol=1e-4)
    # Training on does not move the snapshot.
    train_step(training_client)
    after = trainer_logprobs(training_client, PROMPT)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(scored(sampler, PROMPT), before, rtol=0, atol=1e-4)
    # A second unnamed save is a new session on the new weights.
    second = training_client.save_weights_and_get_sampling_client().result(timeout=WAIT)
    assert second._sampling_session_id != session_id
    np.testing.assert_allclose(scored(second, PROMPT), after, rtol=0, atol=1e-4)


def test_named_sampler_checkpoint_session(server, rest, lab) -> None:
    path = lab.tc.save_weights_for_sampler("api-named").result(timeout=WAIT).path
    assert path == f"tinker://{lab.tc.model_id}/sampler_weights/api-named"
    sampler = lab.sc.create_sampling_client(model_path=path).result(timeout=WAIT)
    assert sampler.get_base_model() == lab.model
    session_id = sampler._sampling_session_id
    info = rest.get_sampler(session_id).result(timeout=WAIT)
    assert (info.sampler_id, info.base_model, info.model_path) == (session_id, lab.model, path)
    raw = get(server, f"samplers/{session_id}")
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    assert raw.json() == {"sampler_id": session_id, "base_model": lab.model, "model_path": path}

    # The checkpoint holds the weights the snapshot holds: same scores, same seeded samples.
    expected = trainer_logprobs(lab.tc, PROMPT)
    np.testing.assert_allclose(scored(sampler, PROMPT), expected, rtol=0, atol=1e-4)
    kwargs = {"num_samples": 2, "max_tokens": 10, "seed": 3, "temperature": 0.9}
    assert_same_response(
        submit(sampler, PROMPT, **kwargs).result(timeout=WAIT),
        submit(lab.snapshot, PROMPT, **kwargs).result(timeout=WAIT),
    )
    # Naming the base model too is fine when it is the checkpoint's; another base is refused.
    both = lab.sc.create_sampling_client(model_path=path, base_model=lab.model).result(timeout=WAIT)
    np.testing.assert_allclose(scored(both, PROMPT), expected, rtol=0, atol=1e-4)
    user_error(
        lab.sc.create_sampling_client(model_path=path, base_model="tinkerd/tiny"),
        "was trained on",
        status=400,
    )


def test_base_model_session_samples_the_base_alone(server, rest, lab, tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    session_id = lab.base._sampling_session_id
    info = rest.get_sampler(session_id).result(timeout=WAIT)
    assert (info.sampler_id, info.base_model, info.model_path) == (session_id, lab.model, None)
    assert "model_path" not in get(server, f"samplers/{session_id}").json()
    assert lab.base.get_base_model() == lab.model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([PROMPT])).logits[0, :-1].float().log_softmax(-1)
    expected = lp.gather(-1, torch.tensor(PROMPT[1:]).view(-1, 1)).view(-1).numpy()
    # Adapters live on the same base in the server; none of them may leak into it.
    np.testing.assert_allclose(scored(lab.base, PROMPT), expected, rtol=0, atol=1e-4)
    assert np.abs(scored(lab.snapshot, PROMPT) - expected).max() > 1e-3


def test_unknown_sampler_is_not_found(server, rest) -> None:
    assert_user_error(get(server, "samplers/nope:sample:0"), "unknown sampling session", status=404)
    with pytest.raises(tinker.NotFoundError):
        rest.get_sampler("nope:sample:0").result(timeout=WAIT)


def test_sample_sequence_ids(server, lab) -> None:
    first = submit(lab.snapshot, PROMPT, 3, max_tokens=4).result(timeout=WAIT)
    second = submit(lab.snapshot, PROMPT, 3, max_tokens=4).result(timeout=WAIT)
    one = submit(lab.base, PROMPT, 1, max_tokens=4).result(timeout=WAIT)
    ids = [s.sequence_id for r in (first, second, one) for s in r.sequences]
    assert len(ids) == 7 and all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 7  # one per sequence, unique across requests and sessions
    # On the wire: the future names one id per sequence.
    body = {
        "sampling_session_id": lab.snapshot._sampling_session_id,
        "seq_id": 10**12,
        "num_samples": 2,
        "prompt": types.ModelInput.from_ints(PROMPT).model_dump(),
        "sampling_params": {"max_tokens": 2},
        "type": "sample",
    }
    r = post(server, "asample", body)
    assert r.status_code == 200, r.text
    assert r.json()["request_id"] and len(r.json()["sample_sequence_ids"]) == 2
    assert server.scheduler.futures.wait(r.json()["request_id"], WAIT) is not None


# -- batching and caching ------------------------------------------------------------------------


def batch_requests(lab) -> list[tuple[Any, list[int], dict[str, Any]]]:
    """Eight seeded or greedy requests on two sets of weights, prompts of different lengths."""
    long = [int(t) for t in np.random.default_rng(0).integers(1, VOCAB, 40)]
    return [
        (lab.snapshot, PROMPT, {"max_tokens": 12, "seed": 1}),
        (lab.snapshot, long, {"num_samples": 3, "max_tokens": 7, "seed": 2, "temperature": 0.7}),
        (lab.snapshot, [3], {"max_tokens": 20, "temperature": 0.0, "stop": []}),
        (lab.snapshot, PROMPT[:2], {"max_tokens": 9, "seed": 3, "top_k": 20, "top_p": 0.9}),
        (lab.base, PROMPT, {"max_tokens": 12, "seed": 1}),
        (lab.base, long[:25], {"num_samples": 2, "max_tokens": 5, "seed": 4, "stop": [7, 8]}),
        (lab.snapshot, long[:30], {"max_tokens": 3, "seed": 5, "include_prompt_logprobs": True}),
        (lab.base, [11, 12, 13], {"max_tokens": 6, "seed": 6, "include_prompt_logprobs": True}),
    ]


def test_concurrent_samples_are_batched_and_match_each_run_alone(server, lab, monkeypatch):
    requests = batch_requests(lab)
    batches = Batches(server, monkeypatch, closed=True)
    futures = [submit(sampler, prompt, **kwargs) for sampler, prompt, kwargs in requests]
    batches.release_when_queued(len(requests))
    together = [f.result(timeout=WAIT) for f in futures]
    # All eight shared an engine step: the snapshot's requests and the base's in one batch.
    assert max(n for n, _ in batches.steps) == len(requests), batches.steps
    assert any(len(adapters) == 2 for _, adapters in batches.steps), batches.steps

    alone = Batches(server, monkeypatch, closed=False)
    for (sampler, prompt, kwargs), batched in zip(requests, together, strict=True):
        assert_same_response(batched, submit(sampler, prompt, **kwargs).result(timeout=WAIT))
    assert {n for n, _ in alone.steps} == {1}


def test_a_sampler_checkpoint_is_read_once(server, lab, monkeypatch) -> None:
    path = lab.tc.save_weights_for_sampler("api-cached").result(timeout=WAIT).path
    reads = []
    real = checkpoint_io.load_adapter
    monkeypatch.setattr(
        checkpoint_io, "load_adapter", lambda *a, **k: reads.append(a[-1]) or real(*a, **k)
    )
    first = lab.sc.create_sampling_client(model_path=path).result(timeout=WAIT)
    second = lab.sc.create_sampling_client(model_path=path).result(timeout=WAIT)
    assert reads == []  # sessions are cheap: nothing is read until a sample needs the weights
    expected = submit(lab.snapshot, PROMPT, max_tokens=8, seed=9).result(timeout=WAIT)
    for sampler in (first, second, first):
        assert_same_response(
            submit(sampler, PROMPT, max_tokens=8, seed=9).result(timeout=WAIT), expected
        )
    futures = [submit(s, PROMPT, max_tokens=4, seed=i) for i, s in enumerate([first, second] * 3)]
    [f.result(timeout=WAIT) for f in futures]
    scored(second, PROMPT)
    assert len(reads) == 1 and Path(reads[0]).name == "api-cached"
    # Unnamed snapshots and the base are never read from disk.
    submit(lab.snapshot, PROMPT, max_tokens=2).result(timeout=WAIT)
    submit(lab.base, PROMPT, max_tokens=2).result(timeout=WAIT)
    assert len(reads) == 1


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": -3}, "max_tokens must be at least 1"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_p": -0.2}, "top_p must be in (0, 1]"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_k": -2}, "top_k must be -1"),
        ({"stop": [""]}, "must not be empty"),
    ],
)
def test_bad_sampling_params(server, lab, params, fragment) -> None:
    before = greedy(lab.snapshot)
    pending = server.scheduler.futures.pending()
    user_error(submit(lab.snapshot, PROMPT, **params), fragment, status=400)
    assert server.scheduler.futures.pending() == pending  # refused before anything was queued
    assert greedy(lab.snapshot) == before  # the same client keeps serving, nothing changed


def asample_body(lab, **changes: Any) -> dict[str, Any]:
    """A valid raw asample body, with `changes` applied (sampling_params.* for nested keys)."""
    body: dict[str, Any] = {
        "sampling_session_id": lab.snapshot._sampling_session_id,
        "seq_id": 2 * 10**12,
        "num_samples": 1,
        "prompt": types.ModelInput.from_ints(PROMPT).model_dump(),
        "sampling_params": {"max_tokens": 4, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "type": "sample",
    }
    for key, value in changes.items():
        target, name = (body["sampling_params"], key[16:]) if "." in key else (body, key)
        target[name] = value
    return body


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"sampling_params.seed": "7"}, "seed must be an integer"),
        ({"sampling_params.seed": 1.5}, "seed must be an integer"),
        ({"sampling_params.seed": True}, "seed must be an integer"),
        ({"sampling_params.max_tokens": "10"}, "max_tokens must be an integer"),
        ({"sampling_params.max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"sampling_params.temperature": "hot"}, "temperature must be a finite number"),
        ({"sampling_params.temperature": float("nan")}, "temperature must be a finite number"),
        ({"sampling_params.top_p": float("inf")}, "top_p must be a finite number"),
        ({"sampling_params.top_k": 1.5}, "top_k must be an integer"),
        ({"sampling_params.stop": [1, "a"]}, "stop must be"),
        ({"sampling_params.stop": 5}, "stop must be"),
        ({"sampling_params.stop": [True]}, "stop must be"),
        ({"sampling_params": "greedy"}, "sampling_params must be an object"),
        ({"num_samples": 0}, "num_samples must be in"),
        ({"num_samples": 5000}, "num_samples must be in"),
        ({"num_samples": "2"}, "num_samples must be an integer"),
        ({"topk_prompt_logprobs": -1}, "topk_prompt_logprobs"),
        ({"topk_prompt_logprobs": "3"}, "topk_prompt_logprobs"),
        ({"prompt": None}, "prompt"),
        ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": []}]}}, "empty"),
        ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": ["a"]}]}}, "integers"),
        ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [-1]}]}}, "negative"),
        ({"prompt": {"chunks": [{"type": "image", "data": "", "format": "png"}]}}, "token ids"),
        ({"topk_sample_logprobs": 3}, "not supported"),
        ({"prompt_alt_tokens_k": 2}, "not supported"),
        ({"prompt_logprobs_last_n": 2, "prompt_logprobs": True}, "not supported"),
        ({"sampling_session_id": "nope:sample:0"}, "unknown sampling session"),
    ],
)
def test_bad_raw_asample(server, lab, changes, fragment) -> None:
    pending = server.scheduler.futures.pending()
    status = 404 if "sampling_session_id" in changes else 400
    assert_user_error(
        post(server, "asample", asample_body(lab, **changes)), fragment, status=status
    )
    assert server.scheduler.futures.pending() == pending
    valid = post(server, "asample", asample_body(lab))  # the same body unchanged is fine
    assert valid.status_code == 200, valid.text
    assert server.scheduler.futures.wait(valid.json()["request_id"], WAIT) is not None


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"topk_sample_logprobs": 2}, "topk_sample_logprobs is not supported"),
        ({"prompt_alt_tokens_k": 2}, "prompt_alt_tokens_k is not supported"),
        (
            {"include_prompt_logprobs": True, "prompt_logprobs_last_n": 2},
            "prompt_logprobs_last_n is not supported",
        ),
        (
            {"target_prompt_logprobs": types.TensorData.from_numpy(np.ones((5, 1), np.int64))},
            "target_prompt_logprobs is not supported",
        ),
    ],
)
def test_unsupported_options_are_refused(server, lab, options, fragment) -> None:
    before = greedy(lab.snapshot)
    user_error(submit(lab.snapshot, PROMPT, max_tokens=3, **options), fragment, status=400)
    assert greedy(lab.snapshot) == before


def test_empty_prompt(lab) -> None:
    user_error(submit(lab.snapshot, [], max_tokens=3), "the prompt is empty", status=400)


@pytest.mark.parametrize("prompt", [[VOCAB], [5, 100_000, 7], [VOCAB + 1] * 3])
def test_token_ids_outside_the_vocabulary(server, lab, prompt) -> None:
    before = greedy(lab.snapshot)
    user_error(submit(lab.snapshot, prompt, max_tokens=3), f"[0, {VOCAB})")
    user_error(lab.snapshot.compute_logprobs(types.ModelInput.from_ints(prompt)), f"[0, {VOCAB})")
    assert greedy(lab.snapshot) == before


def test_prompt_longer_than_the_context(server, lab, small_context_model) -> None:
    sampler = lab.sc.create_sampling_client(base_model=str(small_context_model)).result(
        timeout=WAIT
    )
    for n in (64, 65, 200):
        user_error(submit(sampler, [7] * n, max_tokens=3), f"has {n} tokens", "context is 64")
    # A prompt that fits generates until the context is full, then stops for length.
    seq = submit(sampler, [7] * 60, max_tokens=10, stop=[]).result(timeout=WAIT).sequences[0]
    assert (len(seq.tokens), seq.stop_reason) == (4, "length")
    seq = submit(sampler, [7] * 63, max_tokens=1).result(timeout=WAIT).sequences[0]
    assert len(seq.tokens) == 1
    # The same on the 2048-token model, and the server keeps serving.
    user_error(submit(lab.snapshot, [7] * CONTEXT, max_tokens=1), "context is 2048")
    assert len(greedy(sampler, [7] * 10)) == 12


def test_unknown_and_deleted_checkpoints(server, lab, rest) -> None:
    unknown = f"tinker://{lab.tc.model_id}/sampler_weights/never-saved"
    user_error(lab.sc.create_sampling_client(model_path=unknown), "never-saved", status=404)
    user_error(
        lab.sc.create_sampling_client(model_path="tinker://nobody/sampler_weights/x"), status=404
    )
    path = lab.tc.save_weights_for_sampler("api-deleted").result(timeout=WAIT).path
    sampler = lab.sc.create_sampling_client(model_path=path).result(timeout=WAIT)
    assert len(greedy(sampler)) == 12  # now cached in the worker's memory
    rest.delete_checkpoint_from_tinker_path(path).result(timeout=WAIT)
    # The session outlives its checkpoint, but can no longer read it, cached or not.
    user_error(submit(sampler, PROMPT, max_tokens=3), "api-deleted", status=404)
    user_error(lab.sc.create_sampling_client(model_path=path), "api-deleted", status=404)
    assert len(greedy(lab.snapshot)) == 12


def test_bad_requests_in_a_batch_fail_alone(server, lab, monkeypatch) -> None:
    good = [
        (lab.snapshot, PROMPT, {"max_tokens": 6, "seed": 1}),
        (lab.base, PROMPT, {"max_tokens": 6, "temperature": 0.0}),
        (lab.snapshot, [3, 4], {"num_samples": 2, "max_tokens": 5, "seed": 2}),
    ]
    bad = [
        (lab.snapshot, [5, VOCAB], {"max_tokens": 3}, f"[0, {VOCAB})"),
        (lab.base, [7] * CONTEXT, {"max_tokens": 3}, "context is 2048"),
        (lab.snapshot, [7] * (CONTEXT + 5), {"max_tokens": 3}, "context is 2048"),
    ]
    batches = Batches(server, monkeypatch, closed=True)
    good_futures = [submit(s, p, **k) for s, p, k in good]
    bad_futures = [(submit(s, p, **k), fragment) for s, p, k, fragment in bad]
    batches.release_when_queued(len(good) + len(bad))
    results = [f.result(timeout=WAIT) for f in good_futures]
    for future, fragment in bad_futures:
        user_error(future, fragment)
    assert max(n for n, _ in batches.steps) == len(good), batches.steps
    for (sampler, prompt, kwargs), batched in zip(good, results, strict=True):
        assert_same_response(batched, submit(sampler, prompt, **kwargs).result(timeout=WAIT))
