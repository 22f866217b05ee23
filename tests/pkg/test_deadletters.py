"""Dead-letter replay in-process, against the real RabbitMQ (through a relay a test can stall) and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection
from imgpipe import broker, deadletters
from imgpipe.deadletters import DeadLetters
from imgpipe.limits import Limits
from imgpipe.models import PRESETS, JobMessage, JobRecord, JobStatus, KeySource
from imgpipe.store import JobStore, Transition

from tests.isolated import BrokerProxy, fresh_namespace
from tests.stack import AMQP_URL, drop_namespace
from tests.worker.test_consumer import eventually


class StallingStore(JobStore):
    """Stalls the broker's relay as soon as a job is reopened: the replay's publish then gets no confirm."""

    proxy: BrokerProxy | None = None

    async def reopen(self, current: JobRecord) -> Transition:
        reopened = await super().reopen(current)
        assert self.proxy is not None
        self.proxy.stall()
        return reopened


@pytest.fixture
async def namespace_() -> AsyncIterator[str]:
    namespace = fresh_namespace()
    yield namespace
    await asyncio.to_thread(drop_namespace, namespace)


async def _failed_job(store: JobStore) -> JobMessage:
    """A job of alice's that failed, its record as the worker leaves it."""
    job = JobMessage(
        id=uuid.uuid4().hex,
        owner="alice",
        source=KeySource(key="uploads/o/k"),
        variants=[PRESETS["thumb"]],
        created_at=datetime.now(UTC),
    )
    created = await store.create(JobRecord.pending(job.id, job.owner, job.source, job.variants))
    assert created.applied and created.record is not None
    assert (await store.mark_failed(created.record, "storage_unavailable", "S3 was away")).applied
    return job


@contextlib.asynccontextmanager
async def _through_a_relay(
    topology: broker.Topology, *, robust: bool = False
) -> AsyncIterator[tuple[broker.Publisher, BrokerProxy, AbstractConnection]]:
    """A publisher straight to RabbitMQ, and a connection through a relay the test can stall or cut."""
    direct = await broker.connect(AMQP_URL)
    publisher = broker.Publisher(direct, topology)
    proxy = BrokerProxy()
    await proxy.start()
    url = AMQP_URL.replace(":5672/", f":{proxy.port}/")
    if robust:
        relayed: AbstractConnection = broker.robust_connection(url)
        await broker.keep_connecting(relayed)  # type: ignore[arg-type]
    else:
        relayed = await broker.connect(url)
    try:
        await publisher.open()
        yield publisher, proxy, relayed
    finally:
        proxy.reset()
        await relayed.close()
        await publisher.close()
        await direct.close()
        await proxy.cut()


async def test_a_replayed_job_takes_its_owners_active_slot_again(
    namespace_: str, redis_client: aioredis.Redis
) -> None:
    topology = broker.Topology(namespace_, (1, 2))
    store = JobStore(redis_client, namespace_, retention=timedelta(hours=1))
    limits = Limits(redis_client, namespace_, ttl_s=3600, calls=store.calls)
    job = await _failed_job(store)  # its slot long given up (the admission prunes failed jobs)
    assert await limits.active_jobs("alice") == 0
    connection = await broker.connect(AMQP_URL)
    publisher = broker.Publisher(connection, topology)
    try:
        await publisher.open()
        await publisher.publish_dead(job.model_dump_json().encode(), {}, message_id=job.id, reason="gave up")
        result = await DeadLetters(connection, topology, store).replay([job.id])
    finally:
        await publisher.close()
        await connection.close()
    assert result.replayed == [job.id]
    assert await limits.active_jobs("alice") == 1
    # Counted as the api counts it: a quota of one is full while the replayed job runs.
    decision = await limits.admit_job("alice", uuid.uuid4().hex, rate_limit=0, period_s=60, max_active=1)
    assert not decision.allowed and decision.code == "too_many_active_jobs"


async def test_a_record_this_release_cannot_read_leaves_the_listing_whole(
    namespace_: str, redis_client: aioredis.Redis
) -> None:
    # A later release's job status (a rollback, a rolling upgrade): the listing failed whole, the
    # api's admin route and the command line with it.
    topology = broker.Topology(namespace_, (1, 2))
    store = JobStore(redis_client, namespace_, retention=timedelta(hours=1))
    jobs = [await _failed_job(store) for _ in range(2)]
    key = store.job_key(jobs[0].id)
    data = (await redis_client.hget(key, "data")).decode().replace('"status":"failed"', '"status":"paused"')
    await redis_client.hset(key, "data", data)
    connection = await broker.connect(AMQP_URL)
    publisher = broker.Publisher(connection, topology)
    try:
        await publisher.open()
        for job in jobs:
            await publisher.publish_dead(
                job.model_dump_json().encode(), {}, message_id=job.id, reason="gave up"
            )
        depth, letters = await DeadLetters(connection, topology, store).list()
    finally:
        await publisher.close()
        await connection.close()
    assert depth == 2
    assert [letter.job_id for letter in letters] == [job.id for job in jobs]


