"""The route table of `/openapi.json`: every operation of each surface (the SDK's protocol and
REST under /api/v1, sessions, the simple JSON API, OpenAI-compatible /v1) with its body, answer
and parameters, built from `openapi_schema`'s helpers.

In each group the operations that end or delete something come last, so that a fuzz run in the
document's order reaches the others with their ids still alive.
"""

from __future__ import annotations

from tinkerd.api.openapi_schema import (
    ANY_OBJECT,
    BOOL,
    FUTURE,
    INT,
    NUMBER,
    PAGE,
    TEXT,
    TINKER_PATH,
    TTL,
    Schema,
    array,
    components,
    integer,
    json_content,
    no_op,
    null_or,
    number,
    obj,
    op,
    path_param,
    query,
    ref,
    string,
)
from tinkerd.api.sampling import UNSUPPORTED
from tinkerd.api.simple import NAME
from tinkerd.loss_functions import LOSSES
from tinkerd.storage import KINDS
from tinkerd.text import ROLES
from tinkerd.wire.limits import MAX_NUM_SAMPLES, MAX_TOPK

# storage.check_name's pattern (it also refuses '..'); tests/test_openapi.py compares the two.
CHECKPOINT_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"


# -- /api/v1: the SDK's protocol ---------------------------------------------------------------


