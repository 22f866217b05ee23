"""Dead letters end to end: the admin routes and `imgpipe-dead-letters` on a stack of their own.

api + status + worker run in a namespace of this module (so no other worker takes its messages)
with 2 attempts and a 1 s back-off. Proved here: a job that always fails transiently ends `failed`
with one dead letter that the listing describes, and replaying it (once its source is fixed) runs it
to `succeeded` and empties the queue; an unparseable message is listed as not replayable and a
replay leaves it where it is; a job whose record has expired is not replayed and stays; listing
takes nothing out of the queue; the routes need the admin scope; the CLI does the same as the api.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from imgpipe.broker import ATTEMPT_HEADER, JOB_ROUTING_KEY, REASON_HEADER, REQUEST_ID_HEADER, Topology
from imgpipe.models import PRESETS, JobMessage, JobStatus, UrlSource, utcnow
from imgpipe.store import JobStore

from tests.isolated import BrokerProxy, image, isolated_stack, queue_depth, sse
from tests.stack import AMQP_URL, BIN, REDIS_URL, Client, Stack, local_http, token

pytestmark = pytest.mark.e2e


def _admin() -> dict[str, str]:
    # Minted when a request is made: a token made at import time would expire in a long run.
    return {"Authorization": f"Bearer {token('ops', 'read admin')}"}


@pytest.fixture(scope="module")
def dl(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        **base_env,
        "IMGPIPE_MAX_ATTEMPTS": "2",
        "IMGPIPE_RETRY_DELAYS_S": "[1]",
        # The flaky image server of these tests listens on 127.0.0.1.
        "IMGPIPE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
        "IMGPIPE_WORKER_CONCURRENCY": "2",
    }
    services = {name: (name, {}) for name in ("api", "status", "worker")}
    with isolated_stack(env, tmp_path_factory.mktemp("dead-letters-logs"), services) as stack:
        yield stack


def _topology(stack: Stack) -> Topology:
    return Topology(stack.env["IMGPIPE_NAMESPACE"], (1,))


@pytest.fixture(autouse=True)
async def _empty_dead_queue(dl: Stack) -> AsyncIterator[None]:
    """Every test starts with an empty dead-letter queue; what a test leaves is removed after it."""
    dead_queue = _topology(dl).dead_queue
    assert await queue_depth(dead_queue) == 0, "a previous test left dead letters"
    yield
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(dead_queue, ensure=False)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            await message.ack()


@pytest.fixture
async def store(dl: Stack) -> AsyncIterator[JobStore]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield JobStore(client, dl.env["IMGPIPE_NAMESPACE"], retention=timedelta(days=1))
    finally:
        await client.aclose()


@pytest.fixture
def alice(http: aiohttp.ClientSession, dl: Stack) -> Client:
    return Client(http, dl, "alice")


# --------------------------------------------------------------------------------------------------------
# Helpers


@dataclass
class FlakyServer:
    """Answers 503 until `fixed`; then an image, once `gate` is set (so a test can watch in between)."""

    url: str = ""
    fixed: bool = False
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    hits: int = 0


@asynccontextmanager
async def flaky_server() -> AsyncIterator[FlakyServer]:
    server = FlakyServer()
    body = image(120, 80)

    async def handle(_: web.Request) -> web.Response:
        server.hits += 1
        if not server.fixed:
            return web.Response(status=503, text="down for maintenance")
        await server.gate.wait()
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}", handle)
    async with local_http(app) as base:
        server.url = f"{base}/{uuid.uuid4().hex}.jpg"
        try:
            yield server
        finally:
            server.gate.set()


async def list_dead(
    http: aiohttp.ClientSession, stack: Stack, limit: int | None = None
) -> tuple[int, dict[str, Any]]:
    params = {"limit": str(limit)} if limit is not None else None
    async with http.get(f"{stack.api}/admin/dead-letters", params=params, headers=_admin()) as response:
        return response.status, await response.json()


async def replay(http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any]) -> tuple[int, dict]:
    async with http.post(f"{stack.api}/admin/dead-letters/replay", json=body, headers=_admin()) as response:
        return response.status, await response.json()


async def wait_listed(http: aiohttp.ClientSession, stack: Stack, count: int) -> dict[str, Any]:
    """The listing once the queue holds `count` dead letters."""
    async with asyncio.timeout(30):
        while True:
            status, body = await list_dead(http, stack)
            assert status == 200, body
            if body["count"] >= count:
                assert body["count"] == count, body
                return body
            await asyncio.sleep(0.2)


async def publish(stack: Stack, exchange: str, body: bytes, **properties: Any) -> None:
    """Publish to one of the namespace's exchanges, confirmed by the broker."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)
        await target.publish(message, routing_key=JOB_ROUTING_KEY, mandatory=True)


