"""The status service: `GET /jobs/{id}` for polling and `GET /jobs/{id}/events` as Server-Sent Events.

Each event's `event:` is the job's status, its `id:` the record's version and the moment of the
write that made it (`<version>.<microseconds>`), and its `data:` the same JSON as `GET /jobs/{id}`.
The stream starts with the current state and ends after a terminal one. A reconnecting EventSource
sends `Last-Event-ID`: if the job is terminal and the client has its current state, the answer is
204 (which stops the reconnects); if the client has the current state of a job still running, the
stream does not send that state again.
The hub (`hub.py`) writes the changes to the streams; a stream's handler only opens it, sends
heartbeats while it is idle, and closes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from aiohttp import HttpVersion11, web
from imgpipe import resources
from imgpipe.auth import Principal, TokenVerifier
from imgpipe.models import JobRecord
from imgpipe.settings import AuthSettings, RedisSettings, S3Settings, load
from imgpipe.telemetry import SSE_CONNECTIONS, job_id_var, request_id_var, start_logging
from imgpipe.web import READINESS, VERIFIER, ApiError, authenticate, base_app
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from imgpipe_status import openapi
from imgpipe_status.hub import Hub, Listener
from imgpipe_status.streams import Streams

log = logging.getLogger("imgpipe.status")

HUB = web.AppKey("hub", Hub)
SSE = web.AppKey("sse", "SseSettings")
STREAMS = web.AppKey("streams", Streams)


class SseSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGPIPE_", extra="ignore", frozen=True)

    #: Seconds between keep-alive comments on an idle stream (proxies drop silent connections).
    sse_heartbeat_s: float = Field(default=15.0, gt=0, le=300)
    #: Milliseconds a browser waits before reconnecting a dropped stream.
    sse_retry_ms: int = Field(default=2000, ge=100, le=60_000)
    #: Event streams one user (token `sub`) may hold open on one status process (0 = no limit).
    sse_max_streams_per_user: int = Field(default=200, ge=0)
    #: Event streams one status process holds open in all (0 = no limit): each costs a socket and
    #: some memory (the benchmark's 5,000 streams on one process: 150 MiB at its peak).
    sse_max_streams: int = Field(default=10_000, ge=0)
    #: Seconds what a stream sends may go unacknowledged (or wait on a client that stopped reading)
    #: before the kernel drops the connection (TCP_USER_TIMEOUT; 0 = the kernel's default, about 15
    #: minutes of retransmissions). A client that vanished without closing (a phone that lost its
    #: network) otherwise keeps its stream, and its place under the per-user limit, that long.
    sse_client_timeout_s: float = Field(default=60.0, ge=0, le=3600)


def _visible(record: JobRecord | None, principal: Principal) -> JobRecord:
    # Someone else's job is indistinguishable from a missing one: ids are not for probing.
    if record is None or record.owner != principal.sub:
        raise ApiError(404, "job_not_found", "no such job")
    return record


async def _owned_job(request: web.Request) -> JobRecord:
    principal = await authenticate(request)
    job_id = request.match_info["job_id"]
    job_id_var.set(job_id)
    record = await request.app[resources.STORE].get(job_id) if len(job_id) <= 64 else None
    return _visible(record, principal)


def _view(request: web.Request, record: JobRecord) -> dict:
    return record.public(request.app[resources.STORAGE].presign_download)


async def get_job(request: web.Request) -> web.Response:
    record = await _owned_job(request)
    return web.json_response(_view(request, record), headers={"Cache-Control": "no-store"})


_LAST_EVENT_ID = re.compile(r"([0-9]+)(?:\.([0-9]{1,20}))?")
#: Versions are Redis integers (64-bit): a longer number is past every one (and int() refuses the longest).
_PAST_EVERY_VERSION = 2**64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _written(record: JobRecord) -> int:
    """When the write that made `record` happened, in microseconds since the epoch: with the
    version, what tells one state from another. A version alone does not after a Redis failover
    that lost writes: the store hands the lost versions out again, to other states."""
    return (record.updated_at - _EPOCH) // timedelta(microseconds=1)


def _last_event_id(request: web.Request) -> tuple[int, int | None] | None:
    """The version the client says it has (`Last-Event-ID`) and when that state was written (None
    from an id of a version alone, as the service sent before), or None when absent or malformed."""
    match = _LAST_EVENT_ID.fullmatch(request.headers.get("Last-Event-ID", ""))
    if match is None:
        return None
    digits = match.group(1).lstrip("0")
    version = int(digits or "0") if len(digits) <= 20 else _PAST_EVERY_VERSION
    return version, int(match.group(2)) if match.group(2) else None


def _render(app: web.Application, record: JobRecord) -> bytes:
    """`record` as one SSE event. The hub calls it once per change, whatever the number of streams."""
    data = json.dumps(record.public(app[resources.STORAGE].presign_download), separators=(",", ":"))
    return f"id: {record.version}.{_written(record)}\nevent: {record.status.value}\ndata: {data}\n\n".encode()


async def job_events(request: web.Request) -> web.StreamResponse:
    principal = await authenticate(request, allow_query_token=True)
    job_id = request.match_info["job_id"]
    job_id_var.set(job_id)
    if len(job_id) > 64:
        _visible(None, principal)  # raises the 404
    hub = request.app[HUB]
    settings = request.app[SSE]

    # Listen before reading, so a change between the read and the subscription is not lost.
    with request.app[STREAMS].slot(principal.sub), hub.listen(job_id) as listener:
        # Usually no Redis read at all: the hub already follows a job that other streams watch.
        has, written = _last_event_id(request) or (None, None)
        current = _visible(await hub.current(job_id, at_least=has or 0), principal)
        # The client has this very state. With an id of the version alone (sent before ids carried
        # the write's moment), as then: that version, or a later one for an ended job. With the
        # moment, only this state: a client that was sent a state the store has since lost (a Redis
        # failover), or a later version than the store's, gets the store's state as it is now.
        if written is None:
            has_it = has == current.version
            ended = has is not None and has >= current.version and current.status.terminal
        else:
            has_it = has == current.version and written == _written(current)
            ended = has_it and current.status.terminal
        if ended:
            # A finished stream's EventSource reconnects to it forever; 204 is what makes it stop.
            return web.Response(status=204, headers={"Cache-Control": "no-store"})
        # Rendered before anything is sent: a failure here (no S3 credentials to sign the variants'
        # URLs with) is then a 503 like `GET /jobs/{id}`'s, not a second response after a 200's headers.
        # Not resent to a client that says it has it: the hub sends only newer changes.
        first = b"" if has_it else hub.event(current).data
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # nginx: pass events through at once
                # The middleware cannot add it once the stream is prepared, so it goes in here.
                "X-Request-ID": request_id_var.get() or "",
            }
        )
        # Explicit, because the hub frames the chunks it writes itself (HTTP/1.0 gets none).
        chunked = request.version >= HttpVersion11
        if chunked:
            response.enable_chunked_encoding()
        await response.prepare(request)
        _drop_when_unacknowledged(request.transport, settings.sse_client_timeout_s)
        SSE_CONNECTIONS.inc()
        try:
            # The first event goes through aiohttp, which sends the headers with it.
            await response.write(f"retry: {settings.sse_retry_ms}\n\n".encode() + first)
            if not current.status.terminal:
                hub.attach(listener, request.transport, chunked=chunked, version=current.version)
                await _until_end(listener, settings.sse_heartbeat_s, principal.valid_until)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away; nothing to tell anyone
        finally:
            SSE_CONNECTIONS.dec()
    return response


def _drop_when_unacknowledged(transport: asyncio.BaseTransport | None, timeout_s: float) -> None:
    """Have the kernel drop the connection once what is sent on it has waited `timeout_s` for the
    client (TCP_USER_TIMEOUT): unacknowledged, or unsent behind a client's full receive window.

    The heartbeats keep data in flight, so a client gone without a word is found within a heartbeat
    and this timeout; the stream's handler then sees the transport closed, and ends. Where the
    option does not exist (not Linux, a Unix socket), the kernel's retransmissions decide.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if not timeout_s or sock is None or not hasattr(socket, "TCP_USER_TIMEOUT"):
        return
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(timeout_s * 1000))
    except OSError as exc:
        log.warning("a stream's socket keeps the kernel's timeout: %s", exc)


