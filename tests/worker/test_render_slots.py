"""The consumer's render slots: at most `concurrency` renders at once, and waiting for a slot is free.

The consumer takes one message more than its concurrency so the next job's download overlaps the
renders. A job that then waits behind another job's render must not have that wait counted against
its own `job_timeout_s`: it would fail a healthy image with `processing_timeout`. Runs `Consumer._run`
against the real (moto) S3, with the render slowed down so that the waits are long.

Then a whole `Consumer`, in this process, on the real RabbitMQ, Redis and (moto) S3: a job that runs out
of time mid-render keeps its slot until the render (which cannot be interrupted) has really ended, so
the next job's clock does not run while its render queues behind it; and a job's source bytes are
freed once its render is done, not held through the uploads and the status write.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Network
from typing import Any

import aio_pika
import pytest
import pyvips
import redis.asyncio as aioredis
from aiohttp import web
from imgpipe import broker
from imgpipe.broker import Publisher, Topology
from imgpipe.models import (
    JobMessage,
    JobRecord,
    JobStatus,
    KeySource,
    UrlSource,
    Variant,
    VariantResult,
    utcnow,
)
from imgpipe.storage import Storage
from imgpipe.store import JobStore
from imgpipe.telemetry import SOURCES_DEFERRED
from imgpipe_worker import consumer, holds, imaging
from imgpipe_worker.consumer import Consumer, ConsumerConfig
from imgpipe_worker.fetch import FetchPolicy

from tests.stack import AMQP_URL, REDIS_URL, drop_namespace, local_http, s3_settings
from tests.worker.test_consumer import eventually, jpeg

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
        hold = worker._sources.hold()
        try:
            async with asyncio.timeout(JOB_TIMEOUT_S) as budget:
                source = asyncio.create_task(worker._fetched(message.source, hold))
                results = await worker._run(message, budget, source, hold, [""])
        finally:
            hold.job_done()
        assert [r.width for r in results] == [16]
        return time.monotonic() - started

    try:
        took = await asyncio.gather(*(job() for _ in range(4)))
    finally:
        worker._pool.shutdown(wait=True)
    assert most == 1  # one render at a time at concurrency 1
    # The last job spent more than its whole timeout waiting and rendering, and still succeeded.
    assert max(took) > JOB_TIMEOUT_S


# --------------------------------------------------------------------------------------------------------
# A whole Consumer, in this process, on the real RabbitMQ and Redis (a namespace of its own) and moto S3.


@pytest.fixture
def slot_namespace() -> Iterator[str]:
    namespace = f"imgpipe-slots-{uuid.uuid4().hex[:10]}"
    yield namespace
    drop_namespace(namespace)  # sync: it runs its own event loop


@dataclass
class Running:
    store: JobStore
    publisher: Publisher
    worker: Consumer

    async def submit(self, key: str, variants: list[Variant]) -> str:
        """Record and publish a job as the api does; returns its id. `key` may be a URL instead."""
        source = UrlSource(url=key) if key.startswith("http") else KeySource(key=key)
        record = JobRecord.pending(uuid.uuid4().hex, "o", source, variants)
        assert (await self.store.create(record)).applied
        await self.publisher.publish_job(
            JobMessage(
                id=record.id,
                owner=record.owner,
                source=record.source,
                variants=record.requested,
                created_at=record.created_at,
            )
        )
        return record.id

    async def settled(self, job_id: str, within: float = 10.0) -> JobRecord:
        async with asyncio.timeout(within):
            while True:
                record = await self.store.get(job_id)
                if record is not None and record.status.terminal:
                    return record
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_consumer(
    namespace: str, storage: Storage, *, job_timeout_s: float, render_timeout_s: float | None = None
) -> AsyncIterator[Running]:
    connection = broker.robust_connection(AMQP_URL)
    await broker.keep_connecting(connection)
    publisher = Publisher(connection, Topology(namespace, (1, 2)))
    client = aioredis.Redis.from_url(REDIS_URL)
    store = JobStore(client, namespace, retention=timedelta(minutes=5))
    config = ConsumerConfig(
        concurrency=1,
        job_timeout_s=job_timeout_s,
        max_attempts=1,
        # Shorter than the job's, as the settings require (a render's own limit fires first).
        limits=imaging.Limits(timeout_s=render_timeout_s or job_timeout_s / 2),
        # The tests' own servers, on 127.0.0.1 and free ports.
        fetch=FetchPolicy(allowed_networks=(IPv4Network("127.0.0.0/8"),), allowed_ports=None),
        shutdown_grace_s=10,
    )
    worker = Consumer(connection, publisher, store, storage, config)
    try:
        await publisher.open()
        await worker.start()
        async with asyncio.timeout(10):
            while True:
                try:
                    await worker.ready()
                    break
                except ConnectionError:
                    await asyncio.sleep(0.05)
        yield Running(store, publisher, worker)
    finally:
        await worker.stop()
        worker._pool.shutdown(wait=True)  # an abandoned render must not outlive the test
        await publisher.close()
        await connection.close()
        await client.aclose()


async def test_a_timed_out_render_keeps_its_slot_until_it_ends(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose budget runs out mid-render fails, but its render goes on (libvips cannot be
    interrupted): the next job must not take the slot, and start its clock, before that render ends."""
    overrun_s, job_timeout_s = 3.0, 1.0
    started = threading.Event()
    renders: list[tuple[str, float, float]] = []
    real = imaging.render

    def render(data: bytes, variants: Sequence[Variant], limits: imaging.Limits) -> list[imaging.Rendered]:
        begun = time.monotonic()
        if variants[0].name == "stuck":  # an uninterruptible step far over the job's budget
            started.set()
            time.sleep(overrun_s)
        try:
            return real(data, variants, limits)
        finally:
            renders.append((variants[0].name, begun, time.monotonic()))

    monkeypatch.setattr(consumer.imaging, "render", render)
    await storage.put("uploads/o/src", pyvips.Image.black(64, 48).write_to_buffer(".png"), "image/png")
    stuck = Variant(name="stuck", width=16, height=16, format="jpeg")
    quick = Variant(name="quick", width=16, height=16, format="jpeg")

    async with running_consumer(slot_namespace, storage, job_timeout_s=job_timeout_s) as run:
        first = await run.submit("uploads/o/src", [stuck])
        assert await asyncio.to_thread(started.wait, 5)
        second = await run.submit("uploads/o/src", [quick])  # waits for the slot, its clock stopped

        failed = await run.settled(first)
        assert failed.status is JobStatus.FAILED
        assert failed.error is not None and failed.error.code == "processing_timeout"
        done = await run.settled(second)

    assert done.status is JobStatus.SUCCEEDED, done.error
    assert [v.name for v in done.variants] == ["quick"]
    # One render at a time: the quick one began only after the abandoned one had ended.
    (_, _, stuck_end), (name, quick_begin, _) = renders
    assert name == "quick" and quick_begin >= stuck_end