def job_message(job_id: str | None = None, owner: str = "alice") -> JobMessage:
    return JobMessage(
        id=job_id or uuid.uuid4().hex,
        owner=owner,
        source=UrlSource(url="http://127.0.0.1:9/x.jpg"),
        variants=[PRESETS["thumb"]],
        created_at=utcnow(),
    )


async def failed_job(alice: Client, server: FlakyServer, request_id: str) -> dict[str, Any]:
    """A URL job that failed for good (2 attempts against the failing server)."""
    job = await alice.submit({"url": server.url}, ["thumb"], **{"X-Request-ID": request_id})
    done = await alice.wait(job["id"], within=30)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "url_http_error", done
    assert "gave up after 2 attempts" in done["error"]["message"], done
    return done


def worker_logs(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    records = []
    for line in stack.services["worker"].log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("job_id") == job_id:
            records.append(record)
    return records


async def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "imgpipe-dead-letters"), *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=90,
    )


# --------------------------------------------------------------------------------------------------------
# (a) A job that always fails transiently: dead-lettered once, listed, replayed once fixed.


async def test_failed_job_is_listed_then_replayed_to_success(
    dl: Stack, alice: Client, http: aiohttp.ClientSession, store: JobStore
) -> None:
    dead_queue = _topology(dl).dead_queue
    request_id = f"req-{uuid.uuid4().hex}"
    async with flaky_server() as server:
        started = datetime.now(UTC)
        failed = await failed_job(alice, server, request_id)
        job_id = failed["id"]
        assert server.hits == 2

        listing = await wait_listed(http, dl, 1)
        assert await queue_depth(dead_queue) == 1
        [item] = listing["items"]
        dead_at = item.pop("dead_lettered_at")
        assert started <= datetime.fromisoformat(dead_at) <= datetime.now(UTC)
        reason = item.pop("reason")
        assert "gave up after 2 attempts" in reason and reason == failed["error"]["message"]
        assert item == {
            "message_id": job_id,
            "job_id": job_id,
            "owner": "alice",
            "attempts": 2,
            "request_id": request_id,
            "replayable": True,
        }
        before = await store.get(job_id)

        server.fixed = True
        async with store.subscribe() as changes:
            status, answer = await replay(http, dl, {"job_ids": [job_id]})
            assert status == 200, answer
            assert answer == {"replayed": [job_id], "not_found": []}

            # Back to work: `pending` or already `processing` (the source answers only on the gate).
            code, view = await alice.get(job_id)
            assert code == 200 and view["status"] in ("pending", "processing"), view
            assert view["error"] is None
            async with http.get(
                f"{dl.status}/jobs/{job_id}/events",
                headers=alice.headers,
                timeout=aiohttp.ClientTimeout(total=60),
            ) as response:
                assert response.status == 200
                events = (item async for item in sse(response) if item.event)
                first = await anext(events)
                assert first.event in ("pending", "processing"), first
                server.gate.set()
                rest = [item async for item in events]
            assert rest[-1].event == "succeeded", rest

            # Every change the replay made, in order, as SSE clients of any status process see them.
            seen: list[tuple[int, JobStatus]] = []
            async with asyncio.timeout(10):
                async for version, record in changes:
                    if record.id == job_id:
                        seen.append((version, record.status))
                        if record.status.terminal:
                            break
    assert seen == [
        (before.version + 1, JobStatus.PENDING),
        (before.version + 2, JobStatus.PROCESSING),
        (before.version + 3, JobStatus.SUCCEEDED),
    ]
    done = await alice.wait(job_id)
    assert done["status"] == "succeeded" and [v["name"] for v in done["variants"]] == ["thumb"]
    assert (await store.get(job_id)).replays == 1
    assert server.hits == 3

    # Re-published as a first attempt, with the original request id.
    succeeded = [r for r in worker_logs(dl, job_id) if r["message"] == "job succeeded"]
    assert [(r["attempt"], r["request_id"]) for r in succeeded] == [(1, request_id)], succeeded

    status, listing = await list_dead(http, dl)
    assert (status, listing) == (200, {"count": 0, "items": []})
    assert await queue_depth(dead_queue) == 0
    # Nothing left to replay for it.
    assert await replay(http, dl, {"job_ids": [job_id]}) == (200, {"replayed": [], "not_found": [job_id]})


# --------------------------------------------------------------------------------------------------------
# (b) What cannot be replayed is listed as such and stays in the queue.


