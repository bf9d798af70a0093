"""The simple JSON API (tinkerd/api/simple.py) over real HTTP against the in-process server:
training on chat and token-id data, PPO metrics, named adapters, text sampling, bad input, and
examples/example_simple.py against a `tinkerd serve` process.

The simple API queues the same payloads as the SDK's routes, so its numbers are checked against
the SDK's on the same adapter seed, and its token counts against the chat template by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tinker import types

from tinkerd.local_cluster import serve_process
from tinkerd.tasks import Scheduler
from tinkerd.text import text_codec
from tinkerd.types import CreateModel, LoraConfig, NotFound, RemoveModel

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
TINKERD = Path(sys.executable).with_name("tinkerd")
CHATS = [
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "What flies over the house?"},
        {"role": "assistant", "content": "The bird."},
    ],
]
TOKENS = [5, 17, 42, 99, 300, 7, 8, 61, 23, 400, 12]
QUESTION = [{"role": "user", "content": "What is 10-3?"}]


# -- helpers ---------------------------------------------------------------------------------


def new_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def post(server, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


def result(server, request_id: str) -> dict[str, Any]:
    """A request's settled result (a failed one too), polling through try_again."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = post(server, "/retrieve_future", {"request_id": request_id})
        body = r.json()
        if body.get("type") != "try_again":
            return {"status": r.status_code, **body}
    raise AssertionError(f"{request_id} never settled")


def step(server, name: str, data: list, lr: float = 1e-2, **fields: Any) -> dict[str, Any]:
    """fwdbwd then optim_step, both submitted before waiting; the fwdbwd's result."""
    fwd = ok(post(server, "/fwdbwd", {"model_id": name, "data": data, **fields}))
    assert fwd["model_id"] == name
    opt = ok(post(server, "/optim_step", {"model_id": name, "learning_rate": lr}))
    out = result(server, fwd["request_id"])
    assert out.pop("status") == 200, out
    stepped = result(server, opt["request_id"])
    assert stepped["status"] == 200 and stepped["metrics"]["learning_rate"] == lr, stepped
    return out


def adapters(server) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{server.url}/adapters", timeout=30)
    return {a["model_id"]: a for a in ok(r)["adapters"]}


def assistant_tokens(codec, chat: list[dict[str, str]]) -> int:
    """What the built-in chat template adds for the assistant's reply: its content and the
    end of the message (`<|im_end|>` and a newline), the header before it excluded."""
    return len(codec.encode(chat[-1]["content"] + "<|im_end|>\n"))


def lora_params(data_dir: Path, rank: int) -> int:
    """rank * (in + out) over every Linear of the tiny Llama that LoRA targets by default:
    q, k, v, o, gate, up, down in each layer, and lm_head."""
    config = json.loads((data_dir / "models" / "tiny" / "config.json").read_text())
    h, inter, layers = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    )
    head = config.get("head_dim") or h // config["num_attention_heads"]
    q = config["num_attention_heads"] * head
    kv = config["num_key_value_heads"] * head
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)
    return rank * (layers * per_layer + h + config["vocab_size"])


# -- training --------------------------------------------------------------------------------


def test_supervised_chat_training_lowers_the_loss_with_plausible_metrics(server) -> None:
    name = new_name()
    codec = text_codec("tinkerd/tiny", server.settings.data_dir)
    outs = [step(server, name, CHATS, loss_fn="cross_entropy") for _ in range(5)]
    losses = [o["loss"] for o in outs]
    assert losses[-1] < losses[0] * 0.8, losses

    tokens = [len(codec.training_tokens(chat)[0]) for chat in CHATS]
    weighted = sum(assistant_tokens(codec, chat) for chat in CHATS)
    for out in outs:
        m = out["metrics"]
        assert m["num_tokens"] == sum(n - 1 for n in tokens)  # next-token positions
        assert m["num_weighted_tokens"] == weighted  # the assistant's tokens only
        assert m["mean_nll"] == pytest.approx(out["loss"] / weighted, rel=1e-6)
        assert m["perplexity"] == pytest.approx(math.exp(m["mean_nll"]), rel=1e-6)
    # an untrained adapter on a random model: about log(vocabulary) per token
    assert 4.0 < outs[0]["metrics"]["mean_nll"] < 10.0
    assert adapters(server)[name]["status"] == "ready"  # created on first use


