"""Every public method of the pinned SDK (ServiceClient, TrainingClient, SamplingClient,
RestClient) called against a live tinkerd with live ids and well-formed inputs.

The walk records each HTTP request the server answers (a WSGI wrapper on the live app) and fails
on any 404 (a route tinkerd lacks), on any method that is not in `CALLS` (a newer SDK's: classify
it), and on any call that raises. Only what needs JWT auth or billing, which a self-hosted
server has no use for, is skipped, each with its reason. The protocol coverage table in
docs/sdk.md is made from the walk: the test fails when the page's differs
(`TINKERD_WRITE_COVERAGE=1` rewrites it).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import tinker
from tinker import types
from tinker.lib.api_future_impl import QueueState
from werkzeug.exceptions import HTTPException

pytestmark = pytest.mark.timeout(300)

COVERAGE_PAGE = Path(__file__).resolve().parent.parent / "docs" / "sdk.md"
START, END = "<!-- sdk-coverage:start -->", "<!-- sdk-coverage:end -->"
CLASSES = (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient)
# Requests the SDK sends by itself, around any call: not what a method is for.
BACKGROUND = {
    "/api/v1/client/config",
    "/api/v1/client/dynamic_config",
    "/api/v1/create_session",
    "/api/v1/session_heartbeat",
    "/api/v1/telemetry",
    "/api/v1/retrieve_future",
}
TOKENS = [5, 17, 42, 99, 300, 7, 8]


@dataclass
class Call:
    """One SDK method: how to call it (`run(ctx, method)`: `method` is the bound method, the
    sync one or its `_async` twin), and what tinkerd does for it (the docs' words)."""

    name: str  # Class.method
    does: str
    run: Callable[[SimpleNamespace, Callable[..., Any]], Any] | None = None
    skip: str | None = None  # why it is not called
    twin: bool = True  # also call `<method>_async` (where the SDK has one) the same way


def datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )


