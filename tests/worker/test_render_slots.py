"""The consumer's render slots: at most `concurrency` renders at once, and waiting for a slot is free.

The consumer takes one message more than its concurrency so the next job's download overlaps the
renders. A job that then waits behind another job's render must not have that wait counted against
its own `job_timeout_s`: it would fail a healthy image with `processing_timeout`. Runs `Consumer._run`
against the real (moto) S3, with the render slowed down so that the waits are long.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pyvips
from imgpipe.models import JobMessage, KeySource, Variant, utcnow
from imgpipe.storage import Storage
from imgpipe_worker import consumer, imaging
from imgpipe_worker.consumer import Consumer, ConsumerConfig
from imgpipe_worker.fetch import FetchPolicy

from tests.stack import s3_settings

RENDER_S = 0.5
JOB_TIMEOUT_S = 1.5  # three renders' worth: the fourth job waits for three others before its own


@pytest.fixture
async def storage(s3_endpoint: str) -> AsyncIterator[Storage]:
    settings = s3_settings(s3_endpoint, f"imgpipe-slots-{uuid.uuid4().hex[:10]}")
    storage = Storage(settings)
    await storage.ensure_bucket()
    try:
        yield storage
    finally:
        await storage.close()


async def test_renders_wait_for_a_slot_without_spending_their_timeout(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, most = 0, 0
    lock = threading.Lock()
    real = imaging.render

    def slow_render(*args: object) -> list[imaging.Rendered]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(RENDER_S)
            return real(*args)  # type: ignore[arg-type]
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(consumer.imaging, "render", slow_render)
    source = pyvips.Image.black(64, 48).write_to_buffer(".png")
    await storage.put("uploads/o/src", source, "image/png")
    config = ConsumerConfig(
        concurrency=1,
        job_timeout_s=JOB_TIMEOUT_S,
        max_attempts=1,
        limits=imaging.Limits(),
        fetch=FetchPolicy(),
    )
    # Only the storage and the render pool are used by `_run`; no broker or store is needed.
    worker = Consumer(None, None, None, storage, config)  # type: ignore[arg-type]
    variant = Variant(name="t", width=16, height=16, fit="inside", format="jpeg", quality=80)

    async def job() -> float:
        message = JobMessage(
            id=uuid.uuid4().hex,
            owner="o",
            source=KeySource(key="uploads/o/src"),
            variants=[variant],
            created_at=utcnow(),
        )
        started = time.monotonic()
        async with asyncio.timeout(JOB_TIMEOUT_S) as budget:
            results = await worker._run(message, budget, asyncio.create_task(worker._source(message)))
        assert [r.width for r in results] == [16]
        return time.monotonic() - started

    try:
        took = await asyncio.gather(*(job() for _ in range(4)))
    finally:
        worker._pool.shutdown(wait=True)
    assert most == 1  # one render at a time at concurrency 1
    # The last job spent more than its whole timeout waiting and rendering, and still succeeded.
    assert max(took) > JOB_TIMEOUT_S
