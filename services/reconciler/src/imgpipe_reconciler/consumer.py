"""The `{ns}.reconcile` consumer: runs each queued reconciliation and records its outcome.

The queue has a single active consumer, so with several replicas the broker hands commands to one
of them at a time; prefetch 1 keeps the next command in the broker while a run is going. A command
is acknowledged once its outcome is recorded, whatever it is: a failed run is not retried in a
loop, the next tick runs again. If the process stops mid-run, the unacknowledged command goes to
the next active consumer, which runs it again (deletes are safe to repeat).
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection, ConsumerTag
from imgpipe.broker import Topology
from imgpipe.models import ReconcileCommand
from imgpipe.runs import RunStore
from pydantic import ValidationError

from imgpipe_reconciler.lock import LockBusy, RunLock
from imgpipe_reconciler.reconcile import Reconciler, reconcile_once

log = logging.getLogger("imgpipe.reconciler")


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
        self._channel: AbstractChannel | None = None
        self._tag: ConsumerTag | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1)
        await self._topology.declare(channel)
        queue = await channel.get_queue(self._topology.reconcile_queue, ensure=False)
        self._tag = await queue.consume(self._on_message)
        self._channel = channel
        log.info("consuming", extra={"queue": queue.name})

    async def stop(self) -> None:
        if self._channel is not None and self._tag is not None and not self._channel.is_closed:
            try:
                queue = await self._channel.get_queue(self._topology.reconcile_queue, ensure=False)
                await queue.cancel(self._tag)
            except Exception as exc:
                log.warning("could not cancel consumer: %s", type(exc).__name__)
        # A run in progress is stopped; its command is redelivered to the next active consumer.
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            command = ReconcileCommand.model_validate_json(message.body)
        except ValidationError as exc:
            log.error("unparseable reconcile command dead-lettered: %s", exc.errors()[:1])
            await message.reject(requeue=False)
            return
        await self._runs.update(command, "running")
        try:
            summary = await reconcile_once(
                self._reconciler,
                self._lock,
                dry_run=command.dry_run,
                run_id=command.run_id,
                trigger=command.trigger,
            )
        except LockBusy:
            await self._runs.update(command, "skipped", error="another reconciliation was running")
        except asyncio.CancelledError:
            await asyncio.shield(self._runs.update(command, "queued"))
            raise
        except Exception as exc:
            await self._runs.update(command, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        else:
            await self._runs.update(command, "succeeded", summary=summary.as_dict())
        await message.ack()