def test_token_id_data_gives_the_sdks_numbers(server, service_client) -> None:
    """The same seed and tokens through the simple API and through the SDK: the same losses
    before and after a step (one implementation of training behind both)."""
    name = new_name()
    ok(post(server, "/add_lora", {"model_id": name, "rank": 8, "seed": 3}))
    tc = service_client.create_lora_training_client(
        base_model="tinkerd/tiny", rank=8, seed=3
    ).result()
    sdk_datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )
    for _ in range(2):
        out = step(server, name, [TOKENS], loss_fn="cross_entropy")
        sdk = tc.forward_backward([sdk_datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert out["loss"] == pytest.approx(sdk.result().metrics["loss:sum"], rel=1e-5)
        assert out["metrics"]["num_tokens"] == out["metrics"]["num_weighted_tokens"] == 10


def ppo_data(sampled: dict[str, Any], advantages: list[float]) -> tuple[list, dict]:
    """Token-id datums of prompt + answer, with the sampler's logprobs and an advantage for
    each answer token (the prompt's positions: 0 and 0)."""
    prompt = sampled["prompt_tokens"]
    data, logprobs, advs = [], [], []
    for sample, advantage in zip(sampled["samples"], advantages, strict=True):
        data.append(prompt + sample["tokens"])
        logprobs.append([0.0] * (len(prompt) - 1) + sample["logprobs"])
        advs.append([0.0] * (len(prompt) - 1) + [advantage] * len(sample["tokens"]))
    return data, {"logprobs": logprobs, "advantages": advs}


def test_ppo_step_on_sampled_answers_reports_its_metrics(server) -> None:
    name = new_name()
    ok(post(server, "/add_lora", {"model_id": name, "rank": 8}))
    body = {"model_id": name, "messages": QUESTION, "max_tokens": 6, "num_samples": 2, "seed": 4}
    sampled = ok(post(server, "/sample", body))
    data, inputs = ppo_data(sampled, [1.0, -0.5])
    out = step(server, name, data, loss_fn="ppo", loss_fn_inputs=inputs)

    n = [len(s["tokens"]) for s in sampled["samples"]]
    m = out["metrics"]
    assert m["num_tokens"] == sum(len(d) - 1 for d in data)
    # over the answer tokens (non-zero advantage): sampled from these very weights, so ratio 1
    assert m["mean_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert m["clip_fraction"] == 0.0
    assert m["mean_advantage"] == pytest.approx((n[0] * 1.0 - n[1] * 0.5) / sum(n), rel=1e-5)
    assert out["loss"] == pytest.approx(-(n[0] * 1.0 - n[1] * 0.5), rel=1e-3)
    assert "mean_nll" not in m

    # and on chat data, one number per datum: for the assistant's tokens alone
    chat = [QUESTION + [{"role": "assistant", "content": "7"}]]
    inputs = {"logprobs": [-3.0], "advantages": [2.0]}
    out = step(server, name, chat, loss_fn="importance_sampling", loss_fn_inputs=inputs)
    assert out["metrics"]["mean_advantage"] == pytest.approx(2.0)
    assert out["metrics"]["mean_ratio"] > 0 and "clip_fraction" not in out["metrics"]


def test_a_failed_request_answers_its_error(server) -> None:
    name = new_name()
    fwd = ok(post(server, "/fwdbwd", {"model_id": name, "data": [[5, 100_000]]}))
    failed = result(server, fwd["request_id"])
    assert failed["status"] == 400 and failed["category"] == "user"
    assert "outside the vocabulary" in failed["error"]
    assert step(server, name, [TOKENS])["loss"] > 0  # nothing was applied; it goes on
    r = post(server, "/retrieve_future", {"request_id": "no-such-request"})
    assert r.status_code == 404 and r.json()["category"] == "user"


# -- adapters --------------------------------------------------------------------------------


def test_adapters_are_added_listed_and_removed(server) -> None:
    name = new_name()
    added = ok(post(server, "/add_lora", {"model_id": name, "rank": 4, "train_unembed": True}))
    assert added["created"] is True and added["status"] == "ready"
    run_id = added["training_run_id"]
    assert run_id.startswith(f"simple:{name}:")
    expected = lora_params(server.settings.data_dir, 4)
    assert added["trainable_params"] == expected
    assert expected == sum(p.numel() for p in server.backend._adapters[run_id].params)
    listed = adapters(server)[name]
    assert {k: listed[k] for k in ("base_model", "lora_rank", "trainable_params")} == {
        "base_model": "tinkerd/tiny",
        "lora_rank": 4,
        "trainable_params": expected,
    }
    again = ok(post(server, "/add_lora", {"model_id": name, "rank": 4}))
    assert again["created"] is False and again["training_run_id"] == run_id
    clash = post(server, "/add_lora", {"model_id": name, "rank": 8})
    assert clash.status_code == 409 and "remove it first" in clash.json()["error"]

    # queued work runs before the removal; sampling left a snapshot, which goes too
    ok(post(server, "/sample", {"model_id": name, "prompt": "the cat", "max_tokens": 2}))
    assert f"{run_id}:sample:latest" in server.backend._samplers
    pending = ok(post(server, "/fwdbwd", {"model_id": name, "data": [TOKENS]}))
    removed = ok(post(server, "/remove_lora", {"model_id": name}))
    assert removed == {"model_id": name, "removed": True, "freed": True}
    assert result(server, pending["request_id"])["status"] == 200
    assert run_id not in server.backend.held()["models"]
    assert f"{run_id}:sample:latest" not in server.backend._samplers
    assert name not in adapters(server)
    for path, body in [
        ("/optim_step", {"model_id": name}),
        ("/sample", {"model_id": name, "prompt": "hi"}),
        ("/remove_lora", {"model_id": name}),
    ]:
        r = post(server, path, body)
        assert r.status_code == 404 and name in r.json()["error"], (path, r.text)
    assert httpx.delete(f"{server.url}/adapters/{name}").status_code == 404
    run = ok(httpx.get(f"{server.url}/api/v1/training_runs/{run_id}"))
    assert run["status"] == "inactive"  # its run stays listed

    # the name is free again: a new adapter, with a model id of its own
    renewed = ok(post(server, "/add_lora", {"model_id": name, "rank": 8}))
    assert renewed["training_run_id"] != run_id and renewed["lora_rank"] == 8
    deleted = httpx.delete(f"{server.url}/adapters/{name}", timeout=30)
    assert ok(deleted)["removed"] is True and name not in adapters(server)


def test_scheduler_forgets_a_removed_model() -> None:
    scheduler = Scheduler()
    scheduler.open_model("m")
    scheduler.submit_next("m", CreateModel("tinkerd/tiny", LoraConfig()))
    scheduler.submit_next("m", RemoveModel())
    with pytest.raises(NotFound):  # no request after the removal
        scheduler.submit_next("m", RemoveModel())
    (tasks,) = scheduler.take_ready(0.1)
    assert [type(t.payload) for t in tasks] == [CreateModel, RemoveModel]
    assert not scheduler.has_model("m")


# -- sampling --------------------------------------------------------------------------------


def test_sample_and_generate_answer_text(server) -> None:
    codec = text_codec("tinkerd/tiny", server.settings.data_dir)
    body = {"prompt": "The cat sees", "max_tokens": 5, "seed": 7, "temperature": 1.0}
    out = ok(post(server, "/sample", body))
    assert out["model_id"] is None and out["base_model"] == "tinkerd/tiny"
    (sample,) = out["samples"]
    assert out["text"] == sample["text"] == codec.decode(sample["tokens"])
    assert len(sample["tokens"]) == len(sample["logprobs"]) == 5
    assert out["prompt_tokens"] == codec.encode("The cat sees")
    assert ok(post(server, "/generate", body))["samples"] == out["samples"]  # same seed

    chat = {"messages": QUESTION, "max_tokens": 4, "num_samples": 3, "stop": " "}
    out = ok(post(server, "/generate", chat))
    assert out["prompt_tokens"] == codec.prompt(QUESTION)
    assert len(out["samples"]) == 3
    assert all(" " not in s["text"] for s in out["samples"])  # cut at the stop string


def test_sampling_an_adapter_uses_its_trained_weights(server) -> None:
    """/sample's logprobs agree with the trainer's (forward_only) on the sampled answer, after
    training moved the adapter away from the base model."""
    name = new_name()
    for _ in range(3):
        step(server, name, CHATS, lr=5e-2)
    out = ok(post(server, "/sample", {"model_id": name, "messages": QUESTION, "max_tokens": 6}))
    base = ok(post(server, "/sample", {"messages": QUESTION, "max_tokens": 6, "seed": 1}))
    prompt, (sample,) = out["prompt_tokens"], out["samples"]
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(sample["tokens"])
    fwd = post(
        server,
        "/fwdbwd",
        {
            "model_id": name,
            "data": [prompt + sample["tokens"]],
            "loss_fn_inputs": {"weights": [weights]},
            "forward_only": True,
        },
    )
    scored = result(server, ok(fwd)["request_id"])
    assert scored["loss"] == pytest.approx(-sum(sample["logprobs"]), rel=1e-4)
    assert base["prompt_tokens"] == prompt


# -- bad input -------------------------------------------------------------------------------

NEW = "<new>"  # a fresh name: the request must not create it
OLD = "<existing>"  # an adapter made for the test
LONG_TEXT = "the cat sees the dog " * 700  # over the tiny model's 2048 positions
USER = {"role": "user", "content": "hi"}

BAD = [
    ("/fwdbwd", {"model_id": NEW, "data": "hello"}, "data must be a non-empty list"),
    ("/fwdbwd", {"model_id": NEW, "data": []}, "data must be a non-empty list"),
    ("/fwdbwd", {"model_id": NEW, "data": [[{"role": "robot", "content": "x"}]]}, "role must be"),
    ("/fwdbwd", {"model_id": NEW, "data": [[{"role": "user", "content": ""}]]}, "content must"),
    ("/fwdbwd", {"model_id": NEW, "data": [[{"role": "user"}]]}, "content must"),
    ("/fwdbwd", {"model_id": NEW, "data": [["hi"]]}, "must be a conversation"),
    ("/fwdbwd", {"model_id": NEW, "data": [[USER, 5]]}, "must be a conversation"),
    ("/fwdbwd", {"model_id": NEW, "data": [[1, -2, 3]]}, "non-negative token ids"),
    ("/fwdbwd", {"model_id": NEW, "data": [[7]]}, "needs 2"),
    ("/fwdbwd", {"model_id": NEW, "data": [[USER]]}, "no assistant message"),
    ("/fwdbwd", {"model_id": NEW, "data": [list(range(3000))]}, "over the model's context"),
    (
        "/fwdbwd",
        {"model_id": NEW, "data": [[USER, {"role": "assistant", "content": LONG_TEXT}]]},
        "over the model's context",
    ),
    ("/fwdbwd", {"model_id": NEW, "data": [TOKENS], "loss_fn": "nope"}, "unknown loss_fn"),
    ("/fwdbwd", {"model_id": NEW, "data": [TOKENS], "loss_fn": "ppo"}, "needs loss_fn_inputs"),
    (
        "/fwdbwd",
        {
            "model_id": NEW,
            "data": [TOKENS],
            "loss_fn": "ppo",
            "loss_fn_inputs": {"logprobs": [[0.0]], "advantages": [1.0]},
        },
        "has shape",
    ),
    (
        "/fwdbwd",
        {"model_id": NEW, "data": [TOKENS], "loss_fn_inputs": {"bogus": [1]}},
        "not 'bogus'",
    ),
    (
        "/fwdbwd",
        {"model_id": NEW, "data": [TOKENS], "loss_fn_inputs": {"weights": [1, 1]}},
        "one per datum",
    ),
    (
        "/fwdbwd",
        {
            "model_id": NEW,
            "data": [TOKENS],
            "loss_fn": "importance_sampling",
            "loss_fn_inputs": {"logprobs": [0.0], "advantages": [float("nan")]},
        },
        "finite",
    ),
    (
        "/fwdbwd",
        {"model_id": NEW, "data": [TOKENS], "loss_fn_config": {"beta": 1.0}},
        "unknown to cross_entropy",
    ),
    ("/fwdbwd", {"model_id": "../etc", "data": [TOKENS]}, "model_id must be"),
    ("/fwdbwd", {"data": [TOKENS]}, "model_id must be"),
    ("/optim_step", {"model_id": NEW}, "unknown model_id"),
    ("/optim_step", {"model_id": OLD, "learning_rate": -1}, "learning_rate"),
    ("/optim_step", {"model_id": OLD, "adam_params": "fast"}, "adam_params must be an object"),
    ("/sample", {"model_id": NEW, "prompt": "hi"}, "unknown model_id"),
    ("/sample", {"model_id": OLD, "prompt": "hi", "max_tokens": "ten"}, "max_tokens must be an"),
    ("/generate", {"prompt": "hi", "max_tokens": 0}, "max_tokens must be at least 1"),
    ("/sample", {"model_id": OLD, "prompt": LONG_TEXT}, "over the model's context"),
    ("/sample", {"messages": [{"role": "user", "content": LONG_TEXT}]}, "over the model's context"),
    ("/sample", {"messages": [{"role": "user"}]}, "content must"),
    ("/sample", {"messages": "hi"}, "non-empty list"),
    ("/sample", {"prompt": "hi", "messages": [USER]}, "not both"),
    ("/sample", {}, "give a prompt"),
    ("/sample", {"prompt": "hi", "top_p": 2}, "top_p"),
    ("/sample", {"prompt": "hi", "num_samples": 0}, "num_samples"),
    ("/add_lora", {"model_id": NEW, "rank": 0}, "rank"),
    ("/add_lora", {"model_id": NEW, "base_model": "/no/such/model"}, "neither"),
    ("/remove_lora", {"model_id": NEW}, "unknown model_id"),
    ("/retrieve_future", {}, "request_id"),
]


@pytest.fixture(scope="module")
def existing(server) -> str:
    name = new_name()
    ok(post(server, "/add_lora", {"model_id": name, "rank": 8}))
    return name


@pytest.mark.parametrize(("path", "body", "fragment"), BAD, ids=[f"{p}-{f}" for p, _, f in BAD])
def test_bad_input_is_refused_and_changes_nothing(server, existing, path, body, fragment) -> None:
    fresh = new_name()
    names = {NEW: fresh, OLD: existing}
    body = {k: names.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    before = adapters(server)
    queued = server.scheduler.queue_depth()
    r = httpx.post(
        f"{server.url}{path}",
        content=json.dumps(body),  # allow_nan: a NaN gets through to the server
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["category"] == "user" and fragment in r.json()["error"], r.json()
    assert adapters(server) == before and fresh not in before
    assert server.scheduler.queue_depth() == queued
    assert step(server, existing, [TOKENS])["loss"] > 0  # and the adapter still trains


def test_malformed_json_body(server) -> None:
    for path in ("/fwdbwd", "/sample", "/add_lora", "/retrieve_future"):
        r = httpx.post(f"{server.url}{path}", content=b"{not json", timeout=30)
        assert r.status_code == 400 and "JSON object" in r.json()["error"]


# -- info ------------------------------------------------------------------------------------


def test_health_loss_functions_and_capabilities_at_the_root(server) -> None:
    assert ok(httpx.get(f"{server.url}/healthz"))["status"] == "ok"
    losses = ok(httpx.get(f"{server.url}/loss_functions"))
    assert {"cross_entropy", "importance_sampling", "ppo"} <= set(
        losses["available_loss_functions"]
    )
    assert set(losses["descriptions"]) == set(losses["available_loss_functions"])
    assert losses["descriptions"]["ppo"].startswith("Clipped PPO")
    assert [f["name"] for f in losses["loss_functions"]] == losses["available_loss_functions"]
    root = ok(httpx.get(f"{server.url}/get_server_capabilities"))
    assert root == ok(httpx.get(f"{server.url}/api/v1/get_server_capabilities"))
    assert "tinkerd/tiny" in [m["model_name"] for m in root["supported_models"]]


# -- the example, against `tinkerd serve` ----------------------------------------------------


@pytest.fixture
def tinkerd_serve(tmp_path: Path):
    with serve_process(tmp_path, env={"OMP_WAIT_POLICY": "PASSIVE"}) as server:
        yield server.url


def test_example_runs_against_tinkerd_serve(tinkerd_serve: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "example_simple.py"), "--url", tinkerd_serve],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for line in ("Loss:", "mean_nll", "perplexity", "Mean ratio", "Clip fraction"):
        assert line in out.stdout
    assert "supervised loss fell from" in out.stdout
    assert "example-sft: base tinkerd/tiny" in out.stdout
    losses = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("Loss")]
    assert len(losses) == 6 and np.isfinite(losses).all()
