"""The OpenAPI documents: valid 3.1, complete, rendered as /docs, and true of the live services.

The fuzz runs schemathesis against the api, status and worker processes of the session `stack`:
every documented operation gets generated requests (valid and invalid ones, and some aimed at real
uploads, jobs, runs and dead letters), and every answer must be a non-5xx with a documented status,
content type, body schema (SSE events included) and headers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from imgpipe.openapi import Operation, Response, build_document, health_document, render_html
from imgpipe_api.app import UPLOAD_TYPES
from imgpipe_api.openapi import document as api_document
from imgpipe_status.openapi import document as status_document
from openapi_spec_validator import validate as validate_spec  # comes with moto[server]
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.isolated import image
from tests.stack import Stack, free_port, token

pytestmark = pytest.mark.e2e

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
DOCUMENTS = {"api": api_document, "status": status_document, "worker": lambda: health_document("worker")}

# A closed port on loopback: URL sources the fuzz submits point here, so the session's worker
# fails them at once instead of fetching whatever host hypothesis made up from the internet.
_CLOSED_PORT = free_port()


def _operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


# The documents themselves.


@pytest.mark.parametrize("service", DOCUMENTS)
def test_document_is_valid_openapi_31(service: str) -> None:
    document = DOCUMENTS[service]()
    assert document["openapi"] == "3.1.0"
    validate_spec(document)  # the 3.1 meta-schema, every $ref resolved, path parameters declared
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()
    loaded = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in loaded} == _operations(document)
    # Each error answer names the codes it can carry, and every operation says who may call it.
    for path, item in document["paths"].items():
        for method, op in item.items():
            assert "security" in op, (method, path)
            for status, response in op["responses"].items():
                assert response["headers"]["X-Request-ID"]["required"] is True, (method, path, status)
                if int(status) >= 400 and path != "/readyz":  # a 503 readiness report is no error
                    assert response.get("x-error-codes"), (method, path, status)


_ROUTES = """
import asyncio, json, sys
from importlib import import_module
app = asyncio.run(import_module(sys.argv[1]).create_app())
print(json.dumps(sorted({(r.method, r.resource.canonical) for r in app.router.routes()})))
"""


@pytest.mark.parametrize("service", DOCUMENTS)
def test_every_route_is_documented_and_every_operation_routed(service: str, stack: Stack) -> None:
    # In a child process: create_app() configures logging for the whole process it runs in.
    routes = subprocess.run(
        [sys.executable, "-c", _ROUTES, f"imgpipe_{service}.app"],
        env={**stack.env, "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    # aiohttp answers HEAD on every GET route by itself; HTTP defines it as GET without a body.
    registered = {(method, path) for method, path in json.loads(routes.stdout) if method != "HEAD"}
    assert registered == _operations(DOCUMENTS[service]())


@pytest.mark.parametrize("service", DOCUMENTS)
async def test_live_document_is_the_built_one(
    service: str, stack: Stack, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{stack.services[service].url}/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert response.headers["X-Request-ID"]
        assert await response.json() == json.loads(json.dumps(DOCUMENTS[service]()))


@pytest.mark.parametrize("service", DOCUMENTS)
async def test_docs_page_lists_every_operation(
    service: str, stack: Stack, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{stack.services[service].url}/docs") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        page = await response.text()
    document = DOCUMENTS[service]()
    for path, item in document["paths"].items():
        for method, op in item.items():
            section = re.search(
                rf'<section class="op" id="op-{re.escape(op["operationId"])}">(.*?)</section>', page, re.S
            )
            assert section, (method, path)
            body = section.group(1)
            assert f'<span class="method">{method.upper()}</span><code>{path}</code>' in body
            for param in op["parameters"]:
                assert f"<code>{param['name']}</code>" in body, (method, path, param["name"])
            if "requestBody" in op:
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert f'<a href="#schema-{ref.rsplit("/", 1)[1]}">' in body
            for status, answer in op["responses"].items():
                assert f"<tr><td>{status}</td>" in body, (method, path, status)
                for code in answer.get("x-error-codes", []):
                    assert f"<code>{code}</code>" in body, (method, path, status, code)
    for name in document["components"]["schemas"]:
        assert f'<section id="schema-{name}">' in page
    # Self-contained: no scripts, and nothing fetched from anywhere.
    assert "<script" not in page.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I)


def test_docs_page_escapes_what_it_shows() -> None:
    class Evil(BaseModel):
        """</pre><script>alert(1)</script>"""

        name: str

    hostile = "<img src=x onerror=alert(1)>"
    document = build_document(
        title=f"t{hostile}",
        version='1"><script>',
        description=f"d{hostile}",
        operations=(
            Operation(
                "POST",
                "/x/{id}<b>",
                'op"<i>',
                f"s{hostile}",
                {422: Response(f"r{hostile}", codes=("code<script>",)), 200: Response("ok", model=Evil)},
                description=hostile,
                body=Evil,
            ),
        ),
    )
    page = render_html(document)
    assert "<script" not in page
    assert "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


# What clients get wrong: no token, another's scope, the wrong content type.


def _case(schema: Any, method: str, path: str, **kwargs: Any) -> Any:
    return schema[path][method].Case(**kwargs)


@pytest.fixture
def api_schema(stack: Stack) -> Any:
    return _live_schema(stack.api)


@pytest.fixture
def status_schema(stack: Stack) -> Any:
    return _live_schema(stack.status)


def _live_schema(base: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    # The fuzz sends its own Authorization header; generated ones would only ever be refused.
    schema.config.generation.update(with_security_parameters=False, database="none")
    return schema


UNAUTHENTICATED = [
    ("api", "POST", "/uploads", {"content_type": "image/jpeg", "size": 10}),
    ("api", "POST", "/jobs", {"source": {"key": "uploads/x/y"}}),
    ("api", "POST", "/admin/reconcile", None),
    ("api", "GET", "/admin/reconcile/{run_id}", None),
    ("api", "GET", "/admin/dead-letters", None),
    ("api", "POST", "/admin/dead-letters/replay", {"job_ids": ["0" * 32]}),
    ("status", "GET", "/jobs/{job_id}", None),
    ("status", "GET", "/jobs/{job_id}/events", None),
]


@pytest.mark.parametrize(("service", "method", "path", "body"), UNAUTHENTICATED)
def test_without_a_token_the_documented_401(
    service: str, method: str, path: str, body: Any, api_schema: Any, status_schema: Any
) -> None:
    schema = api_schema if service == "api" else status_schema
    params = {"run_id": "r1", "job_id": "0" * 32}
    path_parameters = {k: v for k, v in params.items() if "{" + k + "}" in path}
    kwargs: dict[str, Any] = {"path_parameters": path_parameters}
    if body is not None:
        kwargs["body"] = body
    response = _case(schema, method, path, **kwargs).call_and_validate(checks=CHECKS)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_token"
    assert response.headers["www-authenticate"] == ["Bearer"]


ADMIN_ONLY = [
    ("POST", "/admin/reconcile", None, {"dry_run": "true"}),
    ("GET", "/admin/reconcile/{run_id}", None, {}),
    ("GET", "/admin/dead-letters", None, {}),
    ("POST", "/admin/dead-letters/replay", {"job_ids": ["0" * 32]}, {}),
]


@pytest.mark.parametrize(("method", "path", "body", "query"), ADMIN_ONLY)
def test_admin_routes_without_the_admin_scope_the_documented_403(
    method: str, path: str, body: Any, query: dict, api_schema: Any
) -> None:
    kwargs: dict[str, Any] = {"query": query}
    if "{run_id}" in path:
        kwargs["path_parameters"] = {"run_id": "r1"}
    if body is not None:
        kwargs["body"] = body
    case = _case(api_schema, method, path, **kwargs)
    response = case.call_and_validate(headers={"Authorization": f"Bearer {token('alice')}"}, checks=CHECKS)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


WRONG_CONTENT_TYPE = [
    ("POST", "/uploads", ""),
    ("POST", "/jobs", ""),
    ("POST", "/admin/dead-letters/replay", "admin"),
]


@pytest.mark.parametrize(("method", "path", "scope"), WRONG_CONTENT_TYPE)
@pytest.mark.parametrize(
    ("content_type", "payload"),
    [
        ("text/plain", '{"source": {"key": "k"}}'),
        ("application/x-www-form-urlencoded", "content_type=image%2Fjpeg&size=1"),
        (
            "multipart/form-data; boundary=b",
            '--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b--\r\n',
        ),
    ],
)
def test_a_body_that_is_not_json_the_documented_415(
    method: str, path: str, scope: str, content_type: str, payload: str, api_schema: Any
) -> None:
    case = _case(api_schema, method, path, body={})
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {token('alice', scopes=scope)}", "Content-Type": content_type},
        data=payload.encode(),
        checks=CHECKS,
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(("method", "path", "scope"), WRONG_CONTENT_TYPE)
def test_a_body_over_the_size_limit_the_documented_413(
    method: str, path: str, scope: str, api_schema: Any
) -> None:
    padded = {"source": {"key": "k"}, "pad": "x" * (64 * 1024)}  # the api reads at most 64 KiB
    case = _case(api_schema, method, path, body=padded)
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {token('alice', scopes=scope)}"}, checks=CHECKS
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


# The fuzz.

FUZZ_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,  # no example database: each run starts afresh (and .hypothesis/ is git-ignored)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
FUZZED = [
    pytest.param(service, method, path, id=f"{service} {method} {path}")
    for service, build in DOCUMENTS.items()
    for method, path in sorted(_operations(build()))
]


#: The fuzz's user: it owns the seeds, and its jobs and uploads are nobody else's.
FUZZER = "fuzzer"


def _auth(case: Any) -> dict[str, str]:
    scopes = "admin" if case.path.startswith("/admin/") else ""
    return {"Authorization": f"Bearer {token(FUZZER, scopes=scopes)}"}


def _harmless(case: Any) -> None:
    """Keep generated requests from doing real damage, changing as little of them as possible."""
    if case.path == "/admin/reconcile" and case.method.upper() == "POST":
        # A dry_run=false run would delete the session bucket's orphans under the other tests' feet.
        query = dict(case.query or {})
        if str(query.get("dry_run", "true")).lower() in ("false", "0"):
            query["dry_run"] = "true"
            case.query = query
    elif case.path == "/admin/dead-letters/replay" and isinstance(case.body, dict) and "all" in case.body:
        # Replaying every dead letter would re-run other tests' poison messages.
        case.body = {"job_ids": ["0" * 32]}
    elif case.path == "/jobs" and isinstance(case.body, dict):
        source = case.body.get("source")
        if isinstance(source, dict) and isinstance(source.get("url"), str):
            try:
                parts = urlsplit(source["url"])
            except ValueError:
                return  # the api refuses it as url_invalid
            if parts.scheme.lower() in ("http", "https") and parts.netloc:
                netloc = f"127.0.0.1:{_CLOSED_PORT}"
                case.body = {
                    **case.body,
                    "source": {**source, "url": urlunsplit(parts._replace(netloc=netloc))},
                }


@dataclass(frozen=True)
class Seeds:
    """Things of the fuzzing user's that random ids would never hit, so the 2xx answers get checked too."""

    upload_key: str
    job_id: str
    run_id: str
    dead_job_id: str


