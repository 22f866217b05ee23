"""The dead-letter queue `{ns}.jobs.dead`: list what is in it and replay jobs from it.

Messages end there in two ways. The worker publishes a job that kept failing transiently, with an
`x-imgpipe-reason` header, and then marks the job `failed`. The broker dead-letters what the jobs
queue rejects (an unparseable message) or redelivers too often, with an `x-death` header. Used by
the api's admin routes and by `imgpipe-dead-letters`.

**Browsing.** A listing takes up to `limit` messages with `basic.get` without acknowledging them,
on a channel of its own, and closes that channel, which hands them all back. Measured on RabbitMQ
3.10 quorum queues (the dead queue is one):

- returned messages go back ahead of the messages never delivered, but not in their original order
  once more than a few dozen come back at once (300 returned messages come back shuffled, 4 keep
  their order), whether they are returned by closing the channel, by one `nack(multiple)` or by a
  `nack` each in order. No return order is stable, so we keep the simplest: closing the channel,
  which is also what happens when this process dies halfway;
- the return is applied asynchronously: right after the channel closes the queue can read empty.
  So we wait until the queue's depth is back before the next browse may start;
- every return counts in the message's `x-delivery-count`. The dead queue has no delivery limit on
  3.10, so listing never drops anything. RabbitMQ 4.0-4.2 give quorum queues a default delivery
  limit of 20 that counts returns too: on those, set the `delivery-limit` policy of the dead queue
  to -1 (unlimited), or about twenty listings dead-letter (and, with no DLX there, drop) a message.

A message held by one browse is invisible to another, so list and replay of a namespace take a
Redis lock (`{ns}:deadletters:lock`): a replay never misses a message a concurrent listing holds.

**Replay.** For each selected message: the job's record moves from `failed` back to `pending`
first (otherwise the worker would acknowledge the redelivered message as a duplicate of a finished
job), then the original body is published to the jobs exchange with publisher confirms and
`x-imgpipe-attempt` 1 (the request id header kept), and only then is the dead message acknowledged.
A message that cannot be replayed stays in the queue and its job id is reported as `not_found`:
its body is not a job, its job's record has expired (retention) or its job is not `failed` (a
stale copy of a job that was replayed or finished since). Dropping those is a decision for a
person with the message in front of them, not for a bulk replay.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pydantic import ValidationError
from redis.exceptions import RedisError

from imgpipe.broker import (
    ATTEMPT_HEADER,
    JOB_ROUTING_KEY,
    REASON_HEADER,
    REQUEST_ID_HEADER,
    BrokerUnavailable,
    Topology,
    close_quietly,
    is_up,
    persistent_message,
    queue_counts,
)
from imgpipe.limits import Limits
from imgpipe.models import JobMessage, JobRecord, JobStatus, read_written
from imgpipe.store import JobStore, Transition

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Most messages one listing or replay may take (the contract's bound on `limit` and `job_ids`).
MAX_LIMIT = 1000
#: Most messages a replay by job id looks through for the ids it was given.
SCAN_LIMIT = 10_000
#: Time for one broker operation before the broker counts as unavailable.
BROKER_TIMEOUT_S = 10.0
#: How long a browse waits for the messages it handed back to be in the queue again.
RETURN_WAIT_S = 5.0
#: Lifetime of the browse lock (a crashed holder blocks the next browse at most this long; a live
#: one renews it every third of it), and how long a browse waits for it.
LOCK_TTL_S = 120
LOCK_WAIT_S = 30.0

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class DeadLettersBusy(Exception):
    """Another listing or replay of this namespace held the lock for longer than we wait."""


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead-letter queue, as the admin API and the CLI show it."""

    message_id: str | None
    job_id: str | None
    owner: str | None
    reason: str
    attempts: int | None
    dead_lettered_at: str | None
    request_id: str | None
    replayable: bool

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplayResult:
    """Job ids replayed (now `pending` and in the jobs queue) and those with nothing to replay."""

    replayed: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)

    def public(self) -> dict[str, list[str]]:
        return {"replayed": self.replayed, "not_found": self.not_found}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value) or None


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return None


