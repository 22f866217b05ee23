"""OpenAPI 3.1 documents built from our pydantic models, served as `/openapi.json` and `/docs`.

Each service describes its operations declaratively (`Operation`, `Param`, `Response`) beside its
handlers; `build_document` turns them into one OpenAPI document whose schemas come from the same
pydantic models the handlers validate with and answer from, so the document cannot drift from the
code for want of being updated by hand. `add_routes` serves it as JSON and as an HTML page rendered
here on the server: no CDN and no scripts, because our services send no third-party assets.

Conventions every operation gets without saying so: an optional `X-Request-ID` request header, the
`X-Request-ID` response header on every answer, and error answers in the shape
`{"error": {"code", "message"}}`, with the codes a status can carry listed as an enum so a client
(and the schemathesis fuzz in the test suite) can rely on them.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version as package_version
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from imgpipe.models import ErrorInfo, ImageFormat, JobStatus

OPENAPI_VERSION = "3.1.0"
_REF_PREFIX = "#/components/schemas/"
REF_TEMPLATE = _REF_PREFIX + "{model}"

#: What a `security` entry of an `Operation` may be: any valid bearer token, or one with `admin`.
BEARER: tuple[dict[str, list[str]], ...] = ({"bearerAuth": []},)
#: OpenAPI 3.1 allows role names in the requirement of a non-OAuth scheme: our `scope` claim.
ADMIN: tuple[dict[str, list[str]], ...] = ({"bearerAuth": ["admin"]},)

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A JWT with `exp` and `sub`; `sub` owns what it creates. Admin routes need "
        "`admin` in the space-separated `scope` claim.",
    },
    "accessToken": {
        "type": "apiKey",
        "in": "query",
        "name": "access_token",
        "description": "The same JWT in the query string, for EventSource clients that cannot send "
        "headers (the event stream only).",
    },
}

#: Response headers, defined once; `Response.headers` and `Response.optional_headers` name them.
HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": {
        "description": "The request's id: the client's `X-Request-ID` when it is sane, otherwise a "
        "new one. Every log line of the request and of its job carries it.",
        "schema": {"type": "string", "pattern": r"^[A-Za-z0-9._:-]{1,128}$"},
    },
    "Location": {
        "description": "Where the created resource can be read.",
        "schema": {"type": "string", "format": "uri-reference"},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "WWW-Authenticate": {
        "description": "The Bearer challenge (RFC 6750).",
        "schema": {"type": "string"},
    },
    "Idempotent-Replayed": {
        "description": "`true` when the answer is the job an earlier request with the same "
        "`Idempotency-Key` created.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Accept-Encoding": {
        "description": "`identity`: the request body must be sent without a Content-Encoding (RFC 7694).",
        "schema": {"type": "string", "enum": ["identity"]},
    },
    "RateLimit-Limit": {
        "description": "The caller's limit in the current window.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "RateLimit-Remaining": {
        "description": "What is left of the caller's limit in the current window.",
        "schema": {"type": "integer", "minimum": 0},
    },
}

#: The error body every service answers 4xx and 5xx with.
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {
                    "type": "string",
                    "pattern": "^[a-z][a-z0-9_]*$",
                    "description": "Machine-readable, stable; branch on this.",
                },
                "message": {"type": "string", "description": "A sentence for people; may change."},
            },
        }
    },
}


# Response bodies that have no model elsewhere: the shapes handlers build as dicts.


class Answer(BaseModel):
    """Base of the models here that describe answers: a field they do not name is a schema break."""

    model_config = ConfigDict(extra="forbid")


class Health(Answer):
    """`GET /healthz`: the process is alive."""

    status: Literal["ok"]
    service: str
    version: str
    environment: str


class Readiness(Answer):
    """`GET /readyz`: every dependency check by name, `ok` or `error: <kind>`."""

    ready: bool
    checks: dict[str, str]


class VariantView(Answer):
    """A finished variant as clients see it (`imgpipe.models.VariantResult` plus its link)."""

    name: str
    format: ImageFormat
    width: int
    height: int
    bytes: int
    key: str
    url: str | None = Field(description="A time-limited GET link; null where no link is made (POST /jobs).")


class JobView(Answer):
    """A job as clients see it: `JobRecord.public()` (`GET /jobs/{id}`, SSE `data:`, POST /jobs)."""

    id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    variants: list[VariantView]
    error: ErrorInfo | None = Field(description="Why a `failed` job failed; null otherwise.")


# The declarative description of operations.


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter."""

    name: str
    location: Literal["path", "query", "header"]
    schema: Mapping[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True)