def sdk_paths() -> dict[str, Schema]:
    v1, sdk = "/api/v1", "sdk"
    ordered = {"model_id": string(), "seq_id": integer(0)}  # a model's request in its order
    save = {
        **ordered,
        "ttl_seconds": TTL,
        "overwrite": BOOL,
        "user_metadata": null_or(ANY_OBJECT),
    }
    sample_from = {"base_model": null_or(string()), "model_path": null_or(TINKER_PATH)}
    return {
        f"{v1}/client/config": {"post": op("SDK client flags", sdk)},
        f"{v1}/client/dynamic_config": {"post": op("SDK refresh settings", sdk)},
        f"{v1}/telemetry": {"post": op("accepted and dropped", sdk)},
        f"{v1}/get_server_capabilities": {
            "get": op("base models this server trains and samples", sdk)
        },
        f"{v1}/create_session": {
            "post": op(
                "start a session",
                sdk,
                obj(
                    tags=null_or(array({})),
                    user_metadata=null_or(ANY_OBJECT),
                    display_name=null_or({"type": "string"}),
                    project_id=null_or({"type": "string"}),
                ),
                obj(("session_id",), session_id=string()),
            )
        },
        f"{v1}/session_heartbeat": {
            "post": op(
                "keep a session alive (410 once it is finished)",
                sdk,
                obj(("session_id",), session_id=string()),
            )
        },
        f"{v1}/create_model": {
            "post": op(
                "create a LoRA model as {session_id}:train:{model_seq_id}; answers a future",
                sdk,
                obj(
                    ("session_id", "model_seq_id", "base_model"),
                    session_id=string(),
                    model_seq_id=integer(0),
                    base_model=string(),
                    lora_config=null_or(ref("LoraConfig")),
                    optimizer_config=null_or(obj(type={"const": "adamw"})),
                    user_metadata=null_or(ANY_OBJECT),
                ),
                FUTURE,
            )
        },
        f"{v1}/get_info": {
            "post": op(
                "a model's base model and LoRA rank", sdk, obj(("model_id",), model_id=string())
            )
        },
        f"{v1}/forward_backward": {
            "post": op(
                "queue a forward/backward pass; the SDK sends application/x-protobuf "
                "(a ForwardBackwardRequest), this JSON form is the same request",
                sdk,
                ok=FUTURE,
                body_content={
                    **json_content(
                        obj(
                            ("model_id", "seq_id", "forward_backward_input"),
                            **ordered,
                            forward_only=BOOL,
                            forward_backward_input=obj(
                                ("data", "loss_fn"),
                                data=array(ref("Datum")),
                                loss_fn={"enum": list(LOSSES)},
                                loss_fn_config=ref("LossFnConfig"),
                            ),
                        )
                    ),
                    "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
                },
            )
        },
        f"{v1}/optim_step": {
            "post": op(
                "queue an AdamW step",
                sdk,
                obj(
                    ("model_id", "seq_id", "adam_params"), **ordered, adam_params=ref("AdamParams")
                ),
                FUTURE,
            )
        },
        f"{v1}/retrieve_future": {
            "post": op(
                "a request's result (long-polls; {type: try_again} while it runs)",
                sdk,
                obj(("request_id",), request_id=string()),
                ok_content={
                    **json_content(ANY_OBJECT),
                    "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
                },
            )
        },
        f"{v1}/save_weights": {
            "post": op(
                "queue a save of weights and optimizer state",
                sdk,
                obj(("model_id", "seq_id", "path"), **save, path=string(pattern=CHECKPOINT_NAME)),
                FUTURE,
            )
        },
        f"{v1}/save_weights_for_sampler": {
            "post": op(
                "queue a save of sampler weights (named by `path`), or of an in-memory snapshot "
                "for a new sampling session (`sampling_session_seq_id`, without `path`)",
                sdk,
                obj(
                    ("model_id", "seq_id"),
                    **save,
                    path=null_or(string(pattern=CHECKPOINT_NAME)),
                    sampling_session_seq_id=integer(0),
                ),
                FUTURE,
            )
        },
        f"{v1}/save_weights_external": {
            "post": op(
                "queue a save of the adapter as a Hugging Face PEFT directory, for download",
                sdk,
                obj(
                    ("model_id", "seq_id", "path"),
                    **ordered,
                    path=string(pattern=CHECKPOINT_NAME),
                    ttl_seconds=TTL,
                    age_encryption_recipients={"anyOf": [{"type": "null"}, array(string(), 0)]},
                ),
                FUTURE,
            )
        },
        f"{v1}/load_weights": {
            "post": op(
                "load a checkpoint into a live model (with `model_id`, in its order), or create "
                "a model from it (with `session_id`)",
                sdk,
                {
                    "anyOf": [
                        obj(
                            ("model_id", "seq_id", "path"),
                            **ordered,
                            path=TINKER_PATH,
                            optimizer=BOOL,
                        ),
                        obj(
                            ("session_id", "model_seq_id", "path"),
                            session_id=string(),
                            model_seq_id=integer(0),
                            path=TINKER_PATH,
                            optimizer=BOOL,
                            base_model=null_or(string()),
                        ),
                    ]
                },
                FUTURE,
            )
        },
        f"{v1}/create_sampling_session": {
            "post": op(
                "a sampling session on a base model or a sampler checkpoint",
                sdk,
                obj(
                    ("session_id", "sampling_session_seq_id"),
                    session_id=string(),
                    sampling_session_seq_id=integer(0),
                    **sample_from,
                ),
                obj(("sampling_session_id",), sampling_session_id=string()),
            )
        },
        f"{v1}/samplers/{{sampler_id}}": {
            "get": op("a sampling session's weights", sdk, params=(path_param("sampler_id"),))
        },
        f"{v1}/asample": {
            "post": op(
                "queue a sampling request (of a sampling session, or naming its weights)",
                sdk,
                obj(
                    ("prompt",),
                    sampling_session_id=null_or(string()),
                    **sample_from,
                    prompt=ref("ModelInput"),
                    num_samples=integer(1, MAX_NUM_SAMPLES),
                    sampling_params=null_or(ref("SamplingParams")),
                    prompt_logprobs=null_or(BOOL),
                    topk_prompt_logprobs=null_or(integer(0, MAX_TOPK)),
                    seq_id=integer(0),
                    **{option: no_op(0) for option in UNSUPPORTED},
                ),
                obj(
                    ("request_id", "sample_sequence_ids"),
                    request_id=string(),
                    sample_sequence_ids=array(string()),
                ),
            )
        },
        f"{v1}/sessions/{{session_id}}/finish": {
            "post": op(
                "finish a session",
                sdk,
                obj(reason=null_or(obj(type={"type": "string"}))),
                params=(path_param("session_id"),),
            )
        },
        f"{v1}/unload_model": {
            "post": op(
                "free a model on its worker, after its queued requests (older SDKs)",
                sdk,
                obj(("model_id",), model_id=string()),
                FUTURE,
            )
        },
    }


# -- /api/v1: REST on runs and checkpoints, operations ------------------------------------------


