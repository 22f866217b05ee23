"""Admin routes: queue a reconciliation and read its outcome (the `admin` scope only).

`POST /admin/reconcile?dry_run=true|false` writes a `queued` run record, publishes the command
with publisher confirms and answers 202 with the run's id; a reconciler replica runs it.
`GET /admin/reconcile/{run_id}` returns the record, with the summary once the run is done.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiohttp import web
from imgpipe import resources
from imgpipe.models import ReconcileCommand
from imgpipe.runs import RunStore, new_run
from imgpipe.web import ApiError, authenticate, require_admin

log = logging.getLogger("imgpipe.api")

_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def _runs(request: web.Request) -> RunStore:
    store = request.app[resources.STORE]
    return RunStore(store.redis, store.namespace)


async def queue_reconcile(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    require_admin(principal)
    raw = request.query.get("dry_run", "true").lower()
    if raw not in _BOOLEANS:
        raise ApiError(422, "invalid_request", "dry_run must be true or false")
    # Without an explicit dry_run=false nothing is deleted: the safe default for a destructive run.
    command = ReconcileCommand(
        run_id=uuid.uuid4().hex, dry_run=_BOOLEANS[raw], trigger="admin", requested_by=principal.sub
    )
    runs = _runs(request)
    await runs.put(new_run(command))
    try:
        async with asyncio.timeout(5.0):
            await request.app[resources.PUBLISHER].publish_reconcile(command)
    except (Exception, asyncio.CancelledError) as exc:
        log.warning("reconcile command not queued: %s", type(exc).__name__)
        try:
            await runs.delete(command.run_id)
        except Exception:
            log.warning("could not remove the run record after a failed publish")
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ApiError(503, "broker_unavailable", "the run could not be queued; retry later") from None
    log.info("reconciliation queued", extra={"run_id": command.run_id, "dry_run": command.dry_run})
    location = f"/admin/reconcile/{command.run_id}"
    return web.json_response(
        {
            "run_id": command.run_id,
            "status": "queued",
            "dry_run": command.dry_run,
            "links": {"self": location},
        },
        status=202,
        headers={"Location": location},
    )


async def get_reconcile(request: web.Request) -> web.Response:
    require_admin(await authenticate(request))
    record = await _runs(request).get(request.match_info["run_id"])
    if record is None:
        raise ApiError(404, "run_not_found", "no reconciliation run with that id")
    return web.json_response(record.public())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/reconcile", queue_reconcile)
    app.router.add_get("/admin/reconcile/{run_id}", get_reconcile)
