"""One reconciliation in-process, against the real Redis, RabbitMQ and the moto S3, in a fresh
namespace and bucket: what is referenced, the grace period, dry runs, foreign keys, stuck jobs,
the end of a job's life and the run lock."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from xml.sax.saxutils import escape

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from imgpipe import broker
from imgpipe.models import PRESETS, JobMessage, JobRecord, JobStatus, KeySource, VariantResult, utcnow
from imgpipe.storage import ObjectNotFound, Storage, StorageError
from imgpipe.store import JobStore, SourceDeleted, owner_id
from imgpipe_reconciler.lock import LockBusy, RunLock
from imgpipe_reconciler.reconcile import (
    DELETING_MARK_S,
    NAMESPACE_MARKER,
    BucketTaken,
    Policy,
    Reconciler,
    Summary,
    reconcile_once,
)
from prometheus_client import REGISTRY
from yarl import URL

from tests.isolated import fresh_namespace, queue_depth
from tests.reconciler.conftest import Taker, keys
from tests.stack import AMQP_URL, delete_keys, local_http, s3_settings

OWNER = "alice"
OID = owner_id(OWNER)


def _record(source: str, *, job_id: str | None = None, age_s: float = 0) -> JobRecord:
    at = utcnow() - timedelta(seconds=age_s)
    return JobRecord.pending(
        job_id or uuid.uuid4().hex, OWNER, KeySource(key=source), [PRESETS["thumb"]], at=at
    )


def _reconciler(
    store: JobStore,
    storage: Storage,
    publisher: broker.Publisher,
    *,
    clock: Callable[[], float] = time.time,
    **policy: float,
) -> Reconciler:
    values = {"grace_s": 0.0, "stuck_pending_s": 3600.0, "stuck_processing_s": 3600.0, **policy}
    return Reconciler(store, storage, publisher, Policy(**values), clock=clock)


class Clock:
    """A clock that moves only when a test moves it: how long a run takes changes nothing."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _put(s3: Any, bucket: str, *names: str, size: int = 10) -> None:
    for name in names:
        s3.put_object(Bucket=bucket, Key=name, Body=b"x" * size)


async def test_referenced_young_old_and_foreign(
    store: JobStore, storage: Storage, publisher: broker.Publisher, s3: Any, bucket: str
) -> None:
    job = _record(f"uploads/{OID}/used")
    await store.create(job)
    await store.record_grant(f"uploads/{OID}/granted", time.time() + 900)
    await store.record_grant(f"uploads/{OID}/grant-expired", time.time() - 1)
    referenced = [f"uploads/{OID}/used", f"variants/{OID}/{job.id}/thumb.jpg", f"uploads/{OID}/granted"]
    old_orphans = [
        f"uploads/{OID}/never-submitted",
        f"variants/{OID}/gone-job/thumb.jpg",
        f"uploads/{OID}/grant-expired",
    ]
    foreign = ["backups/db.dump", "uploads/not-our-shape", "variants/a/b", "README"]
    _put(s3, bucket, *referenced, *old_orphans, *foreign, size=100)
    # LastModified is in whole seconds (truncated): the young objects go in a later second than the
    # old ones, and the reconciler's clock stands still at the grace period after the second they
    # share, so how long the runs below take cannot age the young ones into orphans.
    await asyncio.sleep(math.floor(time.time()) + 1.05 - time.time())
    young_second = math.floor(time.time())
    young = [f"uploads/{OID}/just-uploaded", f"variants/{OID}/other-job/thumb.jpg"]
    _put(s3, bucket, *young)
    everything = {*referenced, *old_orphans, *foreign, *young}
    grace_s = 60.0  # well inside the live grant's 900 s, which this clock must not outrun
    reconciler = _reconciler(
        store, storage, publisher, grace_s=grace_s, clock=lambda: young_second - 0.5 + grace_s
    )

    dry = await reconciler.run(dry_run=True)
    assert keys(s3, bucket) == everything  # a dry run deletes nothing
    expected = {"scanned": 12, "referenced": 3, "orphans": 3, "kept_young": 2, "skipped_foreign": 4}
    assert {k: dry.as_dict()[k] for k in expected} == expected
    assert (dry.deleted, dry.bytes_freed, dry.orphan_bytes, dry.dry_run) == (0, 0, 300, True)

    real = await reconciler.run(dry_run=False)
    assert {k: real.as_dict()[k] for k in expected} == expected  # the same counts as the dry run
    assert (real.deleted, real.bytes_freed, real.dry_run) == (real.orphans, 300, False)
    assert keys(s3, bucket) == everything - set(old_orphans)

    again = await reconciler.run(dry_run=False)
    assert (again.orphans, again.deleted, again.scanned) == (0, 0, 9)