class Response:
    """One status of an operation: a JSON body from a model, a raw schema, or an error with its codes."""

    description: str
    model: type[BaseModel] | None = None
    schema: Mapping[str, Any] | None = None
    media_type: str = "application/json"
    #: Error codes this status can carry; the body is then the Error schema restricted to them.
    codes: tuple[str, ...] = ()
    #: Names from `HEADERS` the answer always has (besides `X-Request-ID`, which every answer has).
    headers: tuple[str, ...] = ()
    #: Names from `HEADERS` the answer may have.
    optional_headers: tuple[str, ...] = ()
    #: A `text/event-stream` whose events carry this model as JSON `data:` (and have an `id:`).
    events: type[BaseModel] | None = None
    #: The `event:` names such a stream uses.
    event_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    """One route: method, path, who may call it, what it takes and every answer it can give."""

    method: str
    path: str
    operation_id: str
    summary: str
    responses: Mapping[int, Response]
    description: str = ""
    tags: tuple[str, ...] = ()
    security: tuple[dict[str, list[str]], ...] = ()
    params: tuple[Param, ...] = ()
    #: A required JSON body, validated with this model.
    body: type[BaseModel] | None = None


def error(
    description: str, *codes: str, headers: tuple[str, ...] = (), optional_headers: tuple[str, ...] = ()
) -> Response:
    """An error answer that carries one of `codes`."""
    return Response(description, codes=codes, headers=headers, optional_headers=optional_headers)


#: The 401 of every authenticated operation.
UNAUTHORIZED = error(
    "No token, or one that is malformed, expired or not valid.",
    "missing_token",
    "invalid_token",
    "token_expired",
    headers=("WWW-Authenticate",),
)
#: The 403 of every admin operation.
FORBIDDEN = error("The token lacks the `admin` scope.", "forbidden")


def unavailable(*codes: str, description: str = "A dependency is down; retry later.") -> Response:
    """The 503 of an authenticated operation whose dependencies (`codes`) may be down.

    `auth_unavailable` is always possible: the identity provider's keys may be out of reach.
    """
    return error(
        description,
        *codes,
        "auth_unavailable",
        optional_headers=("Retry-After",),
    )


_REQUEST_ID = Param(
    "X-Request-ID",
    "header",
    {"type": "string"},
    "Correlates the request's log lines; kept when it matches `[A-Za-z0-9._:-]{1,128}`.",
)


def _model_schemas(
    models: Iterable[tuple[type[BaseModel], JsonSchemaMode]],
) -> tuple[dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]], dict[str, Any]]:
    """Each model's schema (a `$ref`) and the definitions they need, named once across all of them.

    One `models_json_schema` call (rather than `model_json_schema` per model) names a model that
    differs between validation and serialization `-Input`/`-Output` instead of letting one overwrite
    the other in `components.schemas`.
    """
    unique = list(dict.fromkeys(models))
    if not unique:
        return {}, {}
    refs, top = models_json_schema(unique, ref_template=REF_TEMPLATE)
    return dict(refs), top.get("$defs", {})


