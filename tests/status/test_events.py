"""Status `GET /jobs/{id}/events`: Server-Sent Events from one Redis subscription per process.

Most tests run in a namespace of their own with no worker (`quiet`), so a job stays `pending`
for as long as the test wants; the last test starts a worker there and watches every stream
follow the job to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from imgpipe.settings import load
from imgpipe_status.app import SseSettings

from tests.isolated import SseItem, image, isolated_stack, sse, temporary_worker, without_urls
from tests.stack import REDIS_URL, Client, Stack, token

pytestmark = pytest.mark.e2e

JOB_KEYS = {"id", "status", "created_at", "updated_at", "variants", "error"}
HEARTBEAT_S = 0.2
CAP_PER_USER, CAP_TOTAL = 2, 3
CLIENT_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def quiet(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """api and two status processes (one with fast heartbeats), and no worker."""
    with isolated_stack(
        base_env,
        tmp_path_factory.mktemp("quiet-logs"),
        {
            "api": ("api", {}),
            # No leeway on a token's `exp` here, so a stream's end at its token's follows the `exp`.
            "status": ("status", {"IMGPIPE_SSE_HEARTBEAT_S": str(HEARTBEAT_S), "IMGPIPE_JWT_LEEWAY_S": "0"}),
            "status-2": ("status", {}),
            "status-capped": (
                "status",
                {
                    "IMGPIPE_SSE_MAX_STREAMS_PER_USER": str(CAP_PER_USER),
                    "IMGPIPE_SSE_MAX_STREAMS": str(CAP_TOTAL),
                },
            ),
            # Heartbeats that fill a stalled client's window at once, and a short wait on it.
            "status-stalled": (
                "status",
                {
                    "IMGPIPE_SSE_HEARTBEAT_S": "0.01",
                    "IMGPIPE_SSE_CLIENT_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
                    "IMGPIPE_SSE_MAX_STREAMS_PER_USER": "1",
                },
            ),
        },
    ) as stack:
        yield stack


def _stream(client: Client, job_id: str, *, base: str | None = None, query_token: bool = False, **kw):
    url = f"{base or client.stack.status}/jobs/{job_id}/events"
    if query_token:
        kw["params"] = {"access_token": client.headers["Authorization"].split()[1]}
    else:
        kw["headers"] = {**client.headers, **kw.get("headers", {})}
    return client.http.get(url, timeout=aiohttp.ClientTimeout(total=60), **kw)


async def _all_events(response: aiohttp.ClientResponse) -> list[SseItem]:
    return [item async for item in sse(response) if item.event is not None]


def _check_sequence(events: list[SseItem], job_id: str) -> None:
    """Ids grow, every payload is the job's view, and only the last one is terminal."""
    ids = [e.id for e in events]
    assert all(i is not None for i in ids) and ids == sorted(set(ids)), ids  # type: ignore[type-var]
    for event in events:
        assert event.data is not None
        assert set(event.data) == JOB_KEYS
        assert event.data["id"] == job_id
        assert event.event == event.data["status"]
    assert events[-1].event in ("succeeded", "failed")
    assert all(e.event not in ("succeeded", "failed") for e in events[:-1])


# On the session stack, where a worker runs.