async def test_a_bucket_is_one_namespaces(
    store: JobStore, storage: Storage, publisher: broker.Publisher, s3: Any, bucket: str
) -> None:
    orphan = f"uploads/{OID}/never-submitted"
    _put(s3, bucket, orphan)
    reconciler = _reconciler(store, storage, publisher)
    # A dry run claims nothing; the first real run claims the bucket for its namespace.
    await reconciler.run(dry_run=True)
    assert keys(s3, bucket, marker=True) == {orphan}
    first = await reconciler.run(dry_run=False)
    assert (first.deleted, first.scanned) == (1, 1)  # its own marker is neither judged nor counted
    marker = s3.get_object(Bucket=bucket, Key=NAMESPACE_MARKER)["Body"].read()
    assert marker == store.namespace.encode()

    # Another namespace on the same bucket: its Redis references none of the objects, so each one
    # would look orphaned to it. Its runs, dry or not, are refused before anything is judged.
    other = JobStore(store.redis, fresh_namespace(), retention=timedelta(hours=1))
    _put(s3, bucket, orphan)
    for dry_run in (True, False):
        with pytest.raises(BucketTaken, match=store.namespace):
            await _reconciler(other, storage, publisher).run(dry_run=dry_run)
    assert keys(s3, bucket, marker=True) == {orphan, NAMESPACE_MARKER}
    assert (await reconciler.run(dry_run=False)).deleted == 1


async def test_a_job_after_its_retention_leaves_nothing_behind(
    redis_client: aioredis.Redis,
    rc_namespace: str,
    storage: Storage,
    publisher: broker.Publisher,
    s3: Any,
    bucket: str,
) -> None:
    store = JobStore(redis_client, rc_namespace, retention=timedelta(seconds=2))
    source = f"uploads/{OID}/src"
    created = await store.create(_record(source))
    assert created.record is not None
    await store.claim_idempotency(OWNER, "idem-1", created.record.id, "fp")
    taken = await store.mark_processing(created.record.id)
    assert taken.record is not None
    variant = f"variants/{OID}/{created.record.id}/thumb.jpg"
    result = VariantResult(name="thumb", format="jpeg", width=1, height=1, bytes=10, key=variant)
    await store.mark_succeeded(taken.record, [result])
    _put(s3, bucket, source, variant)
    reconciler = _reconciler(store, storage, publisher)

    while_kept = await reconciler.run(dry_run=False)
    assert (while_kept.referenced, while_kept.deleted) == (2, 0)
    # Every key the job left in Redis expires with the record.
    for key in [k async for k in redis_client.scan_iter(f"{rc_namespace}:*")]:
        assert await redis_client.ttl(key) > 0, key

    await asyncio.sleep(2.5)
    assert [k async for k in redis_client.scan_iter(f"{rc_namespace}:*")] == []
    after = await reconciler.run(dry_run=False)
    assert (after.referenced, after.orphans, after.deleted) == (0, 2, 2)
    assert keys(s3, bucket) == set()


