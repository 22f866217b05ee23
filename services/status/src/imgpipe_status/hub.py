"""One Redis subscription per status process, fanned out to every SSE client in it.

A change is rendered into its SSE event once, and the hub writes those same bytes straight to the
socket of every stream that watches the job: no per-client JSON, no per-client task woken, no
awaiting each client's drain. A handler task wakes only to send a heartbeat or to end its stream.
The price of not awaiting drain is a bound instead: a client whose unsent bytes pass
`max_unsent` is evicted (disconnected; an EventSource reconnects and gets the current state), so
one stalled client cannot grow the process's memory.

The hub also knows each watched job's newest record, from one read plus every change since, so
the many streams of one job that connect at once cost one Redis read, not one each. When the
subscription breaks (Redis restarted, or its connection dropped, even if the Redis client restored
it by itself, or went silent: see `JobStore.subscribe`), that knowledge is dropped, and after every
(re)subscribe the hub re-reads every watched job once and delivers what was missed.

A job this version cannot read or render (a newer version's record during a rolling upgrade, a
hand edit) ends its own streams, and only those: the hub goes on with every other job. Its clients
reconnect and get what `GET /jobs/{id}` gets for it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from imgpipe.models import JobRecord
from imgpipe.store import SUBSCRIPTION_PING_S, JobStore, redis_unavailable
from redis.exceptions import ResponseError

log = logging.getLogger("imgpipe.status.hub")

_HEARTBEAT = b": keep-alive\n\n"
_HEARTBEAT_CHUNK = b"%x\r\n%b\r\n" % (len(_HEARTBEAT), _HEARTBEAT)
_EXPIRED = (
    b'event: token_expired\ndata: {"error":{"code":"token_expired",'
    b'"message":"the token this stream was opened with has expired; reconnect with a new one"}}\n\n'
)
_EXPIRED_CHUNK = b"%x\r\n%b\r\n" % (len(_EXPIRED), _EXPIRED)

#: Streams written to between two yields to the event loop: one change fanned out to thousands of
#: streams is thousands of send() calls, and other requests must not wait for all of them.
FAN_OUT_SLICE = 500
#: Watched jobs read at once after a reconnect (`Hub._resync`).
RESYNC_BATCH = 200

#: Bytes a stream may have queued unsent (beyond what the kernel's socket buffer took) before the
#: client is evicted. Events are a few kB, so only a client that stopped reading gets near it.
MAX_UNSENT_BYTES = 256 * 1024


class End(enum.Enum):
    """Why a stream ends."""

    DONE = "done"  # a terminal event was sent
    CLOSE = "close"  # the process is shutting down
    GONE = "gone"  # the job expired while the subscription was down
    ROLLED_BACK = "rolled back"  # the store lost changes the client was sent (a Redis failover)
    UNREADABLE = "unreadable"  # the job's record is one this version cannot read or render
    EVICTED = "evicted"  # the client stopped reading
    EXPIRED = "token expired"  # the token the stream was opened with is no longer valid
    DISCONNECTED = "disconnected"  # the connection is closed


class Event:
    """One change as an SSE event, encoded once and shared by every stream that sends it."""

    __slots__ = ("chunk", "data", "version")

    def __init__(self, version: int, data: bytes) -> None:
        self.version = version
        self.data = data
        # HTTP/1.1 chunked framing, done here once rather than by aiohttp for every stream.
        self.chunk = b"%x\r\n%b\r\n" % (len(data), data)


class Listener:
    """One SSE stream watching one job.

    Until `attach`, the stream's handler writes through aiohttp (which sends the headers with the
    first event); from `attach` on, the hub writes newer changes to the socket itself.
    """

    __slots__ = (
        "_chunked",
        "_max_unsent",
        "_transport",
        "ended",
        "job_id",
        "last_write",
        "reason",
        "version",
    )

    def __init__(self, job_id: str, max_unsent: int) -> None:
        self.job_id = job_id
        self.version = 0  # the newest version the client was sent
        self.reason: End | None = None
        self.ended = asyncio.Event()
        self.last_write = 0.0  # loop time
        self._max_unsent = max_unsent
        self._transport: asyncio.Transport | None = None
        self._chunked = True

    def attach(self, transport: asyncio.BaseTransport | None, *, chunked: bool, version: int) -> None:
        """Hand the socket to the hub; the client has been sent `version` through aiohttp."""
        self.version = version
        self.last_write = asyncio.get_running_loop().time()
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            self.end(End.DISCONNECTED)
            return
        self._transport = transport
        self._chunked = chunked

    def offer(self, record: JobRecord, event: Event) -> None:
        """Send a change unless the client already has it (or a newer one)."""
        if self._transport is None or self.reason is not None or event.version <= self.version:
            return
        if self._write(event.chunk if self._chunked else event.data):
            self.version = event.version
            if record.status.terminal:
                self.end(End.DONE)

    def heartbeat(self) -> None:
        self._write(_HEARTBEAT_CHUNK if self._chunked else _HEARTBEAT)

    def expire(self) -> None:
        """The token the stream was opened with has expired: a `token_expired` event, and the end.
        (An `EventSource` reconnects with the same URL, and its expired token gets a 401.)"""
        self._write(_EXPIRED_CHUNK if self._chunked else _EXPIRED)
        self.end(End.EXPIRED)

    def end(self, reason: End) -> None:
        if self.reason is None:
            self.reason = reason
        self.ended.set()

    def _write(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None or self.reason is not None:
            return False
        if transport.is_closing():
            self.end(End.DISCONNECTED)
            return False
        # Not awaiting drain is what makes the fan-out cheap; this bound is what makes it safe.
        if transport.get_write_buffer_size() > self._max_unsent:
            log.warning(
                "evicting a slow SSE client",
                extra={"job_id": self.job_id, "unsent_bytes": transport.get_write_buffer_size()},
            )
            self.end(End.EVICTED)
            transport.abort()  # close() would wait to flush what the client is not reading
            return False
        transport.write(data)
        self.last_write = asyncio.get_running_loop().time()
        return True


class _Watch:
    """What the hub knows about one watched job."""

    __slots__ = ("event", "job_id", "known", "listeners", "reading")

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.listeners: set[Listener] = set()
        # The newest record seen since the watch began, while the subscription has been live: from
        # a read, or a change. Dropped when the subscription breaks.
        self.known: JobRecord | None = None
        self.reading: asyncio.Future[JobRecord | None] | None = None
        self.event: Event | None = None  # the rendering of the newest change

    def learn(self, record: JobRecord | None) -> JobRecord | None:
        if record is not None and (self.known is None or record.version > self.known.version):
            self.known = record
        return self.known


class Hub:
    """The fan-out. `render` turns a record into its SSE event bytes (`id:`, `event:`, `data:`).

    `ping_s` is how long the subscription may be silent before the hub checks it is still alive
    (`JobStore.subscribe`); a dead one is noticed within twice that.
    """

    def __init__(
        self,
        store: JobStore,
        render: Callable[[JobRecord], bytes],
        *,
        max_unsent: int = MAX_UNSENT_BYTES,
        ping_s: float = SUBSCRIPTION_PING_S,
    ) -> None:
        self._store = store
        self._render = render
        self._max_unsent = max_unsent
        self._ping_s = ping_s
        self._watches: dict[str, _Watch] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # Counts the subscription's breaks: a read begun before one is not learnt after it.
        self._breaks = 0

    @property
    def listeners(self) -> int:
        return sum(len(watch.listeners) for watch in self._watches.values())

    @contextmanager
    def listen(self, job_id: str) -> Iterator[Listener]:
        """Register a stream for `job_id`: changes from now on are not lost (see `current`)."""
        watch = self._watches.get(job_id)
        if watch is None:
            watch = self._watches[job_id] = _Watch(job_id)
        listener = Listener(job_id, self._max_unsent)
        watch.listeners.add(listener)
        try:
            yield listener
        finally:
            watch.listeners.discard(listener)
            self._forget_if_unused(watch)

    async def current(self, job_id: str, *, at_least: int = 0) -> JobRecord | None:
        """The job's record, at least as new as every change before the caller's `listen`.

        Call it inside `listen`. It reads Redis only when the hub does not follow the job already,
        and concurrent callers share that one read. `at_least` is a version the caller knows to
        exist (a client's `Last-Event-ID`): a record the hub knows that is older than it is not
        answered, and Redis is read on its own for this caller.
        """
        watch = self._watches[job_id]
        known = watch.known
        if known is None or known.version >= at_least:
            if known is not None and self.connected.is_set():
                return known
            if watch.reading is None:
                watch.reading = asyncio.ensure_future(self._read(watch))
            # Shielded: one caller going away must not cancel the read the others wait for.
            record = await asyncio.shield(watch.reading)
            if record is None or record.version >= at_least:
                return record
        # The client was sent a change on another replica whose message has not reached this one
        # yet: the store has it already. Read on its own: a shared read may have begun before it.
        return await self._get(watch)

    def attach(
        self, listener: Listener, transport: asyncio.BaseTransport | None, *, chunked: bool, version: int
    ) -> None:
        """Start writing changes to `listener`'s socket; it has been sent `version` so far.

        A stream the store is behind (it lost changes the stream was sent) is ended at once, as
        `End.ROLLED_BACK`: its client reconnects and starts again from what the store says.
        """
        listener.attach(transport, chunked=chunked, version=version)
        watch = self._watches.get(listener.job_id)
        known = watch.known if watch is not None else None
        if known is None:
            return  # nothing known since the subscription broke: the resync after it checks this stream
        if known.version > version:
            # It changed while the first event was being written.
            event = self._event_or_unfollow(known)
            if event is not None:
                listener.offer(known, event)
        elif known.version < version:
            # Behind what the stream was sent: what the hub knew was dropped when the subscription
            # broke, and read again since from a store that lost changes (a failover that lost its
            # last writes). The resync that read it found this stream not attached yet, sent
            # nothing, and let it be. The job's next change would reuse a version the stream has and
            # be dropped as one it has: its terminal event would never be sent.
            listener.end(End.ROLLED_BACK)

    def event(self, record: JobRecord) -> Event:
        """`record` as an SSE event, rendered once per version while its job is watched."""
        watch = self._watches.get(record.id)
        cached = watch.event if watch is not None else None
        if cached is not None and cached.version == record.version:
            return cached
        event = Event(record.version, self._render(record))
        if watch is not None and (cached is None or record.version > cached.version):
            watch.event = event
        return event

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def close_all(self) -> None:
        """End every stream (process shutdown): clients reconnect, to another replica."""
        for watch in tuple(self._watches.values()):
            for listener in tuple(watch.listeners):
                listener.end(End.CLOSE)

    async def _get(self, watch: _Watch) -> JobRecord | None:
        """The job's record from the store, learnt unless the subscription broke while it was read.

        Such a read is answered to its caller but not learnt: the store it read may have been the
        primary a failover lost writes of, and learnt after the resync, its state (a version the
        store now hands out again, to another state) would make the hub drop the job's real change
        of that version as one it has, and its streams would wait, at a state the store no longer has.
        """
        breaks = self._breaks
        record = await self._store.get(watch.job_id)
        return watch.learn(record) if breaks == self._breaks else record

    async def _read(self, watch: _Watch) -> JobRecord | None:
        try:
            return await self._get(watch)
        finally:
            watch.reading = None
            # Failed or not: the streams that waited for it may all have ended meanwhile (their
            # handlers cancelled), and `listen` leaves a watch with a read out to this.
            self._forget_if_unused(watch)

    def _forget_if_unused(self, watch: _Watch) -> None:
        if not watch.listeners and watch.reading is None and self._watches.get(watch.job_id) is watch:
            del self._watches[watch.job_id]

    def _unfollowable(self, job_id: str, why: str) -> None:
        """Stop following a job the hub cannot read or render: end its streams, forget what it knew.

        What it knew is older than the store's record, and no stream of the job can be sent its
        changes any more. An ended stream's client reconnects, and its read of the job then fails as
        `GET /jobs/{id}` does, instead of the stream waiting silently on an outdated state.
        """
        watch = self._watches.get(job_id)
        if watch is None:
            return
        watch.known = None
        watch.event = None
        log.warning(
            "job not readable or renderable here; ending its streams: %s",
            why,
            extra={"job_id": job_id, "streams": len(watch.listeners)},
        )
        for listener in tuple(watch.listeners):
            listener.end(End.UNREADABLE)

    def _event_or_unfollow(self, record: JobRecord) -> Event | None:
        """`event(record)`, or None when it cannot be rendered: the job's streams are then ended.

        One job's rendering failing must not reach `_run`, which would take it for a lost
        subscription, resubscribe, re-read the job, fail again: no job's changes sent, ever; nor a
        stream's handler, which has sent its 200 already. Not always this version's fault: with no
        S3 credentials no variant URL can be signed (`storage_unavailable`), and the reconnecting
        client is answered 503 until there are.
        """
        try:
            return self.event(record)
        except Exception as exc:
            code = getattr(exc, "code", None)
            self._unfollowable(record.id, type(exc).__name__ + (f" ({code})" if code else ""))
            return None

    async def _deliver(self, record: JobRecord) -> None:
        watch = self._watches.get(record.id)
        if watch is None:
            return
        # Learnt first: a stream that attaches while this fan-out yields catches up from it.
        watch.learn(record)
        if not watch.listeners:
            return
        event = self._event_or_unfollow(record)  # once for all of them
        if event is None:
            return
        for n, listener in enumerate(tuple(watch.listeners), 1):
            listener.offer(record, event)
            if n % FAN_OUT_SLICE == 0:
                await asyncio.sleep(0)

    async def _resync(self) -> None:
        """After a reconnect: re-read every watched job once and deliver what was missed.

        The reads go out `RESYNC_BATCH` at a time (the store's coalescer sends each batch as one
        pipeline): one at a time, 5,000 watched jobs held every stream's changes back for seconds.
        """
        watches = [watch for watch in tuple(self._watches.values()) if watch.listeners]
        for start in range(0, len(watches), RESYNC_BATCH):
            batch = watches[start : start + RESYNC_BATCH]
            reads = await asyncio.gather(*(self._store.get(w.job_id) for w in batch), return_exceptions=True)
            for watch, read in zip(batch, reads, strict=True):
                if watch.listeners:  # its streams may have ended while the batch was read
                    await self._resynced(watch, read)

    async def _resynced(self, watch: _Watch, read: JobRecord | BaseException | None) -> None:
        if isinstance(read, (ValueError, ResponseError)):  # ValidationError, or WRONGTYPE: not our record
            if redis_unavailable(read):  # BUSY, a failover's MASTERDOWN: resubscribe and try again
                raise read
            # Raised out of here, it would fail every resync the same way and stop the hub for
            # every job; the record stays unreadable until it changes or expires.
            self._unfollowable(watch.job_id, type(read).__name__)
            return
        if isinstance(read, BaseException):
            raise read
        if read is None:  # expired while we were away
            for listener in tuple(watch.listeners):
                listener.end(End.GONE)
            return
        # A failover that lost the last writes (no AOF, or its last second) leaves the store
        # behind what a stream was sent. The job's next change reuses a version that stream
        # has, and would be dropped as one it has: end it, so that its client reconnects and
        # starts again from what the store says.
        for listener in tuple(watch.listeners):
            if listener.version > read.version:
                listener.end(End.ROLLED_BACK)
        await self._deliver(read)

    def _unreadable_change(self, job_id: str) -> None:
        """A change of `job_id` was published that this version cannot read (the store skipped it)."""
        self._unfollowable(job_id, "change not readable")

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                async with self._store.subscribe(
                    unreadable=self._unreadable_change, ping_s=self._ping_s
                ) as changes:
                    self.connected.set()
                    # After every subscribe, the first too: streams that connected while it was
                    # failing (Redis not up yet) read a state the hub has not followed since.
                    # Nothing watched, nothing read.
                    await self._resync()
                    delay = 0.1
                    async for _, record in changes:
                        await self._deliver(record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Also when the client restored the connection by itself (see `JobStore.subscribe`).
                self.connected.clear()
                self._breaks += 1
                # Changes while we are away are not seen: what we knew can no longer be trusted,
                # nor the cached rendering (a store that lost changes reuses their versions).
                for watch in self._watches.values():
                    watch.known = None
                    watch.event = None
                log.warning("event subscription lost, reconnecting: %s", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
