"""Admin routes: queue a reconciliation and read its outcome (the `admin` scope only).

`POST /admin/reconcile?dry_run=true|false` writes a `queued` run record, publishes the command
with publisher confirms and answers 202 with the run's id; a reconciler replica runs it.
`GET /admin/reconcile/{run_id}` returns the record, with the summary once the run is done.

`GET /admin/dead-letters?limit=N` lists the dead-letter queue without taking anything out of it;
`POST /admin/dead-letters/replay` puts dead-lettered jobs back to `pending` and into the jobs
queue (see `imgpipe.deadletters` for how, and what is never replayed).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Annotated

from aiohttp import web
from imgpipe import resources
from imgpipe.broker import BrokerUnavailable
from imgpipe.deadletters import MAX_LIMIT, DeadLetters, DeadLettersBusy
from imgpipe.models import ReconcileCommand
from imgpipe.runs import RunStore, new_run
from imgpipe.web import ApiError, authenticate, read_model, require_admin
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

log = logging.getLogger("imgpipe.api")

_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def _query(request: web.Request, name: str, default: str) -> str:
    """The query parameter `name`, given at most once: `dry_run=false&dry_run=true` is not guessed at."""
    values = request.query.getall(name, [default])
    if len(values) > 1:
        raise ApiError(422, "invalid_request", f"{name} given more than once")
    return values[0]


def _runs(request: web.Request) -> RunStore:
    store = request.app[resources.STORE]
    return RunStore(store.redis, store.namespace)


async def queue_reconcile(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    require_admin(principal)
    raw = _query(request, "dry_run", "true").lower()
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


class ReplayRequest(BaseModel):
    """Body of `POST /admin/dead-letters/replay`: `{"job_ids": [...]}` or `{"all": true, "limit": N}`."""

    model_config = ConfigDict(extra="forbid")

    job_ids: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=1, max_length=MAX_LIMIT
    )
    all: StrictBool = False
    limit: StrictInt = Field(default=100, ge=1, le=MAX_LIMIT)

    @model_validator(mode="after")
    def _one_selection(self) -> ReplayRequest:
        if (self.job_ids is not None) == self.all:
            raise ValueError('send either "job_ids" or "all": true')
        if self.job_ids is not None and "limit" in self.model_fields_set:
            raise ValueError('"limit" goes with "all": true only')
        return self


def _dead_letters(request: web.Request) -> DeadLetters:
    app = request.app
    return DeadLetters(app[resources.AMQP], app[resources.PUBLISHER].topology, app[resources.STORE])


def _limit(request: web.Request) -> int:
    raw = _query(request, "limit", "100")
    # Length first: int() refuses more than 4,300 digits with an error of its own.
    if not (len(raw) <= 6 and raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(422, "invalid_request", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _unavailable(exc: Exception) -> ApiError:
    if isinstance(exc, DeadLettersBusy):
        return ApiError(409, "dead_letters_busy", "another listing or replay is running; retry shortly")
    log.warning("dead letters: broker unavailable: %s", exc)
    return ApiError(503, "broker_unavailable", "RabbitMQ is unavailable; retry later")


async def list_dead_letters(request: web.Request) -> web.Response:
    require_admin(await authenticate(request))
    limit = _limit(request)
    try:
        count, items = await _dead_letters(request).list(limit)
    except (BrokerUnavailable, DeadLettersBusy) as exc:
        raise _unavailable(exc) from None
    return web.json_response({"count": count, "items": [item.public() for item in items]})


async def replay_dead_letters(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    require_admin(principal)
    body = await read_model(request, ReplayRequest)
    try:
        result = await _dead_letters(request).replay(body.job_ids, limit=body.limit)
    except (BrokerUnavailable, DeadLettersBusy) as exc:
        raise _unavailable(exc) from None
    log.info(
        "dead letters replayed",
        extra={
            "requested_by": principal.sub,
            "replayed": len(result.replayed),
            "not_found": len(result.not_found),
        },
    )
    return web.json_response(result.public())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/reconcile", queue_reconcile)
    app.router.add_get("/admin/reconcile/{run_id}", get_reconcile)
    app.router.add_get("/admin/dead-letters", list_dead_letters)
    app.router.add_post("/admin/dead-letters/replay", replay_dead_letters)
