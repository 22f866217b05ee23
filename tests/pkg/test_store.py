"""Job records in the real Redis: forward-only transitions, versions, events, idempotency, grants."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from imgpipe.models import PRESETS, JobRecord, JobStatus, KeySource, VariantResult
from imgpipe.resources import redis_client as service_redis_client
from imgpipe.settings import RedisSettings
from imgpipe.store import (
    CLAIM_HOLD_S,
    Claim,
    Grant,
    IdempotencyConflict,
    JobStore,
    SourceDeleted,
    Transition,
    owner_id,
    redis_unavailable,
)
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from yarl import URL

from tests.e2e.test_outages import PrivateRedis
from tests.isolated import BrokerProxy
from tests.stack import REDIS_URL, delete_keys

RETENTION = timedelta(hours=2)


@pytest.fixture
async def store(redis_client: aioredis.Redis, namespace: str) -> AsyncIterator[JobStore]:
    ns = f"{namespace}-store-{uuid.uuid4().hex[:8]}"
    try:
        yield JobStore(redis_client, ns, retention=RETENTION)
    finally:
        # `{ns}*`, not `{ns}:*`: a test also writes a neighbouring `{ns}-other` namespace.
        await delete_keys(redis_client, f"{ns}*")


def _record(job_id: str | None = None, owner: str = "alice") -> JobRecord:
    source = KeySource(key=f"uploads/{owner_id(owner)}/abc")
    return JobRecord.pending(job_id or uuid.uuid4().hex, owner, source, [PRESETS["thumb"]])


_RESULT = VariantResult(name="thumb", format="jpeg", width=200, height=100, bytes=999, key="variants/x.jpg")


async def _processing(store: JobStore) -> JobRecord:
    created = await store.create(_record())
    assert created.record is not None
    moved = await store.mark_processing(created.record.id)
    assert moved.applied and moved.record is not None
    return moved.record


async def test_create_stores_a_pending_record_with_version_1(store: JobStore) -> None:
    record = _record()
    result = await store.create(record)
    assert result.applied
    assert result.record is not None
    assert (result.record.status, result.record.version) == (JobStatus.PENDING, 1)
    stored = await store.get(record.id)
    assert stored == result.record
    assert stored.source == record.source and stored.requested == record.requested


async def test_create_twice_is_not_applied(store: JobStore) -> None:
    first = _record("same-id", owner="alice")
    assert (await store.create(first)).applied
    again = await store.create(_record("same-id", owner="mallory"))
    assert not again.applied
    assert again.record is not None
    assert (again.record.owner, again.record.version) == ("alice", 1)
    assert (await store.get("same-id")).owner == "alice"


async def test_forward_transitions_increase_the_version(store: JobStore) -> None:
    created = await store.create(_record())
    processing = await store.mark_processing(created.record.id)
    assert processing.applied
    assert (processing.record.status, processing.record.version) == (JobStatus.PROCESSING, 2)
    assert processing.record == await store.get(created.record.id)  # what was written, as it reads back
    assert processing.record.updated_at >= created.record.updated_at
    done = await store.mark_succeeded(processing.record, [_RESULT])
    assert done.applied
    assert (done.record.status, done.record.version) == (JobStatus.SUCCEEDED, 3)
    assert done.record.variants == [_RESULT]
    stored = await store.get(created.record.id)
    assert (stored.status, stored.version, stored.variants) == (JobStatus.SUCCEEDED, 3, [_RESULT])
    assert stored == done.record


async def test_failed_records_the_error(store: JobStore) -> None:
    current = await _processing(store)
    result = await store.mark_failed(current, "decode_error", "x" * 5000)
    assert result.applied
    assert result.record.status is JobStatus.FAILED
    assert result.record.error.code == "decode_error"
    assert len(result.record.error.message) == 1000


async def test_terminal_jobs_do_not_move(store: JobStore) -> None:
    current = await _processing(store)
    done = await store.mark_succeeded(current, [_RESULT])
    before = await store.get(current.id)

    again = await store.mark_processing(current.id)
    assert not again.applied
    assert again.record == before
    failed = await store.mark_failed(current, "late", "too late")
    assert not failed.applied
    assert failed.record == before
    twice = await store.mark_succeeded(current, [])
    assert not twice.applied
    assert twice.record == before

    after = await store.get(current.id)
    assert after == before
    assert (after.status, after.version, after.variants, after.error) == (
        JobStatus.SUCCEEDED,
        done.record.version,
        [_RESULT],
        None,
    )


async def test_processing_does_not_go_back_to_pending(store: JobStore) -> None:
    current = await _processing(store)
    # Re-creating the job (e.g. a retried POST with the same id) must not reset it.
    again = await store.create(_record(current.id))
    assert not again.applied
    # And the script refuses a lower rank, whatever path asks for it.
    back = await store._apply(current.model_copy(update={"status": JobStatus.PENDING}))
    assert not back.applied
    assert back.record == current
    assert await store.get(current.id) == current


async def test_mark_processing_twice_is_a_redelivery(store: JobStore) -> None:
    current = await _processing(store)
    key = store.job_key(current.id)
    assert await store.redis.hget(key, "taken_up_at") is None
    before = time.time()
    again = await store.mark_processing(current.id)
    assert again == Transition(False, current)
    # The record stays as it is; when the job was taken up again is noted beside it (for the
    # reconciler, which times a stuck job from then).
    assert await store.get(current.id) == current
    assert before <= float(await store.redis.hget(key, "taken_up_at")) <= time.time()
    done = await store.mark_succeeded(current, [_RESULT])
    await store.redis.hdel(key, "taken_up_at")
    assert not (await store.mark_processing(current.id)).applied
    assert await store.redis.hget(key, "taken_up_at") is None  # only a processing job is taken up
    assert await store.get(current.id) == done.record


async def test_unknown_job(store: JobStore) -> None:
    assert await store.get("nope") is None
    assert await store.mark_processing("nope") == Transition(False, None)
    ghost = _record("ghost").model_copy(update={"status": JobStatus.PROCESSING})
    assert await store.mark_succeeded(ghost, []) == Transition(False, None)
    assert await store.mark_failed(ghost, "x", "y") == Transition(False, None)
    assert await store.get("ghost") is None  # a transition never creates a record


async def test_delete(store: JobStore) -> None:
    record = _record()
    await store.create(record)
    await store.delete(record.id)
    assert await store.get(record.id) is None


async def test_every_applied_change_is_published_in_order(store: JobStore) -> None:
    async with store.subscribe() as changes:
        created = await store.create(_record())
        job_id = created.record.id
        await store.create(_record(job_id))  # not applied: not published
        processing = await store.mark_processing(job_id)
        await store.mark_processing(job_id)  # redelivery: not published
        await store.mark_succeeded(processing.record, [_RESULT])
        await store.mark_failed(processing.record, "late", "not applied")  # not published
        other = await store.create(_record())

        received = []
        async with asyncio.timeout(5):
            async for version, record in changes:
                received.append((record.id, version, record.status, record.version))
                if len(received) == 4:
                    break
    assert received == [
        (job_id, 1, JobStatus.PENDING, 1),
        (job_id, 2, JobStatus.PROCESSING, 2),
        (job_id, 3, JobStatus.SUCCEEDED, 3),
        (other.record.id, 1, JobStatus.PENDING, 1),
    ]


async def test_events_stay_in_their_namespace(store: JobStore, redis_client: aioredis.Redis) -> None:
    neighbour = JobStore(redis_client, f"{store.namespace}-other", retention=RETENTION)
    async with store.subscribe() as changes:
        foreign = _record()
        await neighbour.create(foreign)
        mine = await store.create(_record())
        async with asyncio.timeout(5):
            _, record = await anext(aiter(changes))
    assert record.id == mine.record.id
    await neighbour.delete(foreign.id)


async def test_records_expire_after_the_retention(store: JobStore, redis_client: aioredis.Redis) -> None:
    record = _record()
    await store.create(record)
    key = store.job_key(record.id)
    ttl = await redis_client.ttl(key)
    assert RETENTION.total_seconds() - 5 <= ttl <= RETENTION.total_seconds()
    # Every applied change restarts the clock.
    await redis_client.expire(key, 10)
    await store.mark_processing(record.id)
    assert await redis_client.ttl(key) > RETENTION.total_seconds() - 5


async def test_a_job_taken_up_again_lives_the_retention_from_then(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    """A retry keeps the record as it is: its life counted from the first `processing` write, and a
    job retried for longer than the retention expired between two attempts (the next attempt found
    no record and dropped its message: no `failed`, no dead letter, a 404). Its source marker and
    Idempotency-Key claim with it (the reconciler would delete the source of a running job)."""
    record = _record()
    assert await store.claim_idempotency("alice", "key-1", record.id, "fp") is None
    await store.create(record, claim=("alice", "key-1"))
    await store.mark_processing(record.id)
    marker = store.source_marker(record.source.key)
    keys = [store.job_key(record.id), marker, store._idem_key("alice", "key-1")]
    for key in keys:
        await redis_client.expire(key, 10)  # as if most of the retention had gone by
    await store.mark_processing(record.id)  # a retry out of its back-off queue
    for key in keys:
        assert await redis_client.ttl(key) > RETENTION.total_seconds() - 5, key
    assert await redis_client.get(marker) == record.id.encode()


async def test_a_stuck_job_taken_up_again_after_it_was_read_is_not_failed(store: JobStore) -> None:
    """The reconciler fails a `processing` job from the record it read; a redelivery taken up in
    between changes no version, only `taken_up_at`, and was failed under the worker running it."""
    current = await _processing(store)
    key = store.job_key(current.id)
    assert not (
        await store.mark_failed(current, "timeout", "stuck", taken_up="1.5")
    ).applied  # never taken up
    await store.mark_processing(current.id)
    seen = (await store.redis.hget(key, "taken_up_at")).decode()
    await store.mark_processing(current.id)  # taken up again after the read
    refused = await store.mark_failed(current, "timeout", "stuck", taken_up=seen)
    assert not refused.applied and refused.record == current
    seen = (await store.redis.hget(key, "taken_up_at")).decode()
    done = await store.mark_failed(current, "timeout", "stuck", taken_up=seen)
    assert done.applied and done.record is not None and done.record.status is JobStatus.FAILED


async def test_a_stuck_job_never_taken_up_again_is_failed_from_its_read(store: JobStore) -> None:
    current = await _processing(store)
    done = await store.mark_failed(current, "timeout", "stuck", taken_up="")
    assert done.applied and done.record is not None and done.record.status is JobStatus.FAILED


async def test_idempotency_keys(store: JobStore, redis_client: aioredis.Redis) -> None:
    assert await store.claim_idempotency("alice", "key-1", "job-a", "fp-1") is None
    assert await store.claim_idempotency("alice", "key-1", "job-b", "fp-1") == Claim("job-a", accepted=False)
    with pytest.raises(IdempotencyConflict):
        await store.claim_idempotency("alice", "key-1", "job-c", "fp-2")
    # Another owner's identical key is another key.
    assert await store.claim_idempotency("bob", "key-1", "job-d", "fp-2") is None
    assert await store.claim_idempotency("bob", "key-1", "job-e", "fp-2") == Claim("job-d", accepted=False)
    # The claim holds briefly until its job's record is written, then as long as the record.
    ttl = await redis_client.ttl(store._idem_key("alice", "key-1"))
    assert CLAIM_HOLD_S - 5 <= ttl <= CLAIM_HOLD_S < RETENTION.total_seconds()
    await store.create(_record("job-a"), claim=("alice", "key-1"))
    ttl = await redis_client.ttl(store._idem_key("alice", "key-1"))
    assert RETENTION.total_seconds() - 5 <= ttl <= RETENTION.total_seconds()
    assert await redis_client.ttl(store._idem_key("bob", "key-1")) <= CLAIM_HOLD_S  # not bob's
    # Released (the job could not be queued): the key is free again.
    await store.release_idempotency("alice", "key-1", "job-a")
    assert await store.claim_idempotency("alice", "key-1", "job-f", "fp-3") is None
    assert await store.claim_idempotency("bob", "key-1", "job-g", "fp-2") == Claim("job-d", accepted=False)


async def test_a_release_frees_only_its_own_jobs_claim(store: JobStore) -> None:
    """A request whose record write failed withdrew its job, which let go of the claim; a retry
    claimed the key; then the first request's release deleted the retry's claim, and a third request
    with the key made the job a second time beside the retry's."""
    assert await store.claim_idempotency("alice", "k", "job-1", "fp") is None
    assert await store.withdraw("job-1", claim=("alice", "k"))
    assert await store.claim_idempotency("alice", "k", "job-2", "fp") is None  # the retry
    await store.release_idempotency("alice", "k", "job-1")
    assert await store.claim_idempotency("alice", "k", "job-3", "fp") == Claim("job-2", accepted=False)
    await store.release_idempotency("alice", "k", "job-2")
    assert await store.claim_idempotency("alice", "k", "job-3", "fp") is None


