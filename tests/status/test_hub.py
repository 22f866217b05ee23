"""The status hub in-process: one Redis subscription fanned out by writing straight to sockets.

Real Redis (the test database), real TCP connections on loopback; the streams are plain sockets
so a test can read what the hub wrote, or stop reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
import redis
from imgpipe.models import JobRecord, JobStatus, KeySource, utcnow
from imgpipe.resources import redis_client
from imgpipe.settings import RedisSettings
from imgpipe.store import JobStore
from imgpipe_status import hub as hub_module
from imgpipe_status.hub import End, Event, Hub, Listener
from pydantic import SecretStr
from redis.exceptions import ResponseError
from yarl import URL

from tests.isolated import BrokerProxy
from tests.stack import REDIS_URL, delete_keys


class CountingStore(JobStore):
    """The real store, counting its reads."""

    reads = 0
    reading = 0
    most_at_once = 0  # reads out at the same time, at the most

    async def get(self, job_id: str) -> JobRecord | None:
        self.reads += 1
        self.reading += 1
        self.most_at_once = max(self.most_at_once, self.reading)
        try:
            return await super().get(job_id)
        finally:
            self.reading -= 1


def _client(url: str, name: str | None = None) -> redis.asyncio.Redis:
    """A client as the services make it: its retry settings decide what a dropped connection does."""
    if name is not None:
        url += f"{'&' if '?' in url else '?'}client_name={name}"
    return redis_client(RedisSettings(redis_url=SecretStr(url)))


@pytest.fixture
async def store() -> AsyncIterator[CountingStore]:
    namespace = f"imgpipe-hubtest-{uuid.uuid4().hex[:8]}"
    # A name of its own, so a test can find (and cut) exactly this client's subscription.
    client = _client(REDIS_URL, namespace)
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


@contextlib.asynccontextmanager
async def _connected(hub: Hub) -> AsyncIterator[Hub]:
    """`hub` running and subscribed, stopped at the end."""
    hub.start()
    try:
        await asyncio.wait_for(hub.connected.wait(), 10)
        yield hub
    finally:
        await hub.stop()


@pytest.fixture
async def hub(store: CountingStore) -> AsyncIterator[Hub]:
    async with _connected(Hub(store, Rendering())) as hub:
        yield hub


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


def _cut_subscription(store: JobStore) -> None:
    """Drop the hub's subscriber connection, as `CLIENT KILL` or an output-buffer eviction would.

    Only this test's: the store's client is named after its namespace. Blocking on purpose: the hub
    gets no turn of the event loop (to notice and reconnect) before the caller's next command is sent.
    """
    with redis.Redis.from_url(REDIS_URL) as admin:
        ours = [
            c for c in admin.client_list() if c.get("name") == store.namespace and int(c.get("sub", 0)) > 0
        ]
        assert len(ours) == 1, ours
        admin.client_kill_filter(_id=ours[0]["id"])


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
            sent, written = listener.version, listener.last_write
            listener.offer(job.model_copy(update={"version": 5000}), Event(5000, big))
            listener.heartbeat()
            assert (listener.version, listener.last_write) == (sent, written)
            assert listener.reason is End.EVICTED


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
            _cut_subscription(store)
            data = await _read_until(client, b"event: processing\n")
    assert data == b"id: 2\nevent: processing\ndata: " + job.id.encode() + b"\n\n"


async def test_a_change_published_while_the_subscription_is_cut_is_not_lost(
    hub: Hub, store: CountingStore
) -> None:
    """The subscriber connection is dropped while Redis stays up. The client reconnects and subscribes
    again by itself, so the hub sees no error; the change published in the gap is on no subscription."""
    job = await _pending_job(store)
    async with Sockets() as sockets:
        with hub.listen(job.id) as listener:
            current = await hub.current(job.id)
            assert current is not None
            transport, client = await sockets.pair()
            hub.attach(listener, transport, chunked=False, version=current.version)
            _cut_subscription(store)
            await store.mark_failed(current, "decode_failed", "not an image")  # type: ignore[attr-defined]
            # Not a stream that sends heartbeats for ever: it gets the terminal event, and ends.
            await asyncio.wait_for(listener.ended.wait(), 5)
            assert listener.reason is End.DONE
            data = await _read_until(client, b"event: failed\n")
    assert data == b"id: 2\nevent: failed\ndata: " + job.id.encode() + b"\n\n"
    # And a stream that connects now starts from `failed`, not from what the hub knew before the cut.
    with hub.listen(job.id):
        now = await hub.current(job.id)
        assert now is not None and now.status is JobStatus.FAILED


async def test_streams_ahead_of_a_store_that_lost_changes_are_ended(hub: Hub, store: CountingStore) -> None:
    """Redis fails over and loses its last write: the store is back at `pending` (1) after a stream
    was sent `processing` (2). The worker's next write is version 2 again, `succeeded`: the hub sent
    its cached rendering of the old version 2 (`processing`), which the stream dropped as one it had,
    so it never ended; a stream connecting then was sent `processing` as if it were final."""
    job = await _pending_job(store)
    async with Sockets() as sockets:
        with hub.listen(job.id) as listener:
            transport, client = await sockets.pair()
            hub.attach(listener, transport, chunked=False, version=job.version)
            processing = (await store.mark_processing(job.id)).record
            assert processing is not None
            await _read_until(client, b"event: processing\n")
            # The replica promoted had only `pending`; the hub's subscription broke with the primary.
            pending = {"version": 1, "rank": 0, "data": job.model_dump_json(exclude={"version"})}
            await store.redis.hset(store.job_key(job.id), mapping=pending)
            _cut_subscription(store)
            await asyncio.wait_for(listener.ended.wait(), 5)
            assert listener.reason is End.ROLLED_BACK  # its client reconnects, and reads `pending`
    with hub.listen(job.id):
        await _hub_knows(hub, job.id, 1)
        await store.mark_succeeded(processing, [])
        await _hub_knows(hub, job.id, 2)
        now = await hub.current(job.id)
        assert now is not None and now.status is JobStatus.SUCCEEDED
        assert hub.event(now).data == b"id: 2\nevent: succeeded\ndata: " + job.id.encode() + b"\n\n"


async def test_a_subscription_that_goes_silent_is_noticed_and_resynced(store: CountingStore) -> None:
    """The hub's connection to Redis stays open but nothing comes through it any more (Redis killed
    without a FIN, a partition, a proxy that stopped forwarding). Before, the hub never noticed: it
    stayed `connected` (/readyz 200), its streams got keep-alives only, and new streams were answered
    the state it knew, while the job had failed. Now the subscription counts as lost within two ping
    intervals, and once Redis can be reached again the resync sends the stream what it missed."""
    relay = BrokerProxy(target=URL(REDIS_URL).port or 6379)
    await relay.start()
    relayed = _client(str(URL(REDIS_URL).with_host("127.0.0.1").with_port(relay.port)))
    hub = Hub(JobStore(relayed, store.namespace, retention=timedelta(minutes=10)), _render, ping_s=0.2)
    hub.start()
    try:
        await asyncio.wait_for(hub.connected.wait(), 10)
        job = await _pending_job(store)
        async with Sockets() as sockets:
            with hub.listen(job.id) as listener:
                current = await hub.current(job.id)
                assert current is not None and current.status is JobStatus.PENDING
                transport, client = await sockets.pair()
                hub.attach(listener, transport, chunked=False, version=current.version)
                relay.stall()
                # Written straight to Redis; its message to the hub is held in the relay.
                await store.mark_failed(current, "decode_failed", "not an image")  # type: ignore[attr-defined]
                async with asyncio.timeout(2):
                    while hub.connected.is_set():  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                # What the hub knew is dropped: no new stream is answered `pending` from it.
                assert hub._watches[job.id].known is None
                assert not listener.ended.is_set()
                relay.reset()  # the network heals: the hub subscribes again, and re-reads the job
                await asyncio.wait_for(listener.ended.wait(), 5)
                assert listener.reason is End.DONE
                data = await _read_until(client, b"event: failed\n")
        assert hub.connected.is_set()
    finally:
        await hub.stop()
        await relay.cut()
        await relayed.aclose()
    assert data == b"id: 2\nevent: failed\ndata: " + job.id.encode() + b"\n\n"


async def test_a_stream_ahead_of_a_store_that_lost_changes_is_ended_when_it_attaches(
    hub: Hub, store: CountingStore
) -> None:
    """A stream's handler read `processing` (2); Redis then fails over to a replica that had only
    `pending` (1), and the hub's resync reads that while the handler is still writing its first event.
    The resync sees a stream that was sent nothing and lets it be. When it attaches, having sent 2,
    it must end: the worker's next write is version 2 again (`succeeded`), which the stream would drop
    as one it has, and it would never get its terminal event."""
    job = await _pending_job(store)
    processing = (await store.mark_processing(job.id)).record
    assert processing is not None
    async with Sockets() as sockets:
        with hub.listen(job.id) as listener:
            current = await hub.current(job.id)
            assert current is not None and current.version == 2
            # The first event is on its way through aiohttp; meanwhile the failover.
            pending = {"version": 1, "rank": 0, "data": job.model_dump_json(exclude={"version"})}
            await store.redis.hset(store.job_key(job.id), mapping=pending)
            _cut_subscription(store)
            async with asyncio.timeout(5):  # the resync has read the store as it is now
                while (known := hub._watches[job.id].known) is None or known.version != 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert not listener.ended.is_set()
            transport, _ = await sockets.pair()
            hub.attach(listener, transport, chunked=False, version=current.version)
            assert listener.reason is End.ROLLED_BACK  # its client reconnects, and reads `pending`
            assert listener.ended.is_set()


class LateStore(CountingStore):
    """Its subscriptions go to `down` while that is set: Redis is not up yet, as far as the hub's
    subscription is concerned. Reads and changes go to the real Redis all along."""

    down: JobStore | None = None
    failures = 0

    @asynccontextmanager
    async def subscribe(self, **kw: Any) -> AsyncIterator[AsyncIterator[tuple[int, JobRecord]]]:
        subscription = super().subscribe(**kw) if self.down is None else self.down.subscribe(**kw)
        try:
            async with subscription as changes:
                yield changes
        except Exception:
            self.failures += 1
            raise


async def test_streams_that_connect_before_the_first_subscription_are_caught_up(
    store: CountingStore,
) -> None:
    """The hub's first subscribe fails; a stream that connects during the back-off reads the current
    state itself, and a change made before the subscription succeeds must still reach it."""
    job = await _pending_job(store)
    await store.mark_processing(job.id)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound and never listening: every connection is refused
        unreachable = _client(f"redis://127.0.0.1:{closed.getsockname()[1]}/15")
        late = LateStore(store.redis, store.namespace, retention=timedelta(minutes=10))
        late.down = JobStore(unreachable, store.namespace, retention=timedelta(minutes=10))
        hub = Hub(late, _render)
        hub.start()
        try:
            async with asyncio.timeout(5):
                while not late.failures:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert not hub.connected.is_set()
            async with Sockets() as sockets:
                with hub.listen(job.id) as listener:
                    current = await hub.current(job.id)
                    assert current is not None and current.status is JobStatus.PROCESSING
                    transport, client = await sockets.pair()
                    hub.attach(listener, transport, chunked=False, version=current.version)
                    await store.mark_failed(current, "decode_failed", "not an image")  # type: ignore[attr-defined]
                    late.down = None  # Redis is up for the hub's next attempt
                    await asyncio.wait_for(listener.ended.wait(), 5)
                    assert listener.reason is End.DONE
                    data = await _read_until(client, b"event: failed\n")
            assert hub.connected.is_set()
        finally:
            await hub.stop()
            await unreachable.aclose()
    assert data == b"id: 3\nevent: failed\ndata: " + job.id.encode() + b"\n\n"


async def test_a_job_is_forgotten_when_its_read_fails_after_its_streams_left(
    hub: Hub, store: CountingStore
) -> None:
    """A stream's handler is cancelled (its client left) while the hub's read of the job is out, and
    the read fails: nothing is left behind for the job."""
    job_id = uuid.uuid4().hex
    await store.redis.set(store.job_key(job_id), "not a hash")  # so that reading it fails: WRONGTYPE

    async def stream() -> None:
        with hub.listen(job_id):
            await hub.current(job_id)

    handler = asyncio.create_task(stream())
    await asyncio.sleep(0)  # it registered, and started the hub's read
    reading = hub._watches[job_id].reading
    assert reading is not None and not reading.done()
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert job_id in hub._watches  # kept for the read that is out
    with pytest.raises(redis.ResponseError):
        await reading
    assert job_id not in hub._watches


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


async def test_a_version_a_client_has_from_elsewhere_is_read_from_the_store(
    hub: Hub, store: CountingStore
) -> None:
    """A client streamed by another replica reconnects here with a `Last-Event-ID` this hub has not
    heard of yet (the change's message is still on its way): the hub must not answer its older record."""
    job = await _pending_job(store)
    with hub.listen(job.id):
        assert (await hub.current(job.id)).version == 1  # type: ignore[union-attr]  # followed, cached
        ahead = job.model_copy(update={"status": JobStatus.SUCCEEDED, "updated_at": utcnow()})
        # Written as the store writes a change, but not published: no message reaches the hub.
        await store.redis.hset(
            store.job_key(job.id),
            mapping={"version": 2, "rank": 2, "data": ahead.model_dump_json(exclude={"version"})},
        )
        assert (await hub.current(job.id)).version == 1  # type: ignore[union-attr]  # nothing says otherwise
        reads = store.reads
        current = await hub.current(job.id, at_least=2)
        assert current is not None and (current.version, current.status) == (2, JobStatus.SUCCEEDED)
        assert store.reads == reads + 1
        assert (await hub.current(job.id)).version == 2  # type: ignore[union-attr]  # and learnt


async def test_a_version_a_client_has_is_not_answered_from_a_read_begun_before_it(
    hub: Hub, store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another stream's read of the job is on its way when a client with `Last-Event-ID: 2` connects;
    that read began before version 2 was written, so its answer will not do for this client."""
    job = await _pending_job(store)
    go, reading = asyncio.Event(), asyncio.Event()
    read = store.get

    async def slow_first_read(job_id: str) -> JobRecord | None:
        if not reading.is_set():
            reading.set()
            record = await read(job_id)  # version 1, read before the change...
            await go.wait()  # ...and answered after it
            return record
        return await read(job_id)

    monkeypatch.setattr(store, "get", slow_first_read)
    with hub.listen(job.id), hub.listen(job.id):
        first = asyncio.create_task(hub.current(job.id))
        await asyncio.wait_for(reading.wait(), 5)
        ahead = job.model_copy(update={"status": JobStatus.SUCCEEDED, "updated_at": utcnow()})
        await store.redis.hset(
            store.job_key(job.id),
            mapping={"version": 2, "rank": 2, "data": ahead.model_dump_json(exclude={"version"})},
        )
        second = asyncio.create_task(hub.current(job.id, at_least=2))
        await asyncio.sleep(0.05)  # it joins the shared read
        go.set()
        assert (await first).version == 1  # type: ignore[union-attr]  # what it asked for
        assert (await second).version == 2  # type: ignore[union-attr]


async def _unreadable(store: JobStore, job: JobRecord, *, publish: bool) -> None:
    """Rewrite `job` as a newer version would (a status this one does not know), as the next version;
    with `publish`, its change message goes out as the store's script sends one."""
    data = job.model_dump_json(exclude={"version"}).replace('"pending"', '"queued"')
    await store.redis.hset(store.job_key(job.id), mapping={"data": data, "version": job.version + 1})
    if publish:
        await store.redis.publish(store.channel, f'{{"version":{job.version + 1},"record":{data}}}')


@pytest.mark.parametrize(
    ("published", "wrong_type"),
    [(True, False), (False, False), (False, True)],
    ids=["its-change-published", "read-on-resync", "not-a-hash-on-resync"],
)
async def test_a_record_this_version_cannot_read_ends_its_streams_only(
    hub: Hub, store: CountingStore, published: bool, wrong_type: bool
) -> None:
    """A job rewritten in a form this version cannot read (a newer version's status in a rolling
    upgrade, a hand edit): its streams end, and the hub goes on with every other job. Before, its
    message (or its re-read after a reconnect) was taken for a lost subscription, and every re-read
    after the reconnect failed again: the hub never sent another change, and /readyz stayed 503."""
    bad, good = await _pending_job(store), await _pending_job(store)
    async with Sockets() as sockets:
        with hub.listen(bad.id) as stuck, hub.listen(good.id) as fine:
            for listener, job in ((stuck, bad), (fine, good)):
                current = await hub.current(job.id)
                assert current is not None and current.version == 1
                transport, client = await sockets.pair()
                hub.attach(listener, transport, chunked=False, version=current.version)
            if wrong_type:  # a hand edit that left a string where the job's hash was: WRONGTYPE
                await store.redis.delete(store.job_key(bad.id))
                await store.redis.set(store.job_key(bad.id), "edited by hand")
            else:
                await _unreadable(store, bad, publish=published)
            if not published:
                _cut_subscription(store)  # the hub re-reads every job it follows
            await asyncio.wait_for(stuck.ended.wait(), 10)
            assert stuck.reason is End.UNREADABLE
            await store.mark_processing(good.id)
            data = await _read_until(client, b"event: processing\n")
            assert not fine.ended.is_set()
            assert hub.connected.is_set()
            # What the hub knew of the bad job is dropped: a stream that comes for it now reads it
            # (and fails as `GET /jobs/{id}` does), rather than be answered its outdated state.
            with hub.listen(bad.id), pytest.raises(ResponseError if wrong_type else ValueError):
                await hub.current(bad.id)
    assert data == b"id: 2\nevent: processing\ndata: " + good.id.encode() + b"\n\n"


async def test_a_job_whose_rendering_fails_ends_its_streams_only(store: CountingStore) -> None:
    """Rendering is per job as reading is: one job's failing must not stop the hub for the others."""
    broken: set[str] = set()

    def render(record: JobRecord) -> bytes:
        if record.id in broken:
            raise RuntimeError("cannot render this one")
        return _render(record)

    async with _connected(Hub(store, render)) as hub, Sockets() as sockets:
        bad, good = await _pending_job(store), await _pending_job(store)
        with hub.listen(bad.id) as stuck, hub.listen(good.id) as fine:
            for listener, job in ((stuck, bad), (fine, good)):
                transport, client = await sockets.pair()
                hub.attach(listener, transport, chunked=False, version=job.version)
            broken.add(bad.id)
            await store.mark_processing(bad.id)
            await asyncio.wait_for(stuck.ended.wait(), 10)
            assert stuck.reason is End.UNREADABLE
            await store.mark_processing(good.id)
            data = await _read_until(client, b"event: processing\n")
            assert not fine.ended.is_set() and hub.connected.is_set()
    assert data == b"id: 2\nevent: processing\ndata: " + good.id.encode() + b"\n\n"


async def test_a_catch_up_at_attach_that_fails_to_render_ends_that_stream(store: CountingStore) -> None:
    """`attach` sends a change the stream missed while its first event was written. By then the
    handler has sent its 200: a rendering failure must end the stream, not reach the handler (whose
    error answer would be a second response written into the stream)."""

    def render(record: JobRecord) -> bytes:
        if record.version > 1:
            raise RuntimeError("cannot sign its links")
        return _render(record)

    async with _connected(Hub(store, render)) as hub, Sockets() as sockets:
        job = await _pending_job(store)
        await store.mark_processing(job.id)  # version 2, read (not rendered) when the stream starts
        with hub.listen(job.id) as listener:
            current = await hub.current(job.id)
            assert current is not None and current.version == 2
            transport, _ = await sockets.pair()
            hub.attach(listener, transport, chunked=True, version=1)
            assert listener.reason is End.UNREADABLE
            assert hub.connected.is_set()


async def test_a_resync_reads_the_watched_jobs_in_batches_and_misses_none(
    hub: Hub, store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every watched job is read again after a reconnect, a batch at a time (here 3, for 7 jobs:
    two whole batches and a part), and each stream gets the change it missed."""
    monkeypatch.setattr(hub_module, "RESYNC_BATCH", 3)
    jobs = [await _pending_job(store) for _ in range(7)]
    async with Sockets() as sockets, contextlib.AsyncExitStack() as stack:
        streams = []
        for job in jobs:
            listener = stack.enter_context(hub.listen(job.id))
            transport, client = await sockets.pair()
            hub.attach(listener, transport, chunked=False, version=job.version)
            streams.append((job, listener, client))
        for job in jobs:  # changed without their messages, as while the subscription was down
            moved = job.model_copy(update={"status": JobStatus.PROCESSING, "updated_at": utcnow()})
            await store.redis.hset(
                store.job_key(job.id),
                mapping={"version": 2, "rank": 1, "data": moved.model_dump_json(exclude={"version"})},
            )
        reads, store.most_at_once = store.reads, 0
        _cut_subscription(store)
        for job, listener, client in streams:
            data = await _read_until(client, b"event: processing\n")
            assert data == b"id: 2\nevent: processing\ndata: " + job.id.encode() + b"\n\n"
            assert listener.version == 2
    assert store.reads - reads == len(jobs)  # each read once
    assert store.most_at_once == 3  # a batch at a time: not one by one, nor all at once


async def test_a_read_begun_before_the_subscription_broke_is_not_learnt_after_it(
    hub: Hub, store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover lost `processing` (version 2), and a read the old primary answered landed after
    the hub's resync had read the new one: learnt, it put the lost state back, the hub then dropped
    the job's real version 2 (`succeeded`) as one it had, and its streams waited at `processing`."""
    job = await _pending_job(store)
    processing = (await store.mark_processing(job.id)).record
    assert processing is not None
    go, reading = asyncio.Event(), asyncio.Event()
    read = store.get

    async def held_first_read(job_id: str) -> JobRecord | None:
        if not reading.is_set():
            reading.set()
            record = await read(job_id)  # `processing`, from the primary about to be lost...
            await go.wait()  # ...answered after the failover
            return record
        return await read(job_id)

    monkeypatch.setattr(store, "get", held_first_read)
    with hub.listen(job.id):
        late = asyncio.create_task(hub.current(job.id))
        await asyncio.wait_for(reading.wait(), 5)
        # The failover: the promoted replica had only `pending`, and the subscription broke.
        pending = {"version": 1, "rank": 0, "data": job.model_dump_json(exclude={"version"})}
        await store.redis.hset(store.job_key(job.id), mapping=pending)
        reads = store.reads
        _cut_subscription(store)
        async with asyncio.timeout(5):  # resynced: `current` would wait on the held read
            while store.reads == reads or not hub.connected.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        go.set()
        assert (await late).status is JobStatus.PROCESSING  # its caller gets what it read
        await store.mark_succeeded(processing, [])  # the worker's write: version 2 again
        await _hub_knows(hub, job.id, 2)
        now = await hub.current(job.id)
        assert now is not None and now.status is JobStatus.SUCCEEDED