async def test_stream_ends_after_success_and_matches_polling(alice: Client) -> None:
    job = await alice.submit({"key": await alice.upload(image())})
    async with _stream(alice, job["id"], headers={"X-Request-ID": "sse-1"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Request-ID"] == "sse-1"
        async with asyncio.timeout(30):
            events = await _all_events(response)  # returns only because the server ends it
    _check_sequence(events, job["id"])
    assert events[-1].event == "succeeded"
    status, polled = await alice.get(job["id"])
    assert status == 200
    assert without_urls(events[-1].data or {}) == without_urls(polled)


async def test_stream_ends_after_failure(alice: Client) -> None:
    job = await alice.submit({"key": await alice.upload(b"\xff\xd8\xff not really a jpeg" * 4)})
    async with _stream(alice, job["id"]) as response, asyncio.timeout(30):
        events = await _all_events(response)
    _check_sequence(events, job["id"])
    assert events[-1].event == "failed"
    assert events[-1].data is not None and events[-1].data["error"]["code"]


async def test_finished_job_gets_one_event_and_the_end(alice: Client) -> None:
    job = await alice.submit({"key": await alice.upload(image())})
    await alice.wait(job["id"])
    async with _stream(alice, job["id"], query_token=True) as response:
        assert response.status == 200
        events = await _all_events(response)
    assert [e.event for e in events] == ["succeeded"]


async def test_someone_elses_job_is_not_found(alice: Client, bob: Client) -> None:
    job = await alice.submit({"key": await alice.upload(image())})
    for query_token in (False, True):
        async with _stream(bob, job["id"], query_token=query_token) as response:
            assert response.status == 404
            assert response.content_type == "application/json"
            assert (await response.json())["error"]["code"] == "job_not_found"


async def test_unknown_job_is_not_found(alice: Client) -> None:
    async with _stream(alice, "0" * 32) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "job_not_found"


async def test_no_token_is_401(http: aiohttp.ClientSession, stack: Stack) -> None:
    async with http.get(f"{stack.status}/jobs/{'0' * 32}/events") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"]["code"] == "missing_token"


# Last-Event-ID, which EventSource sends when it reconnects.


async def _ended(client: Client) -> tuple[str, int]:
    """A finished job of `client`'s and its terminal event's version."""
    job_id, version, _ = await _ended_with_id(client)
    return job_id, version


async def _ended_with_id(client: Client) -> tuple[str, int, str]:
    """A finished job of `client`'s, its terminal event's version and its whole `id:`."""
    job = await client.submit({"key": await client.upload(image())})
    await client.wait(job["id"])
    async with _stream(client, job["id"]) as response:
        events = await _all_events(response)
    assert [e.event for e in events] == ["succeeded"] and events[0].id is not None
    assert events[0].last_event_id is not None
    return job["id"], events[0].id, events[0].last_event_id


async def test_ended_job_and_its_last_event_id_is_204(alice: Client) -> None:
    """What stops an EventSource from reconnecting to a finished stream for as long as it is open."""
    job_id, version, whole = await _ended_with_id(alice)
    # The id as sent, then ids of the version alone (as sent before ids carried the write's moment).
    for query_token, last in (
        (False, whole),
        (True, whole),
        (False, version),
        (False, version + 1),
        (False, "9" * 5000),
    ):
        headers = {"Last-Event-ID": str(last), "X-Request-ID": "sse-204"}
        async with _stream(alice, job_id, query_token=query_token, headers=headers) as response:
            assert response.status == 204, (query_token, last)
            assert await response.read() == b""
            assert response.headers["X-Request-ID"] == "sse-204"


async def test_ended_job_and_an_older_last_event_id_gets_the_end(alice: Client) -> None:
    job_id, version = await _ended(alice)
    async with _stream(alice, job_id, headers={"Last-Event-ID": str(version - 1)}) as response:
        assert response.status == 200
        events = await _all_events(response)
    assert [(e.id, e.event) for e in events] == [(version, "succeeded")]
    async with _stream(alice, job_id, headers={"Last-Event-ID": str(version)}) as response:
        assert response.status == 204  # one newer version is the boundary


async def test_malformed_last_event_id_is_ignored(alice: Client) -> None:
    job_id, version = await _ended(alice)
    for last in ("", "x", "-1", f"+{version}", f"{version}.0", f"{version}x", f"0x{version}"):
        async with _stream(alice, job_id, headers={"Last-Event-ID": last}) as response:
            assert response.status == 200, last
            events = await _all_events(response)
        assert [(e.id, e.event) for e in events] == [(version, "succeeded")], last
    async with _stream(alice, job_id, headers={"Last-Event-ID": f"0{version}"}) as response:
        assert response.status == 204  # leading zeros are still the number


async def test_last_event_id_on_someone_elses_or_no_job_is_not_found(alice: Client, bob: Client) -> None:
    """Ownership first: the 204 must not tell anyone else that a job exists or how far it got."""
    job_id, version = await _ended(alice)
    for query_token in (False, True):
        for client, target in ((bob, job_id), (alice, "0" * 32)):
            headers = {"Last-Event-ID": str(version)}
            async with _stream(client, target, query_token=query_token, headers=headers) as response:
                assert response.status == 404, (client.sub, target)
                assert (await response.json())["error"]["code"] == "job_not_found"
    async with _stream(alice, job_id, headers={"Last-Event-ID": str(version)}) as response:
        assert response.status == 204  # while its owner gets the 204


# On the quiet stack: jobs stay pending.


async def test_current_state_at_once_then_heartbeats(http: aiohttp.ClientSession, quiet: Stack) -> None:
    alice = Client(http, quiet, "alice")
    job = await alice.submit({"key": await alice.upload(image())})
    items: list[SseItem] = []
    async with _stream(alice, job["id"]) as response:
        assert response.status == 200
        stream = sse(response)
        # `sse` yields comments too: the state comes first, before any heartbeat.
        first = await asyncio.wait_for(anext(stream), 10)
        assert first.event == "pending"
        assert first.data is not None and first.data["id"] == job["id"]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(HEARTBEAT_S * 6):
                async for item in stream:
                    items.append(item)
    assert all(item.event is None for item in items), "nothing changed, so no further events"
    heartbeats = [item for item in items if item.comment == "keep-alive"]
    assert len(heartbeats) >= 3, items


@pytest.mark.usefixtures("clean_env")
def test_the_default_heartbeat_is_15_s() -> None:
    # Idle proxies and load balancers cut a silent connection after 30-60 s; 15 s keeps well inside.
    assert load(SseSettings).sse_heartbeat_s == 15


async def test_default_heartbeat_is_not_fast(http: aiohttp.ClientSession, quiet: Stack) -> None:
    """The other status process keeps its 15 s default (above): heartbeats follow the setting."""
    alice = Client(http, quiet, "alice")
    job = await alice.submit({"key": await alice.upload(image())})
    items: list[SseItem] = []
    async with _stream(alice, job["id"], base=quiet.services["status-2"].url) as response:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(HEARTBEAT_S * 4):
                async for item in sse(response):
                    items.append(item)
    assert [item.event for item in items] == ["pending"]


async def test_a_stream_ends_when_its_token_expires(http: aiohttp.ClientSession, quiet: Stack) -> None:
    """The token is checked when the stream opens; the events carry download links, so the stream
    goes no further than the token: a `token_expired` event, then the end. Its `EventSource`
    reconnects with the same token, and gets a 401."""
    alice = Client(http, quiet, "alice")
    job = await alice.submit({"key": await alice.upload(image())})
    brief = Client(http, quiet, "alice")
    brief.headers = {"Authorization": f"Bearer {token('alice', ttl_s=2)}"}
    loop = asyncio.get_running_loop()
    opened = loop.time()
    async with _stream(brief, job["id"], query_token=True) as response:
        assert response.status == 200
        items = await asyncio.wait_for(_all_events(response), 10)  # the stream ends by itself
    assert [item.event for item in items] == ["pending", "token_expired"]
    # Shaped as the HTTP errors are.
    assert items[-1].data == {
        "error": {
            "code": "token_expired",
            "message": "the token this stream was opened with has expired; reconnect with a new one",
        }
    }
    assert 0.5 < loop.time() - opened < 4  # at the token's `exp` (whole seconds), not before
    async with _stream(brief, job["id"], query_token=True) as again:
        assert again.status == 401
        assert (await again.json())["error"]["code"] == "token_expired"


async def _opened(client: Client, job_id: str, base: str, stack: contextlib.AsyncExitStack) -> int:
    """Open a stream (held by `stack`) and read its first event; its status when it is refused."""
    response = await stack.enter_async_context(_stream(client, job_id, base=base))
    if response.status == 200:
        first = await asyncio.wait_for(anext(sse(response)), 10)
        assert first.event == "pending"
    return response.status


async def test_streams_are_bounded_per_user_and_per_process(
    http: aiohttp.ClientSession, quiet: Stack
) -> None:
    """One user's streams cannot take a replica's sockets: 429 past the user's limit, 503 past the
    process's, both with `Retry-After`; a closed stream gives its place back."""
    base = quiet.services["status-capped"].url
    alice, bob, carol = (Client(http, quiet, sub) for sub in ("alice", "bob", "carol"))
    jobs = {c.sub: (await c.submit({"key": await c.upload(image())}))["id"] for c in (alice, bob, carol)}

    async def refused(client: Client, status: int, code: str) -> None:
        async with _stream(client, jobs[client.sub], base=base) as response:
            assert response.status == status, (client.sub, response.status)
            assert (await response.json())["error"]["code"] == code
            assert response.headers["Retry-After"] == "5"

    async with contextlib.AsyncExitStack() as held:
        assert [await _opened(alice, jobs["alice"], base, held) for _ in range(CAP_PER_USER)] == [200, 200]
        await refused(alice, 429, "too_many_streams")
        async with contextlib.AsyncExitStack() as bobs:
            assert await _opened(bob, jobs["bob"], base, bobs) == 200  # the process's last place
            await refused(carol, 503, "streams_at_capacity")
            await refused(alice, 429, "too_many_streams")  # her own limit first: another replica won't help
        # Bob's stream closed: its place comes back once the server sees the socket go.
        async with asyncio.timeout(10):
            while True:
                async with contextlib.AsyncExitStack() as carols:
                    if await _opened(carol, jobs["carol"], base, carols) == 200:
                        break
                await asyncio.sleep(0.1)
        await refused(alice, 429, "too_many_streams")  # still hers: 2 open
    # Every stream closed: nothing is left counted against anyone.
    async with asyncio.timeout(10):
        while True:
            async with contextlib.AsyncExitStack() as attempt:
                statuses = [await _opened(alice, jobs["alice"], base, attempt) for _ in range(CAP_PER_USER)]
                statuses.append(await _opened(bob, jobs["bob"], base, attempt))
            if statuses == [200] * CAP_TOTAL:
                break
            await asyncio.sleep(0.1)


async def test_a_client_that_stops_acknowledging_loses_its_stream(
    http: aiohttp.ClientSession, quiet: Stack
) -> None:
    """A client gone without closing (a phone that lost its network) held its stream, and its place
    under the per-user limit, until the kernel gave up retransmitting: about 15 minutes. The kernel
    now drops it once what the stream sends has waited `IMGPIPE_SSE_CLIENT_TIMEOUT_S` for the client.
    Here the client stops reading with a tiny receive window, which the heartbeats fill at once: what
    the server sends then waits behind a zero window, as it would wait unacknowledged for a client
    that vanished."""
    base = quiet.services["status-stalled"].url
    alice = Client(http, quiet, "alice")
    job = await alice.submit({"key": await alice.upload(image())})
    address = urlsplit(base)
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the least the kernel allows
    stalled.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(stalled, (address.hostname, address.port))
        request = f"GET /jobs/{job['id']}/events HTTP/1.1\r\nHost: x\r\n"
        await loop.sock_sendall(
            stalled, f"{request}Authorization: {alice.headers['Authorization']}\r\n\r\n".encode()
        )
        # Its place is taken (the limit is 1) while the server holds its stream...
        async with asyncio.timeout(10):
            while True:
                async with _stream(alice, job["id"], base=base) as response:
                    if response.status == 429:
                        break
                await asyncio.sleep(0.05)
        opened = loop.time()
        # ... and given back once the kernel drops the stalled connection: the stream ends.
        async with asyncio.timeout(10 * CLIENT_TIMEOUT_S + 5), contextlib.AsyncExitStack() as held:
            while await _opened(alice, job["id"], base, held) != 200:
                await held.aclose()
                await asyncio.sleep(0.1)
        assert loop.time() - opened >= CLIENT_TIMEOUT_S * 0.9
        # The server reset the connection: the client reads what had arrived, then the reset.
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(10):
                while await loop.sock_recv(stalled, 65536):
                    pass
    finally:
        stalled.close()


async def test_query_token_on_a_live_stream(http: aiohttp.ClientSession, quiet: Stack) -> None:
    alice = Client(http, quiet, "alice")
    job = await alice.submit({"key": await alice.upload(image())})
    async with _stream(alice, job["id"], query_token=True) as response:
        assert response.status == 200
        first = await asyncio.wait_for(anext(sse(response)), 2)
    assert (first.event, first.id) == ("pending", 1)


async def test_running_job_and_its_last_event_id_skips_the_state_the_client_has(
    http: aiohttp.ClientSession, quiet: Stack
) -> None:
    alice = Client(http, quiet, "alice")
    job = await alice.submit({"key": await alice.upload(image())})
    items: list[SseItem] = []
    async with _stream(alice, job["id"], headers={"Last-Event-ID": "1"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(HEARTBEAT_S * 5):
                async for item in sse(response):
                    items.append(item)
    assert all(item.event is None for item in items), items
    assert len([item for item in items if item.comment == "keep-alive"]) >= 2, items
    # An older version (or one the job has not reached) gets the current state, as without one.
    for last in ("0", "2"):
        async with _stream(alice, job["id"], headers={"Last-Event-ID": last}) as response:
            first = await asyncio.wait_for(anext(sse(response)), 2)
        assert (first.event, first.id) == ("pending", 1), last


async def test_http_1_0_stream_is_not_chunked(http: aiohttp.ClientSession, quiet: Stack) -> None:
    """The hub frames chunks itself for HTTP/1.1; an HTTP/1.0 client gets the bare event stream."""
    alice = Client(http, quiet, "alice")
    job = await alice.submit({"key": await alice.upload(image())})
    base = urlsplit(quiet.services["status"].url)
    reader, writer = await asyncio.open_connection(base.hostname, base.port)
    try:
        writer.write(
            f"GET /jobs/{job['id']}/events HTTP/1.0\r\n"
            f"Authorization: {alice.headers['Authorization']}\r\n\r\n".encode()
        )
        data = b""
        async with asyncio.timeout(10):
            while data.count(b": keep-alive\n\n") < 2:  # the hub's heartbeats, after the first event
                more = await reader.read(4096)
                assert more, f"the stream ended: {data!r}"
                data += more
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower(), head
    assert re.match(rb"retry: 2000\n\nid: 1\.[0-9]+\nevent: pending\ndata: \{", body), body
    assert b"\r\n" not in body, body


async def test_one_subscription_per_process_and_fan_out(
    http: aiohttp.ClientSession, quiet: Stack, tmp_path: Path
) -> None:
    alice = Client(http, quiet, "alice")
    job = await alice.submit({"key": await alice.upload(image())})
    other = await alice.submit({"key": await alice.upload(image())})
    bases = [quiet.services["status"].url, quiet.services["status-2"].url]
    opened = asyncio.Event()
    ready = 0
    targets = [(job["id"], bases[i % 2]) for i in range(24)] + [(other["id"], base) for base in bases]
    # Streams of clients that already have version 1: they get every change after it, and only those.
    skipping = [(job["id"], base) for base in bases]

    def opened_one() -> None:
        nonlocal ready
        ready += 1
        if ready == len(targets) + len(skipping):
            opened.set()

    async def listen(job_id: str, base: str, last_event_id: str | None = None) -> list[SseItem]:
        headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
        async with _stream(alice, job_id, base=base, headers=headers) as response:
            assert response.status == 200
            if last_event_id is not None:
                opened_one()  # the server listens before it answers, so nothing is lost from here on
            events = []
            async for item in sse(response):
                if item.event is None:
                    continue
                events.append(item)
                if len(events) == 1 and last_event_id is None:
                    opened_one()
            return events

    tasks = [asyncio.create_task(listen(job_id, base)) for job_id, base in targets]
    tasks += [asyncio.create_task(listen(job_id, base, "1")) for job_id, base in skipping]
    try:
        await asyncio.wait_for(opened.wait(), 10)
        channel = f"{quiet.env['IMGPIPE_NAMESPACE']}:events"
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            # 26 streams on two processes (and none on the other two): four subscriptions, one per
            # process, not one per stream.
            processes = sum(name.startswith("status") for name in quiet.services)
            assert processes == 4
            assert await client.pubsub_numsub(channel) == [(channel.encode(), processes)]
        finally:
            await client.aclose()

        async with temporary_worker(quiet, tmp_path):
            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        for task in tasks:
            task.cancel()

    for (job_id, _), events in zip(targets, results[: len(targets)], strict=True):
        _check_sequence(events, job_id)
        # Every listener saw every change, in order: created, taken up, done.
        assert [(e.id, e.event) for e in events] == [(1, "pending"), (2, "processing"), (3, "succeeded")]
    for (job_id, _), events in zip(skipping, results[len(targets) :], strict=True):
        _check_sequence(events, job_id)
        assert [(e.id, e.event) for e in events] == [(2, "processing"), (3, "succeeded")]
    finals = {without_urls(events[-1].data or {})["updated_at"] for events in results[:24]}
    assert len(finals) == 1, "all listeners of one job got the same final record"