async def test_a_stuck_pending_job_is_republished_once_then_failed(
    store: JobStore, storage: Storage, publisher: broker.Publisher, taker: Taker
) -> None:
    # Its message lost: a worker consumes, and nothing waits in the queue.
    job = _record(f"uploads/{OID}/s", age_s=60)
    await store.create(job)
    clock = Clock()
    reconciler = _reconciler(store, storage, publisher, stuck_pending_s=1.0, clock=clock)

    dry = await reconciler.run(dry_run=True)
    assert (dry.stuck_republished, dry.stuck_failed) == (1, 0)
    await asyncio.sleep(0.2)
    assert taker.taken == []  # a dry run publishes nothing

    first = await reconciler.run(dry_run=False)
    assert (first.stuck_republished, first.stuck_failed) == (1, 0)
    await taker.wait_for(1)
    assert [m.id for m in taker.taken] == [job.id]
    second = await reconciler.run(dry_run=False)
    assert (second.stuck_republished, second.stuck_failed) == (0, 0)  # once, not every run

    clock.now += 1.2
    third = await reconciler.run(dry_run=False)
    assert (third.stuck_republished, third.stuck_failed) == (0, 1)
    record = await store.get(job.id)
    assert record is not None and record.status is JobStatus.FAILED
    assert record.error is not None and record.error.code == "timeout"


async def test_a_stuck_processing_job_is_failed_and_a_live_one_is_not(
    store: JobStore, storage: Storage, publisher: broker.Publisher, taker: Taker
) -> None:
    stuck, live = _record(f"uploads/{OID}/a"), _record(f"uploads/{OID}/b")
    for job in (stuck, live):
        await store.create(job)
        await store.mark_processing(job.id)
    moved = await store.get(live.id)
    assert moved is not None
    await store.mark_succeeded(moved, [])
    clock = Clock()
    clock.now += 1.1
    summary = await _reconciler(store, storage, publisher, stuck_processing_s=1.0, clock=clock).run(
        dry_run=False
    )
    assert summary.stuck_failed == 1
    failed, done = await store.get(stuck.id), await store.get(live.id)
    assert failed is not None and failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error.code == "timeout"
    assert done is not None and done.status is JobStatus.SUCCEEDED


def _message(job: JobRecord) -> JobMessage:
    return JobMessage.of(job)


async def test_jobs_waiting_for_the_workers_are_not_taken_for_stuck(
    store: JobStore, storage: Storage, publisher: broker.Publisher, rc_namespace: str
) -> None:
    """A worker outage, then a backlog: the jobs past their window wait their turn in the queue.
    Neither is a lost message, so none is re-published (a duplicate for every one) or failed. (Past
    four windows in a backlog, a pending job is sent again: the next test.)"""
    waiting, behind = _record(f"uploads/{OID}/w", age_s=60), _record(f"uploads/{OID}/b", age_s=60)
    retrying = _record(f"uploads/{OID}/r")
    for job in (waiting, behind, retrying):
        await store.create(job)
        await publisher.publish_job(_message(job))
    await store.mark_processing(retrying.id)  # taken up once; its retry waits in the queue again
    clock = Clock()
    clock.now += 10
    reconciler = _reconciler(
        store, storage, publisher, stuck_pending_s=30.0, stuck_processing_s=1.0, clock=clock
    )

    for _ in range(2):  # no worker consumes: however long that lasts
        outage = await reconciler.run(dry_run=False)
        assert (outage.stuck_republished, outage.stuck_failed, outage.stuck_left_waiting) == (0, 0, 3)
        assert await queue_depth(f"{rc_namespace}.jobs") == 3
        clock.now += 10
    async with Taker(rc_namespace, prefetch=1) as worker:  # one worker, behind: two still wait
        await worker.wait_for(1)
        backlog = await reconciler.run(dry_run=False)
        assert (backlog.stuck_republished, backlog.stuck_failed, backlog.stuck_left_waiting) == (0, 0, 3)
    for job in (waiting, behind, retrying):
        record = await store.get(job.id)
        assert record is not None and not record.status.terminal
    assert await queue_depth(f"{rc_namespace}.jobs") == 3  # and nothing published twice


