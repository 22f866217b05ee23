"""The `{ns}.reconcile` consumer: runs each queued reconciliation and records its outcome.

The queue has a single active consumer, so with several replicas the broker hands commands to one
of them at a time; prefetch 1 keeps the next command in the broker while a run is going. A command
is acknowledged once its outcome is recorded, whatever it is: a failed run is not retried in a
loop, the next tick runs again. Recording is best effort: a command left unacknowledged because
Redis failed would hold every later one back. If the process stops mid-run, the unacknowledged
command goes to the next active consumer, which runs it again (deletes are safe to repeat). The
stopped run's lock outlives it by up to its TTL, so a command that comes back waits that long for
the lock rather than be skipped as if another run were going: it would never run at all.

A scheduled command that was requested before the consumer's last run ended is `skipped` rather
than run: it is a tick that came up while that run was going, and waited behind it (see
`_overtaken`). Commands of an admin or the command line always run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from imgpipe import broker
from imgpipe.broker import Topology
from imgpipe.models import ReconcileCommand, read_written, utcnow
from imgpipe.runs import RunStatus, RunStore
from pydantic import ValidationError

from imgpipe_reconciler.lock import LockBusy, RunLock
from imgpipe_reconciler.reconcile import Reconciler, Summary, note_skipped, reconcile_once

log = logging.getLogger("imgpipe.reconciler")

#: The `error` of a scheduled command dropped because it came up while a run was going.
OVERTAKEN = "the tick came up while another reconciliation was running"


class CommandConsumer:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        reconciler: Reconciler,
        lock: RunLock,
        runs: RunStore,
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._reconciler = reconciler
        self._lock = lock
        self._runs = runs
        self._subscription: broker.Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriber: asyncio.Task[None] | None = None
        #: When this consumer's last run (one that got past the lock) ended; None before the first.
        self._last_run_ended: datetime | None = None

    async def start(self) -> None:
        """Start consuming as soon as the broker is reachable; returns at once (see `_subscribe`)."""
        self._subscriber = asyncio.create_task(self._subscribe(), name="subscribe")

    async def _subscribe(self) -> None:
        """Wait for the connection, then consume; the robust channel restores it after reconnects."""
        self._subscription = await broker.subscribe(
            self._connection,
            self._topology,
            self._topology.reconcile_queue,
            self._on_message,
            prefetch=1,
        )
        log.info("consuming", extra={"queue": self._topology.reconcile_queue})

    @property
    def consuming(self) -> bool:
        """Subscribed, on a channel that is open right now."""
        return self._subscription is not None and self._subscription.active

    async def stop(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.cancel()
        # A run in progress is stopped; its command is redelivered to the next active consumer.
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self._subscription is not None:
            await broker.close_quietly(self._subscription.channel)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            command = read_written(ReconcileCommand, message.body)
        except ValidationError as exc:
            log.error("unparseable reconcile command dead-lettered: %s", exc.errors(include_input=False)[:1])
            await _settle(message.reject(requeue=False))
            return
        try:
            # Redelivered after its run ended (only the acknowledgement was lost): one run a command.
            if message.redelivered and await self._finished(command):
                raise _AlreadyRan()
            if self._overtaken(command):
                raise _Overtaken()
            await self._record(command, "running")
            summary = await self._run(command, wait_s=self._lock.ttl_s + 1 if message.redelivered else 0)
        except _AlreadyRan:
            log.info(
                "reconciliation already finished; redelivered command acknowledged",
                extra={"run_id": command.run_id},
            )
        except _Overtaken:
            note_skipped(
                dry_run=command.dry_run,
                run_id=command.run_id,
                trigger=command.trigger,
                reason="the tick came up while another one was running",
            )
            await self._record(command, "skipped", error=OVERTAKEN)
        except LockBusy:
            await self._record(command, "skipped", error="another reconciliation was running")
        except asyncio.CancelledError:
            await asyncio.shield(self._record(command, "queued"))
            raise
        except Exception as exc:
            self._last_run_ended = utcnow()
            await self._record(command, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        else:
            self._last_run_ended = utcnow()
            await self._record(command, "succeeded", summary=summary.as_dict())
        await _settle(message.ack(), run_id=command.run_id)

    async def _run(self, command: ReconcileCommand, *, wait_s: float) -> Summary:
        """Run `command`, trying again for the lock for up to `wait_s` (a redelivered command's own
        earlier run may have died holding it); `LockBusy` once that is over."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s
        while True:
            try:
                return await reconcile_once(
                    self._reconciler,
                    self._lock,
                    dry_run=command.dry_run,
                    run_id=command.run_id,
                    trigger=command.trigger,
                    # Counted and logged once, below, when the command is given up: a try a second for
                    # the lock's TTL made ~120 `skipped` runs and log lines of one command that waited.
                    report_skipped=False,
                )
            except LockBusy:
                if loop.time() >= give_up:
                    note_skipped(dry_run=command.dry_run, run_id=command.run_id, trigger=command.trigger)
                    raise
                await asyncio.sleep(min(1.0, max(0.0, give_up - loop.time())))
                # The run it waited for may have been its own first one (its channel closed
                # mid-run): once that has ended, running again would make two runs of one command.
                if await self._finished(command):
                    raise _AlreadyRan() from None

    def _overtaken(self, command: ReconcileCommand) -> bool:
        """Whether `command` is a tick that came up while this consumer's last run was going.

        With prefetch 1 the broker hands over the next command only once the run before it is
        acknowledged, its lock released by then, so such a tick would not find the lock taken: every
        tick of a run longer than the schedule's interval became a full run of its own, back to
        back, and the queue grew without end. Decided here rather than by a message TTL on the
        queue, which would drop ticks unseen: a dropped tick is recorded and counted as `skipped`,
        as one that finds the lock taken is. Only this process's runs are known; a replica that
        becomes the active consumer runs the first tick it gets (at most one run too many), and
        drops the ticks queued behind it. The command's time is by the ticker's clock and the run's
        end by this one's: a tick that came up less than their difference after a run ended is
        taken for one that came up during it, and skipped (the next tick runs).
        """
        if command.trigger != "schedule" or self._last_run_ended is None:
            return False
        return command.requested_at < self._last_run_ended

    async def _finished(self, command: ReconcileCommand) -> bool:
        """Whether the command's run has ended (best effort: unknown, it runs)."""
        try:
            record = await self._runs.get(command.run_id)
        except Exception:
            return False
        return record is not None and record.status in ("succeeded", "failed")

    async def _record(self, command: ReconcileCommand, status: RunStatus, **details: object) -> None:
        """Write the run's state; on a Redis error, log it and go on (see the module)."""
        try:
            await self._runs.update(command, status, **details)
        except Exception as exc:
            log.warning(
                "could not record the run as %s: %s",
                status,
                type(exc).__name__,
                extra={"run_id": command.run_id},
            )


class _AlreadyRan(Exception):
    """A redelivered command's first run ended while the copy waited for the lock."""


class _Overtaken(Exception):
    """A scheduled command that came up while the run before it was going."""


async def _settle(answer: Awaitable[object], *, run_id: str | None = None) -> None:
    """Acknowledge or reject, logged rather than raised when the channel is gone (the broker then
    delivers the command again): nothing else would see this task's exception."""
    try:
        await answer
    except Exception as exc:
        log.warning("could not settle the command: %s", type(exc).__name__, extra={"run_id": run_id})
