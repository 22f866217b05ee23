"""The reconcile-command consumer in-process, against the real RabbitMQ, Redis and the moto S3."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from imgpipe import broker
from imgpipe.models import ReconcileCommand
from imgpipe.runs import RunStore
from imgpipe.storage import Storage
from imgpipe.store import JobStore, owner_id
from imgpipe_reconciler.consumer import CommandConsumer
from imgpipe_reconciler.lock import RunLock
from imgpipe_reconciler.reconcile import Policy, Reconciler, Summary
from prometheus_client import REGISTRY

from tests.isolated import queue_depth
from tests.reconciler.conftest import keys
from tests.reconciler.test_reconcile import _reconciler
from tests.stack import AMQP_URL, free_port
from tests.worker.test_consumer import eventually


async def test_a_run_that_cannot_be_recorded_does_not_hold_back_the_next(
    store: JobStore,
    storage: Storage,
    publisher: broker.Publisher,
    redis_client: aioredis.Redis,
    rc_namespace: str,
) -> None:
    # The run records go to a Redis that refuses connections; the runs themselves work.
    unreachable = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    connection = await broker.connect(AMQP_URL)
    consumer = CommandConsumer(
        connection,
        publisher.topology,
        _reconciler(store, storage, publisher),
        RunLock(redis_client, rc_namespace, ttl_s=30),
        RunStore(unreachable, rc_namespace),
    )
    queue = publisher.topology.reconcile_queue
    try:
        await consumer.start()
        await eventually(lambda: consumer.consuming)
        # An admin's: a second tick queued behind the first would be skipped rather than run.
        for run in ("first", "second"):
            await publisher.publish_reconcile(ReconcileCommand(run_id=run, dry_run=True, trigger="admin"))

        async def both_done() -> bool:
            # Prefetch 1: the second leaves the queue only once the first is acknowledged.
            return await queue_depth(queue) == 0 and not consumer._tasks

        await eventually(both_done, within=30)
    finally:
        await consumer.stop()
        await connection.close()
        await unreachable.aclose()
    assert await queue_depth(queue) == 0, "a command was left unacknowledged and came back"


@asynccontextmanager
async def _taken_unacknowledged(queue: str) -> AsyncIterator[None]:
    """Another replica takes the queue's next message and never acknowledges it: the broker hands it
    back, redelivered, when the context ends (that replica's connection closes)."""
    replica = await aio_pika.connect(AMQP_URL)
    async with replica:
        channel = await replica.channel()
        await channel.set_qos(prefetch_count=1)
        taken: asyncio.Queue[object] = asyncio.Queue()
        await (await channel.get_queue(queue, ensure=False)).consume(taken.put)
        await asyncio.wait_for(taken.get(), 5)
        yield


async def test_a_command_whose_run_died_holding_the_lock_runs_when_the_lock_lapses(
    store: JobStore,
    storage: Storage,
    publisher: broker.Publisher,
    redis_client: aioredis.Redis,
    rc_namespace: str,
) -> None:
    """A replica is killed mid-run: the broker hands its command to the next consumer at once, while
    the dead run's lock still has its TTL to live. The command must wait for it, not be recorded as
    skipped and acknowledged, which would drop a run that never happened."""
    lock = RunLock(redis_client, rc_namespace, ttl_s=2)
    runs = RunStore(redis_client, rc_namespace)
    queue = publisher.topology.reconcile_queue
    await publisher.publish_reconcile(ReconcileCommand(run_id="orphaned", dry_run=True))
    # The first replica: takes the command and the lock, then dies (its channel closes, no ack).
    async with _taken_unacknowledged(queue):
        await redis_client.set(lock.key, "the-dead-replica", px=2000)
    connection = await broker.connect(AMQP_URL)
    consumer = CommandConsumer(
        connection, publisher.topology, _reconciler(store, storage, publisher), lock, runs
    )
    try:
        await consumer.start()

        async def finished() -> str | None:
            record = await runs.get("orphaned")
            status = record.status if record is not None else None
            return status if status in ("succeeded", "skipped", "failed") else None

        assert await eventually(finished, within=20) == "succeeded"
    finally:
        await consumer.stop()
        await connection.close()
    assert await queue_depth(queue) == 0


async def test_a_redelivered_command_that_waits_out_a_running_run_is_skipped_once(
    store: JobStore,
    storage: Storage,
    publisher: broker.Publisher,
    redis_client: aioredis.Redis,
    rc_namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A redelivered command tries for the lock for its TTL; the run holding it outlasts that. The
    command is `skipped` once, in the run record, the metric and the log, not once per try."""
    lock = RunLock(redis_client, rc_namespace, ttl_s=2)  # tries for 3 s: at least 3 tries
    runs = RunStore(redis_client, rc_namespace)
    queue = publisher.topology.reconcile_queue
    await publisher.publish_reconcile(ReconcileCommand(run_id="copy", dry_run=True))
    # Taken once and handed back unacknowledged: the consumer below gets it redelivered.
    async with _taken_unacknowledged(queue):
        pass
    # The run still going, somewhere else: it holds the lock for longer than the command waits.
    await redis_client.set(lock.key, "the-first-run", px=60_000)
    skipped = {"result": "skipped", "dry_run": "true"}
    before = REGISTRY.get_sample_value("imgpipe_reconcile_runs_total", skipped) or 0.0
    connection = await broker.connect(AMQP_URL)
    consumer = CommandConsumer(
        connection, publisher.topology, _reconciler(store, storage, publisher), lock, runs
    )
    try:
        with caplog.at_level(logging.INFO, logger="imgpipe.reconciler"):
            await consumer.start()

            async def given_up() -> bool:
                record = await runs.get("copy")
                return record is not None and record.status == "skipped" and not consumer._tasks

            await eventually(given_up, within=20)
    finally:
        await consumer.stop()
        await connection.close()
        await redis_client.delete(lock.key)
    assert (REGISTRY.get_sample_value("imgpipe_reconcile_runs_total", skipped) or 0.0) - before == 1
    said = [r for r in caplog.records if r.getMessage().startswith("reconciliation skipped")]
    assert [r.run_id for r in said] == ["copy"]  # type: ignore[attr-defined]
    record = await runs.get("copy")
    assert record is not None and record.error == "another reconciliation was running"
    assert await queue_depth(queue) == 0  # acknowledged


async def test_a_redelivered_command_whose_first_run_ends_while_it_waits_does_not_run_again(
    store: JobStore,
    storage: Storage,
    publisher: broker.Publisher,
    redis_client: aioredis.Redis,
    rc_namespace: str,
    s3: Any,
    bucket: str,
) -> None:
    """The consuming connection drops mid-run: the command comes back, redelivered, and waits for the
    lock its own first run holds. That run then ends; the copy took the lock and ran the tick again,
    and its record (`deleted: 0`) replaced the first run's summary."""
    lock = RunLock(redis_client, rc_namespace, ttl_s=10)
    runs = RunStore(redis_client, rc_namespace)
    queue = publisher.topology.reconcile_queue
    command = ReconcileCommand(run_id="tick-1", dry_run=False)
    await publisher.publish_reconcile(command)
    async with _taken_unacknowledged(queue):  # the first run's channel closes: redelivered
        await runs.update(command, "running")
        await redis_client.set(lock.key, "the-first-run", px=10_000)
    orphan = f"uploads/{owner_id('alice')}/left-behind"
    s3.put_object(Bucket=bucket, Key=orphan, Body=b"x")  # the next tick's to delete, not this one's
    connection = await broker.connect(AMQP_URL)
    consumer = CommandConsumer(
        connection, publisher.topology, _reconciler(store, storage, publisher), lock, runs
    )
    try:
        await consumer.start()
        await eventually(lambda: consumer._tasks)  # the copy, waiting for the lock
        await asyncio.sleep(1.5)
        await runs.update(command, "succeeded", summary={"deleted": 3})  # the first run ends
        await redis_client.delete(lock.key)
        await eventually(lambda: not consumer._tasks, within=20)
    finally:
        await consumer.stop()
        await connection.close()
    record = await runs.get("tick-1")
    assert record is not None and (record.status, record.summary) == ("succeeded", {"deleted": 3})
    assert orphan in keys(s3, bucket)
    assert await queue_depth(queue) == 0  # acknowledged


class _HeldReconciler(Reconciler):
    """The real reconciler, whose runs wait until `release` is set; it counts them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs = 0
        self.running = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, **kwargs: Any) -> Summary:
        self.runs += 1
        self.running.set()
        await self.release.wait()
        return await super().run(**kwargs)


async def test_ticks_that_come_up_during_a_run_are_skipped_not_queued_for_later(
    store: JobStore,
    storage: Storage,
    publisher: broker.Publisher,
    redis_client: aioredis.Redis,
    rc_namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run outlasts the schedule's interval. Prefetch 1 kept the ticks that came up meanwhile in
    the queue until the run was acknowledged, its lock released by then: each became a full run,
    back to back, and a backlog that grew without end. They are `skipped`; an admin's run is not."""
    policy = Policy(grace_s=0.0, stuck_pending_s=3600.0, stuck_processing_s=3600.0)
    reconciler = _HeldReconciler(store, storage, publisher, policy)
    runs = RunStore(redis_client, rc_namespace)
    queue = publisher.topology.reconcile_queue
    skipped = {"result": "skipped", "dry_run": "true"}
    before = REGISTRY.get_sample_value("imgpipe_reconcile_runs_total", skipped) or 0.0
    connection = await broker.connect(AMQP_URL)
    consumer = CommandConsumer(
        connection, publisher.topology, reconciler, RunLock(redis_client, rc_namespace, ttl_s=30), runs
    )

    async def status(run_id: str) -> str | None:
        record = await runs.get(run_id)
        return record.status if record is not None else None

    async def done(*run_ids: str) -> bool:
        statuses = [await status(run_id) for run_id in run_ids]
        return all(s in ("succeeded", "skipped", "failed") for s in statuses) and not consumer._tasks

    try:
        caplog.set_level(logging.INFO, logger="imgpipe.reconciler")
        await consumer.start()
        await publisher.publish_reconcile(ReconcileCommand(run_id="scheduled-1", dry_run=True))
        await asyncio.wait_for(reconciler.running.wait(), 10)
        # Two ticks come up while the run goes on, and an admin asks for one too.
        await publisher.publish_reconcile(ReconcileCommand(run_id="scheduled-2", dry_run=True))
        await publisher.publish_reconcile(ReconcileCommand(run_id="scheduled-3", dry_run=True))
        await publisher.publish_reconcile(ReconcileCommand(run_id="asked", dry_run=True, trigger="admin"))
        reconciler.release.set()
        await eventually(lambda: done("scheduled-1", "scheduled-2", "scheduled-3", "asked"), within=30)
        # The next tick, once nothing is running, runs.
        await publisher.publish_reconcile(ReconcileCommand(run_id="scheduled-4", dry_run=True))
        await eventually(lambda: done("scheduled-4"), within=30)
    finally:
        await consumer.stop()
        await connection.close()
    assert {run_id: await status(run_id) for run_id in ("scheduled-1", "scheduled-2", "scheduled-3")} == {
        "scheduled-1": "succeeded",
        "scheduled-2": "skipped",
        "scheduled-3": "skipped",
    }
    assert (await status("asked"), await status("scheduled-4")) == ("succeeded", "succeeded")
    assert reconciler.runs == 3
    record = await runs.get("scheduled-2")
    assert record is not None and record.error == "the tick came up while another reconciliation was running"
    assert (REGISTRY.get_sample_value("imgpipe_reconcile_runs_total", skipped) or 0.0) - before == 2
    said = [r for r in caplog.records if r.getMessage().startswith("reconciliation skipped")]
    assert [r.run_id for r in said] == ["scheduled-2", "scheduled-3"]  # type: ignore[attr-defined]
    assert await queue_depth(queue) == 0  # all acknowledged
