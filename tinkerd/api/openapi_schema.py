"""The building blocks of `/openapi.json`: small schema builders (`string`, `obj`, `op`, ...),
the shapes many operations share, and the `components` section that names them.

Each builder mirrors a check in `tinkerd.api.validation` or `tinkerd.wire`, so a schema states
what its view accepts; `openapi_paths.py` composes them into the route table.
"""

from __future__ import annotations

from typing import Any

from tinkerd.api.validation import MAX_LORA_RANK
from tinkerd.storage import MAX_TTL_SECONDS
from tinkerd.text import ROLES

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def null_or(schema: Schema) -> Schema:
    """`schema` or JSON null: most optional fields take null for "absent"."""
    return {"anyOf": [schema, {"type": "null"}]}


def string(**kw: Any) -> Schema:
    return {"type": "string", "minLength": 1, **kw}


def integer(minimum: int | None = 0, maximum: int | None = None) -> Schema:
    bounds = {"minimum": minimum, "maximum": maximum}
    return {"type": "integer", **{k: v for k, v in bounds.items() if v is not None}}


def number(minimum: float = 0.0, below: float | None = None) -> Schema:
    """A finite number in [minimum, below) (`tinkerd.api.validation.get_float`)."""
    out: Schema = {"type": "number", "minimum": minimum}
    return out | ({"exclusiveMaximum": below} if below is not None else {})


def array(items: Schema, min_items: int = 0) -> Schema:
    return {"type": "array", "items": items} | ({"minItems": min_items} if min_items else {})


def obj(required: tuple[str, ...] = (), **properties: Schema) -> Schema:
    """An object; the views ignore keys they do not know, so others are allowed."""
    out: Schema = {"type": "object", "properties": properties}
    return out | ({"required": list(required)} if required else {})


BOOL: Schema = {"type": "boolean"}
INT: Schema = {"type": "integer"}
# A checkpoint's ttl_seconds (`tinkerd.api.validation.get_ttl_seconds`): none, or (0, 10 years].
TTL: Schema = null_or(number(1e-9) | {"maximum": MAX_TTL_SECONDS})
NUMBER: Schema = {"type": "number"}
ANY_OBJECT: Schema = {"type": "object"}
TOKENS: Schema = array(integer(0))
TINKER_PATH: Schema = string(
    pattern=r"^tinker://[^/]+/(weights|sampler_weights|external_weights)/[^/]+$",
    description="tinker://<model_id>/{weights|sampler_weights|external_weights}/<name>",
)


def json_content(schema: Schema) -> dict[str, Schema]:
    return {"application/json": {"schema": schema}}


def op(
    summary: str,
    tag: str,
    body: Schema | None = None,
    ok: Schema | None = None,
    *,
    params: tuple[Schema, ...] = (),
    ok_content: dict[str, Schema] | None = None,
    body_content: dict[str, Schema] | None = None,
    public: bool = False,
    error: str = "Error",
) -> Schema:
    """One operation: its body (required when given), its 200 answer, and the error shape of
    every 4xx and 5xx (`error`: tinkerd's, or OpenAI's on /v1)."""
    errors = {"description": "refused or failed", "content": json_content(ref(error))}
    out: Schema = {
        "summary": summary,
        "tags": [tag],
        "responses": {
            "200": {"description": "ok", "content": ok_content or json_content(ok or ANY_OBJECT)},
            "4XX": errors,
            "5XX": errors,
        },
    }
    content = body_content or (json_content(body) if body is not None else None)
    if content is not None:
        out["requestBody"] = {"required": True, "content": content}
    if params:
        out["parameters"] = list(params)
    if public:
        out["security"] = []
    return out


def no_op(value: Any) -> Schema:
    """An OpenAI option tinkerd does not support: absent, null, or the value that changes
    nothing."""
    return {"anyOf": [{"const": value}, {"type": "null"}], "description": "not supported"}


def path_param(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def query(name: str, schema: Schema, required: bool = False) -> Schema:
    return {"name": name, "in": "query", "required": required, "schema": schema}


PAGE = (query("limit", integer(1)), query("offset", integer(0)))
FUTURE = obj(("request_id", "model_id"), request_id=string(), model_id=string())
TEXT = {"text/plain": {"schema": {"type": "string"}}}


# -- shared shapes -----------------------------------------------------------------------------


def components() -> dict[str, Schema]:
    tensor = obj(
        ("data",),
        data=array(NUMBER),
        dtype={"enum": ["float32", "int64"]},
        shape=null_or(array(INT)),
        sparse_crow_indices=null_or(array(INT)),
        sparse_col_indices=null_or(array(INT)),
    )
    text_chunk = obj(("tokens",), type={"const": "encoded_text"}, tokens=TOKENS)
    stop = null_or({"anyOf": [string(), array(string()), array(INT)]})
    return {
        "Error": obj(
            ("error", "category"), error={"type": "string"}, category={"enum": ["user", "server"]}
        ),
        "OpenAIError": obj(
            ("error",),
            error=obj(
                ("message", "type"),
                message={"type": "string"},
                type={"type": "string"},
                param=null_or({"type": "string"}),
                code=null_or({"type": "string"}),
            ),
        ),
        "TensorData": tensor,
        "ModelInput": obj(("chunks",), chunks=array(text_chunk)),
        "Datum": obj(
            ("model_input",),
            model_input=ref("ModelInput"),
            loss_fn_inputs=null_or(
                {
                    "type": "object",
                    "additionalProperties": {"anyOf": [ref("TensorData"), array(NUMBER)]},
                }
            ),
        ),
        "LossFnConfig": null_or({"type": "object", "additionalProperties": {"type": "number"}}),
        "AdamParams": obj(
            learning_rate=number(),
            beta1=number(below=1.0),
            beta2=number(below=1.0),
            eps=number(),
            weight_decay=number(),
            grad_clip_norm=number(),
        ),
        "LoraConfig": obj(
            rank=integer(1, MAX_LORA_RANK),
            seed=null_or(integer(-(2**63), 2**64 - 1)),  # what torch.manual_seed takes
            train_mlp=BOOL,
            train_attn=BOOL,
            train_unembed=BOOL,
        ),
        "SamplingParams": obj(
            max_tokens=null_or(integer(1)),
            temperature=null_or(number()),
            top_p=null_or({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
            top_k=integer(-1),
            seed=null_or(INT),
            stop=ref("Stop"),
        ),
        "Message": obj(("role", "content"), role={"enum": list(ROLES)}, content=string()),
        "Conversation": array(ref("Message"), min_items=1),
        "Stop": stop,
    }