def _error_schema(codes: Sequence[str]) -> dict[str, Any]:
    if not codes:
        return {"$ref": _REF_PREFIX + "Error"}
    return {
        "allOf": [
            {"$ref": _REF_PREFIX + "Error"},
            {"properties": {"error": {"properties": {"code": {"enum": list(codes)}}}}},
        ]
    }


def _event_schema(data: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """One Server-Sent Event, as OpenAPI 3.1 describes an event stream: each event by `schema`."""
    event: dict[str, Any] = {"type": "string", "description": "The event's name."}
    if names:
        event["enum"] = list(names)
    return {
        "type": "object",
        "required": ["event", "id", "data"],
        "properties": {
            "event": event,
            "id": {"type": "string", "description": "Grows with every event of the stream."},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": dict(data)},
            "retry": {"type": "integer", "description": "Milliseconds to wait before reconnecting."},
        },
    }


def build_document(
    *, title: str, version: str, description: str, operations: Sequence[Operation]
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `operations`, with every schema under `components.schemas`."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for op in operations:
        if op.body is not None:
            wanted.append((op.body, "validation"))
        for response in op.responses.values():
            wanted.extend((m, "serialization") for m in (response.model, response.events) if m is not None)
    refs, defs = _model_schemas(wanted)
    if "Error" in defs:
        raise ValueError("a model named 'Error' would shadow the error schema")
    schemas = {"Error": ERROR_SCHEMA, **dict(sorted(defs.items()))}

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        item: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": list(op.tags),
            "security": [dict(s) for s in op.security],
            "parameters": [
                {
                    "name": p.name,
                    "in": p.location,
                    "required": p.required or p.location == "path",
                    "description": p.description,
                    "schema": dict(p.schema),
                }
                for p in (*op.params, _REQUEST_ID)
            ],
            "responses": {},
        }
        if op.description:
            item["description"] = op.description
        if op.body is not None:
            item["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
            }
        for status, response in sorted(op.responses.items()):
            if response.model is not None:
                schema: Mapping[str, Any] | None = refs[(response.model, "serialization")]
            elif response.events is not None:
                schema = _event_schema(refs[(response.events, "serialization")], response.event_names)
            elif response.schema is not None:
                schema = response.schema
            elif status >= 400:
                schema = _error_schema(response.codes)
            else:
                schema = None
            required = ("X-Request-ID", *response.headers)
            unknown = [name for name in (*required, *response.optional_headers) if name not in HEADERS]
            if unknown:
                raise ValueError(f"{op.operation_id} {status}: undocumented headers {unknown}")
            # Inline, not `$ref`: whether a header is required depends on the answer, and a 3.1
            # Reference Object cannot carry `required` beside it.
            headers = {name: {**HEADERS[name], "required": True} for name in required}
            headers.update({name: {**HEADERS[name], "required": False} for name in response.optional_headers})
            answer: dict[str, Any] = {"description": response.description, "headers": headers}
            media_type = "text/event-stream" if response.events is not None else response.media_type
            if schema is not None:
                answer["content"] = {media_type: {"schema": dict(schema)}}
            if response.codes:
                # Also outside the schema, for readers and generators that do not follow allOf.
                answer["x-error-codes"] = list(response.codes)
            item["responses"][str(status)] = answer
        paths.setdefault(op.path, {})[op.method.lower()] = item

    used_schemes = {name for op in operations for req in op.security for name in req}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {k: v for k, v in SECURITY_SCHEMES.items() if k in used_schemes},
        },
    }


