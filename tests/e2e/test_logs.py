"""End to end: the logs of a whole client flow, at DEBUG in production, help and never leak.

One isolated stack runs with `IMGPIPE_ENV=production`, `IMGPIPE_LOG_LEVEL=DEBUG`, a random JWT
secret, random S3 credentials and a Redis URL with a password: the worst case for leaks. A client
goes through the whole flow (upload grant, presigned POST, `POST /jobs`, SSE with `?access_token=`,
`GET /jobs/{id}` with presigned download URLs, a bad token, a 404), and two more jobs reach the
worker with the request id only in the AMQP header or only in the message body. Then every line of
every service's log is read.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from imgpipe.auth import TokenVerifier
from imgpipe.broker import ATTEMPT_HEADER, JOB_ROUTING_KEY, REQUEST_ID_HEADER, Topology
from imgpipe.models import JobMessage, JobRecord, JobStatus
from imgpipe.settings import AuthSettings
from imgpipe.store import JobStore

from tests.isolated import image, isolated_stack, sse
from tests.stack import AMQP_URL, REDIS_URL, Stack, presigned_form

pytestmark = pytest.mark.e2e


def _with_password(url: str, password: str) -> str:
    """`url` authenticating as Redis' default user with `password` (accepted by a nopass user)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"default:{password}@{host}"))


@dataclass
class Secrets:
    """Everything that must never show up in a log line."""

    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    aws_access_key_id: str = field(
        default_factory=lambda: "AKIA" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(16))
    )
    aws_secret: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    redis_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    seen: dict[str, str] = field(default_factory=dict)  # what the flow handed out: description → value

    def token(self, sub: str = "alice", ttl_s: int = 600) -> str:
        verifier = TokenVerifier(AuthSettings(env="production", jwt_secret=self.jwt_secret))
        return verifier.issue(sub, scopes="", ttl_s=ttl_s)

    def forbidden(self) -> dict[str, str]:
        amqp_password = urlsplit(AMQP_URL).password
        found = {
            "JWT secret": self.jwt_secret,
            "AWS secret access key": self.aws_secret,
            "Redis password": self.redis_password,
            **self.seen,
        }
        if amqp_password:
            # "guest" alone is an ordinary word (and the user name); in URL form it is the password.
            found["AMQP password"] = f":{amqp_password}@"
        return found


@pytest.fixture(scope="module")
def keys() -> Secrets:
    return Secrets()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("leak-logs")


@pytest.fixture(scope="module")
def worst_case(base_env: dict[str, str], keys: Secrets, logdir: Path) -> Iterator[Stack]:
    env = {
        **base_env,
        "IMGPIPE_ENV": "production",
        "IMGPIPE_LOG_LEVEL": "DEBUG",
        "IMGPIPE_JWT_SECRET": keys.jwt_secret,
        "AWS_ACCESS_KEY_ID": keys.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": keys.aws_secret,
        "IMGPIPE_REDIS_URL": _with_password(REDIS_URL, keys.redis_password),
    }
    with isolated_stack(
        env, logdir, {"api": ("api", {}), "status": ("status", {}), "worker": ("worker", {})}
    ) as stack:
        yield stack