@pytest.mark.parametrize("hung", ["get", "put"])
async def test_a_job_that_runs_out_of_time_waiting_for_s3_is_retried_not_failed_for_good(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch, hung: str
) -> None:
    """S3 stops answering mid-request (a hung connection): the job's budget runs out while it waits.
    That is S3's failure, not the image's: `storage_unavailable`, retried (here, with one attempt,
    dead-lettered to be replayed), not the final `processing_timeout` a render that overruns gets."""
    await storage.put("uploads/o/src", pyvips.Image.black(64, 48).write_to_buffer(".png"), "image/png")

    async def hangs(*_: Any, **__: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(storage, hung, hangs)
    # Time enough for the (tiny) render even on a loaded machine: the budget must run out in S3.
    async with running_consumer(slot_namespace, storage, job_timeout_s=2.0) as run:
        await _fails_as_s3_unavailable(run)


async def _fails_as_s3_unavailable(run: Running) -> None:
    """A job run to its end fails as S3 being out of reach: retried, here dead-lettered (one attempt)."""
    job = await run.submit("uploads/o/src", [Variant(name="t", width=16, format="jpeg")])
    failed = await run.settled(job)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error.code == "storage_unavailable", failed.error
    assert "gave up after 1 attempt" in failed.error.message


async def test_a_render_left_short_of_time_by_a_slow_fetch_is_retried_not_failed_for_good(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 sends the source slowly, and the render, well within its own limit, then outlasts what is
    left of the job's time. The image is not to blame: retried (here, with one attempt, dead-lettered
    to be replayed), not failed for good as `processing_timeout` as if the render had overrun."""
    await storage.put("uploads/o/src", pyvips.Image.black(64, 48).write_to_buffer(".png"), "image/png")
    real_get, real_render = storage.get, imaging.render

    async def slow_get(*args: Any, **kwargs: Any) -> bytes:
        await asyncio.sleep(1.6)  # the job's 2 s nearly gone when the source arrives
        return await real_get(*args, **kwargs)

    def render(*args: Any) -> list[imaging.Rendered]:
        time.sleep(0.8)  # within the render's own 1 s limit
        return real_render(*args)

    monkeypatch.setattr(storage, "get", slow_get)
    monkeypatch.setattr(consumer.imaging, "render", render)
    async with running_consumer(slot_namespace, storage, job_timeout_s=2.0, render_timeout_s=1.0) as run:
        await _fails_as_s3_unavailable(run)


async def test_jobs_whose_channel_closed_are_let_go(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer channel closes (a broker blip, RabbitMQ's `consumer_timeout`) while the worker
    holds jobs it has not finished, and the reopened channel is sent them again. The first tasks went
    on beside the new ones: every channel lost added a prefetch's worth of jobs (and of sources held
    in memory) to the worker's load."""
    await storage.put("uploads/o/src", pyvips.Image.black(64, 48).write_to_buffer(".png"), "image/png")
    real_get, release, fetches = storage.get, asyncio.Event(), [0]

    async def held_get(*args: Any, **kwargs: Any) -> bytes:
        fetches[0] += 1
        await release.wait()
        return await real_get(*args, **kwargs)

    monkeypatch.setattr(storage, "get", held_get)
    async with running_consumer(slot_namespace, storage, job_timeout_s=30.0) as run:
        worker = run.worker
        jobs = [
            await run.submit("uploads/o/src", [Variant(name="t", width=16, format="jpeg")]) for _ in range(3)
        ]
        for lost in range(1, 4):
            # The prefetch's worth held, (again) fetching.
            await eventually(lambda n=lost: fetches[0] >= worker.prefetch * n)
            assert worker._subscription is not None
            channel = await worker._subscription.channel.get_underlay_channel()
            # An acknowledgement of a tag the broker never sent: it closes the channel, which reopens.
            await channel.basic_ack(999_999)
            await eventually(lambda c=channel: c.is_closed)
        await eventually(lambda: fetches[0] >= worker.prefetch * 4)
        assert len(worker._tasks) <= worker.prefetch
        release.set()
        done = [await run.settled(job) for job in jobs]
    assert [record.status for record in done] == [JobStatus.SUCCEEDED] * 3
    # The downloads of the jobs let go of were dropped with them: none holds bytes.
    assert run.worker._sources.held_bytes == 0


async def test_a_delivery_whose_channel_closed_before_its_callback_is_left_to_the_broker(
    storage: Storage, slot_namespace: str
) -> None:
    """A delivery whose channel has closed by the time the consumer's callback runs (aio-pika cancels
    a callback when its channel closes, but only one that has not run yet: this guards the hop). The
    job used to start anyway, beside the copy the broker sends again, and stay in the worker's tasks
    for good: its channel was read only after the task was made, and raised, so nothing could let
    it go."""
    async with running_consumer(slot_namespace, storage, job_timeout_s=30.0) as run:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue.name)
            message = await queue.get(timeout=5)
            await channel.close()  # the broker has the message back: it was never acknowledged
            await run.worker._on_message(message)
            assert not run.worker._tasks
            assert not run.worker._delivered_on
        finally:
            await connection.close()