def rest_paths() -> dict[str, Schema]:
    v1, rest, ops = "/api/v1", "rest", "ops"
    run = (path_param("run_id"),)
    checkpoint = f"{v1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}"
    one = (*run, path_param("kind"), path_param("name"))
    health = obj(("status",), status={"const": "ok"}, queue_depth=integer(0))
    events = (
        query("limit", integer(1, 1000)),
        query("offset", integer(0)),
        query("since", {"type": "number"}),
        query("type", {"type": "string"}),
    )
    return {
        f"{v1}/training_runs": {"get": op("training runs, a page", rest, params=PAGE)},
        f"{v1}/training_runs/{{run_id}}": {"get": op("a training run", rest, params=run)},
        f"{v1}/training_runs/{{run_id}}/checkpoints": {
            "get": op("a run's checkpoints", rest, params=run)
        },
        f"{v1}/training_runs/{{run_id}}/save": {
            "post": op(
                "queue a save as the run's next request (no seq_id)",
                rest,
                obj(
                    ("name",),
                    name=string(pattern=CHECKPOINT_NAME),
                    kind={"enum": list(KINDS)},
                    ttl_seconds=TTL,
                    overwrite=BOOL,
                    user_metadata=null_or(ANY_OBJECT),
                ),
                params=run,
            )
        },
        f"{v1}/training_runs/{{run_id}}/events": {
            "get": op("a run's events, oldest first", rest, params=(*run, *events))
        },
        f"{v1}/training_runs/{{run_id}}/log": {
            "get": op("a run's events as text", rest, params=(*run, *events), ok_content=TEXT)
        },
        f"{v1}/checkpoints": {
            "get": op("every run's checkpoints, newest first", rest, params=PAGE)
        },
        f"{v1}/checkpoints/archive": {
            "get": op(
                "a checkpoint's files as a tar stream",
                rest,
                params=(query("path", TINKER_PATH, required=True), query("optimizer", BOOL)),
                ok_content={"application/x-tar": {"schema": {"type": "string"}}},
            )
        },
        f"{v1}/weights_info": {
            "post": op(
                "a checkpoint's base model and LoRA config",
                rest,
                obj(("tinker_path",), tinker_path=TINKER_PATH),
            )
        },
        f"{checkpoint}/external_weights_urls": {
            "get": op(
                "signed download URLs, one per file, of an external weights checkpoint",
                rest,
                ok=obj(("urls", "expires"), urls=ANY_OBJECT, expires={"type": "string"}),
                params=one,
            )
        },
        f"{checkpoint}/archive": {
            "get": op(
                "a signed URL to a checkpoint's tar (older SDKs)",
                rest,
                ok=obj(("url", "expires"), url=string(), expires={"type": "string"}),
                params=one,
            )
        },
        f"{v1}/copy_weights": {
            "post": op(
                "copy a checkpoint (own or published) into a new run of this key's",
                rest,
                obj(
                    ("source_path",),
                    source_path=TINKER_PATH,
                    destination_project_id=null_or(string()),
                    session_id=null_or(string()),
                    model_seq_id=null_or(integer(0)),
                    ttl_seconds=TTL,
                ),
                obj(("tinker_path",), tinker_path=TINKER_PATH),
            )
        },
        f"{v1}/downloads/{{token}}/{{file_name}}": {
            "get": op(
                "a signed URL's file (no API key: the signature grants it)",
                rest,
                params=(path_param("token"), path_param("file_name")),
                ok_content={
                    "application/octet-stream": {"schema": {"type": "string"}},
                    "application/x-tar": {"schema": {"type": "string"}},
                    "application/json": {"schema": ANY_OBJECT},
                },
                public=True,
            )
        },
        f"{checkpoint}/ttl": {
            "put": op(
                "set (null: remove) a checkpoint's expiry, from now; owner only",
                rest,
                obj(("ttl_seconds",), ttl_seconds=TTL),
                params=one,
            )
        },
        f"{checkpoint}/publish": {
            "post": op(
                "publish a checkpoint: every key may read it; owner only (409 if public)",
                rest,
                params=one,
            ),
            "delete": op("unpublish a checkpoint (409 if private)", rest, params=one),
        },
        checkpoint: {"delete": op("delete a checkpoint", rest, params=one)},
        f"{v1}/system/status": {"get": op("workers, queue, host, lost models", ops)},
        f"{v1}/healthz": {"get": op("liveness", ops, ok=health, public=True)},
        f"{v1}/loss_functions": {"get": op("the losses, their inputs and config", ops)},
        "/healthz": {"get": op("liveness", ops, ok=health, public=True)},
        "/loss_functions": {"get": op("the losses, their inputs and config", ops)},
        "/metrics": {"get": op("Prometheus text exposition", ops, ok_content=TEXT)},
        "/openapi.json": {"get": op("this document", ops, public=True)},
    }