async def test_a_job_is_withdrawn_or_answered_for_never_both(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    # Withdrawn: the record and the claim holding it go, in one step; a late replay cannot answer.
    assert await store.claim_idempotency("alice", "k-1", "job-1", "fp") is None
    await store.create(_record("job-1"), claim=("alice", "k-1"))
    assert await store.withdraw("job-1", claim=("alice", "k-1"))
    assert await store.get("job-1") is None
    assert await redis_client.get(store._idem_key("alice", "k-1")) is None
    assert not await store.answer_replay("alice", "k-1", "job-1")
    # Answered for: the withdrawal changes nothing, and later replays see the claim as answered.
    assert await store.claim_idempotency("alice", "k-2", "job-2", "fp") is None
    await store.create(_record("job-2"), claim=("alice", "k-2"))
    assert await store.answer_replay("alice", "k-2", "job-2")
    assert not await store.withdraw("job-2", claim=("alice", "k-2"))
    assert await store.get("job-2") is not None
    assert await store.claim_idempotency("alice", "k-2", "job-x", "fp") == Claim("job-2", accepted=True)
    # A claim holding another job (the key was released and claimed again) is neither's to decide.
    assert await store.claim_idempotency("alice", "k-3", "job-4", "fp") is None
    await store.create(_record("job-3"))
    assert not await store.answer_replay("alice", "k-3", "job-3")
    assert await store.withdraw("job-3", claim=("alice", "k-3"))
    assert await store.claim_idempotency("alice", "k-3", "job-y", "fp") == Claim("job-4", accepted=False)
    # Without a key, a withdrawal deletes the record.
    await store.create(_record("job-5"))
    assert await store.withdraw("job-5")
    assert await store.get("job-5") is None
    # A withdrawal tried again late finds the job published and taken up meanwhile: it stays, and so
    # does its claim. And one whose record was never written lets its claim go.
    assert await store.claim_idempotency("alice", "k-6", "job-6", "fp") is None
    await store.create(_record("job-6"), claim=("alice", "k-6"))
    await store.mark_processing("job-6")
    assert not await store.withdraw("job-6", claim=("alice", "k-6"))
    assert (await store.get("job-6")).status is JobStatus.PROCESSING  # type: ignore[union-attr]
    assert await store.claim_idempotency("alice", "k-6", "job-z", "fp") == Claim("job-6", accepted=False)
    assert await store.claim_idempotency("alice", "k-7", "job-7", "fp") is None
    assert await store.withdraw("job-7", claim=("alice", "k-7"))
    assert await redis_client.get(store._idem_key("alice", "k-7")) is None
    # Pending again, but not as created: failed meanwhile and replayed from its dead letter.
    created = (await store.create(_record("job-8"))).record
    assert created is not None
    failed = (await store.mark_failed(created, "internal_error", "gave up")).record
    assert failed is not None and (await store.reopen(failed)).applied
    assert not await store.withdraw("job-8")
    assert (await store.get("job-8")).status is JobStatus.PENDING  # type: ignore[union-attr]


async def test_an_accepted_claim_says_so_and_keeps_its_expiry(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    assert await store.claim_idempotency("alice", "key-2", "job-a", "fp-1") is None
    await redis_client.expire(store._idem_key("alice", "key-2"), 100)
    await store.accept_idempotency("alice", "key-2", "job-a", "fp-1")
    assert await store.claim_idempotency("alice", "key-2", "job-b", "fp-1") == Claim("job-a", accepted=True)
    assert 90 <= await redis_client.ttl(store._idem_key("alice", "key-2")) <= 100
    with pytest.raises(IdempotencyConflict):  # still the same request's key
        await store.claim_idempotency("alice", "key-2", "job-c", "fp-2")
    # A claim released meanwhile is not written back.
    await store.accept_idempotency("alice", "key-3", "job-d", "fp-1")
    assert await redis_client.exists(store._idem_key("alice", "key-3")) == 0


async def test_a_claim_made_again_by_its_own_request_is_still_its_own(store: JobStore) -> None:
    # What a batch re-sent after a dropped connection does: the same claim, run twice.
    assert await store.claim_idempotency("alice", "key-again", "job-a", "fp-1") is None
    assert await store.claim_idempotency("alice", "key-again", "job-a", "fp-1") is None
    assert await store.claim_idempotency("alice", "key-again", "job-b", "fp-1") == Claim("job-a", False)


async def test_concurrent_claims_of_one_idempotency_key_have_one_winner(store: JobStore) -> None:
    claims = await asyncio.gather(
        *(store.claim_idempotency("alice", "key-race", f"job-{i}", "fp") for i in range(10))
    )
    winners = [f"job-{i}" for i, held in enumerate(claims) if held is None]
    assert len(winners) == 1
    assert [held.job_id for held in claims if held is not None] == winners * 9


async def test_record_grant_prunes_week_old_entries(store: JobStore, redis_client: aioredis.Redis) -> None:
    now = time.time()
    await store.record_grant("uploads/o/old", now - 8 * 24 * 3600)
    await store.record_grant("uploads/o/recent", now - 6 * 24 * 3600)
    assert await redis_client.zcard(store.grants_key) == 2  # nothing a week older than the newest yet
    await store.record_grant("uploads/o/new", now + 900)
    grants = await redis_client.zrange(store.grants_key, 0, -1, withscores=True)
    assert [(key.decode(), round(score)) for key, score in grants] == [
        ("uploads/o/recent", round(now - 6 * 24 * 3600)),
        ("uploads/o/new", round(now + 900)),
    ]


async def test_record_grant_keeps_its_terms_and_lets_everything_expire(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    now = time.time()
    expires = now + 900
    await store.record_grant("uploads/o/a", expires, content_type="image/png", size=1234)
    assert await store.grant("uploads/o/a") == Grant("uploads/o/a", "image/png", 1234, expires)
    assert await redis_client.zscore(store.grants_key, "uploads/o/a") == pytest.approx(expires)
    # The terms outlive the grant by the job retention: `POST /jobs` checks an upload against them.
    terms_ttl = await redis_client.ttl(store.grant_key("uploads/o/a"))
    assert abs(terms_ttl - (expires + RETENTION.total_seconds() - now)) <= 5

    def a_day_after(seconds: float) -> tuple[float, float]:
        return seconds + 24 * 3600 - 5, seconds + 24 * 3600 + 1

    low, high = a_day_after(900)
    assert low <= await redis_client.ttl(store.grants_key) <= high
    # A shorter grant (and one without terms) does not cut the set's life; a longer one extends it.
    await store.record_grant("uploads/o/b", now + 60)
    assert await store.grant("uploads/o/b") is None
    assert low <= await redis_client.ttl(store.grants_key) <= high
    await store.record_grant("uploads/o/c", now + 7200)
    low, high = a_day_after(7200)
    assert low <= await redis_client.ttl(store.grants_key) <= high


async def test_concurrent_terminal_transitions_apply_once(store: JobStore) -> None:
    current = await _processing(store)
    calls = []
    for i in range(50):
        calls.append(store.mark_succeeded(current, [_RESULT]))
        calls.append(store.mark_failed(current, "boom", f"attempt {i}"))
    results = await asyncio.gather(*calls)
    applied = [r for r in results if r.applied]
    assert len(applied) == 1
    winner = applied[0].record
    assert winner.version == current.version + 1
    final = await store.get(current.id)
    assert final == winner
    assert final.status is winner.status
    # Every loser was told what actually happened.
    assert all(r.record == final for r in results if not r.applied)


# Reopen: the one way back, failed -> pending, for replaying a dead-lettered job.


async def _failed(store: JobStore) -> JobRecord:
    current = await _processing(store)
    failed = await store.mark_failed(current, "url_http_error", "gave up after 3 attempts")
    assert failed.applied and failed.record is not None
    return failed.record


async def test_reopen_moves_a_failed_job_back_to_pending(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    failed = await _failed(store)
    await redis_client.expire(store.job_key(failed.id), 60)
    # The reconciler's mark of a stuck pending job that was re-published once.
    await redis_client.hset(store.job_key(failed.id), "republished_at", time.time() - 10_000)
    async with store.subscribe() as changes:
        reopened = await store.reopen(failed)
        async with asyncio.timeout(5):
            version, published = await anext(aiter(changes))
    assert reopened.applied and reopened.record is not None
    record = reopened.record
    assert (record.status, record.version, record.error, record.replays) == (
        JobStatus.PENDING,
        failed.version + 1,
        None,
        1,
    )
    assert record.updated_at > failed.updated_at
    assert await store.get(failed.id) == record
    # Published like every other change, so SSE clients see the job come back.
    assert (version, published) == (record.version, record)
    # A fresh stuck-pending window, the retention renewed, and the job moves forward again.
    assert await redis_client.hget(store.job_key(failed.id), "republished_at") is None
    assert await redis_client.ttl(store.job_key(failed.id)) > RETENTION.total_seconds() - 5
    assert await redis_client.ttl(store.source_marker(record.source.key)) > RETENTION.total_seconds() - 5
    processing = await store.mark_processing(failed.id)
    assert processing.applied
    done = await store.mark_succeeded(processing.record, [_RESULT])
    assert done.applied and done.record.replays == 1


async def test_reopen_only_from_failed(store: JobStore) -> None:
    pending = (await store.create(_record())).record
    assert await store.reopen(pending) == Transition(False, pending)
    processing = await store.mark_processing(pending.id)
    assert await store.reopen(processing.record) == Transition(False, processing.record)
    succeeded = (await store.mark_succeeded(processing.record, [_RESULT])).record
    assert await store.reopen(succeeded) == Transition(False, succeeded)
    # Even with a forged `failed` copy of the current version: the stored status decides.
    forged = succeeded.model_copy(update={"status": JobStatus.FAILED})
    assert await store.reopen(forged) == Transition(False, succeeded)
    assert await store.get(pending.id) == succeeded


async def test_reopen_a_stale_or_missing_record_is_not_applied(store: JobStore) -> None:
    failed = await _failed(store)
    first = await store.reopen(failed)
    assert first.applied
    # A second replay working from the same read does not reopen (or count) it twice.
    again = await store.reopen(failed)
    assert again == Transition(False, first.record)
    assert (await store.get(failed.id)).replays == 1
    await store.delete(failed.id)
    assert await store.reopen(failed) == Transition(False, None)
    assert await store.get(failed.id) is None  # reopen never creates a record


async def test_concurrent_reopens_apply_once(store: JobStore) -> None:
    failed = await _failed(store)
    results = await asyncio.gather(*(store.reopen(failed) for _ in range(30)))
    assert sum(r.applied for r in results) == 1
    final = await store.get(failed.id)
    assert (final.status, final.version, final.replays) == (JobStatus.PENDING, failed.version + 1, 1)


async def test_an_upload_marked_for_deletion_takes_no_new_job(store: JobStore) -> None:
    """The reconciler's last check marks only what nothing references, and a create then refuses it."""
    used, granted, orphan = (f"uploads/{owner_id('alice')}/{name}" for name in ("used", "granted", "orphan"))
    await store.create(JobRecord.pending(uuid.uuid4().hex, "alice", KeySource(key=used), [PRESETS["thumb"]]))
    await store.record_grant(granted, time.time() + 900)
    now = time.time()
    marked = await store.mark_deleting([used, granted, orphan], now=now, life_s=60)
    assert marked == [False, False, True]
    assert 0 < await store.redis.pttl(store.deleting_mark(orphan)) <= 60_000
    assert not await store.redis.exists(store.deleting_mark(used), store.deleting_mark(granted))

    late = JobRecord.pending(uuid.uuid4().hex, "alice", KeySource(key=orphan), [PRESETS["thumb"]])
    with pytest.raises(SourceDeleted):
        await store.create(late)
    assert await store.get(late.id) is None
    assert not await store.redis.exists(store.source_marker(orphan))  # nothing holds it after all

    # S3 refused the delete: the object stays, and jobs may use it again.
    await store.unmark_deleting([orphan])
    assert (await store.create(late)).applied
    assert await store.mark_deleting([orphan], now=now, life_s=60) == [False]  # now it is in use


async def test_a_change_that_cannot_be_read_is_skipped_not_a_break(store: JobStore) -> None:
    """A message this version cannot parse (a newer version's status, a hand edit, not even JSON) is
    skipped and its job named to the subscriber; the subscription goes on with the next change.
    Raised, it ended the iterator as if the subscription had broken."""
    named: list[str] = []
    async with store.subscribe(unreadable=named.append) as changes:
        newer = _record()
        data = newer.model_dump_json(exclude={"version"}).replace('"pending"', '"queued"')
        await store.redis.publish(store.channel, f'{{"version":2,"record":{data}}}')
        await store.redis.publish(store.channel, b"\xff not json")
        await store.redis.publish(store.channel, '{"version":1}')
        readable = await store.create(_record())
        async with asyncio.timeout(5):
            version, record = await anext(aiter(changes))
    assert (version, record) == (1, readable.record)
    assert named == [newer.id]  # the others name no job


async def test_a_quiet_subscription_is_not_taken_for_a_broken_one(store: JobStore) -> None:
    """Nothing is published for many ping intervals: the subscription's PINGs are answered, and the
    answers are not taken for changes nor for a break. Through a client made as the services make it,
    whose own health check PINGs the same connection."""
    client = service_redis_client(RedisSettings(redis_url=SecretStr(REDIS_URL)))
    quiet = JobStore(client, store.namespace, retention=RETENTION)
    try:
        async with quiet.subscribe(ping_s=0.05) as changes:
            received = asyncio.ensure_future(anext(aiter(changes)))
            await asyncio.sleep(0.5)  # about five PINGs, each answered
            assert not received.done()
            created = await store.create(_record())
            async with asyncio.timeout(5):
                assert await received == (1, created.record)
    finally:
        await client.aclose()


async def test_a_subscription_that_goes_silent_is_taken_for_broken(store: JobStore) -> None:
    """The connection stays open and nothing comes through it any more (Redis killed without a FIN,
    a partition, a proxy that stopped forwarding): the iterator raises, as for a dropped connection.
    It waited for ever before: redis-py's health check sends PINGs and never misses their answers."""
    relay = BrokerProxy(target=URL(REDIS_URL).port or 6379)
    await relay.start()
    url = str(URL(REDIS_URL).with_host("127.0.0.1").with_port(relay.port))
    client = service_redis_client(RedisSettings(redis_url=SecretStr(url)))
    relayed = JobStore(client, store.namespace, retention=RETENTION)
    try:
        async with relayed.subscribe(ping_s=0.2) as changes:
            created = await store.create(_record())
            async with asyncio.timeout(5):
                assert await anext(aiter(changes)) == (1, created.record)  # live through the relay
            relay.stall()
            silent = asyncio.get_running_loop().time()
            with pytest.raises(RedisConnectionError):
                async with asyncio.timeout(5):
                    await anext(aiter(changes))
            # Within two ping intervals of the last thing heard (and a little for a busy machine).
            assert asyncio.get_running_loop().time() - silent < 1.5
    finally:
        await relay.cut()
        await client.aclose()


async def test_a_redis_refusing_writes_is_unavailable_a_wrong_command_is_not(tmp_path: Path) -> None:
    """What the api answers 503 (and a worker waits out) against what is a bug: told apart on the
    errors a real Redis gives. A full one (OOM under `noeviction`) was taken for a bug."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        store = JobStore(client, "refusals", retention=timedelta(minutes=5))
        await client.config_set("maxmemory", 1)
        with pytest.raises(ResponseError) as full:
            await store.create(_record())
        assert redis_unavailable(full.value), full.value
        await client.config_set("maxmemory", 0)
        await client.set("refusals:a-string", "x")
        with pytest.raises(ResponseError) as wrong:
            await client.hget("refusals:a-string", "field")  # WRONGTYPE
        assert not redis_unavailable(wrong.value)
    finally:
        await client.aclose()
        server.kill()
    # And out of reach, as the api's Redis is when it is down.
    gone = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        with pytest.raises(RedisConnectionError) as down:
            await gone.ping()
        assert redis_unavailable(down.value)
    finally:
        await gone.aclose()


@pytest.fixture
async def relayed(store: JobStore) -> AsyncIterator[tuple[JobStore, BrokerProxy]]:
    """`store`'s namespace through a relay that can lose a reply, on a client made as the services
    make theirs (which sends a command again, once, when its connection breaks)."""
    relay = BrokerProxy(target=URL(REDIS_URL).port or 6379)
    await relay.start()
    url = str(URL(REDIS_URL).with_host("127.0.0.1").with_port(relay.port))
    client = service_redis_client(RedisSettings(redis_url=SecretStr(url)))
    try:
        yield JobStore(client, store.namespace, retention=RETENTION), relay
    finally:
        await relay.cut()
        await client.aclose()


async def test_a_write_whose_reply_was_lost_is_known_for_its_own(
    store: JobStore, relayed: tuple[JobStore, BrokerProxy]
) -> None:
    """The connection breaks between a script and its reply; the client sends it again, and the
    second run finds the first one's write. It was taken for someone else's: a replay was answered
    `not_found` and its job left `pending` with no message, a worker's result went uncounted, a
    create looked like an existing job's."""
    through, relay = relayed
    # The scripts loaded and the connection made (its own first exchanges are not the ones lost).
    warm = await _processing(store)
    warm_failed = await store.mark_failed(warm, "upstream_unavailable", "gave up")
    assert warm_failed.record is not None
    await store.reopen(warm_failed.record)
    assert await through.get(warm.id) is not None
    relay.lose_reply_to(b"EVALSHA")
    created = await through.create(_record())
    assert created.applied and created.record is not None and created.record.version == 1
    relay.lose_reply_to(b"EVALSHA")
    taken = await through.mark_processing(created.record.id)
    assert taken.applied and taken.record is not None and taken.record.version == 2
    relay.lose_reply_to(b"EVALSHA")
    failed = await through.mark_failed(taken.record, "upstream_unavailable", "gave up")
    assert failed.applied and failed.record is not None and failed.record.version == 3
    relay.lose_reply_to(b"EVALSHA")
    reopened = await through.reopen(failed.record)
    assert reopened.applied and reopened.record is not None
    assert (reopened.record.status, reopened.record.version, reopened.record.replays) == (
        JobStatus.PENDING,
        4,
        1,
    )
    stored = await store.get(created.record.id)
    assert stored == reopened.record  # each write made once: one version each
    # A write that really is someone else's is still told apart.
    assert not (await store.mark_failed(taken.record, "late", "late")).applied


async def test_an_old_copy_of_a_job_does_not_write_over_its_replay(store: JobStore) -> None:
    """A worker held a job (its `processing` copy) while another copy failed it and an admin replayed
    it: the first worker's late result or failure must not end the replayed job. It did: only the
    status order was checked, and `failed` -> `pending` had opened it again."""
    held = await _processing(store)
    failed = await store.mark_failed(held, "upstream_unavailable", "gave up")
    assert failed.applied and failed.record is not None
    reopened = await store.reopen(failed.record)
    assert reopened.applied and reopened.record is not None
    for late in (store.mark_failed(held, "late", "late"), store.mark_succeeded(held, [_RESULT])):
        outcome = await late
        assert not outcome.applied
        assert outcome.record == reopened.record
    assert await store.get(held.id) == reopened.record


async def test_a_result_after_a_failover_that_lost_writes_still_ends_the_job(store: JobStore) -> None:
    """Redis failed over and lost the last writes: the record is back at `pending` (1), older than
    the worker's `processing` copy (2). That is no change the worker has not seen: its result ends
    the job, as it did before writes checked versions."""
    held = await _processing(store)
    data = (
        _record(held.id)
        .model_copy(update={"created_at": held.created_at})
        .model_dump_json(exclude={"version"})
    )
    await store.redis.hset(store.job_key(held.id), mapping={"version": 1, "rank": 0, "data": data})
    done = await store.mark_succeeded(held, [_RESULT])
    assert done.applied and done.record is not None and done.record.status is JobStatus.SUCCEEDED


async def test_an_idempotency_claim_lasts_as_long_as_its_record(store: JobStore) -> None:
    """Only the create gave the claim the record's life; later writes renewed the record's alone. A
    job changed late (a long backlog, a replay days later) outlived its claim, and a retry with the
    key made a second job."""
    record = _record()
    assert await store.claim_idempotency("alice", "key-1", record.id, "fp") is None
    created = await store.create(record, claim=("alice", "key-1"))
    assert created.record is not None
    claim = store._idem_key("alice", "key-1")
    await store.redis.expire(claim, 5)  # as if the job had been waiting for hours
    taken = await store.mark_processing(record.id)
    assert taken.record is not None
    assert await store.redis.ttl(claim) > RETENTION.total_seconds() - 60
    failed = await store.mark_failed(taken.record, "upstream_unavailable", "gave up")
    assert failed.record is not None
    await store.redis.expire(claim, 5)
    await store.reopen(failed.record)
    assert await store.redis.ttl(claim) > RETENTION.total_seconds() - 60
    # A claim that holds another job now (this one's was let go of) is left as it is.
    await store.redis.set(claim, '{"job_id": "another", "fingerprint": "fp"}', ex=5)
    reopened = await store.get(record.id)
    assert reopened is not None
    await store.mark_processing(record.id)
    assert await store.redis.ttl(claim) <= 5
