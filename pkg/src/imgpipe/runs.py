"""Reconciliation runs as records in Redis: queued by the api, moved on and summarised by the reconciler.

A run is a JSON value `{ns}:reconcile:run:{run_id}` kept for `RUN_RETENTION`, so an admin who
queued a run can read its summary later (`GET /admin/reconcile/{run_id}`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel

from imgpipe.models import ReconcileCommand, utcnow

#: How long a run's record (and its summary) is kept.
RUN_RETENTION = timedelta(days=7)

RunStatus = Literal["queued", "running", "succeeded", "failed", "skipped"]


class RunRecord(BaseModel):
    """One reconciliation run: who asked, where it is, and its summary once it is done."""

    run_id: str
    status: RunStatus
    dry_run: bool
    trigger: str
    requested_by: str | None = None
    created_at: datetime
    updated_at: datetime
    summary: dict[str, Any] | None = None
    error: str | None = None

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class RunStore:
    """Run records of one namespace."""

    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self.redis = client
        self.namespace = namespace

    def key(self, run_id: str) -> str:
        return f"{self.namespace}:reconcile:run:{run_id}"

    async def get(self, run_id: str) -> RunRecord | None:
        raw = await self.redis.get(self.key(run_id))
        return RunRecord.model_validate_json(raw) if raw else None

    async def put(self, record: RunRecord) -> None:
        await self.redis.set(
            self.key(record.run_id),
            record.model_dump_json(),
            ex=int(RUN_RETENTION.total_seconds()),
        )

    async def delete(self, run_id: str) -> None:
        await self.redis.delete(self.key(run_id))

    async def update(self, command: ReconcileCommand, status: RunStatus, **fields: Any) -> RunRecord:
        """Write the run's new status, creating the record if nobody queued it (a scheduled run).

        `summary` and `error` are the new status's, None unless given: what they said belongs to
        the status they were written with.
        """
        current = await self.get(command.run_id)
        now = utcnow()
        base = current or RunRecord(
            run_id=command.run_id,
            status=status,
            dry_run=command.dry_run,
            trigger=command.trigger,
            requested_by=command.requested_by,
            created_at=command.requested_at,
            updated_at=now,
        )
        # Not merged into the old ones: a redelivered copy of the command may have recorded `skipped`
        # with its error while this run went on, and a run that succeeds must not keep that error
        # (nor a run started again keep its last summary).
        record = base.model_copy(
            update={"status": status, "updated_at": now, "summary": None, "error": None, **fields}
        )
        await self.put(record)
        return record


def new_run(command: ReconcileCommand) -> RunRecord:
    """The `queued` record of a command that is about to be published."""
    return RunRecord(
        run_id=command.run_id,
        status="queued",
        dry_run=command.dry_run,
        trigger=command.trigger,
        requested_by=command.requested_by,
        created_at=command.requested_at,
        updated_at=command.requested_at,
    )
