"""The worker's consumer: take a job message, make its variants, store them, move the status on.

Delivery is at least once. A message is acknowledged only after its variants are in S3 and the
terminal status is in Redis; output keys are deterministic and the status moves only forward, so
a redelivered or duplicated message does no harm. Failures split in two:

- permanent (a bad image, a missing source, a forbidden URL): the job is marked `failed` with the
  error's code at once and the message is acknowledged;
- transient (S3, Redis, a URL's server): the message is parked in a retry queue for its back-off
  and tried again, up to `IMGPIPE_MAX_ATTEMPTS`; then the job is marked `failed` and the message
  goes to the dead-letter queue for people to look at.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import aiohttp
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aiormq.abc import AbstractChannel as AbstractUnderlayChannel
from aiormq.exceptions import AMQPConnectionError, ChannelInvalidStateError
from imgpipe import broker
from imgpipe.bodies import BodyNotAdmitted
from imgpipe.broker import ATTEMPT_HEADER, REQUEST_ID_HEADER, BrokerUnavailable, Publisher
from imgpipe.models import (
    CONTENT_TYPES,
    JobMessage,
    JobRecord,
    KeySource,
    UrlSource,
    Variant,
    VariantResult,
    read_written,
)
from imgpipe.storage import Storage, StorageError, variant_key
from imgpipe.store import JobStore, redis_unavailable
from imgpipe.telemetry import (
    JOB_LATENCY,
    JOB_SECONDS,
    JOB_STAGE,
    JOBS_DEAD_LETTERED,
    JOBS_FAILED,
    JOBS_IN_FLIGHT,
    JOBS_RETRIED,
    JOBS_SUCCEEDED,
    SOURCES_DEFERRED,
    VARIANT_SECONDS,
    WORKER_CONCURRENCY,
    clean_request_id,
    job_id_var,
    request_id_var,
)
from pydantic import ValidationError

from imgpipe_worker import imaging
from imgpipe_worker.fetch import FetchError, FetchPolicy, fetch_url, make_session
from imgpipe_worker.holds import RenderSlot, SourceHold, Sources
from imgpipe_worker.settings import DEFAULT_RENDER_NICE

log = logging.getLogger("imgpipe.worker")

T = TypeVar("T")


def _since_accepted(created_at: datetime) -> float:
    """Seconds from the api's creating the job's record (its `created_at`) until now, by the wall
    clock: the api's and the worker's hosts may differ by a little, so never negative.

    The api writes an aware time; a message from elsewhere may carry a naive one. That is taken as
    UTC: read in this host's zone, year 1 raised (`timestamp()` goes through the C library there).
    """
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return max(0.0, time.time() - created_at.timestamp())


#: Pauses between attempts to settle a job after an error (about a minute in all).
_SETTLE_BACKOFF_S = (0.5, 1, 2, 4, 8, 15, 30)
#: Longest pause between attempts while Redis or RabbitMQ is down (those are retried until they work).
_OUTAGE_RETRY_S = 5.0


class JobFailed(Exception):
    """A failure with a code for the job record; `transient` failures are retried."""

    def __init__(self, code: str, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class ConsumerConfig:
    concurrency: int
    job_timeout_s: float
    max_attempts: int
    limits: imaging.Limits
    fetch: FetchPolicy
    shutdown_grace_s: float = 60.0
    render_nice: int = DEFAULT_RENDER_NICE


class Consumer:
    """Consumes the jobs queue with `concurrency` jobs in flight, image work on a thread pool."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        publisher: Publisher,
        store: JobStore,
        storage: Storage,
        config: ConsumerConfig,
    ) -> None:
        self._connection = connection
        self._publisher = publisher
        self._store = store
        self._storage = storage
        self._config = config
        # One thread per concurrent render: libvips releases the GIL, so renders run in parallel.
        self._pool = ThreadPoolExecutor(
            max_workers=config.concurrency,
            thread_name_prefix="render",
            initializer=_lower_priority,
            initargs=(config.render_nice,),
        )
        # `concurrency` is how many renders run at once. One message more than that is taken, so
        # the next job's download overlaps the renders and a render slot that frees up starts the
        # next render at once instead of idling a core through a GET (see `_run`).
        self._render_slots = asyncio.Semaphore(config.concurrency)
        # The sources held or being read, to the room each render's budget leaves for them (`holds.Sources`).
        self._sources = Sources(imaging.SOURCE_ROOM_BYTES * config.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        # The channel each task's message came on: once it closes, the broker has put the message
        # back in the queue, and the task's acknowledgement can no longer be sent.
        self._delivered_on: dict[asyncio.Task[None], AbstractUnderlayChannel] = {}
        self._subscription: broker.Subscription | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Start consuming as soon as the broker is reachable; returns at once.

        The subscription is made in the background, so the worker starts (and serves `/healthz`)
        while RabbitMQ is down, and consumes once it is up.
        """
        self._http = make_session(self._config.fetch)
        WORKER_CONCURRENCY.set(self._config.concurrency)
        self._subscriber = asyncio.create_task(self._subscribe(), name="subscribe")

    async def _subscribe(self) -> None:
        # Prefetch is concurrency + 1: one job ahead, downloading while the renders run. More would
        # hold messages here that an idle worker could be taking.
        self._subscription = await broker.subscribe(
            self._connection,
            self._publisher.topology,
            self._publisher.topology.jobs_queue,
            self._on_message,
            prefetch=self.prefetch,
        )
        log.info(
            "consuming",
            extra={"queue": self._publisher.topology.jobs_queue, "concurrency": self._config.concurrency},
        )

    @property
    def prefetch(self) -> int:
        """Messages held at once: the renders in flight and one job ahead."""
        return self._config.concurrency + 1

    async def ready(self) -> None:
        """Readiness: subscribed, on a channel that is open now (it is not during a reconnect)."""
        if self._subscription is None:
            raise ConnectionError("not consuming yet")
        if not self._subscription.active:
            raise ConnectionError("consumer channel closed")

    async def stop(self) -> None:
        """Stop taking messages, let the jobs in flight finish (up to the grace period), close."""
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.cancel()
        if self._tasks:
            log.info("waiting for jobs in flight", extra={"in_flight": len(self._tasks)})
            _, late = await asyncio.wait(self._tasks, timeout=self._config.shutdown_grace_s)
            for task in late:  # unacknowledged: the broker redelivers them to another worker
                task.cancel()
        if self._subscription is not None:
            await broker.close_quietly(self._subscription.channel)
        if self._http is not None:
            await self._http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._let_go_of_lost_deliveries()
        try:
            channel = message.channel
        except ChannelInvalidStateError:
            # Closed between the delivery and this callback (deliveries reach it through tasks):
            # the broker has the message back and sends it again on the reopened channel. Taken
            # up here, its job would run beside that copy, watched by nothing (its channel is not
            # known, so `_let_go_of_lost_deliveries` could not cancel it).
            log.info("delivery on a closed channel skipped; the broker sends it again")
            return
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        self._delivered_on[task] = channel
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._delivered_on.pop(task, None)

    def _let_go_of_lost_deliveries(self) -> None:
        """Cancel the jobs whose channel has closed (a broker blip, its `consumer_timeout`).

        Their messages are back in the queue, and the reopened channel is sent them again: left
        running beside their new copies, every channel lost would add a prefetch's worth of jobs
        (and sources) to what the worker holds. A render already running keeps its slot until it
        ends, so the renders stay within `concurrency`.
        """
        lost = [task for task, channel in self._delivered_on.items() if channel.is_closed]
        for task in lost:
            task.cancel()
            del self._delivered_on[task]
        if lost:
            log.warning("consumer channel lost; letting go of its jobs", extra={"jobs": len(lost)})

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        request_id_var.set(clean_request_id(headers.get(REQUEST_ID_HEADER)))
        # The message's id is its job's (as published): lines about a message whose header or body
        # cannot be read carry it too. Set again from the body once it is read.
        job_id_var.set(clean_request_id(message.message_id))
        attempt = _attempt(headers)
        try:
            job = read_written(JobMessage, message.body)
        except ValidationError as exc:
            # Unreadable: no retry can fix it. Rejecting dead-letters it through the queue's DLX.
            log.error("unparseable message dead-lettered: %s", exc.errors(include_input=False)[:1])
            JOBS_DEAD_LETTERED.inc()
            try:
                await message.reject(requeue=False)
            except Exception as exc:  # the channel is gone: the broker delivers it again, to be rejected
                log.warning("could not reject: %s", type(exc).__name__)
            return
        job_id_var.set(job.id)
        if clean_request_id(job.request_id):
            request_id_var.set(job.request_id)
        JOBS_IN_FLIGHT.inc()
        started = time.perf_counter()
        try:  # from here on, whatever goes wrong, the message is settled
            # Not for a redelivery: its wait includes a lost worker's time.
            if attempt == 1 and not message.redelivered:
                JOB_STAGE["queued"].observe(_since_accepted(job.created_at))
            await self._process(job, message, attempt)
        except Exception as exc:
            log.error("job could not be settled; returned to the queue: %s", type(exc).__name__)
            await _nack(message)
        finally:
            JOBS_IN_FLIGHT.dec()
            JOB_SECONDS.observe(time.perf_counter() - started)

    async def _process(self, job: JobMessage, message: AbstractIncomingMessage, attempt: int) -> None:
        # The source downloads while the job is marked `processing`: the two Redis round trips of
        # that are off the job's path.
        hold = self._sources.hold()
        source = asyncio.create_task(self._fetched(job.source, hold))
        try:
            await self._process_holding(job, message, attempt, hold, source)
        finally:
            # However the job ends, its download ends with it: one left to run would hold its bytes
            # for a job that is gone. A job found gone or finished, or let go of with its channel,
            # drops it here.
            _drop(source)  # a no-op for one done, but for taking its outcome
            hold.job_done()

    async def _process_holding(
        self,
        job: JobMessage,
        message: AbstractIncomingMessage,
        attempt: int,
        hold: SourceHold,
        source: asyncio.Task[list[bytearray]],
    ) -> None:
        record: JobRecord | None = None
        try:
            record = (await _persist(lambda: self._store.mark_processing(job.id))).record
        finally:
            if record is None or record.status.terminal:  # raised, or nothing to process
                _drop(source)
        if record is None:
            log.warning("no record for job (expired or withdrawn); dropping message")
            await message.ack()
            return
        if record.status.terminal:
            log.info("job already %s; duplicate delivery acknowledged", record.status.value)
            await message.ack()
            return
        stage = ["fetch"]
        try:
            async with asyncio.timeout(self._config.job_timeout_s) as budget:
                results = await self._run(job, budget, source, hold, stage)
        except JobFailed as exc:
            failure = exc
        except TimeoutError:
            failure = _timed_out(job, stage[0], self._config.job_timeout_s)
        except Exception as exc:
            # A bug or an unforeseen condition: retried like a transient failure, then dead-lettered.
            log.exception("unexpected error while processing")
            failure = JobFailed("internal_error", f"{type(exc).__name__}", transient=True)
        else:
            finishing = time.perf_counter()
            finished = await _persist(lambda: self._store.mark_succeeded(record, results))
            JOB_STAGE["finish"].observe(time.perf_counter() - finishing)
            await message.ack()
            if not finished.applied:
                _settled_elsewhere(finished.record, "result")
                return
            JOB_LATENCY["succeeded"].observe(_since_accepted(record.created_at))
            JOBS_SUCCEEDED.inc()
            log.info("job succeeded", extra={"variants": len(results), "attempt": attempt})
            return
        await self._fail(record, message, failure, attempt)

    async def _fail(
        self, record: JobRecord, message: AbstractIncomingMessage, failure: JobFailed, attempt: int
    ) -> None:
        # Another copy of the message (a redelivery, the reconciler's re-publish of a job that waited
        # long) may have finished the job meanwhile, or the job may even have failed and been
        # replayed by an admin (a newer version): this copy then neither schedules a retry nor
        # leaves a dead letter for a job that is not its own any more, and is not counted as a failure.
        current = await _persist(lambda: self._store.get(record.id))
        if current is None or current.status.terminal or current.version > record.version:
            await message.ack()
            _settled_elsewhere(current, "failure")
            return
        headers = dict(message.headers or {})
        if failure.transient and attempt < self._config.max_attempts:
            delay = await _persist(
                lambda: self._publisher.publish_retry(
                    message.body, headers, message_id=record.id, attempt=attempt
                )
            )
            await message.ack()
            JOBS_RETRIED.labels(failure.code).inc()
            log.warning(
                "transient failure, retrying",
                extra={"code": failure.code, "error": failure.message, "attempt": attempt, "delay_s": delay},
            )
            return
        text = failure.message
        if failure.transient:
            text = f"{text} (gave up after {attempt} attempts)"
            await _persist(
                lambda: self._publisher.publish_dead(message.body, headers, message_id=record.id, reason=text)
            )
            JOBS_DEAD_LETTERED.inc()
        failed = await _persist(lambda: self._store.mark_failed(record, failure.code, text))
        await message.ack()
        if not failed.applied:
            _settled_elsewhere(failed.record, "failure")
            return
        JOB_LATENCY["failed"].observe(_since_accepted(record.created_at))
        JOBS_FAILED.labels(failure.code).inc()
        log.info("job failed", extra={"code": failure.code, "error": text, "attempt": attempt})

    async def _render(
        self,
        job: JobMessage,
        budget: asyncio.Timeout,
        held: list[bytearray],
        slot: RenderSlot,
        hold: SourceHold,
    ) -> list[imaging.Rendered]:
        """Render the job's variants from the source in `held` on the pool, in `slot`.

        Waiting for a slot (behind another job's render) is not this job's time (`_off_the_clock`).
        """
        loop = asyncio.get_running_loop()
        waiting = loop.time()
        await _off_the_clock(budget, slot.acquire())
        JOB_STAGE["render_wait"].observe(loop.time() - waiting)
        started = time.perf_counter()
        try:
            # Run in a copy of this context so what the render logs carries the job and request ids
            # (not what libvips logs from threads of its own: see `telemetry.NOISY_LOGGERS`).
            render = loop.run_in_executor(
                self._pool,
                contextvars.copy_context().run,
                _render_held,
                held,
                job.variants,
                self._config.limits,
            )
        except BaseException:
            slot.render_ended(None)
            raise
        hold.rendering()
        render.add_done_callback(hold.render_ended)
        # The slot is given back when the render has really ended (or, for large outputs, once they
        # are uploaded: `holds.RenderSlot`), not when this job stops waiting for it. A job whose budget
        # runs out is cancelled here, but libvips calls cannot be interrupted: the pool thread renders
        # on until the render timeout's kill flag, or the end of a step that never checks it, stops
        # it. Were the slot freed at once, the next job would take it and start its clock, and its
        # render would queue in the pool (one thread per slot) behind the abandoned one: a healthy
        # image failed with `processing_timeout`. `shield` keeps the cancellation off the future
        # (cancelling it would run this callback at once, the thread still busy); the callback runs
        # on the loop, once, however the render ends.
        render.add_done_callback(slot.render_ended)
        try:
            rendered = await asyncio.shield(render)
        except imaging.ImageError as exc:
            raise JobFailed(exc.code, exc.message, transient=False) from None
        elapsed = time.perf_counter() - started
        JOB_STAGE["render"].observe(elapsed)
        for fmt in {v.format for v in job.variants}:
            VARIANT_SECONDS.labels(fmt).observe(elapsed)
        return rendered

    async def _run(
        self,
        job: JobMessage,
        budget: asyncio.Timeout,
        source: asyncio.Task[list[bytearray]],
        hold: SourceHold,
        stage: list[str],
    ) -> list[VariantResult]:
        """Fetch, render and upload the job's variants, noting in `stage[0]` which one it is at: when
        the budget runs out, that says who is to blame (`_timed_out`)."""
        stage[0] = "fetch"
        held = await source  # cancelled with this await if the budget runs out
        while not held:  # no room for it among the sources held: again once there is
            # Waiting for other jobs' sources to be freed is not this job's time. Each is freed when
            # its render ends (or its download fails), so a wait as long as a whole job's time means
            # something is wrong: a retry then, rather than a job that never ends.
            limit = self._config.job_timeout_s
            try:
                await _off_the_clock(budget, asyncio.wait_for(hold.room_for_it(), limit))
            except TimeoutError:
                log.error("no room for the source after %.0f s; retrying the job", limit)
                raise JobFailed(
                    "processing_timeout", f"no room for its source after {limit:.0f} s", transient=True
                ) from None
            held = await self._fetched(job.source, hold)
        # A render that starts with less than its own limit left can run out of the job's time
        # through no fault of the image's: the fetch before it was slow (`_timed_out`).
        deadline = budget.when()
        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        stage[0] = (
            "render" if left is None or left >= self._config.limits.timeout_s else "render after slow fetch"
        )
        slot = RenderSlot(self._render_slots)
        try:
            rendered = await self._render(job, budget, held, slot, hold)
            stage[0] = "upload"
            keys = [variant_key(job.owner, job.id, r.name, r.format) for r in rendered]
            started = time.perf_counter()
            await _all(
                self._storage.put(key, r.data, CONTENT_TYPES[r.format])
                for key, r in zip(keys, rendered, strict=True)
            )
        except StorageError as exc:
            raise JobFailed(exc.code, exc.message, transient=exc.transient) from None
        finally:
            slot.job_done()
        JOB_STAGE["upload"].observe(time.perf_counter() - started)
        return [
            VariantResult(
                name=r.name, format=r.format, width=r.width, height=r.height, bytes=len(r.data), key=k
            )
            for k, r in zip(keys, rendered, strict=True)
        ]

    async def _fetched(self, source: KeySource | UrlSource, hold: SourceHold) -> list[bytearray]:
        """The source's bytes, as the one item of a list that the render empties; an empty list when
        the sources held leave no room for them now, or others wait for room before it
        (`holds.Sources`): `_run` waits its turn, then calls this again.

        `_process` runs the first call as a task, and holds the task until the job has settled: a
        task keeps its result, and bytes returned as they are would stay in memory (up to
        `IMGPIPE_MAX_UPLOAD_BYTES` a job) through the uploads and the status write. The render takes
        them out of the list instead (`_render_held`), so they are freed as soon as it ends.
        """
        if not hold.may_try():
            hold.defer(0)
            return []
        started = time.perf_counter()
        try:
            if isinstance(source, KeySource):
                limit = self._config.limits.max_bytes
                data = await self._storage.get(source.key, max_bytes=limit, admit=hold.admit)
            else:
                data = (
                    await fetch_url(str(source.url), self._config.fetch, session=self._http, admit=hold.admit)
                ).data
        except BodyNotAdmitted as exc:
            _clear_frames(exc)  # a body without a length, read up to its room, is in them
            SOURCES_DEFERRED.inc()
            hold.defer(exc.size)
            return []
        except (StorageError, FetchError) as exc:
            hold.drop()
            _clear_frames(exc)  # a body read part of the way is in them (`_render_held`)
            raise JobFailed(exc.code, exc.message, transient=exc.transient) from None
        except BaseException:
            hold.drop()
            raise
        # The last try's time, when there were several: the waits between them are not the fetch's.
        JOB_STAGE["fetch"].observe(time.perf_counter() - started)
        hold.downloaded(len(data))
        return [data]


async def _all(work: Iterable[Awaitable[object]]) -> None:
    """Await every one of `work` at once; the first to fail cancels the rest and is raised.

    `asyncio.gather` leaves the others running: a job's other uploads went on beside its failure
    (and its retry), holding their variants' bytes outside the sources' budget, and were still
    running when a worker stopped.
    """
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _off_the_clock(budget: asyncio.Timeout, waiting: Awaitable[T]) -> T:
    """Await `waiting` with the job's `budget` suspended, then push its deadline back by the wait:
    waiting for the worker's own room (a render slot, room for its source) is not the job's time,
    and counted against it would fail a healthy image behind another job's long render."""
    loop = asyncio.get_running_loop()
    deadline, since = budget.when(), loop.time()
    budget.reschedule(None)
    try:
        return await waiting
    finally:
        if deadline is not None:
            budget.reschedule(deadline + loop.time() - since)


def _settled_elsewhere(current: JobRecord | None, what: str) -> None:
    """Log that this copy's outcome (`what`) was not recorded: the job was done or gone by then."""
    state = current.status.value if current is not None else "gone"
    log.info("job already %s; this copy's %s not recorded", state, what)


def _timed_out(job: JobMessage, stage: str, limit_s: float) -> JobFailed:
    """Why a job whose budget ran out failed. In a render given its whole limit, the image is to
    blame: final. Waiting for S3 or for the source's server, they are (a hung connection, an outage):
    retried with back-off like any other failure of theirs, not failed for good as if the image were;
    so is a render that the slow fetch before it left short of time."""
    if stage == "render":
        return JobFailed("processing_timeout", f"the job took over {limit_s:g}s", transient=False)
    url = not isinstance(job.source, KeySource)
    if stage == "render after slow fetch":
        slow = "the source's server" if url else "S3"
        return JobFailed(
            "url_timeout" if url else "storage_unavailable",
            f"the job's {limit_s:g}s ran out in its render, after {slow} was slow to send the source",
            transient=True,
        )
    if stage == "fetch" and url:
        return JobFailed("url_timeout", f"the source's server did not answer in {limit_s:g}s", transient=True)
    return JobFailed("storage_unavailable", f"S3 did not answer in the job's {limit_s:g}s", transient=True)


def _attempt(headers: dict) -> int:
    """The delivery number from our header; 1 when it is missing or unreadable.

    The header comes from whoever published the message: a value `int()` cannot take must not
    raise here, where the message would be left unacknowledged and hold a consumer slot forever.
    """
    try:
        return max(1, int(headers.get(ATTEMPT_HEADER, 1) or 1))
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        log.warning("unreadable %s header; counting this delivery as the first", ATTEMPT_HEADER)
        return 1


def _dependency_down(exc: BaseException) -> bool:
    """Redis or RabbitMQ cannot be used now (as opposed to a bug or a refused command): out of
    reach, or a Redis refusing writes for a while (full, read-only after a failover)."""
    return redis_unavailable(exc) or isinstance(
        exc,
        (
            BrokerUnavailable,
            AMQPConnectionError,
            ChannelInvalidStateError,
            ConnectionError,
            TimeoutError,
        ),
    )


async def _persist(operation: Callable[[], Awaitable[T]]) -> T:
    """Run a Redis or broker write, retrying while the dependency is down.

    Keeping the message and retrying here beats nacking at once: a nacked message spins through
    the broker and exhausts its delivery limit within seconds of an outage, and then the job is
    lost. So while Redis or RabbitMQ is unreachable the write is retried for as long as it takes
    (every few seconds, so the job settles soon after the dependency is back); any other error is
    retried for about a minute and then raised. Only the write is retried; the job's finished
    work is not redone. On shutdown the task is cancelled and the broker redelivers the message.
    """
    for attempt in itertools.count():
        try:
            return await operation()
        except Exception as exc:
            down = _dependency_down(exc)
            if not down and attempt >= len(_SETTLE_BACKOFF_S):
                raise
            delay = _SETTLE_BACKOFF_S[min(attempt, len(_SETTLE_BACKOFF_S) - 1)]
            if down:
                delay = min(delay, _OUTAGE_RETRY_S)
            log.warning("write failed, retrying in %ss: %s", delay, type(exc).__name__)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _lower_priority(nice: int) -> None:
    """Add `nice` to the nice value of the calling thread (a render thread, as it starts).

    A render keeps its cores busy; at the same priority, the event loop woken by a reply waits for
    the scheduler to take a core from it (about 5 ms a wake-up on two busy cores, up to 15), and so
    does everything on the loop: every other job's transfers and status writes, and the broker's
    heartbeats. The threads libvips starts from a render thread inherit its nice value. Linux keeps
    a nice value per thread; elsewhere `PRIO_PROCESS` would mean the whole worker, so nothing is
    changed there.
    """
    if not nice or sys.platform != "linux":
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError as exc:  # a seccomp profile that forbids it: renders run at the loop's priority
        log.warning("render threads keep their priority: setpriority failed: %s", exc)


def _render_held(
    held: list[bytearray], variants: list[Variant], limits: imaging.Limits
) -> list[imaging.Rendered]:
    """`imaging.render` of the source in `held`, run on a pool thread.

    The bytes are taken out of `held` here, in the thread, so that once the render returns nothing
    refers to them any more: not the task of `_fetched`, nor the pool's work item, which lives on
    for a moment after the result is handed to the loop. Nor once it raises: the frames of its
    traceback (and of the errors it chains) hold the source, and the job's failure, which carries
    them, sits in reference cycles that only the garbage collector breaks. Before their locals were
    cleared, four refused jobs of a 35 MB source took a worker 137 MiB over idle.
    """
    try:
        return imaging.render(held.pop(), variants, limits)
    except BaseException as exc:
        _clear_frames(exc)
        raise


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of the finished frames in `exc`'s traceback and in those of what it chains
    (the lines stay, for the log)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


def _drop(task: asyncio.Task[list[bytearray]]) -> None:
    """Cancel a download nobody will wait for, and take its outcome so asyncio does not log it."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _nack(message: AbstractIncomingMessage) -> None:
    try:
        await message.nack(requeue=True)
    except Exception as exc:  # the channel is gone: the broker requeues unacked messages itself
        log.warning("could not nack: %s", type(exc).__name__)