@pytest.fixture(scope="module")
def seeds(stack: Stack) -> Seeds:
    user = {"Authorization": f"Bearer {token(FUZZER)}"}
    admin = {"Authorization": f"Bearer {token(FUZZER, scopes='admin')}"}
    data = image()
    grant = requests.post(
        f"{stack.api}/uploads",
        json={"content_type": "image/jpeg", "size": len(data)},
        headers=user,
        timeout=30,
    )
    assert grant.status_code == 201, grant.text
    uploaded = requests.post(
        grant.json()["url"],
        data=grant.json()["fields"],
        files={"file": ("upload", data, "image/jpeg")},
        timeout=30,
    )
    assert uploaded.status_code in (200, 201, 204), uploaded.text
    key = grant.json()["key"]
    job = requests.post(f"{stack.api}/jobs", json={"source": {"key": key}}, headers=user, timeout=30)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + 60
    while requests.get(f"{stack.status}/jobs/{job_id}", headers=user, timeout=30).json()["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, "the seed job did not finish"
        time.sleep(0.1)
    run = requests.post(f"{stack.api}/admin/reconcile", params={"dry_run": "true"}, headers=admin, timeout=30)
    assert run.status_code == 202, run.text
    # A job whose source never answers: retried, failed, and in the dead-letter queue a few seconds on.
    dead = requests.post(
        f"{stack.api}/jobs",
        json={"source": {"url": f"http://127.0.0.1:{_CLOSED_PORT}/seed.jpg"}},
        headers=user,
        timeout=30,
    )
    assert dead.status_code == 202, dead.text
    dead_job_id = dead.json()["id"]
    deadline = time.monotonic() + 60
    while dead_job_id not in {
        item["job_id"]
        for item in requests.get(
            f"{stack.api}/admin/dead-letters", params={"limit": 1000}, headers=admin, timeout=30
        ).json()["items"]
    }:
        assert time.monotonic() < deadline, "the seed job was not dead-lettered"
        time.sleep(0.2)
    return Seeds(upload_key=key, job_id=job_id, run_id=run.json()["run_id"], dead_job_id=dead_job_id)


def _strategies(operation: Any, seeds: Seeds) -> list[SearchStrategy]:
    """Generated requests, valid and invalid, plus ones aimed at the seeds."""
    cases = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
    label = (operation.method.upper(), operation.path)
    if label == ("POST", "/uploads"):
        bodies = st.fixed_dictionaries(
            {"content_type": st.sampled_from(sorted(UPLOAD_TYPES)), "size": st.integers(1, 2**40)}
        )
        cases.append(bodies.flatmap(lambda body: operation.as_strategy(body=body)))
    elif label == ("POST", "/jobs"):

        def own_source(case: Any) -> Any:
            if isinstance(case.body, dict):
                case.body = {**case.body, "source": {"key": seeds.upload_key}}
            return case

        cases.append(operation.as_strategy(GenerationMode.POSITIVE).map(own_source))
    elif label in (("GET", "/jobs/{job_id}"), ("GET", "/jobs/{job_id}/events")):
        cases.append(operation.as_strategy(path_parameters={"job_id": seeds.job_id}))
    elif label == ("GET", "/admin/reconcile/{run_id}"):
        cases.append(operation.as_strategy(path_parameters={"run_id": seeds.run_id}))
    elif label == ("POST", "/admin/dead-letters/replay"):
        # Back to pending, failed again and dead-lettered again a few seconds later: harmless.
        cases.append(operation.as_strategy(body={"job_ids": [seeds.dead_job_id]}))
    return cases


@pytest.mark.parametrize(("service", "method", "path"), FUZZED)
def test_fuzz(service: str, method: str, path: str, stack: Stack, seeds: Seeds) -> None:
    operation = _live_schema(stack.services[service].url)[path][method]

    @FUZZ_SETTINGS
    @given(case=st.one_of(_strategies(operation, seeds)))
    def fuzz(case: Any) -> None:
        _harmless(case)
        case.call_and_validate(headers=_auth(case), checks=CHECKS, timeout=30)

    fuzz()