async def test_a_pending_job_long_in_a_backlog_is_sent_again_once_and_not_failed(
    store: JobStore, storage: Storage, publisher: broker.Publisher, rc_namespace: str
) -> None:
    """On a queue that never drains, a job whose message was lost waited until its record expired:
    it was judged only once nothing waited. Past four windows, while a worker consumes, a pending
    job is sent again anyway, once (a duplicate of one still queued is harmless); failing it still
    waits until nothing does. A job taken up is not sent again: only pending ones are."""
    lost, queued = _record(f"uploads/{OID}/l", age_s=60), _record(f"uploads/{OID}/q", age_s=60)
    retrying = _record(f"uploads/{OID}/r")
    for job in (lost, queued, retrying):
        await store.create(job)
    for job in (queued, retrying):  # the lost job's message never reached the queue
        await publisher.publish_job(_message(job))
    await store.mark_processing(retrying.id)
    await publisher.publish_job(_message(_record(f"uploads/{OID}/x")))  # the backlog: more than one waits
    clock = Clock()
    reconciler = _reconciler(
        store, storage, publisher, stuck_pending_s=20.0, stuck_processing_s=1.0, clock=clock
    )
    async with Taker(rc_namespace, prefetch=1) as worker:  # one worker, behind
        await worker.wait_for(1)
        within = await reconciler.run(dry_run=False)  # 60 s idle: three windows, left waiting
        assert (within.stuck_republished, within.stuck_failed, within.stuck_left_waiting) == (0, 0, 2)
        clock.now += 30  # 90 s: past four windows
        dry = await reconciler.run(dry_run=True)
        assert (dry.stuck_republished, dry.stuck_failed, dry.stuck_left_waiting) == (2, 0, 1)
        past = await reconciler.run(dry_run=False)
        assert (past.stuck_republished, past.stuck_failed, past.stuck_left_waiting) == (2, 0, 1)
        clock.now += 60
        again = await reconciler.run(dry_run=False)  # once: afterwards it waits as before
        assert (again.stuck_republished, again.stuck_failed, again.stuck_left_waiting) == (0, 0, 3)
    # Sent again: the queue holds the two copies besides what it had (one of which the worker holds).
    assert await queue_depth(f"{rc_namespace}.jobs") == 3 + 2
    for job in (lost, queued):
        record = await store.get(job.id)
        assert record is not None and record.status is JobStatus.PENDING


async def test_processing_jobs_are_not_judged_while_a_retry_waits_out_its_back_off(
    store: JobStore, storage: Storage, publisher: broker.Publisher, rc_namespace: str, taker: Taker
) -> None:
    """The jobs queue is empty and a worker consumes, but a retry waits in a back-off queue: it may
    be any processing job's, so none is failed. Pending jobs are never in a retry queue: judged."""
    lost, retrying = _record(f"uploads/{OID}/l", age_s=60), _record(f"uploads/{OID}/r")
    for job in (lost, retrying):
        await store.create(job)
    await store.mark_processing(retrying.id)
    connection = await broker.connect(AMQP_URL)
    try:
        # A 120 s back-off (one of the delays `drop_namespace` removes): still waiting when the run reads.
        slow = broker.Publisher(connection, broker.Topology(rc_namespace, (120,)))
        await slow.publish_retry(
            _message(retrying).model_dump_json().encode(), {}, message_id=retrying.id, attempt=1
        )
        clock = Clock()
        clock.now += 10
        summary = await _reconciler(
            store, storage, slow, stuck_pending_s=1.0, stuck_processing_s=1.0, clock=clock
        ).run(dry_run=False)
        await slow.close()
    finally:
        await connection.close()
    assert (summary.stuck_republished, summary.stuck_failed, summary.stuck_left_waiting) == (1, 0, 1)
    record = await store.get(retrying.id)
    assert record is not None and record.status is JobStatus.PROCESSING
    await taker.wait_for(1)
    assert [m.id for m in taker.taken] == [lost.id]