# The HTML page.

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem;color:#222}
code,pre{font:13px/1.4 ui-monospace,monospace}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.3rem .5rem;
text-align:left;vertical-align:top}section.op{border-top:2px solid #ccc;margin-top:2rem}
.method{font-weight:bold;text-transform:uppercase;margin-right:.5rem}
"""

_SCHEMA_REF = re.compile(r"&quot;#/components/schemas/([A-Za-z0-9_.-]+)&quot;")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def _json(value: Any) -> str:
    """Pretty JSON, escaped, with each schema reference made a link to that schema."""
    escaped = _e(json.dumps(value, indent=2, ensure_ascii=False))
    return _SCHEMA_REF.sub(
        lambda m: f'<a href="#{_anchor("schema", m.group(1))}">{m.group(0)}</a>',
        escaped,
    )


def _security_text(security: list[dict[str, list[str]]]) -> str:
    if not security:
        return "none"
    parts = []
    for requirement in security:
        for scheme, roles in requirement.items():
            parts.append(f"{scheme} (scope: {' '.join(roles)})" if roles else scheme)
    return " or ".join(parts)


def _operation_html(method: str, path: str, op: Mapping[str, Any]) -> str:
    out = [
        f'<section class="op" id="{_e(_anchor("op", op["operationId"]))}">',
        f'<h3><span class="method">{_e(method)}</span><code>{_e(path)}</code></h3>',
        f"<p><strong>{_e(op['summary'])}</strong></p>",
    ]
    if op.get("description"):
        out.extend(f"<p>{_e(para)}</p>" for para in op["description"].split("\n\n"))
    out.append(f"<p>Authentication: {_e(_security_text(op.get('security', [])))}</p>")
    if op.get("parameters"):
        out.append("<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>required</th>")
        out.append("<th>schema</th><th>description</th></tr>")
        for p in op["parameters"]:
            out.append(
                f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
                f"<td>{'yes' if p.get('required') else 'no'}</td>"
                f"<td><code>{_e(json.dumps(p['schema'], ensure_ascii=False))}</code></td>"
                f"<td>{_e(p.get('description', ''))}</td></tr>"
            )
        out.append("</table>")
    body = op.get("requestBody")
    if body:
        out.append(f"<h4>Request body{' (required)' if body.get('required') else ''}</h4>")
        for media, content in body["content"].items():
            out.append(f"<p><code>{_e(media)}</code></p><pre>{_json(content['schema'])}</pre>")
    out.append("<h4>Responses</h4><table><tr><th>status</th><th>description</th><th>body</th>")
    out.append("<th>codes</th><th>headers</th></tr>")
    for status, response in op["responses"].items():
        if response.get("x-error-codes"):
            # The Error schema narrowed to these codes: the codes column says all the rest.
            bodies = f'<code>application/json</code>: <a href="#{_anchor("schema", "Error")}">Error</a>'
        else:
            bodies = "".join(
                f"<code>{_e(media)}</code><pre>{_json(content['schema'])}</pre>"
                for media, content in response.get("content", {}).items()
            )
        codes = ", ".join(f"<code>{_e(code)}</code>" for code in response.get("x-error-codes", []))
        headers = ", ".join(
            f"<code>{_e(name)}</code>{'' if header.get('required') else ' (optional)'}"
            for name, header in response.get("headers", {}).items()
        )
        out.append(
            f"<tr><td>{_e(status)}</td><td>{_e(response['description'])}</td><td>{bodies}</td>"
            f"<td>{codes}</td><td>{headers}</td></tr>"
        )
    out.append("</table></section>")
    return "\n".join(out)


def render_html(document: Mapping[str, Any]) -> str:
    """A self-contained page listing every operation, its parameters, body, responses and codes."""
    info = document["info"]
    ops = [
        (method.upper(), path, op) for path, item in document["paths"].items() for method, op in item.items()
    ]
    components = document.get("components", {})
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(info['title'])} {_e(info['version'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(info['title'])} <small>{_e(info['version'])}</small></h1>",
    ]
    out.extend(f"<p>{_e(para)}</p>" for para in info.get("description", "").split("\n\n") if para)
    out.append(
        '<p>The machine-readable document: <a href="openapi.json"><code>openapi.json</code></a> '
        f"(OpenAPI {_e(document['openapi'])}).</p>"
    )
    out.append("<h2>Operations</h2><ul>")
    out.extend(
        f'<li><a href="#{_e(_anchor("op", op["operationId"]))}"><span class="method">{_e(method)}</span>'
        f"<code>{_e(path)}</code></a> {_e(op['summary'])}</li>"
        for method, path, op in ops
    )
    out.append("</ul>")
    if components.get("securitySchemes"):
        out.append("<h2>Authentication</h2><ul>")
        out.extend(
            f"<li><code>{_e(name)}</code>: {_e(scheme.get('description', scheme.get('type', '')))}</li>"
            for name, scheme in components["securitySchemes"].items()
        )
        out.append("</ul>")
    out.extend(_operation_html(method, path, op) for method, path, op in ops)
    headers = {
        name: header
        for _, _, op in ops
        for response in op["responses"].values()
        for name, header in response.get("headers", {}).items()
    }
    if headers:
        out.append("<h2>Response headers</h2><table><tr><th>name</th><th>description</th></tr>")
        out.extend(
            f"<tr><td><code>{_e(name)}</code></td><td>{_e(header.get('description', ''))}</td></tr>"
            for name, header in sorted(headers.items())
        )
        out.append("</table>")
    out.append("<h2>Schemas</h2>")
    out.extend(
        f'<section id="{_e(_anchor("schema", name))}"><h3>{_e(name)}</h3><pre>{_json(schema)}</pre></section>'
        for name, schema in components.get("schemas", {}).items()
    )
    out.append("</body></html>")
    return "\n".join(out)


# Serving it.

#: The page carries its own styles and nothing else: no scripts, no fetches, not even images.
_DOCS_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def add_routes(app: web.Application, document: Mapping[str, Any]) -> None:
    """Serve `document` as `GET /openapi.json` and `GET /docs`, rendered once, here and now."""
    as_json = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    as_html = render_html(document).encode()

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=as_json, content_type="application/json")

    async def docs(request: web.Request) -> web.Response:
        return web.Response(
            body=as_html,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": _DOCS_CSP, "X-Content-Type-Options": "nosniff"},
        )

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)


def meta_operations() -> tuple[Operation, ...]:
    """The operations every service has: health, readiness, metrics and these documents."""
    return (
        Operation(
            "GET",
            "/healthz",
            "healthz",
            "Liveness: the process answers.",
            {200: Response("Alive.", model=Health)},
            tags=("health",),
        ),
        Operation(
            "GET",
            "/readyz",
            "readyz",
            "Readiness: every dependency answers.",
            {
                200: Response(
                    "Every check passed; or, on api and status, every check has passed once since "
                    "the process started, and `checks` names those failing now (an outage of a "
                    "dependency every replica shares: requests that need it get a quick JSON 503).",
                    model=Readiness,
                ),
                503: Response("At least one check failed; `checks` names it.", model=Readiness),
            },
            tags=("health",),
        ),
        Operation(
            "GET",
            "/metrics",
            "metrics",
            "Prometheus metrics, in the text exposition format.",
            {200: Response("The metrics.", schema={"type": "string"}, media_type="text/plain")},
            tags=("health",),
        ),
        Operation(
            "GET",
            "/openapi.json",
            "openapi",
            "This document (OpenAPI 3.1).",
            {200: Response("The document.", schema={"type": "object"})},
            tags=("meta",),
        ),
        Operation(
            "GET",
            "/docs",
            "docs",
            "This document as a self-contained HTML page.",
            {200: Response("The page.", schema={"type": "string"}, media_type="text/html")},
            tags=("meta",),
        ),
    )


def health_document(service: str) -> dict[str, Any]:
    """The document of a service that serves only health, readiness and metrics (worker, reconciler)."""
    return build_document(
        title=f"imgpipe {service}",
        version=package_version("imgpipe"),
        description="Health, readiness and metrics only: this service takes its work from the broker.",
        operations=meta_operations(),
    )