def _rid(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


async def _flow(http: aiohttp.ClientSession, stack: Stack, keys: Secrets) -> dict[str, Any]:
    """The client's whole journey; returns the ids the logs are checked against."""
    token = keys.token()
    keys.seen["token"] = token
    keys.seen["token signature"] = token.rsplit(".", 1)[1]
    auth = {"Authorization": f"Bearer {token}"}
    data = image(800, 600)

    # 1. The upload grant, and the presigned POST straight to S3.
    upload_rid = _rid("upload")
    async with http.post(
        f"{stack.api}/uploads",
        json={"content_type": "image/jpeg", "size": len(data)},
        headers={**auth, "X-Request-ID": upload_rid},
    ) as response:
        assert response.status == 201, await response.text()
        assert response.headers["X-Request-ID"] == upload_rid
        grant = await response.json()
    keys.seen["POST policy"] = grant["fields"]["policy"]
    keys.seen["POST policy signature"] = grant["fields"]["x-amz-signature"]
    form = presigned_form(grant["fields"], data, "image/jpeg")
    async with http.post(grant["url"], data=form) as response:
        assert response.status in (200, 201, 204), await response.text()

    # 2. The job, under the client's own request id.
    job_rid = _rid("client-chosen")
    async with http.post(
        f"{stack.api}/jobs",
        json={"source": {"key": grant["key"]}, "variants": ["thumb", "small"]},
        headers={**auth, "X-Request-ID": job_rid},
    ) as response:
        assert response.status == 202, await response.text()
        assert response.headers["X-Request-ID"] == job_rid
        job = await response.json()

    # 3. Its events, EventSource-style: the token in the query string.
    sse_rid = _rid("sse")
    async with http.get(
        f"{stack.status}/jobs/{job['id']}/events",
        params={"access_token": token},
        headers={"X-Request-ID": sse_rid},
        timeout=aiohttp.ClientTimeout(total=90),
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["X-Request-ID"] == sse_rid
        events = [item.event async for item in sse(response) if item.event is not None]
    assert events[-1] == "succeeded", events

    # 4. The finished job, with its presigned download URLs; one of them is used.
    async with http.get(f"{stack.status}/jobs/{job['id']}", headers=auth) as response:
        assert response.status == 200
        assert response.headers["X-Request-ID"]  # generated when the client sends none
        done = await response.json()
    assert {v["name"] for v in done["variants"]} == {"thumb", "small"}
    for variant in done["variants"]:
        query = parse_qs(urlsplit(variant["url"]).query)
        keys.seen[f"{variant['name']} X-Amz-Signature"] = query["X-Amz-Signature"][0]
    async with http.get(done["variants"][0]["url"]) as response:
        assert response.status == 200

    # 5. Bad tokens, in the header and in the query string, and 404s, one carrying a good token.
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    keys.seen["forged token"] = forged
    bad_rid = _rid("bad-token")
    async with http.get(
        f"{stack.status}/jobs/{job['id']}",
        headers={"Authorization": f"Bearer {forged}", "X-Request-ID": bad_rid},
    ) as response:
        assert response.status == 401
        assert response.headers["X-Request-ID"] == bad_rid
        assert (await response.json())["error"]["code"] == "invalid_token"
    async with http.get(
        f"{stack.status}/jobs/{job['id']}/events", params={"access_token": forged}
    ) as response:
        assert response.status == 401
    async with http.post(
        f"{stack.api}/jobs",
        json={"source": {"key": grant["key"]}},
        headers={"Authorization": f"Bearer {forged}"},
    ) as response:
        assert response.status == 401
    missing_rid = _rid("missing")
    async with http.get(
        f"{stack.status}/jobs/{uuid.uuid4().hex}", headers={**auth, "X-Request-ID": missing_rid}
    ) as response:
        assert response.status == 404
        assert response.headers["X-Request-ID"] == missing_rid
    async with http.get(f"{stack.api}/no/such/route", params={"access_token": token}) as response:
        assert response.status == 404
    # 6. Requests aiohttp cannot parse, carrying the token: its own error logging must not leak it.
    for service_url in (stack.api, stack.status):
        await _malformed(service_url, token)
    # 7. A body whose Content-Encoding is broken: refused (415), and nothing inflates it afterwards
    # (aiohttp did, to drain it, and logged an ERROR with no request id for any client's garbage).
    async with http.post(
        f"{stack.api}/jobs",
        data=b"\x1f\x8b not really gzip",
        headers={**auth, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    ) as response:
        assert response.status == 415
    return {"job": job["id"], "job_rid": job_rid, "key": grant["key"]}


async def _malformed(url: str, token: str) -> None:
    """A request whose broken header line (no colon) holds the token; aiohttp logs the line it rejects."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            (
                f"GET /jobs/x/events?access_token={token} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Authorization Bearer {token}\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.split()[1] == b"400", status_line
    finally:
        writer.close()
        await writer.wait_closed()


async def _side_door_jobs(stack: Stack, keys: Secrets, source_job: str) -> dict[str, str | None]:
    """Jobs published straight to the jobs exchange, each with the request id in only one place.

    The api always sets both; an older api or another publisher may set only one, and the worker
    must still put it on its lines (unless it is not a sane id). Returns job id → the request id its
    lines must carry.
    """
    namespace = stack.env["IMGPIPE_NAMESPACE"]
    client = aioredis.from_url(_with_password(REDIS_URL, keys.redis_password))
    expected: dict[str, str | None] = {}
    try:
        store = JobStore(client, namespace, retention=timedelta(days=1))
        template = await store.get(source_job)
        assert template is not None
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(Topology(namespace).jobs_exchange)
            for where in ("header", "body", "bad-header"):
                job_id, rid = uuid.uuid4().hex, _rid(f"only-in-{where}")
                sent: str | None = rid
                now = datetime.now(UTC)
                record = template.model_copy(
                    update={
                        "id": job_id,
                        "status": JobStatus.PENDING,
                        "variants": [],
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                assert (await store.create(record)).applied
                message = JobMessage(
                    id=job_id,
                    owner=template.owner,
                    source=template.source,
                    variants=template.requested,
                    request_id=rid if where == "body" else None,
                    created_at=now,
                )
                headers: dict[str, Any] = {ATTEMPT_HEADER: 1}
                if where == "header":
                    headers[REQUEST_ID_HEADER] = rid
                if where == "bad-header":
                    # Not an id a client could have sent (X-Request-ID is refused in this shape):
                    # the worker's lines carry none rather than a forged or unbounded one.
                    headers[REQUEST_ID_HEADER] = f'{rid}" \n{"x" * 300}'
                    sent = None
                await exchange.publish(
                    aio_pika.Message(
                        message.model_dump_json().encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=job_id,
                        headers=headers,
                    ),
                    routing_key=JOB_ROUTING_KEY,
                    mandatory=True,
                )
                expected[job_id] = sent
        for job_id in expected:
            record = await _terminal(store, job_id)
            assert record.status is JobStatus.SUCCEEDED, record
    finally:
        await client.aclose()
    return expected


async def _terminal(store: JobStore, job_id: str) -> JobRecord:
    async with asyncio.timeout(60):
        while True:
            record = await store.get(job_id)
            if record is not None and record.status.terminal:
                return record
            await asyncio.sleep(0.1)


def _read(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    """Every service's log, line by line; every line must be one JSON object."""
    logs: dict[str, list[dict[str, Any]]] = {}
    for name, service in stack.services.items():
        lines = []
        for number, raw in enumerate(service.log.read_text().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                pytest.fail(f"{name} log line {number} is not JSON: {raw[:300]}")
            assert isinstance(line, dict), raw
            lines.append(line)
        logs[name] = lines
    return logs


@pytest.fixture(scope="module")
def outcome(worst_case: Stack, keys: Secrets) -> dict[str, Any]:
    """Runs the flow once, stops the stack's services, and returns the ids and every log line."""

    async def run() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            ids = await _flow(http, worst_case, keys)
        ids["side_door"] = await _side_door_jobs(worst_case, keys, ids["job"])
        return ids

    ids = asyncio.run(run())
    # Stopped, so shutdown lines are in the files too (the namespace is dropped with the module).
    for service in worst_case.services.values():
        worst_case.stop(service)
    return {
        **ids,
        "logs": _read(worst_case),
        "raw": {n: s.log.read_text() for n, s in worst_case.services.items()},
    }


def test_no_line_leaks_a_secret(outcome: dict[str, Any], keys: Secrets) -> None:
    forbidden = keys.forbidden()
    assert len(forbidden) >= 9  # the flow really handed out tokens, signatures and a policy
    for service, text in outcome["raw"].items():
        assert text.strip(), f"{service} logged nothing"
        for what, value in forbidden.items():
            assert value not in text, f"{service} logged the {what}"


def test_a_clients_garbage_is_no_error_of_ours(outcome: dict[str, Any]) -> None:
    for service, lines in outcome["logs"].items():
        errors = [line for line in lines if line.get("level") in ("ERROR", "CRITICAL")]
        assert not [line for line in errors if line.get("logger", "").startswith("aiohttp")], (
            service,
            errors,
        )


def test_no_stack_traces_in_production(outcome: dict[str, Any]) -> None:
    for service, text in outcome["raw"].items():
        assert "Traceback" not in text, service
        assert 'File "' not in text, service
    for service, lines in outcome["logs"].items():
        for line in lines:
            assert "exc_info" not in line, (service, line)
            assert "stack_info" not in line, (service, line)


def test_debug_is_on_and_every_line_has_the_fields(outcome: dict[str, Any]) -> None:
    levels = set()
    for service, lines in outcome["logs"].items():
        assert lines, service
        for line in lines:
            assert {"ts", "level", "logger", "message", "service", "request_id", "job_id"} <= set(line), line
            assert line["service"] == service
            levels.add(line["level"])
    # IMGPIPE_LOG_LEVEL=DEBUG took effect (redis-py says something at DEBUG on every connection), so
    # the checks above covered the chattiest configuration.
    assert "DEBUG" in levels


def test_worker_lines_of_the_job_carry_the_clients_request_id(outcome: dict[str, Any]) -> None:
    job, rid = outcome["job"], outcome["job_rid"]
    about = [line for line in outcome["logs"]["worker"] if line["job_id"] == job or job in json.dumps(line)]
    assert about, "the worker logged nothing about the job"
    assert any(line["message"] == "job succeeded" for line in about)
    for line in about:
        assert (line["job_id"], line["request_id"]) == (job, rid), line
    # The api's lines about it carry the same pair: one id follows the job across services.
    accepted = [line for line in outcome["logs"]["api"] if line["job_id"] == job]
    assert any(line["message"] == "job accepted" for line in accepted)
    for line in accepted:
        assert line["request_id"] == rid, line


def test_worker_takes_the_request_id_from_header_or_body(outcome: dict[str, Any]) -> None:
    worker = outcome["logs"]["worker"]
    for job, rid in outcome["side_door"].items():
        about = [line for line in worker if line["job_id"] == job or job in json.dumps(line)]
        assert any(line["message"] == "job succeeded" for line in about), (rid, about)
        for line in about:
            assert (line["job_id"], line["request_id"]) == (job, rid), line


def test_no_worker_line_is_labelled_with_a_foreign_job(outcome: dict[str, Any]) -> None:
    # A job's context leaking into lines of another job, or a stale one, would mislabel them.
    jobs = {outcome["job"], *outcome["side_door"]}
    labelled = [line for line in outcome["logs"]["worker"] if line["job_id"] is not None]
    assert labelled
    for line in labelled:
        assert line["job_id"] in jobs, line