async def test_a_processing_job_is_timed_from_when_it_was_last_taken_up(
    store: JobStore, storage: Storage, publisher: broker.Publisher, taker: Taker
) -> None:
    """A retry or a redelivery keeps the record as it is (`updated_at` from its first attempt) and
    notes `taken_up_at`: a job on its third attempt after a long wait is not stuck."""
    again, long_ago = _record(f"uploads/{OID}/a"), _record(f"uploads/{OID}/g")
    for job in (again, long_ago):
        await store.create(job)
        await store.mark_processing(job.id)
    clock = Clock()
    clock.now += 10
    await store.redis.hset(store.job_key(again.id), "taken_up_at", repr(clock.now - 0.5))
    await store.redis.hset(store.job_key(long_ago.id), "taken_up_at", repr(clock.now - 2))
    summary = await _reconciler(store, storage, publisher, stuck_processing_s=1.0, clock=clock).run(
        dry_run=False
    )
    assert (summary.stuck_failed, summary.stuck_left_waiting) == (1, 0)
    kept, failed = await store.get(again.id), await store.get(long_ago.id)
    assert kept is not None and kept.status is JobStatus.PROCESSING
    assert failed is not None and failed.status is JobStatus.FAILED


@pytest.mark.parametrize("where", ["claim", "publish"])
async def test_a_republish_cut_short_leaves_no_mark(
    store: JobStore,
    storage: Storage,
    publisher: broker.Publisher,
    taker: Taker,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """A run cancelled inside the re-publish (a shutdown, a lost lock), after its claim was made but
    before its answer came back, or in the publish: the job was not sent again, so no mark may say
    it was (a later run would fail it as one that was)."""
    job = _record(f"uploads/{OID}/c", age_s=60)
    await store.create(job)
    reconciler = _reconciler(store, storage, publisher, stuck_pending_s=1.0)
    claim = reconciler._claim_republish

    async def claimed_then_cut(*args: object, **kwargs: object) -> object:
        await claim(*args, **kwargs)  # made in Redis; the answer never comes back
        raise asyncio.CancelledError

    async def cut(*_: object, **__: object) -> None:
        raise asyncio.CancelledError

    if where == "claim":
        monkeypatch.setattr(reconciler, "_claim_republish", claimed_then_cut)
    else:
        monkeypatch.setattr(publisher, "publish_job", cut)
    with pytest.raises(asyncio.CancelledError):
        await reconciler.run(dry_run=False)
    assert await store.redis.hget(store.job_key(job.id), "republished_at") is None
    monkeypatch.undo()
    again = await _reconciler(store, storage, publisher, stuck_pending_s=1.0).run(dry_run=False)
    assert (again.stuck_republished, again.stuck_failed) == (1, 0)  # published, not failed


async def test_a_claim_asked_again_is_the_same_claim(
    store: JobStore, storage: Storage, publisher: broker.Publisher
) -> None:
    """redis-py sends a command again after a dropped connection: a claim made by the first send
    answers the second as claimed (the run goes on to publish), and no other run's claim does."""
    job = (await store.create(_record(f"uploads/{OID}/d", age_s=60))).record
    assert job is not None
    claim = _reconciler(store, storage, publisher)._claim_republish
    key = store.job_key(job.id)
    assert await claim(keys=[key], args=[job.version, "1000.5"]) == 1
    assert await claim(keys=[key], args=[job.version, "1000.5"]) == 1
    assert await claim(keys=[key], args=[job.version, "2000.5"]) == 0
    assert await store.redis.hget(key, "republished_at") == b"1000.5"


async def test_a_job_taken_up_after_it_was_read_is_not_failed(store: JobStore) -> None:
    job = _record(f"uploads/{OID}/c")
    await store.create(job)
    read = await store.get(job.id)
    assert read is not None
    await store.mark_processing(job.id)  # a worker takes it up in between
    outcome = await store.mark_failed(read, "timeout", "stuck")
    assert not outcome.applied
    assert outcome.record is not None and outcome.record.status is JobStatus.PROCESSING


async def test_records_without_a_source_marker_get_one_back(
    store: JobStore, storage: Storage, publisher: broker.Publisher, s3: Any, bucket: str
) -> None:
    source = f"uploads/{OID}/legacy"
    await store.create(_record(source))
    await store.redis.delete(store.source_marker(source))  # as written before markers existed
    _put(s3, bucket, source)
    summary = await _reconciler(store, storage, publisher).run(dry_run=False)
    assert (summary.markers_restored, summary.referenced, summary.deleted) == (1, 1, 0)
    assert 0 < await store.redis.ttl(store.source_marker(source)) <= 7200


async def test_one_run_at_a_time_and_a_crashed_holder_expires(
    store: JobStore, storage: Storage, publisher: broker.Publisher, rc_namespace: str
) -> None:
    reconciler = _reconciler(store, storage, publisher)
    lock = RunLock(store.redis, rc_namespace, ttl_s=5)
    async with lock.held():
        with pytest.raises(LockBusy):
            await reconcile_once(reconciler, lock, dry_run=True, run_id="r2", trigger="cli")
    # A holder that died without releasing: its lock lapses on its own.
    await store.redis.set(lock.key, "dead-holder", px=1000)  # long enough to still hold at the next line
    with pytest.raises(LockBusy):
        await reconcile_once(reconciler, lock, dry_run=True, run_id="r3", trigger="cli")
    await asyncio.sleep(max(0.0, await store.redis.pttl(lock.key)) / 1000 + 0.05)
    summary = await reconcile_once(reconciler, lock, dry_run=True, run_id="r4", trigger="cli")
    assert summary.dry_run
    assert not await store.redis.exists(lock.key)  # released at the end


async def test_pages_and_batched_deletes(storage: Storage, s3: Any, bucket: str) -> None:
    _put(s3, bucket, *(f"uploads/o/{i}" for i in range(5)))
    pages = [page async for page in storage.iter_pages("uploads/", page_size=2)]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert pages[0][0].size == 10 and pages[0][0].last_modified.tzinfo is not None
    deleted = await storage.delete_many([f"uploads/o/{i}" for i in range(3)])
    assert deleted == [f"uploads/o/{i}" for i in range(3)]
    assert keys(s3, bucket) == {"uploads/o/3", "uploads/o/4"}


async def test_a_key_xml_cannot_carry_does_not_fail_its_batch(storage: Storage, s3: Any, bucket: str) -> None:
    """S3 takes any UTF-8 in a key, a control character too; XML 1.0 cannot carry one, and the
    DeleteObjects request of its page was malformed: no key of that page was ever deleted, and each
    run failed on it again."""
    odd, plain = "uploads/o/bad\x01name", "uploads/o/plain"
    _put(s3, bucket, odd, plain, "uploads/o/kept")
    assert sorted(await storage.delete_many([odd, plain])) == sorted([odd, plain])
    assert keys(s3, bucket) == {"uploads/o/kept"}


async def test_a_job_submitted_between_the_last_check_and_the_delete_is_refused(
    store: JobStore, storage: Storage, publisher: broker.Publisher, s3: Any, bucket: str
) -> None:
    """An old upload with no grant left is submitted just as the reconciler deletes it: the api found
    it (HEAD), so its record must not be written for an object about to go, or a 202 job loses it."""
    source, other = f"uploads/{OID}/uploaded-long-ago", f"uploads/{OID}/refused-by-s3"
    _put(s3, bucket, source, other)
    late = _record(source)
    deleting = storage.delete_many
    outcome: list[str] = []

    async def submitted_meanwhile(keys_: list[str]) -> list[str]:
        assert await storage.head(source)  # the api's check of the source passes
        try:
            await store.create(late)
            outcome.append("created")
        except SourceDeleted:
            outcome.append("refused")
        deleted = await deleting(keys_)
        return [key for key in deleted if key != other]  # as if S3 refused that one

    storage.delete_many = submitted_meanwhile  # type: ignore[method-assign]
    summary = await _reconciler(store, storage, publisher).run(dry_run=False)
    assert outcome == ["refused"]
    assert await store.get(late.id) is None
    assert summary.deleted == 1 and summary.delete_errors == 1
    # The object S3 did not delete is free again for a new job; the deleted one stays refused.
    assert not await store.redis.exists(store.deleting_mark(other))
    assert (await store.create(_record(other))).applied
    with pytest.raises(SourceDeleted):
        await store.create(_record(source))


async def test_two_namespaces_first_runs_at_once_claim_the_bucket_once(
    store: JobStore, storage: Storage, publisher: broker.Publisher, s3: Any, bucket: str
) -> None:
    """Both runs find no namespace object, then both write it: only one of them may take the bucket,
    or each deletes the other's sources as orphans."""
    other = JobStore(store.redis, fresh_namespace(), retention=timedelta(hours=1))
    mine, theirs = _record(f"uploads/{OID}/mine"), _record(f"uploads/{OID}/theirs")
    await store.create(mine)
    await other.create(theirs)
    _put(s3, bucket, f"uploads/{OID}/mine", f"uploads/{OID}/theirs")
    both_looked = asyncio.Barrier(2)
    reading = storage.get

    async def get(key: str, *, max_bytes: int) -> bytes:
        try:
            return await reading(key, max_bytes=max_bytes)
        except ObjectNotFound:
            await both_looked.wait()  # neither writes before the other has seen the bucket unclaimed
            raise

    storage.get = get  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(
            _reconciler(store, storage, publisher).run(dry_run=False),
            _reconciler(other, storage, publisher).run(dry_run=False),
            return_exceptions=True,
        )
    finally:
        await delete_keys(store.redis, f"{other.namespace}:*")
    assert sorted(type(r).__name__ for r in results) == ["BucketTaken", "Summary"], results
    winner, source = (store, mine) if isinstance(results[0], Summary) else (other, theirs)
    # The bucket is the winner's alone; the loser's run judged nothing (its objects are the
    # winner's orphans now: one bucket per namespace), and the winner kept its own source.
    assert s3.get_object(Bucket=bucket, Key=NAMESPACE_MARKER)["Body"].read() == winner.namespace.encode()
    assert source.source.key in keys(s3, bucket)  # type: ignore[union-attr]


async def test_a_record_nobody_can_read_does_not_stop_the_runs(
    store: JobStore, storage: Storage, publisher: broker.Publisher, s3: Any, bucket: str, taker: Taker
) -> None:
    stuck = _record(f"uploads/{OID}/s", age_s=60)
    await store.create(stuck)
    await store.redis.hset(store.job_key("unreadable"), mapping={"rank": 0, "version": 1, "data": "{}"})
    await store.redis.expire(store.job_key("unreadable"), 3600)
    _put(s3, bucket, f"uploads/{OID}/orphan")
    summary = await _reconciler(store, storage, publisher, stuck_pending_s=1.0).run(dry_run=False)
    assert (summary.stuck_republished, summary.deleted) == (1, 1)  # the rest of the run went on
    assert await store.redis.exists(store.job_key("unreadable"))  # and that record was left alone


async def test_a_failed_delete_keeps_its_marks(
    store: JobStore, storage: Storage, publisher: broker.Publisher, s3: Any, bucket: str
) -> None:
    """The DeleteObjects call fails (a timeout, the run cancelled): S3 may have deleted all the same
    (boto3's thread runs on, the answer may be what was lost), so the uploads stay refused to new
    jobs for the marks' life rather than be given to a job whose source then goes."""
    source = f"uploads/{OID}/maybe-gone"
    _put(s3, bucket, source)

    async def lost_answer(keys_: list[str]) -> list[str]:
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys_]})  # done...
        raise StorageError("storage_unavailable", "S3 DeleteObjects: timed out", transient=True)  # ...unsaid

    storage.delete_many = lost_answer  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        await _reconciler(store, storage, publisher).run(dry_run=False)
    assert 0 < await store.redis.pttl(store.deleting_mark(source)) <= DELETING_MARK_S * 1000
    with pytest.raises(SourceDeleted):
        await store.create(_record(source))