async def test_unparseable_message_is_listed_and_never_replayed(
    dl: Stack, http: aiohttp.ClientSession
) -> None:
    topology = _topology(dl)
    message_id = f"poison-{uuid.uuid4().hex[:8]}"
    body = b"\x00 not a job {"
    await publish(
        dl, topology.jobs_exchange, body, message_id=message_id, headers={REQUEST_ID_HEADER: "req-poison"}
    )
    # The worker rejects it; the broker dead-letters it with x-death.
    listing = await wait_listed(http, dl, 1)
    [item] = listing["items"]
    assert datetime.fromisoformat(item.pop("dead_lettered_at")) <= datetime.now(UTC)
    assert item == {
        "message_id": message_id,
        "job_id": message_id,
        "owner": None,
        "reason": "rejected",
        "attempts": None,
        "request_id": "req-poison",
        "replayable": False,
    }

    assert await replay(http, dl, {"job_ids": [message_id, "no-such-job"]}) == (
        200,
        {"replayed": [], "not_found": [message_id, "no-such-job"]},
    )
    assert await replay(http, dl, {"all": True}) == (200, {"replayed": [], "not_found": [message_id]})

    # Still there, unchanged.
    assert await queue_depth(topology.dead_queue) == 1
    again = await wait_listed(http, dl, 1)
    assert again["items"][0]["message_id"] == message_id and not again["items"][0]["replayable"]
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.dead_queue, ensure=False)
        letter = await queue.get(no_ack=False)
        assert (letter.message_id, letter.body) == (message_id, body)
        await letter.nack(requeue=True)


async def test_job_whose_record_expired_is_not_replayed_and_stays(
    dl: Stack, http: aiohttp.ClientSession, store: JobStore
) -> None:
    topology = _topology(dl)
    job = job_message()  # as the worker dead-letters it, but no record (retention removed it)
    await publish(
        dl,
        topology.dead_exchange,
        job.model_dump_json().encode(),
        message_id=job.id,
        headers={ATTEMPT_HEADER: 5, REASON_HEADER: "storage_unavailable (gave up after 5 attempts)"},
    )
    [item] = (await wait_listed(http, dl, 1))["items"]
    assert (item["job_id"], item["replayable"], item["attempts"]) == (job.id, True, 5)
    assert item["reason"] == "storage_unavailable (gave up after 5 attempts)"
    assert item["dead_lettered_at"] is None  # no x-death, no timestamp, no record to tell

    assert await replay(http, dl, {"job_ids": [job.id]}) == (200, {"replayed": [], "not_found": [job.id]})
    assert await replay(http, dl, {"all": True, "limit": 5}) == (200, {"replayed": [], "not_found": [job.id]})
    assert await store.get(job.id) is None  # replay never makes up a record
    assert await queue_depth(topology.dead_queue) == 1
    assert await queue_depth(topology.jobs_queue) == 0


# --------------------------------------------------------------------------------------------------------
# (c) Listing takes nothing out of the queue.


async def test_listing_does_not_consume(dl: Stack, http: aiohttp.ClientSession) -> None:
    topology = _topology(dl)
    ids = []
    for i in range(40):
        job = job_message()
        body = job.model_dump_json().encode() if i % 2 else f"junk {i}".encode()
        await publish(
            dl, topology.dead_exchange, body, message_id=job.id, headers={REASON_HEADER: f"reason {i}"}
        )
        ids.append(job.id)

    first = await wait_listed(http, dl, 40)
    second = await wait_listed(http, dl, 40)
    # The same items. Not necessarily in the same order: RabbitMQ 3.10 quorum queues hand returned
    # messages back in an order of their own (see imgpipe.deadletters).
    by_id = sorted(first["items"], key=lambda item: item["message_id"])
    assert by_id == sorted(second["items"], key=lambda item: item["message_id"])
    assert sorted(item["message_id"] for item in by_id) == sorted(ids)
    assert sum(item["replayable"] for item in by_id) == 20
    assert await queue_depth(topology.dead_queue) == 40

    status, some = await list_dead(http, dl, limit=5)
    assert status == 200 and some["count"] == 40 and len(some["items"]) == 5
    # Browses running at once (api and CLI alike) take turns, so none hides messages from another.
    results = await asyncio.gather(
        list_dead(http, dl, limit=1000),
        list_dead(http, dl, limit=7),
        replay(http, dl, {"job_ids": ["no-such-job"]}),
        cli(dl, "list", "--limit", "1000"),
    )
    assert [len(body["items"]) for _, body in results[:2]] == [40, 7]
    assert results[2] == (200, {"replayed": [], "not_found": ["no-such-job"]})
    assert results[3].returncode == 0, results[3].stderr
    assert len(json.loads(results[3].stdout)["items"]) == 40
    assert await queue_depth(topology.dead_queue) == 40
    assert (await wait_listed(http, dl, 40))["count"] == 40