def _parse_job(body: bytes) -> JobMessage | None:
    try:
        return read_written(JobMessage, body)
    except ValidationError:
        return None


def _deaths(headers: dict[str, Any]) -> list[dict[str, Any]]:
    deaths = headers.get("x-death")
    return [d for d in deaths if isinstance(d, dict)] if isinstance(deaths, list) else []


def describe(message: AbstractIncomingMessage, record: JobRecord | None = None) -> DeadLetter:
    """What a dead message is about. `record` is its job's record, if one was looked up."""
    headers = dict(message.headers or {})
    job = _parse_job(message.body)
    deaths = _deaths(headers)
    reason = _text(headers.get(REASON_HEADER))
    when: str | None = None
    if reason is None:
        # Dead-lettered by the broker: the newest x-death entry (the first) says why and when.
        reason = _text(deaths[0].get("reason")) if deaths else None
        when = _iso(deaths[0].get("time")) if deaths else None
    # The worker's own dead letters carry the retry queues' x-death entries (they describe a retry,
    # not this): their time is the failure the worker recorded right after publishing them.
    if when is None and record is not None and record.status is JobStatus.FAILED:
        when = record.updated_at.isoformat()
    if when is None:
        when = _iso(message.timestamp)
    attempts = headers.get(ATTEMPT_HEADER)
    return DeadLetter(
        message_id=_text(message.message_id),
        job_id=job.id if job else _text(message.message_id),
        owner=job.owner if job else None,
        reason=reason or "unknown",
        attempts=attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else None,
        dead_lettered_at=when,
        request_id=_text(headers.get(REQUEST_ID_HEADER)) or (job.request_id if job else None),
        replayable=job is not None,
    )


