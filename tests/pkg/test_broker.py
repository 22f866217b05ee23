"""RabbitMQ topology and publishing against the real broker: queues, retries by TTL, dead letters."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import aio_pika
import aiormq
import pamqp.encode
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aiohttp import web
from imgpipe import resources
from imgpipe.broker import (
    ATTEMPT_HEADER,
    DELIVERY_LIMIT,
    JOB_ROUTING_KEY,
    REASON_HEADER,
    REQUEST_ID_HEADER,
    BrokerUnavailable,
    Publisher,
    Topology,
    Waiting,
    connect,
    is_up,
    keep_connecting,
    queue_counts,
    robust_connection,
    subscribe,
)
from imgpipe.models import PRESETS, JobMessage, KeySource
from imgpipe.settings import AmqpSettings
from imgpipe.web import READINESS
from pydantic import SecretStr

from tests.isolated import BrokerProxy
from tests.stack import AMQP_URL, free_port


def test_topology_names() -> None:
    topology = Topology("ns")
    assert topology.jobs_exchange == "ns.jobs"
    assert topology.jobs_queue == "ns.jobs"
    assert topology.retry_exchange == "ns.retry"
    assert topology.dead_exchange == "ns.dead"
    assert topology.dead_queue == "ns.jobs.dead"
    assert topology.retry_queue(30) == "ns.jobs.wait.30s"
    assert topology.retry_key(30) == "wait.30"
    assert topology.queue_names() == [
        "ns.jobs",
        "ns.jobs.dead",
        "ns.jobs.wait.1s",
        "ns.jobs.wait.5s",
        "ns.jobs.wait.30s",
        "ns.jobs.wait.120s",
        "ns.reconcile",
    ]
    assert topology.reconcile_exchange == "ns.reconcile"
    assert topology.exchange_names() == ["ns.jobs", "ns.retry", "ns.dead", "ns.reconcile"]


def test_retry_delay_repeats_the_last_value() -> None:
    topology = Topology("ns", retry_delays_s=(1, 5, 30, 120))
    assert [topology.retry_delay(attempt) for attempt in range(1, 7)] == [1, 5, 30, 120, 120, 120]
    assert topology.retry_delay(0) == 1
    assert Topology("ns", retry_delays_s=(7,)).retry_delay(3) == 7


@pytest.fixture
async def connection() -> AsyncIterator[AbstractRobustConnection]:
    connection = await connect(AMQP_URL)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def topology(namespace: str, connection: AbstractRobustConnection) -> AsyncIterator[Topology]:
    topology = Topology(f"{namespace}-broker-{uuid.uuid4().hex[:8]}", retry_delays_s=(1, 2))
    try:
        yield topology
    finally:
        channel = await connection.channel()
        for name in topology.queue_names():
            await channel.queue_delete(name)
        for name in topology.exchange_names():
            await channel.exchange_delete(name)
        await channel.close()


@pytest.fixture
async def publisher(connection: AbstractRobustConnection, topology: Topology) -> AsyncIterator[Publisher]:
    publisher = Publisher(connection, topology)
    try:
        yield publisher
    finally:
        await publisher.close()


def _job(request_id: str | None = "req-1") -> JobMessage:
    return JobMessage(
        id=uuid.uuid4().hex,
        owner="alice",
        source=KeySource(key="uploads/o/k"),
        variants=[PRESETS["thumb"]],
        request_id=request_id,
        created_at=datetime.now(UTC),
    )


async def _get(queue: AbstractQueue, within: float = 5.0) -> AbstractIncomingMessage:
    """The next message of `queue`, polling (basic.get) for up to `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            message = await queue.get(no_ack=False, fail=False)
            if message is not None:
                return message
            await asyncio.sleep(0.05)


async def _count(connection: AbstractRobustConnection, name: str) -> int:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count
    finally:
        await channel.close()


async def _queue(connection: AbstractRobustConnection, name: str) -> AbstractQueue:
    channel = await connection.channel()
    return await channel.declare_queue(name, passive=True)


async def test_declare_is_idempotent_and_jobs_is_a_quorum_queue(
    connection: AbstractRobustConnection, topology: Topology
) -> None:
    channel = await connection.channel()
    await topology.declare(channel)
    await topology.declare(channel)  # same arguments: no PRECONDITION_FAILED
    other = await connection.channel()
    await topology.declare(other)
    for name in topology.queue_names():
        await channel.declare_queue(name, passive=True)
    for name in topology.exchange_names():
        await channel.declare_exchange(name, passive=True)

    # A classic queue of the same name cannot be declared over it.
    probe = await connection.channel()
    classic = {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": topology.dead_exchange,
        "x-delivery-limit": DELIVERY_LIMIT,
    }
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-queue-type"):
        await probe.declare_queue(topology.jobs_queue, durable=True, arguments=classic)

    await channel.close()
    await other.close()
    # The arguments as the broker holds them: AMQP has no way to read them back.
    if not shutil.which("rabbitmqctl"):
        pytest.skip("no rabbitmqctl here to read the queues' arguments back")
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *("list_queues", "name", "type", "arguments", "-q", "--formatter", "json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await proc.communicate()
    if proc.returncode != 0:  # e.g. not run as root or rabbitmq
        pytest.skip(f"rabbitmqctl list_queues failed: {stderr.decode()[:200]}")
    queues = {q["name"]: q for q in json.loads(stdout)}
    for name in topology.queue_names():
        assert queues[name]["type"] == "quorum", queues[name]
    arguments = {arg[0]: arg[-1] for arg in queues[topology.jobs_queue]["arguments"]}
    assert arguments["x-dead-letter-exchange"] == topology.dead_exchange
    assert arguments["x-delivery-limit"] == DELIVERY_LIMIT
    retry = {arg[0]: arg[-1] for arg in queues[topology.retry_queue(2)]["arguments"]}
    assert retry["x-message-ttl"] == 2000
    assert retry["x-dead-letter-exchange"] == topology.jobs_exchange
    # At least once (which RabbitMQ takes only with reject-publish): an expired retry that the jobs
    # queue cannot take is kept and sent again, not dropped. Shown by hand (about 3 minutes a try):
    # bench/README.md, twenty-sixth round.
    assert (retry["x-dead-letter-strategy"], retry["x-overflow"]) == ("at-least-once", "reject-publish")


async def test_publish_job(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    job = _job()
    await publisher.publish_job(job)
    message = await _get(await _queue(connection, topology.jobs_queue))
    await message.ack()
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == job.id
    assert message.content_type == "application/json"
    assert message.headers[ATTEMPT_HEADER] == 1
    assert message.headers[REQUEST_ID_HEADER] == "req-1"
    assert JobMessage.model_validate_json(message.body) == job
    assert await _count(connection, topology.jobs_queue) == 0

    anonymous = _job(request_id=None)
    await publisher.publish_job(anonymous, attempt=3)
    message = await _get(await _queue(connection, topology.jobs_queue))
    await message.ack()
    assert message.headers[ATTEMPT_HEADER] == 3
    assert REQUEST_ID_HEADER not in message.headers


async def test_queue_counts_and_waiting_ask_the_broker_each_time(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    """A robust channel answers `declare_queue(passive=True)` with the queue it declared before,
    counts and all, without asking: `queue_counts` asks, on the same channel, every time."""
    channel = await connection.channel()
    try:
        await topology.declare(channel)
        assert await queue_counts(channel, topology.jobs_queue) == (0, 0)
        await publisher.publish_job(_job())
        await publisher.publish_retry(_job().model_dump_json().encode(), {}, message_id="r", attempt=2)
        stale = await channel.declare_queue(topology.jobs_queue, passive=True)
        assert stale.declaration_result.message_count == 0  # what the cache says
        assert await queue_counts(channel, topology.jobs_queue) == (1, 0)
        assert await publisher.waiting() == Waiting(ready=1, retrying=1, consumers=0)
        queue = await channel.get_queue(topology.jobs_queue, ensure=False)

        async def hold(message: AbstractIncomingMessage) -> None:  # takes it, never acknowledges
            pass

        await queue.consume(hold)
        async with asyncio.timeout(5):
            while (await queue_counts(channel, topology.jobs_queue)) != (0, 1):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert (await publisher.waiting()).consumers == 1
    finally:
        await channel.close()


async def test_open_declares_the_topology_before_any_publish(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    await publisher.open()
    channel = await connection.channel()
    for name in topology.queue_names():
        await channel.declare_queue(name, passive=True)  # a missing one closes the channel with 404
    await channel.close()


async def test_a_closed_channel_is_replaced_with_its_exchanges(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    """The exchanges kept from one channel are not used on the next one."""
    await publisher.publish_job(_job())
    queue = await _queue(connection, topology.jobs_queue)
    await (await _get(queue)).ack()
    assert publisher._channel is not None
    await publisher._channel.close()  # as a channel error would close it

    job = _job()
    await publisher.publish_job(job)
    message = await _get(queue)
    await message.ack()
    assert message.message_id == job.id


def _open_channels(connection: AbstractRobustConnection) -> int:
    assert connection.transport is not None
    return sum(1 for channel in connection.transport.connection.channels.values() if not channel.is_closed)


async def test_a_publish_timed_out_while_opening_its_channel_leaves_no_channel(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    """A broker slow to open the channel and declare the topology (an alarm, a leader election)
    fails the publish at its deadline; the channel it was opening must not outlive it. A robust
    channel left behind would be reopened and re-declared on every reconnect, one more for every
    publish refused that way, until the connection's channel limit."""
    before = _open_channels(connection)
    refused = 0
    for _ in range(10):
        try:
            await publisher.publish_job(_job(), timeout_s=0.002)
        except TimeoutError:
            refused += 1
    assert refused
    await asyncio.sleep(1.5)  # a robust channel closed under it reopens at once
    # At most the one channel the publisher keeps, should a publish have opened it in time.
    assert _open_channels(connection) - before <= 1
    await publisher.publish_job(_job())  # and a publish in normal time works as before
    assert _open_channels(connection) - before == 1


async def test_a_publish_tried_again_while_the_broker_reads_nothing_is_sent_once(
    connection: AbstractRobustConnection, topology: Topology
) -> None:
    """A broker in a resource alarm stops reading the connection, confirms and all, while it stays
    up. Every try of a retry loop (the worker settling a retry) that timed out put one more copy
    in the socket, and every copy reached the queue once the broker read again: each one then run
    as the job's next attempt."""
    proxy = BrokerProxy()
    await proxy.start()
    stalled = robust_connection(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    await keep_connecting(stalled)
    publisher = Publisher(stalled, topology)
    try:
        await publisher.open()
        job = _job()
        body = job.model_dump_json().encode()
        headers = {REQUEST_ID_HEADER: "req-1", "x-seen": [{"count": 1}]}  # tables, as a dead letter's
        proxy.stall()
        for _ in range(4):
            with pytest.raises(TimeoutError):
                await publisher.publish_retry(body, headers, message_id=job.id, attempt=1, timeout_s=0.3)
        proxy.resume()
        # The next try waits for the send under way; once the broker has the message it is told so.
        assert await publisher.publish_retry(body, headers, message_id=job.id, attempt=1) == 1
        assert await publisher.publish_retry(body, headers, message_id=job.id, attempt=1) == 1  # kept
        # Another message (the next attempt's retry) is its own send.
        assert await publisher.publish_retry(body, headers, message_id=job.id, attempt=2) == 2
        await asyncio.sleep(1.5)  # the first one's 1 s wait
        assert await _count(connection, topology.jobs_queue) == 1
        assert await _count(connection, topology.retry_queue(2)) == 1
    finally:
        await publisher.close()
        await stalled.close()
        await proxy.cut()


class _HeldSends(Publisher):
    """A publisher whose sends wait on `gate` instead of a broker: when a confirm lands is the test's."""

    def __init__(self) -> None:
        super().__init__(None, Topology("held"))  # type: ignore[arg-type]  # no connection is used
        self.sent = 0
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def connected(self) -> bool:
        return True

    async def _send(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        self.sent += 1
        await self.gate


async def test_a_send_confirmed_as_its_deadline_falls_is_not_sent_again() -> None:
    """The confirm and the deadline in one pass of the loop: the caller was told it timed out, the
    send was forgotten as one nobody had given up on, and the caller's next try sent a copy."""
    for _ in range(20):
        publisher = _HeldSends()
        asyncio.get_running_loop().call_later(0.02, publisher.gate.set_result, None)
        try:
            await publisher.publish_dead(b"{}", {}, message_id="m", reason="r", timeout_s=0.02)
        except TimeoutError:
            await asyncio.sleep(0.01)  # a retry loop's pause
            await publisher.publish_dead(b"{}", {}, message_id="m", reason="r", timeout_s=1)
        finally:
            await publisher.close()
        assert publisher.sent == 1


async def test_a_send_ended_by_close_is_broker_unavailable_to_its_caller() -> None:
    """`close` cancels the sends under way; their callers, whom nobody cancelled, were handed the
    cancellation (a worker's settling loop then ended as if shut down)."""
    publisher = _HeldSends()
    caller = asyncio.create_task(publisher.publish_dead(b"{}", {}, message_id="m", reason="r", timeout_s=30))
    await asyncio.sleep(0.01)
    await publisher.close()
    with pytest.raises(BrokerUnavailable, match="closed"):
        await caller


async def test_publish_retry_comes_back_after_the_delay(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    job = _job()
    body = job.model_dump_json().encode()
    delay = await publisher.publish_retry(
        body, {REQUEST_ID_HEADER: "req-1", ATTEMPT_HEADER: 1}, message_id=job.id, attempt=1
    )
    assert delay == 1
    assert await _count(connection, topology.retry_queue(1)) == 1
    assert await _count(connection, topology.jobs_queue) == 0

    message = await _get(await _queue(connection, topology.jobs_queue), within=10)
    await message.ack()
    assert message.body == body
    assert message.message_id == job.id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers[ATTEMPT_HEADER] == 2
    assert message.headers[REQUEST_ID_HEADER] == "req-1"
    assert await _count(connection, topology.retry_queue(1)) == 0

    # The last configured delay repeats.
    assert await publisher.publish_retry(body, {}, message_id=job.id, attempt=5) == 2
    assert await _count(connection, topology.retry_queue(2)) == 1
    await (await _get(await _queue(connection, topology.jobs_queue), within=10)).ack()


async def test_an_upgrade_keeps_the_old_retry_queues_apart(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    """A namespace an earlier version declared: its retry queues (at most once, under the old
    names and keys) make the new declaration fail nothing, and a new retry goes to the new queue
    alone, while what the old one holds still comes back to the jobs queue."""
    channel = await connection.channel()
    retry = await channel.declare_exchange(
        topology.retry_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    old = await channel.declare_queue(
        f"{topology.namespace}.jobs.retry.1s",
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-message-ttl": 1000,
            "x-dead-letter-exchange": topology.jobs_exchange,
            "x-dead-letter-routing-key": JOB_ROUTING_KEY,
        },
    )
    await old.bind(retry, "1")
    try:
        await topology.declare(await connection.channel())
        await retry.publish(aio_pika.Message(b"parked before the upgrade", message_id="old"), routing_key="1")
        await publisher.publish_retry(b"parked after it", {}, message_id="new", attempt=1)
        assert await _count(connection, topology.retry_queue(1)) == 1
        assert await _count(connection, old.name) == 1
        jobs = await _queue(connection, topology.jobs_queue)
        arrived = set()
        for _ in range(2):
            message = await _get(jobs, within=10)
            await message.ack()
            arrived.add(message.message_id)
        assert arrived == {"old", "new"}
        await asyncio.sleep(0.3)
        assert await jobs.get(fail=False) is None  # each once
    finally:
        await channel.queue_delete(old.name)
        await channel.close()


# Every exchange and queue as released versions declare them. RabbitMQ refuses a declaration whose
# type or arguments differ from those of what exists (PRECONDITION_FAILED), and with it every service
# of an upgrade, or of a rollback, that meets the other version's topology. Never edit an entry: a
# queue or exchange with new arguments needs a new name (as `jobs.wait.<d>s` replaced
# `jobs.retry.<d>s`), and the entry for the new name is added here.
_RELEASED_EXCHANGES = {"jobs": "direct", "retry": "direct", "dead": "fanout", "reconcile": "direct"}
_RELEASED_QUEUES: dict[str, dict[str, object]] = {
    "jobs": {"x-queue-type": "quorum", "x-dead-letter-exchange": "{ns}.dead", "x-delivery-limit": 10},
    "jobs.dead": {"x-queue-type": "quorum"},
    **{
        f"jobs.wait.{d}s": {
            "x-queue-type": "quorum",
            "x-message-ttl": d * 1000,
            "x-dead-letter-exchange": "{ns}.jobs",
            "x-dead-letter-routing-key": "job",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        for d in (1, 2, 5, 30, 120)
    },
    "reconcile": {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": "{ns}.dead",
        "x-delivery-limit": 10,
    },
}


async def test_the_topology_declares_over_what_released_versions_declared(
    connection: AbstractRobustConnection, topology: Topology
) -> None:
    # The default delays and the fixture's, in the fixture's namespace (which it cleans up).
    every = Topology(
        topology.namespace, retry_delays_s=(*Topology("x").retry_delays_s, *topology.retry_delays_s)
    )
    ns = every.namespace
    channel = await connection.channel()
    try:
        for name, kind in _RELEASED_EXCHANGES.items():
            await channel.declare_exchange(f"{ns}.{name}", aio_pika.ExchangeType(kind), durable=True)
        for name in every.queue_names():
            released = _RELEASED_QUEUES.get(name.removeprefix(f"{ns}."))
            assert released is not None, f"{name}: no release declared it yet; add it to _RELEASED_QUEUES"
            arguments = {k: v.format(ns=ns) if isinstance(v, str) else v for k, v in released.items()}
            await channel.declare_queue(name, durable=True, arguments=arguments)
        # This version's declarations over them: any difference is PRECONDITION_FAILED here.
        await every.declare(await connection.channel())
    finally:
        cleanup = await connection.channel()
        for name in every.queue_names():
            await cleanup.queue_delete(name)
        await cleanup.close()


async def test_publish_dead(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    job = _job()
    body = job.model_dump_json().encode()
    await publisher.publish_dead(
        body, {ATTEMPT_HEADER: 5}, message_id=job.id, reason="storage_unavailable: " + "x" * 1000
    )
    message = await _get(await _queue(connection, topology.dead_queue))
    await message.ack()
    assert message.body == body
    assert message.message_id == job.id
    assert message.headers[REASON_HEADER].startswith("storage_unavailable: ")
    assert len(message.headers[REASON_HEADER]) == 512
    assert message.headers[ATTEMPT_HEADER] == 5
    assert await _count(connection, topology.jobs_queue) == 0


async def test_rejected_job_is_dead_lettered(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    job = _job()
    await publisher.publish_job(job)
    message = await _get(await _queue(connection, topology.jobs_queue))
    await message.reject(requeue=False)
    dead = await _get(await _queue(connection, topology.dead_queue))
    await dead.ack()
    assert dead.message_id == job.id
    assert JobMessage.model_validate_json(dead.body) == job
    assert dead.headers["x-death"][0]["reason"] == "rejected"
    assert await _count(connection, topology.jobs_queue) == 0


async def test_a_message_redelivered_past_the_limit_is_dead_lettered(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    """One that kills its consumer every time (returned to the queue, never settled) ends in the
    dead-letter queue after DELIVERY_LIMIT redeliveries, instead of circling for ever."""
    job = _job()
    await publisher.publish_job(job)
    queue = await _queue(connection, topology.jobs_queue)
    returned = 0
    async with asyncio.timeout(60):
        while await _count(connection, topology.dead_queue) == 0:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.nack(requeue=True)
            returned += 1
    assert returned == DELIVERY_LIMIT + 1  # the first delivery and DELIVERY_LIMIT more
    dead = await _get(await _queue(connection, topology.dead_queue))
    await dead.ack()
    assert dead.message_id == job.id
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
    assert await _count(connection, topology.jobs_queue) == 0


async def test_unroutable_publish_raises(
    connection: AbstractRobustConnection, topology: Topology, publisher: Publisher
) -> None:
    """A job that no queue would keep is an error for the caller, not a silent drop."""
    await publisher.publish_job(_job())  # declares the topology
    await (await _get(await _queue(connection, topology.jobs_queue))).ack()
    channel = await connection.channel()
    await channel.queue_delete(topology.jobs_queue)
    await channel.close()
    with pytest.raises(aio_pika.exceptions.DeliveryError):
        await publisher._publish(topology.jobs_exchange, "job", b"{}", {}, message_id="x", timeout_s=5)


async def _until(condition: Callable[[], bool], within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def _publish_once_reconnected(connection: AbstractRobustConnection, publisher: Publisher) -> JobMessage:
    """Wait for the connection to come back, then publish a job as soon as the publisher can."""
    async with asyncio.timeout(30):
        await connection.ready()
    job = _job()
    async with asyncio.timeout(30):  # the restored channel may still be re-declaring
        while True:
            try:
                await publisher.publish_job(job)
                return job
            except BrokerUnavailable:
                await asyncio.sleep(0.1)


async def test_publish_fails_fast_while_not_connected(topology: Topology) -> None:
    """No broker yet: a publish says so at once, instead of waiting out its timeout."""
    closed = free_port()  # nothing listens there
    connection = robust_connection(f"amqp://guest:guest@127.0.0.1:{closed}/")
    connecting = asyncio.create_task(keep_connecting(connection, timeout_s=1))
    publisher = Publisher(connection, topology)
    try:
        assert not publisher.connected
        async with asyncio.timeout(5):  # the publish's own timeout is 60 s
            with pytest.raises(BrokerUnavailable):
                await publisher.publish_job(_job(), timeout_s=60)
        assert not connecting.done()  # still trying in the background
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await publisher.close()
        await connection.close()


async def test_publisher_refuses_during_a_reconnect_and_publishes_after(topology: Topology) -> None:
    connection = robust_connection(AMQP_URL)
    await keep_connecting(connection)
    publisher = Publisher(connection, topology)
    try:
        await publisher.publish_job(_job())
        queue = await _queue(connection, topology.jobs_queue)
        await (await _get(queue)).ack()

        # Drop the connection from our side (the shared broker is left alone); it reconnects by itself.
        assert connection.transport is not None
        await connection.transport.connection.close(ConnectionResetError("connection lost"))
        await _until(lambda: not publisher.connected, within=5)
        refused = _job()
        with pytest.raises(BrokerUnavailable):
            await publisher.publish_job(refused, timeout_s=60)

        job = await _publish_once_reconnected(connection, publisher)
        message = await _get(await _queue(connection, topology.jobs_queue))
        await message.ack()
        assert message.message_id == job.id  # the refused one was never sent
        assert await _count(connection, topology.jobs_queue) == 0
    finally:
        await publisher.close()
        await connection.close()


async def test_a_consumer_cancelled_while_disconnected_is_not_restored(topology: Topology) -> None:
    """A worker told to stop while the broker is away must not take new jobs once it is back."""
    connection = robust_connection(AMQP_URL, reconnect_interval_s=1)
    await keep_connecting(connection)
    publisher = Publisher(connection, topology)
    delivered: list[AbstractIncomingMessage] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        delivered.append(message)

    try:
        await publisher.open()
        subscription = await subscribe(connection, topology, topology.jobs_queue, on_message, prefetch=2)
        assert connection.transport is not None
        await connection.transport.connection.close(ConnectionResetError("connection lost"))
        await _until(lambda: not subscription.active, within=5)
        await subscription.cancel()

        await _publish_once_reconnected(connection, publisher)
        await asyncio.sleep(1.0)  # time enough for a restored consumer to get it
        assert delivered == []
        assert await _count(connection, topology.jobs_queue) == 1
    finally:
        await publisher.close()
        await connection.close()


async def test_a_timestamp_past_the_year_9999_does_not_close_the_connection(
    connection: AbstractRobustConnection,
    topology: Topology,
    publisher: Publisher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AMQP's timestamp is any 64-bit number: one in microseconds was a frame pamqp could not
    decode, and every delivery of it closed the consumer's connection."""
    stamp = datetime(2001, 1, 1, tzinfo=UTC)  # stands for the raw value in the encoder below
    plain = pamqp.encode.timestamp

    def microseconds(value: object) -> bytes:
        return struct.pack(">Q", 1_700_000_000_000_000) if value == stamp else plain(value)

    # The hostile message is made with our own client, whose encoder writes datetimes only.
    monkeypatch.setitem(pamqp.encode.METHODS, "timestamp", microseconds)
    await publisher.open()
    exchange = await (await connection.channel()).get_exchange(topology.jobs_exchange)
    await exchange.publish(aio_pika.Message(b"stamped", message_id="m1", timestamp=stamp), routing_key="job")
    await publisher.publish_job(_job())
    jobs = await _queue(connection, topology.jobs_queue)
    stamped = await _get(jobs)
    assert (stamped.message_id, stamped.timestamp) == ("m1", None)
    await stamped.ack()
    await (await _get(jobs)).ack()  # the same connection and channel go on
    assert is_up(connection)


async def test_the_connections_are_closed_even_when_the_publisher_s_close_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Left open, a robust connection went on reconnecting after shutdown, and its reconnection
    swallows the cancellation aiohttp sends every task left at the end: the process did not exit."""
    app = web.Application()
    app[READINESS] = {}
    settings = AmqpSettings(amqp_url=SecretStr(AMQP_URL))
    ctx = resources.amqp(settings, f"close-{uuid.uuid4().hex[:8]}", consume=True)(app)
    await ctx.__anext__()
    consuming, publisher = app[resources.AMQP], app[resources.PUBLISHER]
    async with asyncio.timeout(10):
        await consuming.connected.wait()

    async def broken_close() -> None:
        raise RuntimeError("the publisher's channel was in a bad state")

    monkeypatch.setattr(publisher, "close", broken_close)
    with pytest.raises(RuntimeError, match="bad state"):
        await ctx.__anext__()
    assert consuming.is_closed
