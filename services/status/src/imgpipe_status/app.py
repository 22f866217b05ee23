"""The status service: `GET /jobs/{id}` for polling and `GET /jobs/{id}/events` as Server-Sent Events.

Each event's `event:` is the job's status, its `id:` the record's version and its `data:` the same
JSON as `GET /jobs/{id}`. The stream starts with the current state and ends after a terminal one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from imgpipe import resources
from imgpipe.auth import TokenVerifier
from imgpipe.models import JobRecord
from imgpipe.settings import AuthSettings, CommonSettings, RedisSettings, S3Settings, load
from imgpipe.telemetry import SSE_CONNECTIONS, job_id_var, request_id_var, setup_logging
from imgpipe.web import READINESS, VERIFIER, ApiError, authenticate, base_app
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from imgpipe_status.hub import Hub, Signal

log = logging.getLogger("imgpipe.status")

HUB = web.AppKey("hub", Hub)
SSE = web.AppKey("sse", "SseSettings")


class SseSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGPIPE_", extra="ignore", frozen=True)

    #: Seconds between keep-alive comments on an idle stream (proxies drop silent connections).
    sse_heartbeat_s: float = Field(default=15.0, gt=0, le=300)
    #: Milliseconds a browser waits before reconnecting a dropped stream.
    sse_retry_ms: int = Field(default=2000, ge=100, le=60_000)


async def _owned_job(request: web.Request, *, allow_query_token: bool = False) -> JobRecord:
    principal = await authenticate(request, allow_query_token=allow_query_token)
    job_id = request.match_info["job_id"]
    job_id_var.set(job_id)
    record = await request.app[resources.STORE].get(job_id) if len(job_id) <= 64 else None
    # Someone else's job is indistinguishable from a missing one: ids are not for probing.
    if record is None or record.owner != principal.sub:
        raise ApiError(404, "job_not_found", "no such job")
    return record


def _view(request: web.Request, record: JobRecord) -> dict:
    return record.public(request.app[resources.STORAGE].presign_download)


async def get_job(request: web.Request) -> web.Response:
    record = await _owned_job(request)
    return web.json_response(_view(request, record), headers={"Cache-Control": "no-store"})


def _event(request: web.Request, record: JobRecord) -> bytes:
    data = json.dumps(_view(request, record), separators=(",", ":"))
    return f"id: {record.version}\nevent: {record.status.value}\ndata: {data}\n\n".encode()


async def job_events(request: web.Request) -> web.StreamResponse:
    record = await _owned_job(request, allow_query_token=True)
    hub = request.app[HUB]
    settings = request.app[SSE]
    store = request.app[resources.STORE]

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-store",
            "X-Accel-Buffering": "no",  # nginx: pass events through at once
            # The middleware cannot add it once the stream is prepared, so it goes in here.
            "X-Request-ID": request_id_var.get() or "",
        }
    )
    # Listen before re-reading, so a change between the read and the subscription is not lost.
    with hub.listen(record.id) as changes:
        current = await store.get(record.id) or record
        await response.prepare(request)
        SSE_CONNECTIONS.inc()
        try:
            await response.write(f"retry: {settings.sse_retry_ms}\n\n".encode())
            await response.write(_event(request, current))
            sent = current.version
            while not current.status.terminal:
                try:
                    update = await asyncio.wait_for(changes.get(), settings.sse_heartbeat_s)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if update is Signal.CLOSE:
                    break
                if update is Signal.RESYNC:
                    update = await store.get(record.id)
                    if update is None:
                        break  # expired while we were away
                if update.version <= sent:
                    continue  # a duplicate, or older than what the client has
                current, sent = update, update.version
                await response.write(_event(request, current))
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away; nothing to tell anyone
        finally:
            SSE_CONNECTIONS.dec()
    return response


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = Hub(app[resources.STORE])
    app[HUB] = hub
    hub.start()

    async def ready() -> None:
        if not hub.connected.is_set():
            raise ConnectionError("event subscription not connected")

    app[READINESS]["events"] = ready
    yield
    await hub.stop()


async def _on_shutdown(app: web.Application) -> None:
    # End open streams cleanly (clients reconnect, to another replica) instead of cutting them.
    app[HUB].broadcast(Signal.CLOSE)


async def create_app() -> web.Application:
    """The status application; every setting comes from the environment."""
    common = load(CommonSettings)
    setup_logging("status", env=common.env, level=common.log_level)
    app = base_app("status", environment=common.env)
    app[VERIFIER] = TokenVerifier(load(AuthSettings))
    app[SSE] = load(SseSettings)
    app.cleanup_ctx.extend(
        [
            resources.job_store(load(RedisSettings), common.namespace),
            resources.object_storage(load(S3Settings)),
            _hub_ctx,
        ]
    )
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_get("/jobs/{job_id}/events", job_events)
    return app