class DeadLetters:
    """List and replay the dead-letter queue of one namespace."""

    def __init__(self, connection: AbstractConnection, topology: Topology, store: JobStore) -> None:
        self._connection = connection
        self.topology = topology
        self._store = store
        # A replayed job takes its owner's active slot again, as the api's limits count them.
        self._limits = Limits(store.redis, store.namespace, ttl_s=store.retention_s, calls=store.calls)
        self._lock_key = f"{store.namespace}:deadletters:lock"
        self._release = store.redis.register_script(_RELEASE)
        self._renew = store.redis.register_script(_RENEW)

    async def list(self, limit: int = 100) -> tuple[int, list[DeadLetter]]:
        """The queue's depth and its first `limit` messages, which all stay in the queue."""
        limit = max(1, min(limit, MAX_LIMIT))
        async with self._session() as session:
            count = session.depth_before
            messages = await session.take(limit)
            records = await self._records([_parse_job(m.body) for m in messages])
            items = [describe(m, r) for m, r in zip(messages, records, strict=True)]
        return count, items

    async def replay(self, job_ids: Sequence[str] | None = None, *, limit: int = 100) -> ReplayResult:
        """Replay the dead letters of `job_ids`, or with None the first `limit` replayable ones.

        Raises `BrokerUnavailable` when the broker fails; what was replayed before that stays
        replayed, and the rest stays in the queue.
        """
        wanted = dict.fromkeys(job_ids) if job_ids is not None else None
        limit = max(1, min(limit, MAX_LIMIT))
        result = ReplayResult()
        handled: set[str] = set()
        async with self._session() as session:
            for _ in range(SCAN_LIMIT):
                if wanted is not None and handled >= wanted.keys():
                    break
                if wanted is None and len(result.replayed) >= limit:
                    break
                message = await session.next()
                if message is None:
                    break
                job = _parse_job(message.body)
                job_id = job.id if job else _text(message.message_id)
                if job_id is None or job_id in handled or (wanted is not None and job_id not in wanted):
                    continue  # not selected (or a second copy of a job handled above): stays queued
                handled.add(job_id)
                if job is not None and await self._replay_one(session, message, job):
                    result.replayed.append(job_id)
                else:
                    result.not_found.append(job_id)
        if wanted is not None:
            result.not_found.extend(job_id for job_id in wanted if job_id not in handled)
        return result

    async def _put_back(self, current: JobRecord, reopening: asyncio.Future[Transition]) -> None:
        """Undo a replay's reopen, once it has landed, if it was applied: the job is failed again."""
        try:
            reopened = await reopening
        except Exception:
            return  # not reopened: nothing to undo
        if not reopened.applied or reopened.record is None or current.error is None:
            return
        try:
            error = current.error
            await self._store.mark_failed(reopened.record, error.code, error.message)
        except Exception as exc:
            log.warning(
                "a replay's job could not be put back: %s", type(exc).__name__, extra={"job_id": current.id}
            )

    async def _replay_one(self, session: _Session, message: AbstractIncomingMessage, job: JobMessage) -> bool:
        current = await self._store.get(job.id)
        if current is None or current.status is not JobStatus.FAILED:
            log.warning(
                "dead letter not replayed: its job is %s",
                "gone (retention)" if current is None else current.status.value,
                extra={"job_id": job.id},
            )
            return False
        headers = {ATTEMPT_HEADER: 1}
        request_id = _text((message.headers or {}).get(REQUEST_ID_HEADER)) or job.request_id
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        # Its own task, so that a cancel cannot lose sight of a reopen the server has applied.
        reopening = asyncio.ensure_future(self._store.reopen(current))
        try:
            reopened = await asyncio.shield(reopening)
            if not reopened.applied or reopened.record is None:
                return False
            await self._limits.hold_job(reopened.record.owner, job.id)
            await session.publish_job(message.body, headers, message_id=job.id)
        except BaseException:
            # Reopened, but not known to be in the jobs queue (the broker is away, Redis failed, or
            # the admin's request went away, anywhere from the reopen to the confirm): put the job
            # back as it was, so it does not sit `pending` with no message until the reconciler
            # times it out. Its dead letter goes back to the queue with the channel. Shielded: a
            # cancelled replay must still get this far.
            await asyncio.shield(self._put_back(current, reopening))
            raise
        # Acknowledged only after the confirm: a crash in between leaves a duplicate, never a loss.
        await session.ack(message)
        log.info("dead letter replayed", extra={"job_id": job.id, "replays": reopened.record.replays})
        return True

    async def _records(self, jobs: list[JobMessage | None]) -> list[JobRecord | None]:
        """The job records of `jobs`, in one round trip; best effort (None when unknown)."""
        ids = [job.id for job in jobs if job is not None]
        if not ids:
            return [None] * len(jobs)
        try:
            async with self._store.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(self._store.job_key(job_id), ["version", "data"])
                answers = iter(await pipe.execute())
        except RedisError as exc:
            log.warning("job records not read for the listing: %s", type(exc).__name__)
            return [None] * len(jobs)
        records: list[JobRecord | None] = []
        for job in jobs:
            if job is None:
                records.append(None)
                continue
            version, data = next(answers)
            try:
                record = read_written(JobRecord, data) if data else None
            except ValidationError:
                # A record this release cannot read (a later one's status) must not stop the whole
                # listing: it is listed without its record, as one that has gone.
                log.warning("job record not readable; listed without it", extra={"job_id": job.id})
                record = None
            if record is not None:
                record.version = int(version or 0)
            records.append(record)
        return records

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        token = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT_S
        while not await self._store.redis.set(self._lock_key, token, nx=True, ex=LOCK_TTL_S):
            if loop.time() > deadline:
                raise DeadLettersBusy("another listing or replay of the dead letters is running")
            await asyncio.sleep(0.1)
        # A browse may outlive the lock (up to SCAN_LIMIT gets and MAX_LIMIT confirmed publishes):
        # one that lost it would run beside the next, each seeing a queue short of what the other holds.
        renewing = asyncio.create_task(self._keep(token))
        try:
            yield
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            try:
                await self._release(keys=[self._lock_key], args=[token])
            except RedisError as exc:  # it expires by itself
                log.warning("dead-letter lock not released: %s", type(exc).__name__)

    async def _keep(self, token: str) -> None:
        """Renew the browse lock while it is ours; a failed renewal is tried again next time."""
        while True:
            await asyncio.sleep(LOCK_TTL_S / 3)
            try:
                await self._renew(keys=[self._lock_key], args=[token, LOCK_TTL_S])
            except RedisError as exc:
                log.warning("dead-letter lock not renewed: %s", type(exc).__name__)

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[_Session]:
        async with self._locked():
            session = _Session(self._connection, self.topology)
            try:
                await session.open()
                yield session
            finally:
                await session.close()