def _sample(name: str, **labels: str) -> float:
    """The value of a metric of this process (the reconciler runs in-process here)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class RefusingS3:
    """The test S3 behind a relay that answers every DeleteObjects with a per-key error for each key,
    as S3 does when a bucket policy or Object Lock refuses them: HTTP 200, nothing deleted."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.refused: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "POST" and "delete" in request.query:
            names = [el.text or "" for el in ET.fromstring(body).iter() if el.tag.endswith("Key")]
            self.refused += names
            errors = "".join(
                f"<Error><Key>{escape(n)}</Key><Code>AccessDenied</Code><Message>denied</Message></Error>"
                for n in names
            )
            return web.Response(
                body=f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>{errors}</DeleteResult>',
                content_type="application/xml",
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            url = URL(self.target + request.raw_path, encoded=True)
            async with session.request(request.method, url, headers=headers, data=body) as answer:
                passed = {
                    k: v
                    for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                }
                return web.Response(status=answer.status, headers=passed, body=await answer.read())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


async def test_deletes_s3_refuses_are_counted_for_an_alert(
    store: JobStore, publisher: broker.Publisher, s3: Any, s3_endpoint: str, bucket: str, rc_namespace: str
) -> None:
    """The run still succeeds (the orphans are tried again next run); the summary's `delete_errors`
    and `imgpipe_reconcile_delete_errors_total` are what says S3 refused."""
    orphans = [f"uploads/{OID}/refused-{i}" for i in range(3)]
    _put(s3, bucket, *orphans)
    relay = RefusingS3(s3_endpoint)
    lock = RunLock(store.redis, rc_namespace, ttl_s=30)
    before = _sample("imgpipe_reconcile_delete_errors_total")
    async with local_http(relay.app()) as endpoint:
        storage = Storage(s3_settings(endpoint, bucket))
        try:
            summary = await reconcile_once(
                _reconciler(store, storage, publisher), lock, dry_run=False, run_id="refused", trigger="cli"
            )
        finally:
            await storage.close()
    assert sorted(relay.refused) == orphans  # each one was asked for, and refused
    assert keys(s3, bucket) == set(orphans)
    assert (summary.orphans, summary.deleted, summary.delete_errors) == (3, 0, 3)
    assert _sample("imgpipe_reconcile_delete_errors_total") - before == 3


async def test_a_stuck_job_the_run_fails_counts_as_a_failed_job(
    store: JobStore, storage: Storage, publisher: broker.Publisher, taker: Taker
) -> None:
    """`imgpipe_jobs_failed_total{code="timeout"}` and `imgpipe_job_latency_seconds{outcome="failed"}`
    count the jobs the reconciler fails, as the worker's failures count: once, when the job is really
    failed (not by a dry run, not again later)."""
    stuck = _record(f"uploads/{OID}/stuck")
    await store.create(stuck)
    await store.mark_processing(stuck.id)
    clock = Clock()
    clock.now += 1.1
    reconciler = _reconciler(store, storage, publisher, stuck_processing_s=1.0, clock=clock)
    before = _sample("imgpipe_jobs_failed_total", code="timeout")
    latencies = _sample("imgpipe_job_latency_seconds_count", outcome="failed")

    dry = await reconciler.run(dry_run=True)
    assert dry.stuck_failed == 1
    assert _sample("imgpipe_jobs_failed_total", code="timeout") == before
    assert _sample("imgpipe_job_latency_seconds_count", outcome="failed") == latencies

    real = await reconciler.run(dry_run=False)
    assert real.stuck_failed == 1
    assert _sample("imgpipe_jobs_failed_total", code="timeout") == before + 1
    assert _sample("imgpipe_job_latency_seconds_count", outcome="failed") == latencies + 1

    again = await reconciler.run(dry_run=False)  # failed already: nothing to do, nothing counted
    assert again.stuck_failed == 0
    assert _sample("imgpipe_jobs_failed_total", code="timeout") == before + 1
    assert _sample("imgpipe_job_latency_seconds_count", outcome="failed") == latencies + 1
