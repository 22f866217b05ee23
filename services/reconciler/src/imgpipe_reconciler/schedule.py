"""When reconciliations run: a cron schedule in every replica, and one run per tick among them.

Every replica runs the same APScheduler job. On a tick each replica computes the tick's scheduled
time (the same in all of them), and tries `SET {ns}:reconcile:tick:<time> NX`; only the winner
publishes the `reconcile` command. The queue has a single active consumer and the run itself holds
a lock, so even a tick published twice (a replica firing very late) never runs two at once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from imgpipe.broker import Publisher
from imgpipe.models import ReconcileCommand

log = logging.getLogger("imgpipe.reconciler")

#: A replica that fires later than this after the scheduled time skips the tick.
MISFIRE_GRACE_S = 30
#: How long a tick's claim is kept: far longer than any replica can be late.
_TICK_TTL_S = 3600
#: How long `Ticker.stop` waits for a tick being published (a confirm takes milliseconds).
STOP_WAIT_S = 10.0


def parse_cron(expr: str) -> CronTrigger:
    """Crontab's 5 fields (`0 * * * *`), or 6 with a leading seconds field (`*/5 * * * * *`), in UTC.

    Day-of-week follows APScheduler: names (`mon`-`sun`) are unambiguous, numbers count from Monday.
    """
    fields = expr.split()
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(expr, timezone=UTC)
        if len(fields) == 6:
            second, minute, hour, day, month, dow = fields
            return CronTrigger(
                second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=dow, timezone=UTC
            )
    except ValueError as exc:
        raise ValueError(f"not a valid cron expression: {exc}") from None
    raise ValueError(f"a cron expression has 5 fields (or 6 with seconds), not {len(fields)}")


def tick_time(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The latest scheduled time at or before `now` (within the misfire grace), the tick's identity.

    Computed from the schedule rather than from the clock at firing, so replicas that fire a few
    milliseconds apart agree on which tick it is.
    """
    latest = None
    fire = trigger.get_next_fire_time(None, now - timedelta(seconds=MISFIRE_GRACE_S))
    while fire is not None and fire <= now:
        latest = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
    return latest


class Ticker:
    """Turns the schedule's ticks into `reconcile` commands, one per tick across all replicas."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        publisher: Publisher,
        trigger: CronTrigger,
        *,
        dry_run: bool,
    ) -> None:
        self._redis = redis
        self._namespace = namespace
        self._publisher = publisher
        self._trigger = trigger
        self._dry_run = dry_run
        self._replica = uuid.uuid4().hex[:12]
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._firing: set[asyncio.Task] = set()

    def start(self) -> None:
        self._scheduler.add_job(
            self._fire,
            self._trigger,
            id="reconcile",
            coalesce=True,
            misfire_grace_time=MISFIRE_GRACE_S,
        )
        self._scheduler.start()

    async def stop(self) -> None:
        """Fire no more ticks, and let one being published finish (before the broker's connection
        closes)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._firing:
            await asyncio.wait(self._firing, timeout=STOP_WAIT_S)

    async def _fire(self) -> None:
        # The tick runs apart from the scheduler, whose shutdown cancels the jobs it is running: a
        # tick cancelled between its claim and the broker's confirm kept the claim with no command
        # queued, and no replica ran that tick.
        task = asyncio.create_task(self._tick())
        self._firing.add(task)
        task.add_done_callback(self._firing.discard)

    async def _tick(self) -> None:
        try:
            await self.tick()
        except Exception as exc:  # Redis down: the next tick tries again
            log.error("could not claim the scheduled reconciliation: %s", type(exc).__name__)

    async def tick(self, now: datetime | None = None) -> ReconcileCommand | None:
        """Claim this tick; the replica that wins publishes the command and returns it."""
        scheduled = tick_time(self._trigger, now or datetime.now(UTC))
        if scheduled is None:
            return None
        stamp = scheduled.strftime("%Y%m%dT%H%M%SZ")
        claim = f"{self._namespace}:reconcile:tick:{stamp}"
        if not await self._redis.set(claim, self._replica, nx=True, ex=_TICK_TTL_S):
            log.info("tick taken by another replica", extra={"tick": stamp})
            return None
        command = ReconcileCommand(run_id=f"scheduled-{stamp}", dry_run=self._dry_run, trigger="schedule")
        try:
            await self._publisher.publish_reconcile(command)
        except BaseException as exc:
            # Give the tick back (cancelled too, by an exit after `STOP_WAIT_S`): it is lost now,
            # but a retried or late tick of another replica may use it.
            await asyncio.shield(self._redis.delete(claim))
            if not isinstance(exc, Exception):
                raise
            log.error("could not queue the scheduled reconciliation: %s", type(exc).__name__)
            return None
        log.info("scheduled reconciliation queued", extra={"tick": stamp, "run_id": command.run_id})
        return command
