"""The status hub in-process: one Redis subscription fanned out by writing straight to sockets.

Real Redis (the test database), real TCP connections on loopback; the streams are plain sockets
so a test can read what the hub wrote, or stop reading.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from imgpipe.models import JobRecord, JobStatus, KeySource, utcnow
from imgpipe.store import JobStore
from imgpipe_status.hub import End, Event, Hub, Listener

from tests.stack import REDIS_URL, delete_keys


class CountingStore(JobStore):
    """The real store, counting its reads."""

    reads = 0

    async def get(self, job_id: str) -> JobRecord | None:
        self.reads += 1
        return await super().get(job_id)


@pytest.fixture
async def store() -> AsyncIterator[CountingStore]:
    namespace = f"imgpipe-hubtest-{uuid.uuid4().hex[:8]}"
    # A name of its own, so a test can find (and cut) exactly this client's subscription.
    client = aioredis.from_url(REDIS_URL, client_name=namespace)
    store = CountingStore(client, namespace, retention=timedelta(minutes=10))
    try:
        yield store
    finally:
        await delete_keys(client, f"{namespace}:*")
        await client.aclose()


def _render(record: JobRecord) -> bytes:
    return f"id: {record.version}\nevent: {record.status.value}\ndata: {record.id}\n\n".encode()


class Rendering:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, record: JobRecord) -> bytes:
        self.calls += 1
        return _render(record)


@pytest.fixture
async def hub(store: CountingStore) -> AsyncIterator[Hub]:
    hub = Hub(store, Rendering())
    hub.start()
    await asyncio.wait_for(hub.connected.wait(), 10)
    try:
        yield hub
    finally:
        await hub.stop()


class Sockets:
    """Connected loopback pairs: the server side's transport for the hub, the client side to read."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.clients: list[socket.socket] = []

    async def __aenter__(self) -> Sockets:
        loop = asyncio.get_running_loop()
        accepted = self.accepted

        class Server(asyncio.Protocol):
            def connection_made(self, transport) -> None:  # type: ignore[override]
                accepted.put_nowait(transport)

        self.server = await loop.create_server(Server, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            client.close()
        assert self.server is not None
        self.server.close()

    async def pair(self, *, rcvbuf: int | None = None) -> tuple[asyncio.Transport, socket.socket]:
        assert self.server is not None
        client = socket.socket()
        if rcvbuf is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.setblocking(False)
        self.clients.append(client)
        await asyncio.get_running_loop().sock_connect(client, self.server.sockets[0].getsockname())
        return await asyncio.wait_for(self.accepted.get(), 5), client


async def _read_until(client: socket.socket, marker: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(10):
        while marker not in data:
            more = await loop.sock_recv(client, 65536)
            if not more:
                raise EOFError(data)
            data += more
    return data


async def _hub_knows(hub: Hub, job_id: str, version: int) -> None:
    """Wait until the hub has seen `version` of the job (through its subscription)."""
    async with asyncio.timeout(5):
        while (await hub.current(job_id)).version != version:  # type: ignore[union-attr]  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _pending_job(store: JobStore) -> JobRecord:
    record = JobRecord.pending(uuid.uuid4().hex, "alice", KeySource(key="uploads/x/y"), [])
    created = (await store.create(record)).record
    assert created is not None
    return created


async def test_a_change_is_rendered_once_for_every_stream(hub: Hub, store: CountingStore) -> None:
    job = await _pending_job(store)
    async with Sockets() as sockets:
        clients = []
        with ExitStack() as streams:
            listeners = [streams.enter_context(hub.listen(job.id)) for _ in range(50)]
            for listener in listeners:
                current = await hub.current(job.id)
                assert current is not None and current.version == job.version
                hub.event(current)  # what the handler sends first, through aiohttp
                transport, client = await sockets.pair()
                hub.attach(listener, transport, chunked=True, version=current.version)
                clients.append(client)

            await store.mark_processing(job.id)
            received = await asyncio.gather(*(_read_until(c, b"event: processing\n") for c in clients))

    event = b"id: 2\nevent: processing\ndata: " + job.id.encode() + b"\n\n"
    # The same chunk-framed bytes on every socket, rendered once for all 50 (and once before, v1).
    assert set(received) == {b"%x\r\n%b\r\n" % (len(event), event)}
    assert hub._render.calls == 2  # type: ignore[attr-defined]


async def test_streams_of_one_job_share_one_read(hub: Hub, store: CountingStore) -> None:
    job = await _pending_job(store)
    reads = store.reads

    async def connect() -> int:
        with hub.listen(job.id):
            current = await hub.current(job.id)
            assert current is not None
            return current.version

    assert await asyncio.gather(*(connect() for _ in range(200))) == [1] * 200
    assert store.reads - reads == 1

    # While the job is watched, a stream that connects later needs no read at all.
    with hub.listen(job.id):
        await store.mark_processing(job.id)
        await _hub_knows(hub, job.id, 2)
        reads = store.reads
        assert await connect() == 2
        assert store.reads == reads


async def test_a_change_before_attach_is_caught_up(hub: Hub, store: CountingStore) -> None:
    """The first event goes out before `attach`; a change that arrives meanwhile is not lost."""
    job = await _pending_job(store)
    async with Sockets() as sockets:
        with hub.listen(job.id) as listener:
            current = await hub.current(job.id)
            assert current is not None and current.status is JobStatus.PENDING
            await store.mark_processing(job.id)
            await _hub_knows(hub, job.id, 2)  # the hub has seen the change, before the stream attached
            transport, client = await sockets.pair()
            hub.attach(listener, transport, chunked=False, version=current.version)
            data = await _read_until(client, b"event: processing\n")
    assert data == b"id: 2\nevent: processing\ndata: " + job.id.encode() + b"\n\n"  # HTTP/1.0: unframed


async def test_a_terminal_change_ends_the_stream(hub: Hub, store: CountingStore) -> None:
    job = await _pending_job(store)
    async with Sockets() as sockets:
        with hub.listen(job.id) as listener:
            transport, client = await sockets.pair()
            hub.attach(listener, transport, chunked=True, version=job.version)
            current = await store.get(job.id)
            assert current is not None
            await store.mark_failed(current, "decode_failed", "not an image")  # type: ignore[attr-defined]
            await asyncio.wait_for(listener.ended.wait(), 5)
            assert listener.reason is End.DONE
            await _read_until(client, b"event: failed\n")


async def test_a_client_that_stops_reading_is_evicted(store: CountingStore) -> None:
    """Writes do not wait for the client, so a stalled one is cut off at a bound instead."""
    bound = 64 * 1024
    hub = Hub(store, _render, max_unsent=bound)
    job = await _pending_job(store)
    async with Sockets() as sockets:
        with hub.listen(job.id) as listener:
            transport, _ = await sockets.pair(rcvbuf=4096)  # and the client never reads
            hub.attach(listener, transport, chunked=True, version=job.version)
            big = b"data: " + b"x" * 32 * 1024 + b"\n\n"
            most = 0
            for version in range(2, 2000):  # ~64 MB if nothing stopped it
                record = job.model_copy(update={"version": version})
                listener.offer(record, Event(version, big))
                most = max(most, transport.get_write_buffer_size())
                if listener.reason is not None:
                    break
            assert listener.reason is End.EVICTED
            assert listener.ended.is_set()
            assert most <= bound + len(big) + 64
            assert transport.is_closing()
            # Later changes are not written to it any more.
            listener.offer(job.model_copy(update={"version": 5000}), Event(5000, big))
            listener.heartbeat()


async def test_heartbeat_is_a_comment_in_a_chunk(hub: Hub, store: CountingStore) -> None:
    job = await _pending_job(store)
    async with Sockets() as sockets:
        with hub.listen(job.id) as listener:
            transport, client = await sockets.pair()
            hub.attach(listener, transport, chunked=True, version=job.version)
            listener.heartbeat()
            assert await _read_until(client, b"keep-alive\n\n\r\n") == b"e\r\n: keep-alive\n\n\r\n"


async def test_missed_changes_are_delivered_after_the_subscription_is_restored(
    hub: Hub, store: CountingStore
) -> None:
    """A change whose message the hub never got (it was cut off) reaches the stream after resync."""
    job = await _pending_job(store)
    async with Sockets() as sockets:
        with hub.listen(job.id) as listener:
            transport, client = await sockets.pair()
            hub.attach(listener, transport, chunked=False, version=job.version)
            # `processing` written without its message, as if it had been published while the
            # subscription was down.
            moved = job.model_copy(update={"status": JobStatus.PROCESSING, "updated_at": utcnow()})
            await store.redis.hset(
                store.job_key(job.id),
                mapping={"version": 2, "rank": 1, "data": moved.model_dump_json(exclude={"version"})},
            )
            # Cut this hub's subscription (and only it: the client is named after the namespace).
            ours = [
                c
                for c in await store.redis.client_list()
                if c.get("name") == store.namespace and int(c.get("sub", 0)) > 0
            ]
            assert len(ours) == 1, ours
            await store.redis.client_kill_filter(_id=ours[0]["id"])
            data = await _read_until(client, b"event: processing\n")
    assert data == b"id: 2\nevent: processing\ndata: " + job.id.encode() + b"\n\n"


def test_listener_before_attach_writes_nothing() -> None:
    listener = Listener("x", 1024)
    now = utcnow()
    record = JobRecord(
        id="x",
        owner="alice",
        status=JobStatus.PROCESSING,
        created_at=now,
        updated_at=now,
        source=KeySource(key="k"),
        requested=[],
    )
    record.version = 2
    listener.offer(record, Event(2, b"data: x\n\n"))  # no transport yet: it is only remembered by the hub
    listener.heartbeat()
    assert listener.version == 0 and listener.reason is None
