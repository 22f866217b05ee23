"""One Redis subscription per status process, fanned out to every SSE client in it.

Clients register interest in a job id and get an `asyncio.Queue` of records. When the
subscription breaks (Redis restarted), the hub reconnects and tells every listener to re-read its
job, because changes made while it was away were never delivered.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from imgpipe.models import JobRecord
from imgpipe.store import JobStore

log = logging.getLogger("imgpipe.status.hub")


class Signal(enum.Enum):
    """Put on a listener's queue instead of a record."""

    RESYNC = "resync"  # the subscription was re-established: changes may have been missed, re-read
    CLOSE = "close"  # the process is shutting down: end the stream


class Hub:
    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._listeners: dict[str, set[asyncio.Queue[JobRecord | Signal]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    @property
    def listeners(self) -> int:
        return sum(len(queues) for queues in self._listeners.values())

    @contextmanager
    def listen(self, job_id: str) -> Iterator[asyncio.Queue[JobRecord | Signal]]:
        queue: asyncio.Queue[JobRecord | Signal] = asyncio.Queue()
        self._listeners[job_id].add(queue)
        try:
            yield queue
        finally:
            queues = self._listeners.get(job_id)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._listeners[job_id]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while True:
            try:
                async with self._store.subscribe() as changes:
                    self.connected.set()
                    if not first:
                        self.broadcast(Signal.RESYNC)
                    first, delay = False, 0.1
                    async for _, record in changes:
                        for queue in tuple(self._listeners.get(record.id, ())):
                            queue.put_nowait(record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                log.warning("event subscription lost, reconnecting: %s", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def broadcast(self, signal: Signal) -> None:
        for queues in tuple(self._listeners.values()):
            for queue in tuple(queues):
                queue.put_nowait(signal)