async def _until_end(listener: Listener, heartbeat_s: float, valid_until: float) -> None:
    """Wait for the stream to end, with a keep-alive comment after every `heartbeat_s` of silence,
    and end it when its token does (`valid_until`, epoch seconds): the token was checked when the
    stream opened, and the events carry download links, so they go no further than it does."""
    loop = asyncio.get_running_loop()
    expires = loop.time() + max(0.0, valid_until - time.time())
    while not listener.ended.is_set():
        deadline = min(listener.last_write + heartbeat_s, expires)
        try:
            async with asyncio.timeout_at(deadline):
                await listener.ended.wait()
        except TimeoutError:
            if loop.time() >= expires:
                listener.expire()
            elif listener.last_write + heartbeat_s <= deadline:  # nothing was sent meanwhile
                listener.heartbeat()


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = Hub(app[resources.STORE], lambda record: _render(app, record))
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
    app[HUB].close_all()


def _raise_fd_limit() -> None:
    """Every SSE stream holds a socket: allow as many as the hard limit does (the soft is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
            return
    log.info("open-file limit %d", max(soft, target))


async def create_app() -> web.Application:
    """The status application; every setting comes from the environment."""
    common = start_logging("status")
    app = base_app("status", environment=common.env, openapi=openapi.document(), serves_clients=True)
    _raise_fd_limit()
    app[VERIFIER] = TokenVerifier(load(AuthSettings))
    app[SSE] = sse = load(SseSettings)
    app[STREAMS] = Streams(per_user=sse.sse_max_streams_per_user, total=sse.sse_max_streams)
    app.cleanup_ctx.extend(
        [
            resources.job_store(load(RedisSettings), common.namespace),
            # Only to sign download links, which needs no call to S3: an S3 outage does not take
            # every status replica out of its Service (and their streams' reconnects with it).
            resources.object_storage(load(S3Settings), probe=False),
            _hub_ctx,
        ]
    )
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/jobs/{job_id}", get_job)
    # No HEAD: a stream has no headers-only form, and aiohttp would write its events as a body.
    app.router.add_get("/jobs/{job_id}/events", job_events, allow_head=False)
    return app