# --------------------------------------------------------------------------------------------------------
# (d) Admin scope, and what a bad request gets.


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/admin/dead-letters", None), ("POST", "/admin/dead-letters/replay", {"all": True})],
)
async def test_routes_need_the_admin_scope(
    dl: Stack, http: aiohttp.ClientSession, method: str, path: str, body: dict | None
) -> None:
    url = f"{dl.api}{path}"
    async with http.request(method, url, json=body) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "missing_token"
    user = {"Authorization": f"Bearer {token('alice', 'read')}"}
    async with http.request(method, url, json=body, headers=user) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"all": False},
        {"job_ids": []},
        {"job_ids": ["a"], "all": True},
        {"job_ids": ["a"], "limit": 5},
        {"all": True, "limit": 0},
        {"all": True, "limit": 1001},
        {"job_ids": [f"job-{i}" for i in range(1001)]},
        {"job_ids": [""]},
        {"job_ids": "abc"},
        {"all": True, "extra": 1},
        {"all": "true"},
        {"all": 1},
        {"all": True, "limit": "5"},
    ],
)
async def test_replay_refuses_a_bad_body(dl: Stack, http: aiohttp.ClientSession, body: dict) -> None:
    status, answer = await replay(http, dl, body)
    assert status == 422, answer
    assert answer["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "ten", "1.5", "", "9" * 4301, ["5", "7"]])
async def test_list_refuses_a_bad_limit(dl: Stack, http: aiohttp.ClientSession, limit: str | list) -> None:
    params = [("limit", value) for value in limit] if isinstance(limit, list) else {"limit": limit}
    async with http.get(f"{dl.api}/admin/dead-letters", params=params, headers=_admin()) as response:
        assert response.status == 422
        assert (await response.json())["error"]["code"] == "invalid_request"


async def test_broker_outage_is_503_broker_unavailable(
    dl: Stack, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = BrokerProxy()
    await proxy.start()
    own = Stack(dl.env)
    url = AMQP_URL.replace(":5672/", f":{proxy.port}/")
    assert url != AMQP_URL
    api = await asyncio.to_thread(own.start, "api", tmp_path, {"IMGPIPE_AMQP_URL": url})
    own.services["api"] = api
    try:
        assert (await list_dead(http, own))[0] == 200
        await proxy.cut()
        async with asyncio.timeout(30):  # did not hang
            status, body = await list_dead(http, own)
            assert status == 503, body
            assert body["error"]["code"] == "broker_unavailable"
            status, body = await replay(http, own, {"all": True})
            assert status == 503, body
            assert body["error"]["code"] == "broker_unavailable"
    finally:
        await asyncio.to_thread(own.stop, api)


# --------------------------------------------------------------------------------------------------------
# (e) The CLI: the same listing and replay from a shell.


async def test_cli_lists_and_replays(dl: Stack, alice: Client) -> None:
    async with flaky_server() as server:
        failed = await failed_job(alice, server, f"req-{uuid.uuid4().hex}")
        job_id = failed["id"]
        listed = await cli(dl, "list")
        assert listed.returncode == 0, listed.stderr
        answer = json.loads(listed.stdout)
        assert answer["count"] == 1
        assert [(i["job_id"], i["attempts"], i["replayable"]) for i in answer["items"]] == [(job_id, 2, True)]
        assert json.loads((await cli(dl, "list", "--limit", "1")).stdout) == answer

        server.fixed = True
        server.gate.set()
        replayed = await cli(dl, "replay", job_id, "no-such-job")
        assert replayed.returncode == 0, replayed.stderr
        assert json.loads(replayed.stdout) == {"replayed": [job_id], "not_found": ["no-such-job"]}
        done = await alice.wait(job_id, within=30)
        assert done["status"] == "succeeded", done

    nothing = await cli(dl, "replay", "--all")
    assert nothing.returncode == 0, nothing.stderr
    assert json.loads(nothing.stdout) == {"replayed": [], "not_found": []}
    assert json.loads((await cli(dl, "list")).stdout) == {"count": 0, "items": []}

    for bad in (
        ["replay"],
        ["replay", "--all", "x"],
        ["replay", "x", "--limit", "3"],
        ["list", "--limit", "0"],
    ):
        result = await cli(dl, *bad)
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert result.stdout == ""