async def test_source_bytes_are_freed_after_the_render(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to IMGPIPE_MAX_UPLOAD_BYTES of source must not stay in memory through the uploads and the
    status write. Bytes take no weak reference, so the source is a bytes subclass that notes its
    `__del__`; it is checked when the variants are uploaded and when the job is marked succeeded."""
    freed = threading.Event()

    class Source(bytes):
        def __del__(self) -> None:
            freed.set()

    real_get, real_put = storage.get, storage.put
    freed_at: list[tuple[str, bool]] = []

    async def get(key: str, **kwargs: Any) -> bytes:
        return Source(await real_get(key, **kwargs))

    async def put(key: str, data: bytes, content_type: str) -> None:
        freed_at.append(("upload", freed.is_set()))
        await real_put(key, data, content_type)

    monkeypatch.setattr(storage, "get", get)
    monkeypatch.setattr(storage, "put", put)
    await real_put("uploads/o/big", jpeg(1200, 900), "image/jpeg")
    variants = [
        Variant(name="a", width=64, height=64, format="jpeg"),
        Variant(name="b", width=32, height=32, format="webp"),
    ]

    async with running_consumer(slot_namespace, storage, job_timeout_s=20) as run:
        real_succeeded = run.store.mark_succeeded

        async def mark_succeeded(record: JobRecord, results: list[VariantResult]) -> Any:
            freed_at.append(("status", freed.is_set()))
            return await real_succeeded(record, results)

        monkeypatch.setattr(run.store, "mark_succeeded", mark_succeeded)
        done = await run.settled(await run.submit("uploads/o/big", variants))

    assert done.status is JobStatus.SUCCEEDED, done.error
    assert freed_at == [("upload", True), ("upload", True), ("status", True)]


async def test_source_bytes_are_freed_when_the_render_fails(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render that raises must not keep the source either: the frames of its traceback hold it,
    and the job's failure that carries them sits in reference cycles, which only the garbage
    collector breaks (four refused jobs of a 35 MB source took a worker 137 MiB over idle). With the
    collector off, the source must be gone by the time the job is marked failed."""
    freed = threading.Event()

    class Source(bytes):
        def __del__(self) -> None:
            freed.set()

    real_get = storage.get
    freed_at: list[bool] = []

    async def get(key: str, **kwargs: Any) -> bytes:
        return Source(await real_get(key, **kwargs))

    monkeypatch.setattr(storage, "get", get)
    await storage.put("uploads/o/corrupt", jpeg(1200, 900)[:600] + b"\x00" * 60_000, "image/jpeg")
    gc.collect()
    gc.disable()
    try:
        async with running_consumer(slot_namespace, storage, job_timeout_s=20) as run:
            real_failed = run.store.mark_failed

            async def mark_failed(*args: Any, **kwargs: Any) -> Any:
                freed_at.append(freed.is_set())
                return await real_failed(*args, **kwargs)

            monkeypatch.setattr(run.store, "mark_failed", mark_failed)
            thumb = Variant(name="t", width=64, format="jpeg")
            done = await run.settled(await run.submit("uploads/o/corrupt", [thumb]))
    finally:
        gc.enable()

    assert done.status is JobStatus.FAILED and done.error is not None
    assert done.error.code == "corrupt_image"
    assert freed_at == [True]


def _noise_png() -> bytes:
    """A 300 x 200 PNG of noise: 100-400 kB, which no compression makes smaller."""
    noise = [pyvips.Image.gaussnoise(300, 200, sigma=80, seed=seed) for seed in (1, 2, 3)]
    return noise[0].bandjoin(noise[1:]).cast("uchar").copy(interpretation="srgb").write_to_buffer(".png")


def _slow_renders(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[float]:
    """Make every render take `seconds` more; returns the list of the moments they end."""
    ended: list[float] = []
    real_render = imaging.render

    def render(*args: Any) -> list[imaging.Rendered]:
        time.sleep(seconds)
        try:
            return real_render(*args)
        finally:
            ended.append(time.monotonic())

    monkeypatch.setattr(consumer.imaging, "render", render)
    return ended


@pytest.mark.parametrize("large", [False, True], ids=["small-outputs", "large-outputs"])
async def test_large_outputs_keep_the_render_slot_until_they_are_uploaded(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch, large: bool
) -> None:
    """The next job renders while a job's outputs upload, but not beside outputs over
    `holds.OVERLAP_MAX_BYTES`: the render budget does not count them (two full-size PNG jobs of a
    26 MP progressive JPEG took a worker at concurrency 1 98 MiB over one)."""
    await storage.put("uploads/o/noise", _noise_png(), "image/png")
    png = Variant(name="p", width=300, format="png")  # noise: 172 kB
    monkeypatch.setattr(holds, "OVERLAP_MAX_BYTES", 100_000 if large else 1_000_000)
    renders: list[float] = []
    uploads: list[tuple[float, float]] = []
    real_render, real_put = imaging.render, storage.put

    def render(*args: Any) -> list[imaging.Rendered]:
        renders.append(time.monotonic())
        return real_render(*args)

    async def put(key: str, data: bytes, content_type: str) -> None:
        begun = time.monotonic()
        await asyncio.sleep(0.5)  # a slow upload: the next render has every chance to start beside it
        await real_put(key, data, content_type)
        uploads.append((begun, time.monotonic()))

    monkeypatch.setattr(consumer.imaging, "render", render)
    monkeypatch.setattr(storage, "put", put)
    async with running_consumer(slot_namespace, storage, job_timeout_s=20) as run:
        jobs = [await run.submit("uploads/o/noise", [png]) for _ in range(2)]
        done = [await run.settled(job) for job in jobs]

    assert [record.status for record in done] == [JobStatus.SUCCEEDED] * 2
    assert all(100_000 < record.variants[0].bytes < 1_000_000 for record in done)
    (first_upload_begun, first_upload_end), _ = uploads
    if large:
        assert renders[1] >= first_upload_end
    else:
        assert renders[1] < first_upload_begun + 0.5


@pytest.mark.parametrize("room", [True, False], ids=["room", "no-room"])
async def test_a_source_downloads_ahead_of_the_renders_only_into_the_room_the_sources_leave(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch, room: bool
) -> None:
    """The job held ahead of the renders downloads its source while they run, but reads its body
    only into what the sources held leave of their budget (`holds.Sources`): each render's leaves
    `imaging.SOURCE_ROOM_BYTES` for them (a 4800 px PNG of a 100 MP JPEG took a worker at
    concurrency 1 from 289 MiB alone to 321-328 MiB with the next 29 MB source beside it). With too
    little room it gives the download up at the headers, and makes it again once the render before
    it has freed its source. That wait is not its time: the job's budget is shorter than the wait
    and its render together."""
    render_s, job_timeout_s = 0.8, 1.2
    source = _noise_png()
    assert 100_000 < len(source) < 400_000
    await storage.put("uploads/o/noise", source, "image/png")
    monkeypatch.setattr(imaging, "SOURCE_ROOM_BYTES", 1_000_000 if room else len(source) * 3 // 2)
    gets: list[float] = []
    real_get = storage.get

    async def get(key: str, **kwargs: Any) -> bytearray:
        gets.append(time.monotonic())
        return await real_get(key, **kwargs)

    monkeypatch.setattr(storage, "get", get)
    rendered = _slow_renders(monkeypatch, render_s)
    deferred = SOURCES_DEFERRED._value.get()
    thumb = Variant(name="t", width=32, format="jpeg")
    async with running_consumer(slot_namespace, storage, job_timeout_s=job_timeout_s) as run:
        jobs = [await run.submit("uploads/o/noise", [thumb]) for _ in range(2)]
        done = [await run.settled(job) for job in jobs]

    assert [record.status for record in done] == [JobStatus.SUCCEEDED] * 2, [r.error for r in done]
    assert run.worker._sources.held_bytes == 0  # every source let go of, once
    if room:
        assert len(gets) == 2 and gets[1] < rendered[0]
    else:
        assert len(gets) == 3 and gets[1] < rendered[0] <= gets[2]
    assert SOURCES_DEFERRED._value.get() - deferred == (not room)


async def test_a_url_source_without_a_length_waits_to_be_the_only_source_when_it_has_no_room(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body sent without a `Content-Length` is counted at all the room it is given until it is
    read. The job ahead of the render reads its own past that room: it gives the download up, waits
    until no other source is held, and fetches it again, off its clock."""
    render_s, job_timeout_s = 0.8, 1.2
    source = _noise_png()
    monkeypatch.setattr(imaging, "SOURCE_ROOM_BYTES", len(source) * 3 // 2)
    hits: list[float] = []

    async def chunked(request: web.Request) -> web.StreamResponse:
        hits.append(time.monotonic())
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for start in range(0, len(source), 16_384):
                await response.write(source[start : start + 16_384])
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the worker hung up past the room it had
        return response

    rendered = _slow_renders(monkeypatch, render_s)
    app = web.Application()
    app.router.add_get("/{name}", chunked)
    deferred = SOURCES_DEFERRED._value.get()
    thumb = Variant(name="t", width=32, format="jpeg")
    async with (
        local_http(app) as base,
        running_consumer(slot_namespace, storage, job_timeout_s=job_timeout_s) as run,
    ):
        jobs = [await run.submit(f"{base}/{n}.png", [thumb]) for n in range(2)]
        done = [await run.settled(job) for job in jobs]

    assert [record.status for record in done] == [JobStatus.SUCCEEDED] * 2, [r.error for r in done]
    assert len(hits) == 3 and hits[1] < rendered[0] <= hits[2]
    assert SOURCES_DEFERRED._value.get() - deferred == 1
    assert run.worker._sources.held_bytes == 0


async def test_a_job_that_never_gets_room_for_its_source_fails_rather_than_waits_for_good(
    storage: Storage, slot_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for room is off the job's clock, so a wait that never ended (a bug in the accounting)
    would leave an accepted job unfinished for good. A wait as long as a whole job's time ends it
    as a transient failure instead: retried, then failed."""
    await storage.put("uploads/o/src", pyvips.Image.black(64, 48).write_to_buffer(".png"), "image/png")

    async def never(_: holds.SourceHold) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(holds.SourceHold, "may_try", lambda _: False)
    monkeypatch.setattr(holds.SourceHold, "room_for_it", never)
    async with running_consumer(slot_namespace, storage, job_timeout_s=1.0) as run:
        done = await run.settled(await run.submit("uploads/o/src", [Variant(name="t", width=16)]))

    assert done.status is JobStatus.FAILED and done.error is not None
    assert done.error.code == "processing_timeout"
    assert "no room for its source after 1 s" in done.error.message
    assert run.worker._sources.held_bytes == 0
