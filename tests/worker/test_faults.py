"""Workers stopped in the middle of a load: SIGTERM drains what is in flight, SIGKILL loses nothing.

Each test submits a batch of sizeable jobs to a stack of its own (api + status in a namespace of
this module, so no other worker takes the messages), starts one worker, stops it while jobs are in
flight, starts a second worker and checks that every job ends `succeeded` with exactly one set of
variants in the bucket.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from imgpipe.models import JobRecord, JobStatus
from imgpipe.resources import redis_client
from imgpipe.settings import RedisSettings
from imgpipe.store import JobStore
from imgpipe_worker import consumer

from tests.e2e.test_outages import PrivateRedis
from tests.stack import REDIS_URL, Client
from tests.worker.test_consumer import (
    OwnStack,
    eventually,
    job_prefix,
    jpeg,
    log_records,
    metric,
    own_stack,
    s3_objects,
)

pytestmark = pytest.mark.e2e

JOBS = 20
GRACE_S = 30
VARIANTS = ["thumb", "small", "medium"]
EXTENSIONS = {"thumb": "jpg", "small": "webp", "medium": "webp"}


@pytest.fixture(scope="module")
def faults(
    base_env: dict[str, str], namespace: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OwnStack]:
    with own_stack(
        base_env,
        namespace,
        s3_endpoint,
        tmp_path_factory.mktemp("faults-logs"),
        "faults",
        workers=0,
        extra_env={"IMGPIPE_WORKER_CONCURRENCY": "2", "IMGPIPE_SHUTDOWN_GRACE_S": str(GRACE_S)},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return jpeg(3000, 2000)


@pytest.fixture
async def store(faults: OwnStack) -> AsyncIterator[JobStore]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield JobStore(client, faults.namespace, retention=timedelta(days=1))
    finally:
        await client.aclose()


async def _submit_batch(user: Client, data: bytes) -> list[str]:
    key = await user.upload(data)
    return [(await user.submit({"key": key}, VARIANTS))["id"] for _ in range(JOBS)]


async def _records(store: JobStore, ids: list[str]) -> dict[str, JobRecord]:
    records = await asyncio.gather(*(store.get(job_id) for job_id in ids))
    assert all(r is not None for r in records), "a job record disappeared"
    return {r.id: r for r in records if r is not None}


def _by_status(records: dict[str, JobRecord]) -> dict[JobStatus, set[str]]:
    groups: dict[JobStatus, set[str]] = {status: set() for status in JobStatus}
    for record in records.values():
        groups[record.status].add(record.id)
    return groups


async def _mid_load(store: JobStore, ids: list[str]) -> dict[JobStatus, set[str]]:
    """Wait until some jobs are done and others are being processed right now."""

    async def probe() -> dict[JobStatus, set[str]] | None:
        groups = _by_status(await _records(store, ids))
        if groups[JobStatus.SUCCEEDED] and groups[JobStatus.PROCESSING]:
            return groups
        return None

    return await eventually(probe, within=30)


async def _all_succeed_once(faults: OwnStack, store: JobStore, user: Client, ids: list[str]) -> None:
    async def done() -> dict[str, JobRecord] | None:
        records = await _records(store, ids)
        return records if all(r.status.terminal for r in records.values()) else None

    records = await eventually(done, within=45)
    failed = {r.id: r.error for r in records.values() if r.status is not JobStatus.SUCCEEDED}
    assert not failed, failed
    for job_id, record in records.items():
        prefix = job_prefix(user.sub, job_id)
        expected = {f"{prefix}{name}.{EXTENSIONS[name]}" for name in VARIANTS}
        assert {v.key for v in record.variants} == expected
        # Exactly one set of variants per job: nothing more, nothing less under its prefix.
        assert set(await asyncio.to_thread(s3_objects, faults.s3_endpoint, prefix)) == expected


async def test_sigterm_finishes_jobs_in_flight_then_exits(
    faults: OwnStack, store: JobStore, http: aiohttp.ClientSession, big_jpeg: bytes
) -> None:
    user = faults.client(http)
    ids = await _submit_batch(user, big_jpeg)
    first = faults.start_worker()
    await _mid_load(store, ids)

    first.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    code = await asyncio.to_thread(first.proc.wait, GRACE_S + 5)
    took = time.monotonic() - stopped
    assert code == 0, first.tail()
    assert took < GRACE_S, f"exited after {took:.1f}s"

    # It waited for the jobs it held, and finished them: nothing is left half done.
    waited = [r for r in log_records(first) if r["message"] == "waiting for jobs in flight"]
    assert len(waited) == 1 and waited[0]["in_flight"] >= 1, first.tail()
    after = _by_status(await _records(store, ids))
    assert not after[JobStatus.PROCESSING], after
    assert not after[JobStatus.FAILED], after
    assert after[JobStatus.SUCCEEDED], after
    left = after[JobStatus.PENDING]
    assert left, "every job finished before SIGTERM: the test proved nothing"
    finished = {r["job_id"] for r in log_records(first) if r["message"] == "job succeeded"}
    assert finished == after[JobStatus.SUCCEEDED]

    second = faults.start_worker()
    await _all_succeed_once(faults, store, user, ids)
    # The second worker did only what was left: every job was processed exactly once.
    assert await metric(http, second, "imgpipe_jobs_succeeded_total") == len(left)
    assert {r["job_id"] for r in log_records(second) if r["message"] == "job succeeded"} == left
    faults.stack.stop(second)


async def test_sigkill_mid_job_loses_nothing(
    faults: OwnStack, store: JobStore, http: aiohttp.ClientSession, big_jpeg: bytes
) -> None:
    user = faults.client(http)
    ids = await _submit_batch(user, big_jpeg)
    first = faults.start_worker()
    await _mid_load(store, ids)

    assert faults.stack.stop(first, signal.SIGKILL) == -signal.SIGKILL
    killed = _by_status(await _records(store, ids))
    interrupted = killed[JobStatus.PROCESSING]
    assert interrupted, "no job was in flight at the kill: the test proved nothing"
    assert not killed[JobStatus.FAILED], killed

    second = faults.start_worker()
    await _all_succeed_once(faults, store, user, ids)
    # The interrupted jobs came back to the queue and were done by the second worker.
    redone = {r["job_id"] for r in log_records(second) if r["message"] == "job succeeded"}
    assert interrupted <= redone
    assert redone.isdisjoint(killed[JobStatus.SUCCEEDED])
    faults.stack.stop(second)


async def test_settling_outlasts_a_long_redis_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's status write is retried for as long as Redis is down, not given up after a while.

    The bounded back-off (kept for other errors) is made tiny here, so the write outlives it many
    times over before Redis appears; giving up would return the message to the queue, where a long
    outage burns its delivery limit and the job is dead-lettered instead of done.
    """
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed here")
    monkeypatch.setattr(consumer, "_SETTLE_BACKOFF_S", (0.01, 0.01, 0.01))
    monkeypatch.setattr(consumer, "_OUTAGE_RETRY_S", 0.02)
    server = PrivateRedis(tmp_path / "redis")  # not started yet: nothing listens on its port
    client = redis_client(RedisSettings(redis_url=server.url))
    tries = 0

    async def write() -> bool:
        nonlocal tries
        tries += 1
        return await client.set("settled", "yes")

    try:
        settle = asyncio.create_task(consumer._persist(write))
        await eventually(lambda: tries > 20, within=30)  # far past the bounded retries
        assert not settle.done()
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(10):
            assert await settle is True
        assert await client.get("settled") == b"yes"

        calls = 0

        async def broken() -> None:
            nonlocal calls
            calls += 1
            raise ValueError("not an outage")

        with pytest.raises(ValueError):  # anything else still gives up after the bounded retries
            await consumer._persist(broken)
        assert calls == len(consumer._SETTLE_BACKOFF_S) + 1
    finally:
        await client.aclose()
        server.kill()