async def test_a_replay_cancelled_before_the_confirm_puts_the_job_back(
    namespace_: str, redis_client: aioredis.Redis
) -> None:
    topology = broker.Topology(namespace_, (1, 2))
    store = StallingStore(redis_client, namespace_, retention=timedelta(hours=1))
    job = await _failed_job(store)

    async with _through_a_relay(topology) as (publisher, proxy, relayed):
        store.proxy = proxy
        body = job.model_dump_json().encode()
        await publisher.publish_dead(body, {}, message_id=job.id, reason="gave up")

        replay = asyncio.create_task(DeadLetters(relayed, topology, store).replay([job.id]))

        async def reopened() -> bool:
            record = await store.get(job.id)
            return record is not None and record.status is JobStatus.PENDING

        await eventually(reopened)
        await asyncio.sleep(0.5)  # the publish is sent, and held by the relay: it never reaches the broker
        assert not replay.done()
        replay.cancel()
        proxy.reset()  # the broker answers again (on new connections), so the browse closes at once
        with pytest.raises(asyncio.CancelledError):
            await replay
        # Failed again, as before the replay: not `pending` with no message behind it.
        record = await store.get(job.id)
        assert record is not None and record.status is JobStatus.FAILED, record
        assert record.error is not None and record.error.code == "storage_unavailable"


async def test_the_browse_lock_is_renewed_while_a_browse_runs(
    namespace_: str, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletters, "LOCK_TTL_S", 1)
    monkeypatch.setattr(deadletters, "LOCK_WAIT_S", 0.3)
    dead = DeadLetters(
        None,  # type: ignore[arg-type]  # no broker: only the lock is used
        broker.Topology(namespace_, (1, 2)),
        JobStore(redis_client, namespace_, retention=timedelta(hours=1)),
    )
    lock = f"{namespace_}:deadletters:lock"
    async with dead._locked():
        await asyncio.sleep(2.5)  # over twice the lock's life
        assert await redis_client.exists(lock) == 1
        with pytest.raises(deadletters.DeadLettersBusy):  # still held: a second browse waits
            async with dead._locked():
                pass
    assert await redis_client.exists(lock) == 0  # released at the end


class SlowHoldLimits(Limits):
    """Its `hold_job` (the step between the reopen and the publish) takes a while, and says so."""

    holding: asyncio.Event

    async def hold_job(self, sub: str, job_id: str) -> None:
        self.holding.set()
        await asyncio.sleep(5)
        await super().hold_job(sub, job_id)


async def test_a_replay_cancelled_between_the_reopen_and_the_publish_puts_the_job_back(
    namespace_: str, redis_client: aioredis.Redis
) -> None:
    """The admin's request goes away after the job is reopened but before its publish is sent: the
    job must be failed again, not left `pending` with no message behind it."""
    topology = broker.Topology(namespace_, (1, 2))
    store = JobStore(redis_client, namespace_, retention=timedelta(hours=1))
    limits = SlowHoldLimits(redis_client, namespace_, ttl_s=3600, calls=store.calls)
    limits.holding = asyncio.Event()
    job = await _failed_job(store)
    connection = await broker.connect(AMQP_URL)
    publisher = broker.Publisher(connection, topology)
    try:
        await publisher.open()
        await publisher.publish_dead(job.model_dump_json().encode(), {}, message_id=job.id, reason="gave up")
        letters = DeadLetters(connection, topology, store)
        letters._limits = limits
        replay = asyncio.create_task(letters.replay([job.id]))
        await asyncio.wait_for(limits.holding.wait(), 10)
        replay.cancel()
        with pytest.raises(asyncio.CancelledError):
            await replay
    finally:
        await publisher.close()
        await connection.close()
    record = await store.get(job.id)
    assert record is not None and record.status is JobStatus.FAILED, record
    assert record.error is not None and record.error.code == "storage_unavailable"


@pytest.mark.parametrize("when", ["opening its second channel", "taking messages"])
async def test_a_browse_cut_short_by_a_lost_connection_leaves_no_channel_behind(
    namespace_: str, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Its channels, closed by the connection's loss and not by their owner (or never open), were
    reopened by the robust connection once it reconnected, and kept for good: in the api, on its
    publishing connection, more for each browse a broker restart interrupted."""
    topology = broker.Topology(namespace_, (1, 2))
    store = JobStore(redis_client, namespace_, retention=timedelta(hours=1))
    async with _through_a_relay(topology, robust=True) as (publisher, proxy, relayed):

        def channels() -> list[int]:
            assert relayed.transport is not None
            return sorted(relayed.transport.connection.channels)

        # The connection drops at a set moment of the browse.
        if when == "taking messages":
            take = deadletters._Session.next

            async def next_then_drop(session: deadletters._Session) -> object:
                if session._taken == 10:
                    proxy.reset()
                return await take(session)

            monkeypatch.setattr(deadletters._Session, "next", next_then_drop)
        else:
            opened = 0
            make = relayed.channel

            def channel_then_drop(*args: object, **kwargs: object) -> object:
                nonlocal opened
                opened += 1
                if opened == 2:
                    proxy.reset()  # made and registered, then its opening fails
                return make(*args, **kwargs)

            monkeypatch.setattr(relayed, "channel", channel_then_drop)
        for n in range(30):
            await publisher.publish_dead(b"{}", {}, message_id=f"m{n}", reason="gave up")
        with pytest.raises(broker.BrokerUnavailable):
            await DeadLetters(relayed, topology, store).list(1000)
        await asyncio.wait_for(relayed.connected.wait(), 10)
        await asyncio.sleep(1)  # what the reconnect restores, it has restored by now
        assert channels() == []
        monkeypatch.undo()
        depth, items = await DeadLetters(relayed, topology, store).list(1000)
        assert depth == len(items) == 30  # none lost
        assert channels() == []