def neg_logprob(data: list[types.Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
    loss = sum(-lp.sum() for lp in logprobs)
    return loss, {"neg_logprob:sum": float(loss)}


def _per_datum_loss(logprobs: Any, weights: Any) -> tuple[Any, dict[str, Any]]:
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss}


def _named(prefix: str) -> Callable[[SimpleNamespace, Callable[..., Any]], Any]:
    """Save under a name of its own per call (the sync call and its twin save two)."""

    def run(c: SimpleNamespace, m: Callable[..., Any]) -> Any:
        c.counter += 1
        return m(f"{prefix}-{c.counter}")

    return run


def _keep(attr: str, call: Callable[[SimpleNamespace, Callable[..., Any]], Any]):
    """Run `call` and keep what it answers as `ctx.<attr>` (its `.path` for a save)."""

    def run(c: SimpleNamespace, m: Callable[..., Any]) -> Any:
        out = settle(call(c, m))
        setattr(c, attr, getattr(out, "path", out))
        return out

    return run


def _download(c: SimpleNamespace, url: str) -> httpx.Response:
    r = httpx.get(url, timeout=30)  # a signed URL: no API key
    assert r.status_code == 200, r.text
    return r


def _external_urls(c: SimpleNamespace, m: Callable[..., Any]) -> Any:
    out = settle(m(c.external_path))
    assert "adapter_model.safetensors" in out.urls and "adapter_config.json" in out.urls
    assert _download(c, out.urls["adapter_config.json"]).json()["r"] == 4
    return out


def _trace(c: SimpleNamespace, m: Callable[..., Any]) -> Any:
    url = settle(m(c.session_id))
    names = {e["name"] for e in _download(c, url).json()["traceEvents"]}
    assert {"created", "forward_backward", "optim_step"} <= names, names
    return url


def _delete(c: SimpleNamespace, m: Callable[..., Any], by_path: bool) -> Any:
    path = settle(c.tc.save_state(f"doomed-{id(m)}-{c.counter}")).path
    c.counter += 1
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    settle(m(path) if by_path else m(parsed.training_run_id, parsed.checkpoint_id))
    listed = settle(c.rest.list_checkpoints(parsed.training_run_id)).checkpoints
    assert path not in [ck.tinker_path for ck in listed]


def _search(c: SimpleNamespace, m: Callable[..., Any]) -> Any:
    out = settle(m(types.SessionSearchRequest(session_id=c.session_id)))
    assert [s.session_id for s in out.sessions] == [c.session_id]
    return out


def _ttl(c: SimpleNamespace, m: Callable[..., Any]) -> Any:
    settle(m(c.state_path, 86400))
    [ck] = [ck for ck in settle(c.rest.list_checkpoints(c.model_id)).checkpoints
            if ck.tinker_path == c.state_path]  # fmt: skip
    assert ck.expires_at is not None
    return settle(m(c.state_path, None))


def _published(public: bool) -> Callable[[SimpleNamespace, Callable[..., Any]], Any]:
    def run(c: SimpleNamespace, m: Callable[..., Any]) -> Any:
        settle(m(c.sampler_path))
        listed = settle(c.rest.list_checkpoints(c.model_id)).checkpoints
        assert [ck.public for ck in listed if ck.tinker_path == c.sampler_path] == [public]

    return run


S, T, P, R = "ServiceClient", "TrainingClient", "SamplingClient", "RestClient"
LOCAL = "client-side: no request"
CALLS: list[Call] = [
    # -- a training client and its work ------------------------------------------------------
    Call(f"{S}.create_lora_training_client",
         "creates a LoRA model `{session}:train:{n}` on the base model, then reads its info",
         _keep("tc", lambda c, m: m(base_model=c.base, rank=4, seed=0))),
    Call(f"{S}.get_server_capabilities", "the base models in use: each trains and samples",
         lambda c, m: m()),
    Call(f"{S}.create_rest_client", LOCAL, lambda c, m: m(), twin=False),
    Call(f"{S}.get_console_url", LOCAL, lambda c, m: m(), twin=False),
    Call(f"{S}.get_telemetry", LOCAL, lambda c, m: m(), twin=False),
    Call(f"{S}.create_custom_loss",
         "traced on the client; runs client-side (`custom_loss_server_side` is off)",
         _keep("loss", lambda c, m: m(_per_datum_loss, {"logprobs": 1, "weights": 1}))),
    Call(f"{T}.get_info", "what get_info answered at creation (the SDK keeps it)",
         lambda c, m: m()),
    Call(f"{T}.get_tokenizer", "client-side, from get_info's `tokenizer_id` (a local directory)",
         lambda c, m: m(), twin=False),
    Call(f"{T}.get_console_url", LOCAL, lambda c, m: m(), twin=False),
    Call(f"{T}.get_telemetry", LOCAL, lambda c, m: m(), twin=False),
    Call(f"{T}.forward", "logprobs and loss, no gradients (protobuf, zstd)",
         lambda c, m: m([datum()], "cross_entropy")),
    Call(f"{T}.forward_backward", "loss, logprobs and gradients, in seq_id order (protobuf, zstd)",
         lambda c, m: m([datum()], "cross_entropy")),
    Call(f"{T}.forward_backward_custom",
         "a forward, the loss on the client, then a forward_backward with its gradients",
         lambda c, m: m([datum()], c.loss)),
    Call(f"{T}.optim_step", "an AdamW step (`AdamParams`)",
         lambda c, m: m(types.AdamParams(learning_rate=1e-4))),
    Call(f"{T}.save_state", "adapter + optimizer state as `tinker://{id}/weights/{name}`",
         _keep("state_path", _named("state"))),
    Call(f"{T}.load_state", "loads a checkpoint's weights into the live model",
         lambda c, m: m(c.state_path)),
    Call(f"{T}.load_state_with_optimizer", "the same, with its AdamW state",
         lambda c, m: m(c.state_path)),
    Call(f"{T}.save_weights_for_sampler", "the adapter as `tinker://{id}/sampler_weights/{name}`",
         _keep("sampler_path", _named("sampler"))),
    Call(f"{T}.save_weights_and_get_sampling_client",
         "an in-memory snapshot and a sampling session on it", _keep("sampler", lambda c, m: m())),
    Call(f"{T}.save_weights_external",
         "a Hugging Face PEFT adapter as `tinker://{id}/external_weights/{name}`",
         _keep("external_path", _named("external"))),
    Call(f"{T}.create_sampling_client", "a sampling session on a sampler checkpoint",
         lambda c, m: m(c.sampler_path)),
    # -- sampling -----------------------------------------------------------------------------
    Call(f"{P}.sample", "samples with every `SamplingParams` field (batched per weights)",
         lambda c, m: m(types.ModelInput.from_ints(TOKENS), 1,
                        types.SamplingParams(max_tokens=2, seed=1))),
    Call(f"{P}.compute_logprobs", "the prompt's logprobs",
         lambda c, m: m(types.ModelInput.from_ints(TOKENS))),
    Call(f"{P}.get_base_model", LOCAL, lambda c, m: m()),
    Call(f"{P}.get_tokenizer", "client-side, from the base model name (a local directory)",
         lambda c, m: m(), twin=False),
    Call(f"{P}.get_telemetry", LOCAL, lambda c, m: m(), twin=False),
    Call(f"{P}.on_queue_state_change", LOCAL,
         lambda c, m: m(QueueState.ACTIVE, None), twin=False),
    Call(f"{P}.get_sampler_handle", LOCAL, _keep("handle", lambda c, m: m()), twin=False),
    Call(f"{P}.from_sampler_handle", "a client for the same sampling session (reads it back)",
         lambda c, m: m(c.handle, api_key=c.api_key).get_base_model(), twin=False),
    Call(f"{P}.create", "a sampling session (base model, checkpoint, or an existing one)",
         lambda c, m: m(c.sc.holder, model_path=c.sampler_path), twin=False),
    Call(f"{S}.create_sampling_client", "a sampling session on a checkpoint or a base model",
         lambda c, m: m(model_path=c.sampler_path)),
    Call(f"{S}.create_training_client_from_state",
         "a new model from a checkpoint's weights, its LoRA config from the checkpoint",
         lambda c, m: m(c.state_path)),
    Call(f"{S}.create_training_client_from_state_with_optimizer",
         "the same, with the checkpoint's AdamW state", lambda c, m: m(c.state_path)),
    # -- REST: runs, checkpoints -------------------------------------------------------------
    Call(f"{R}.get_server_capabilities", "the base models in use", lambda c, m: m(), twin=False),
    Call(f"{R}.list_training_runs", "this key's runs, a page", lambda c, m: m()),
    Call(f"{R}.get_training_run", "a run: base model, rank, status, last checkpoints",
         lambda c, m: m(c.model_id)),
    Call(f"{R}.get_training_run_by_tinker_path", "the same, by a checkpoint's path",
         lambda c, m: m(c.state_path)),
    Call(f"{R}.get_weights_info_by_tinker_path", "a checkpoint's base model and LoRA config",
         lambda c, m: m(c.state_path), twin=False),
    Call(f"{R}.list_checkpoints", "a run's checkpoints", lambda c, m: m(c.model_id)),
    Call(f"{R}.list_user_checkpoints", "every run's checkpoints, newest first",
         lambda c, m: m()),
    Call(f"{R}.get_sampler", "a sampling session's base model and checkpoint",
         lambda c, m: m(c.sampler._sampling_session_id)),
    Call(f"{R}.get_external_weights_urls",
         "signed URLs, one per file, that `GET downloads/{token}/{file}` serves without a key "
         "for an hour", _external_urls),
    Call(f"{R}.set_checkpoint_ttl_from_tinker_path",
         "sets (or with None removes) a checkpoint's expiry; owner only", _ttl),
    Call(f"{R}.publish_checkpoint_from_tinker_path",
         "every key may then load, sample, download and copy it; owner only (409 if public)",
         _published(True), twin=False),
    Call(f"{R}.unpublish_checkpoint_from_tinker_path", "private again (409 if private)",
         _published(False), twin=False),
    Call(f"{R}.publish_checkpoint_from_tinker_path_async", "as the sync method",
         _published(True), twin=False),
    Call(f"{R}.unpublish_checkpoint_from_tinker_path_async", "as the sync method",
         _published(False), twin=False),
    Call(f"{R}.copy_weights",
         "a copy (hard links) as a new run of this key's, labelled with the project",
         lambda c, m: m(c.state_path, "compat-project")),
    Call(f"{S}.copy_weights", "the same, into the ServiceClient's project",
         lambda c, m: m(c.state_path), twin=False),
    Call(f"{R}.delete_checkpoint", "deletes a checkpoint of this key's",
         lambda c, m: _delete(c, m, by_path=False)),
    Call(f"{R}.delete_checkpoint_from_tinker_path", "the same, by path",
         lambda c, m: _delete(c, m, by_path=True)),
    # -- REST: sessions, audit, usage ----------------------------------------------------------
    Call(f"{R}.list_sessions", "this key's sessions (an admin's: all), newest first",
         lambda c, m: m()),
    Call(f"{R}.get_session", "a session's runs, samplers, metadata and display name",
         lambda c, m: m(c.session_id)),
    Call(f"{R}.assign_session_project", "labels the session with a project id",
         lambda c, m: m(c.session_id, "compat-project")),
    Call(f"{R}.search_sessions", "filters this key's sessions, newest first, by pages",
         _search, twin=False),
    Call(f"{R}.export_session_trace",
         "a signed URL (`GET downloads/...`) to its runs' events as Chrome trace-event JSON, "
         "which ui.perfetto.dev opens",
         _trace),
    Call(f"{R}.get_audit_log",
         "a UTC day of this key's creates, saves, deletes, publishes, key changes (admin: all)",
         lambda c, m: m()),
    Call(f"{R}.get_current_checkpoint_storage_usage",
         "this key's checkpoints now, by project and key: count and bytes", lambda c, m: m()),
    Call(f"{R}.get_telemetry", LOCAL, lambda c, m: m(), twin=False),
    Call(f"{R}.get_billing_usage", "not served (404)",
         skip="billing: tinkerd bills nothing, so it keeps no usage events to report"),
    Call(f"{R}.whoami", "not served",
         skip="needs JWT auth: the SDK reads the identity from a JWT, which tinkerd does not "
         "issue (`pjwt_auth_enabled` is off); it raises on the client and sends nothing"),
    # -- the end of the session ----------------------------------------------------------------
    Call(f"{S}.close", "finishes the session (heartbeats then answer 410)",
         lambda c, m: m("success"), twin=False),
]  # fmt: skip


def settle(value: Any) -> Any:
    """What an SDK call answers, whatever its shape: a coroutine, an APIFuture, a value."""
    for _ in range(4):
        if inspect.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = asyncio.run(_awaited(value))
        elif hasattr(value, "result") and callable(value.result) and not isinstance(value, type):
            value = value.result(timeout=120)
        else:
            return value
    return value


async def _awaited(value: Any) -> Any:
    return await value


class Recorder:
    """A WSGI wrapper that notes each request's method, path and status, as the app answers."""

    def __init__(self, app: Any) -> None:
        self.inner = app.wsgi_app
        self.url_map = app.url_map
        self.seen: list[tuple[str, str, int]] = []
        self.not_found: list[str] = []  # every 404 of the walk, whatever asked
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")

        def start(status: str, headers: Any, exc_info: Any = None) -> Any:
            with self._lock:
                self.seen.append((method, path, int(status.split()[0])))
                if status.startswith("404"):
                    self.not_found.append(f"{method} {path}")
            return start_response(status, headers, exc_info)

        return self.inner(environ, start)

    def traced(
        self, method: Callable[..., Any], hits: list[tuple[str, str, int]]
    ) -> Callable[..., Any]:
        """`method`, noting in `hits` the requests its call makes (until its result is in),
        apart from what a walk's entry does around it to check the answer."""

        def call(*args: Any, **kwargs: Any) -> Any:
            self.take()  # what came before: the entry's own preparations
            out = settle(method(*args, **kwargs))
            hits.extend(self.take())
            return out

        return call

    def take(self) -> list[tuple[str, str, int]]:
        with self._lock:
            seen, self.seen = self.seen, []
        return seen

    def route(self, method: str, path: str) -> str:
        try:
            rule, _ = self.url_map.bind("localhost").match(path, method, return_rule=True)
            return f"{method} {rule.rule}"
        except HTTPException:
            return f"{method} {path}"


def public_methods() -> list[str]:
    return [
        f"{cls.__name__}.{name}"
        for cls in CLASSES
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_") and callable(value)
    ]


def _target(c: SimpleNamespace, qualified: str) -> Callable[..., Any]:
    cls_name, method = qualified.split(".")
    owner = getattr(c, {S: "sc", T: "tc", P: "sampler", R: "rest"}[cls_name], None)
    if method in ("create", "from_sampler_handle"):  # static methods
        return getattr(tinker.SamplingClient, method)
    return getattr(owner, method)


def test_every_public_sdk_method_answers(server, tiny_model_dir, monkeypatch) -> None:
    methods = public_methods()
    covered = {call.name for call in CALLS} | {f"{call.name}_async" for call in CALLS if call.twin}
    unclassified = sorted(set(methods) - covered)
    assert not unclassified, f"SDK methods the walk does not call or skip: {unclassified}"

    recorder = Recorder(server.app)
    monkeypatch.setattr(server.app, "wsgi_app", recorder)
    api_key = "tml-compat"
    sc = tinker.ServiceClient(base_url=server.url, api_key=api_key, project_id="compat-project")
    c = SimpleNamespace(sc=sc, base=str(tiny_model_dir), counter=0, api_key=api_key)
    c.rest = tinker.RestClient(base_url=server.url, api_key=api_key)
    rows: list[tuple[str, str, str]] = []
    for call in CALLS:
        names = [call.name]
        if call.twin and f"{call.name}_async" in methods:
            names.append(f"{call.name}_async")
        if call.skip is not None:
            rows.append((call.name, f"skipped: {call.skip}", call.does))
            continue
        routes: list[str] = []
        for name in names:
            hits: list[tuple[str, str, int]] = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated and experimental methods
                settle(call.run(c, recorder.traced(_target(c, name), hits)))
            if name.startswith(f"{S}.create_lora_training_client"):
                c.model_id = c.tc.model_id
                c.session_id = c.model_id.split(":")[0]
            for method, path, _ in hits:
                route = recorder.route(method, path)
                if path not in BACKGROUND and route not in routes and name == call.name:
                    routes.append(route)
        rows.append((call.name, ", ".join(routes) or "none", call.does))
    assert not recorder.not_found, f"routes tinkerd does not serve: {recorder.not_found}"
    check_coverage_page(rows, methods)


def coverage_table(rows: list[tuple[str, str, str]], methods: list[str]) -> str:
    """docs/sdk.md's table: one row per method (its `_async` twin marked), the routes it
    reached, what tinkerd does."""
    lines = [
        START,
        "| SDK method | requests | what tinkerd does |",
        "| --- | --- | --- |",
    ]
    grouped: dict[tuple[str, str], list[str]] = {}  # methods that do the same, in one row
    for name, routes, does in sorted(rows):
        twin = " (+`_async`)" if f"{name}_async" in methods and not name.endswith("_async") else ""
        routes = re.sub(r"/api/v1/", "", routes)
        routes = re.sub(r"<[^>]+>", lambda m: "{" + m.group(0)[1:-1].split(":")[-1] + "}", routes)
        grouped.setdefault((routes, does), []).append(f"`{name}`{twin}")
    for (routes, does), names in grouped.items():
        lines.append(f"| {', '.join(names)} | {routes} | {does} |")
    lines.append(END)
    return "\n".join(lines)


def check_coverage_page(rows: list[tuple[str, str, str]], methods: list[str]) -> None:
    # an `_async` row of its own is folded into its sync method's when both say the same
    folded = [r for r in rows if not (r[0].endswith("_async") and r[2] == "as the sync method")]
    table = coverage_table(folded, methods)
    text = COVERAGE_PAGE.read_text()
    block = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if os.environ.get("TINKERD_WRITE_COVERAGE") == "1":
        COVERAGE_PAGE.write_text(block.sub(lambda _: table, text))
        return
    found = block.search(text)
    assert found is not None, f"docs/sdk.md has no {START} ... {END} block"
    assert found.group(0) == table, (
        "docs/sdk.md's protocol coverage table is stale: run "
        "TINKERD_WRITE_COVERAGE=1 .venv/bin/python -m pytest tests/test_sdk_compat.py"
    )