async def _amqp(operation: Awaitable[T]) -> T:
    """Await a broker operation; any failure of the broker becomes `BrokerUnavailable`."""
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            return await operation
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc


class _Session:
    """Two channels: `browse` for basic.get (closing it hands back what was not acknowledged) and
    `control` for the depth and confirmed publishing."""

    def __init__(self, connection: AbstractConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology
        self._browse: AbstractChannel | None = None
        self._control: AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self.depth_before = 0
        self._taken = 0
        self._acked = 0

    async def open(self) -> None:
        if not is_up(self._connection):
            raise BrokerUnavailable("not connected to RabbitMQ")
        # Each channel is kept before it is awaited: one whose opening a lost connection cuts
        # short is registered with the robust connection already, and `close` must close it too.
        self._control = self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await _amqp(self._control)
        # Declared (idempotently) as every component does, so a fresh namespace lists as empty.
        await _amqp(self._topology.declare(self._control))
        self.depth_before = await self.depth()
        self._browse = self._connection.channel(publisher_confirms=False)
        await _amqp(self._browse)
        self._queue = await _amqp(self._browse.get_queue(self._topology.dead_queue, ensure=False))

    async def depth(self) -> int:
        """Messages ready in the dead queue (those a browse holds are not counted)."""
        assert self._control is not None
        return (await _amqp(queue_counts(self._control, self._topology.dead_queue)))[0]

    async def next(self) -> AbstractIncomingMessage | None:
        """The next message, held unacknowledged; None when the queue has no more."""
        assert self._queue is not None
        message = await _amqp(self._queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S))
        if message is not None:
            self._taken += 1
        return message

    async def take(self, limit: int) -> list[AbstractIncomingMessage]:
        messages: list[AbstractIncomingMessage] = []
        while len(messages) < limit and (message := await self.next()) is not None:
            messages.append(message)
        return messages

    async def publish_job(self, body: bytes, headers: dict[str, Any], *, message_id: str) -> None:
        assert self._control is not None
        exchange = await _amqp(self._control.get_exchange(self._topology.jobs_exchange, ensure=False))
        message = persistent_message(body, headers, message_id=message_id)
        # mandatory + on_return_raises: an unroutable message is an error, not a silent drop.
        await _amqp(exchange.publish(message, routing_key=JOB_ROUTING_KEY, mandatory=True))

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await _amqp(message.ack())
        self._acked += 1

    async def close(self) -> None:
        try:
            # A browse channel that a lost connection closed handed its messages back with it, and
            # waiting for them on the control channel would wait for the reconnect, which reopens
            # that channel behind our back (`close_quietly` below would then miss it).
            if self._browse is not None and not self._browse.is_closed:
                # Hands back every message taken and not acknowledged (see the module docstring).
                await _amqp(self._browse.close())
                if self._taken > self._acked and self._control is not None:
                    await self._wait_returned(self.depth_before - self._acked)
        except BrokerUnavailable as exc:
            # The broker hands the messages back itself when the channel or connection goes.
            log.warning("dead-letter browse not closed cleanly: %s", exc)
        finally:
            # Whatever state they are in: channels that a lost connection closed, not we, would be
            # reopened by the robust connection after it reconnects, and kept for good (in the api,
            # two more on its publishing connection for each browse a broker restart cut short).
            for channel in (self._browse, self._control):
                if channel is not None:
                    await close_quietly(channel)

    async def _wait_returned(self, expected: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETURN_WAIT_S
        while (depth := await self.depth()) < expected:
            if not is_up(self._connection):
                raise BrokerUnavailable("the connection to RabbitMQ was lost")  # and they are back
            if loop.time() > deadline:
                log.warning("dead letters not all back yet", extra={"depth": depth, "expected": expected})
                return
            await asyncio.sleep(0.02)
