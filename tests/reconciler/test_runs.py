"""Run records in the real Redis: each status change says only what belongs to that status."""

from __future__ import annotations

import redis.asyncio as aioredis
from imgpipe.models import ReconcileCommand
from imgpipe.runs import RunStore


async def test_a_status_change_drops_the_summary_and_error_of_the_status_before(
    redis_client: aioredis.Redis, rc_namespace: str
) -> None:
    """A redelivered copy of a command gives up waiting for the lock and records `skipped` with its
    error while the command's first run goes on; that run then succeeds. The record said `succeeded`
    with the copy's error, and a run started again showed the last run's summary while running."""
    runs, command = RunStore(redis_client, rc_namespace), ReconcileCommand(run_id="r1")
    await runs.update(command, "running")
    await runs.update(command, "skipped", error="another reconciliation was running")

    done = await runs.update(command, "succeeded", summary={"deleted": 3})
    assert (done.status, done.summary, done.error) == ("succeeded", {"deleted": 3}, None)
    assert await runs.get("r1") == done

    again = await runs.update(command, "running")
    assert (again.summary, again.error) == (None, None)
    failed = await runs.update(command, "failed", error="StorageError: S3 down")
    assert (failed.summary, failed.error) == (None, "StorageError: S3 down")
    # What stays is the run's own: who asked, and when.
    assert (failed.created_at, failed.trigger, failed.dry_run) == (done.created_at, "schedule", False)
