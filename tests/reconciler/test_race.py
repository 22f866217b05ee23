"""Reconciliations racing real traffic: uploads and jobs through the api and the worker while runs
with no grace period at all delete orphans; then the end of the jobs' lives closes the loop."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from imgpipe import broker
from imgpipe.storage import Storage
from imgpipe.store import JobStore, owner_id
from imgpipe_reconciler.reconcile import Policy, Reconciler

from tests.isolated import image, isolated_stack
from tests.reconciler.conftest import keys
from tests.stack import AMQP_URL, Client, Stack, s3_settings

pytestmark = pytest.mark.e2e


@pytest.fixture
def worker_tmp(tmp_path: Path) -> Path:
    path = tmp_path / "worker-tmp"
    path.mkdir()
    return path


@pytest.fixture
def pipeline(base_env: dict[str, str], bucket: str, tmp_path: Path, worker_tmp: Path) -> Iterator[Stack]:
    # The worker gets an empty TMPDIR of its own: it must still be empty after the jobs.
    with isolated_stack(
        {**base_env, "IMGPIPE_S3_BUCKET": bucket, "IMGPIPE_WORKER_CONCURRENCY": "4"},
        tmp_path,
        {"api": ("api", {}), "status": ("status", {}), "worker": ("worker", {"TMPDIR": str(worker_tmp)})},
    ) as stack:
        yield stack


@pytest.fixture
async def reconciler(pipeline: Stack, redis_client: aioredis.Redis) -> AsyncIterator[Reconciler]:
    env = pipeline.env
    namespace = env["IMGPIPE_NAMESPACE"]
    connection = await broker.connect(AMQP_URL)
    publisher = broker.Publisher(connection, broker.Topology(namespace, (1, 2)))
    storage = Storage(s3_settings(env["IMGPIPE_S3_ENDPOINT_URL"], env["IMGPIPE_S3_BUCKET"]))
    store = JobStore(redis_client, namespace, retention=timedelta(days=7))
    try:
        yield Reconciler(
            store, storage, publisher, Policy(grace_s=0, stuck_pending_s=3600, stuck_processing_s=3600)
        )
    finally:
        await storage.close()
        await publisher.close()
        await connection.close()


async def test_a_run_racing_uploads_and_jobs_deletes_nothing_in_use(
    pipeline: Stack,
    reconciler: Reconciler,
    redis_client: aioredis.Redis,
    http: aiohttp.ClientSession,
    s3: Any,
    bucket: str,
    worker_tmp: Path,
) -> None:
    client = Client(http, pipeline, "racer")
    stop = asyncio.Event()
    deleted = 0

    async def reconcile_continuously() -> None:
        nonlocal deleted
        n = 0
        while not stop.is_set():
            n += 1  # a fresh orphan each round, so every run has something to delete
            key = f"uploads/{owner_id('racer')}/orphan-{n}"
            await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=b"x")
            deleted += (await reconciler.run(dry_run=False)).deleted

    async def flow(i: int) -> tuple[str, dict]:
        await asyncio.sleep(random.uniform(0, 1.0))
        key = await client.upload(image(80 + i, 60))
        await asyncio.sleep(random.uniform(0, 0.3))  # uploaded, not yet submitted: only the grant holds it
        job = await client.submit({"key": key}, ["thumb", "small"], **{"Idempotency-Key": f"k{i}"})
        return key, await client.wait(job["id"])

    loop = asyncio.create_task(reconcile_continuously())
    try:
        results = await asyncio.gather(*(flow(i) for i in range(16)))
    finally:
        stop.set()
        await loop
    deleted += (await reconciler.run(dry_run=False)).deleted

    assert deleted >= 2, "the reconciler did not really delete anything during the race"
    in_use = set()
    for key, job in results:
        assert job["status"] == "succeeded", job  # the source was there when the worker read it
        in_use |= {key, *(v["key"] for v in job["variants"])}
    remaining = keys(s3, bucket)
    assert in_use <= remaining
    assert remaining == in_use  # and every orphan is gone
    assert os.listdir(worker_tmp) == []  # the worker wrote no temporary files

    # Every key the jobs left in Redis expires on its own (records, markers, idempotency, grants).
    namespace = pipeline.env["IMGPIPE_NAMESPACE"]
    names = [k.decode() async for k in redis_client.scan_iter(f"{namespace}:*")]
    assert names
    for name in names:
        assert await redis_client.ttl(name) > 0, name
    # Their retention ends and the grants expire (here: now): sources and variants are orphans and go.
    await redis_client.delete(*(n for n in names if ":job:" in n or ":src:" in n or n.endswith(":grants")))
    final = await reconciler.run(dry_run=False)
    assert final.deleted == len(in_use)
    assert keys(s3, bucket) == set()
    assert os.listdir(worker_tmp) == []