def session_paths() -> dict[str, Schema]:
    v1, rest = "/api/v1", "rest"
    session = (path_param("session_id"),)
    owner = obj(("type",), type={"enum": ["own", "accessible", "user"]}, owner_urns=array(string()))
    status = obj(
        ("type",),
        type={"enum": ["active", "cancelled", "failed", "client_finished"]},
        reasons=null_or(array({"enum": ["success", "errored", "interrupted"]}, 1)),
    )
    cursor = obj(
        ("last_created_at", "last_session_id"),
        last_created_at={"type": "string", "format": "date-time"},
        last_session_id=string(),
    )
    return {
        f"{v1}/sessions": {
            "get": op(
                "this key's session ids, newest first",
                rest,
                ok=obj(("sessions",), sessions=array({"type": "string"})),
                params=(*PAGE, query("access_scope", {"enum": ["owned", "accessible"]})),
            )
        },
        f"{v1}/sessions/search": {
            "post": op(
                "search this key's sessions, newest first, a page at a time",
                rest,
                obj(
                    session_id=null_or({"type": "string"}),
                    display_name=null_or(string()),
                    project_ids=null_or(array({"type": "string"})),
                    user_metadata={"type": "object", "additionalProperties": {"type": "string"}},
                    owner=owner,
                    statuses=null_or(array(status, 1)),
                    limit=integer(1, 200),
                    cursor=null_or(cursor),
                ),
                obj(("sessions",), sessions=array(ANY_OBJECT), next_cursor=null_or(cursor)),
            )
        },
        f"{v1}/sessions/{{session_id}}": {
            "get": op(
                "a session's runs, samplers, metadata",
                rest,
                ok=obj(
                    ("training_run_ids", "sampler_ids"),
                    training_run_ids=array({"type": "string"}),
                    sampler_ids=array({"type": "string"}),
                ),
                params=(*session, query("access_scope", {"enum": ["owned", "accessible"]})),
            )
        },
        f"{v1}/sessions/{{session_id}}/trace_export": {
            "get": op(
                "a signed URL to the session's trace (Chrome trace-event JSON)",
                rest,
                ok=obj(("status", "url"), status={"const": "ready"}, url=string()),
                params=session,
            )
        },
        f"{v1}/sessions/{{session_id}}/project": {
            "put": op(
                "label a session with a project id",
                rest,
                obj(("project_id",), project_id=string()),
                params=session,
            )
        },
        f"{v1}/audit": {
            "get": op(
                "a UTC day of this key's audit log (an admin key's: every key's)",
                rest,
                ok=obj(("entries",), entries=array(ANY_OBJECT)),
                params=(
                    query(
                        "event_type",
                        {"enum": ["all", "checkpoints", "projects", "teams", "organizations"]},
                    ),
                    query("day", {"type": "string", "format": "date"}),
                ),
            )
        },
        f"{v1}/billing/usage/checkpoints/current": {
            "get": op(
                "the checkpoints this key stores, by project label and key",
                rest,
                ok=obj(("data",), data=array(ANY_OBJECT)),
                params=(query("project_id", {"type": "string"}),),
            )
        },
    }


# -- the simple JSON API at the root -----------------------------------------------------------


def simple_paths() -> dict[str, Schema]:
    simple = "simple"
    name = string(pattern=NAME.pattern)
    sequence = {"anyOf": [ref("Conversation"), array(integer(0), min_items=2)]}
    per_datum = array({"anyOf": [NUMBER, array(NUMBER), ref("TensorData")]})
    sample = obj(
        model_id=null_or(name),
        base_model=null_or(string()),
        prompt=null_or({"anyOf": [string(), array(integer(0), min_items=1)]}),
        messages=null_or(ref("Conversation")),
        max_tokens=null_or(integer(1)),
        temperature=null_or(number()),
        top_p=null_or({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        top_k=null_or(integer(-1)),
        seed=null_or(INT),
        stop=ref("Stop"),
        num_samples=integer(1, MAX_NUM_SAMPLES),
    )
    lora = {k: null_or(v) for k, v in components()["LoraConfig"]["properties"].items()}
    return {
        "/adapters": {"get": op("the adapters, oldest first", simple)},
        "/add_lora": {
            "post": op(
                "create an adapter (409 if the name exists with another config)",
                simple,
                obj(("model_id",), model_id=name, base_model=null_or(string()), **lora),
            )
        },
        "/fwdbwd": {
            "post": op(
                "queue a forward/backward pass on conversations or token ids (a new name "
                "creates its adapter)",
                simple,
                obj(
                    ("model_id", "data"),
                    model_id=name,
                    data=array(sequence, min_items=1),
                    loss_fn={"enum": list(LOSSES)},
                    loss_fn_config=ref("LossFnConfig"),
                    loss_fn_inputs=null_or({"type": "object", "additionalProperties": per_datum}),
                    forward_only=BOOL,
                ),
                FUTURE,
            )
        },
        "/optim_step": {
            "post": op(
                "queue an AdamW step",
                simple,
                obj(
                    ("model_id",),
                    model_id=name,
                    adam_params=null_or(ref("AdamParams")),
                    learning_rate=null_or(number()),
                ),
                FUTURE,
            )
        },
        "/retrieve_future": {
            "post": op(
                "a request's result as JSON (long-polls)",
                simple,
                obj(("request_id",), request_id=string()),
            )
        },
        "/sample": {"post": op("sample text and wait for it", simple, sample)},
        "/generate": {"post": op("sample text and wait for it (= /sample)", simple, sample)},
        "/get_server_capabilities": {
            "get": op("base models this server trains and samples", simple)
        },
        "/remove_lora": {
            "post": op("remove an adapter", simple, obj(("model_id",), model_id=name))
        },
        "/adapters/{name}": {
            "delete": op("remove an adapter", simple, params=(path_param("name"),))
        },
    }


# -- /v1: OpenAI-compatible sampling -----------------------------------------------------------


def openai_paths() -> dict[str, Schema]:
    openai = "openai"
    options = {
        "model": string(description="a base model, or a tinker:// sampler checkpoint"),
        "max_tokens": null_or(integer(1)),
        "temperature": null_or(number()),
        "top_p": null_or({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": null_or(integer(-1)),
        "n": null_or(integer(1, MAX_NUM_SAMPLES)),
        "best_of": null_or({**integer(1), "description": "only equal to n"}),
        "seed": null_or(INT),
        "stop": null_or({"anyOf": [string(), array(string())]}),
        "stream": null_or(BOOL),
        "stream_options": null_or(obj(include_usage=BOOL)),
        "frequency_penalty": no_op(0),
        "presence_penalty": no_op(0),
        "logit_bias": no_op({}),
        "tools": no_op([]),
        "functions": no_op([]),
        "response_format": no_op({"type": "text"}),
    }
    ids = array(integer(0), min_items=1)
    prompt = {"anyOf": [{"type": "string"}, array(string(), 1), ids, array(ids, 1)]}
    part = obj(("type", "text"), type={"const": "text"}, text={"type": "string"})
    message = obj(
        ("role", "content"),
        role={"enum": [*ROLES, "developer"]},
        content={"anyOf": [string(), array(part, 1)]},
    )
    answer = {
        **json_content(ANY_OBJECT),
        # Before OpenAPI 3.2 a stream's schema describes each event.
        "text/event-stream": {
            "schema": obj(("data",), data=string(description="a JSON chunk, or [DONE]"))
        },
    }
    return {
        "/v1/completions": {
            "post": op(
                "text completions",
                openai,
                obj(
                    ("model", "prompt"),
                    **options,
                    prompt=prompt,
                    logprobs=null_or(integer(0, 0)),
                    echo=no_op(False),
                    suffix=no_op(""),
                ),
                ok_content=answer,
                error="OpenAIError",
            )
        },
        "/v1/chat/completions": {
            "post": op(
                "chat completions",
                openai,
                obj(
                    ("model", "messages"),
                    **options,
                    messages=array(message, 1),
                    max_completion_tokens=null_or(integer(1)),
                    logprobs=null_or(BOOL),
                    top_logprobs=null_or(integer(0, 0)),
                ),
                ok_content=answer,
                error="OpenAIError",
            )
        },
        "/v1/models": {"get": op("the models to sample from", openai, error="OpenAIError")},
        "/v1/models/{model}": {
            "get": op(
                "one model",
                openai,
                params=(path_param("model"),),
                error="OpenAIError",
            )
        },
    }
