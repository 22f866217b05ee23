"""aiohttp pieces every service shares: errors as JSON, request ids, metrics, health and the CLI.

Errors leave every service as `{"error": {"code", "message"}}`; handlers raise `ApiError` and the
middleware turns it (and aiohttp's own HTTP errors, and anything unexpected) into that shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any, TypeVar

from aiohttp import hdrs, web, web_protocol
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from imgpipe.auth import AuthError, Principal, TokenVerifier, bearer_token
from imgpipe.openapi import add_routes as add_openapi_routes
from imgpipe.openapi import health_document
from imgpipe.storage import StorageError
from imgpipe.store import redis_unavailable
from imgpipe.telemetry import (
    EVENT_LOOP_LAG,
    HTTP_LATENCY,
    HTTP_REQUESTS,
    LOOP_CHECK_INTERVAL_S,
    clean_request_id,
    request_id_var,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Check = Callable[[], Awaitable[Any]]

SERVICE = web.AppKey("service", str)
ENVIRONMENT = web.AppKey("environment", str)
VERIFIER = web.AppKey("verifier", TokenVerifier)
READINESS = web.AppKey("readiness", dict)


@dataclass
class _Readiness:
    """How `/readyz` answers for one application (see `base_app`'s `serves_clients`)."""

    #: A failing check makes the answer 503 only until every check has passed once.
    only_until_started: bool
    started: bool = False


_READY = web.AppKey("ready", _Readiness)

_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


class ApiError(Exception):
    """An error answer: HTTP status, a machine-readable code and a sentence for people.

    `close`: the connection is closed after the answer (what is left of the request on it cannot be
    read as the next one).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.close = close


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _internal_error() -> web.Response:
    return error_response(500, "internal_error", "an internal error occurred")


class _Sampled:
    """Lets one line through per `period_s`, and counts the ones it holds back meanwhile: what any
    client can cause, one line a request, would let it fill the logs (and their bill)."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._next = 0.0
        self._held = 0

    def take(self) -> int | None:
        """The number of lines held back since the last one let through, or None: hold this one."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        held, self._held, self._next = self._held, 0, now + self.period_s
        return held


_MALFORMED_LINES = _Sampled(period_s=1.0)


def _unparsed_request_error(
    self: web_protocol.RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """aiohttp's answer to a request it could not parse, which no middleware sees, in our JSON shape.

    Its own was text, and quoted the bytes it choked on: a stray byte in a query string sent the
    whole request line back, `?access_token=<the JWT>` and all, and an oversized header its first
    8 KiB (a bearer token). It also logged each as an ERROR: a client's garbage is not ours, so it
    is a warning here, naming the kind of fault and not the bytes, at most one a second with the
    count of those held back. A 500 (a fault of ours) keeps aiohttp's logging.
    """
    if status >= 500:
        _aiohttp_handle_error(self, request, status, exc, message)  # logs; refuses a sent response
        response = _internal_error()
    else:
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, no second one
            raise ConnectionError("a response is sent already, cannot send another")
        held = _MALFORMED_LINES.take()
        if held is not None:
            log.warning(
                "malformed HTTP request refused (%s): %s; %d more since the last such line",
                status,
                type(exc).__name__,
                held,
                extra={"held_back": held},
            )
        response = error_response(
            status, _DEFAULT_CODES.get(status, "bad_request"), "the request is not well-formed HTTP"
        )
    response.force_close()  # as aiohttp's own: what follows on the connection cannot be trusted
    return response


_aiohttp_handle_error = web_protocol.RequestHandler.handle_error
web_protocol.RequestHandler.handle_error = _unparsed_request_error  # type: ignore[method-assign]


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id (taken from X-Request-ID when sane), JSON errors and HTTP metrics."""
    request_id = clean_request_id(request.headers.get("X-Request-ID")) or uuid.uuid4().hex
    token = request_id_var.set(request_id)
    service = request.app[SERVICE]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
            if exc.close:
                response.force_close()
        except AuthError as exc:
            # RFC 6750 3.1: no error code when the request carried no credentials at all.
            challenge = "Bearer" if exc.code == "missing_token" else 'Bearer error="invalid_token"'
            # A 503 auth_unavailable (the IdP's keys are out of reach) carries Retry-After instead.
            headers = {"WWW-Authenticate": challenge} if exc.status == 401 else exc.headers or None
            response = error_response(exc.status, exc.code, exc.message, headers)
        except RedisError as exc:
            if not redis_unavailable(exc):
                log.exception("unhandled error", extra={"path": request.path})
                response = _internal_error()
            else:
                log.warning(
                    "redis unavailable: %s: %s", type(exc).__name__, exc, extra={"path": request.path}
                )
                response = error_response(
                    503, "store_unavailable", "the job store is unavailable; retry later"
                )
        except StorageError as exc:
            if not exc.transient:
                # Not an outage: a bug or an answer we cannot use. Still the JSON shape and our log.
                log.error("storage error: %s", exc.message, extra={"path": request.path})
                response = _internal_error()
            else:
                log.warning("storage unavailable: %s", exc.message)
                response = error_response(
                    503, "storage_unavailable", "object storage is unavailable; retry later"
                )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _DEFAULT_CODES.get(exc.status, "http_error")
            # Keep e.g. Allow, but not the exception's own text/plain Content-Type: the body is JSON.
            kept = {
                k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
            }
            response = error_response(exc.status, code, exc.reason or code, kept or None)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code): not a server error in the metrics
            raise
        except Exception as exc:
            # A reset is the client's going away only if its connection is gone; else it was a
            # connection of ours (a dependency's), and our fault.
            if isinstance(exc, ConnectionResetError) and _client_gone(request):
                status = 499
                raise
            log.exception("unhandled error", extra={"path": request.path})
            response = _internal_error()
        status = response.status
        if not response.prepared:
            if request.writer.output_size > 0:
                # The handler's own answer had begun (a stream) when it failed: another cannot
                # follow it on this connection, where it would land inside the first one's body.
                # Closed, the connection ends that answer short, which is what the client sees.
                if request.transport is not None:
                    request.transport.close()
            else:
                response.headers["X-Request-ID"] = request_id
        return response
    finally:
        HTTP_REQUESTS.labels(service, request.method, route, str(status)).inc()
        HTTP_LATENCY.labels(service, request.method, route).observe(time.perf_counter() - started)
        request_id_var.reset(token)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def authenticate(request: web.Request, *, allow_query_token: bool = False) -> Principal:
    """The caller, from `Authorization: Bearer`; EventSource clients may pass `?access_token=`."""
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        # Proxies and frameworks disagree on which of two wins; neither is guessed at.
        raise AuthError("invalid_token", "send one Authorization header, not several")
    header = headers[0] if headers else None
    if not header and allow_query_token and request.query.get("access_token"):
        return await request.app[VERIFIER].verify(request.query["access_token"])
    return await request.app[VERIFIER].verify(bearer_token(header))


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "this route needs the 'admin' scope")


#: How long a request body may take to arrive, whole. Ours are at most 64 KiB of JSON.
BODY_TIMEOUT_S = 10.0


async def read_model(request: web.Request, model: type[M]) -> M:
    """The JSON body validated into `model`; any problem is a 4xx with a precise code."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    # aiohttp inflates a gzip or deflate body itself, and one that does not inflate would reach us
    # as an error of its own (a 500). Our bodies are a few hundred bytes of JSON: compressing them
    # gains nothing, so a coded body is refused before any of it is inflated (RFC 7694 says how).
    coded = [c for c in request.headers.getall(hdrs.CONTENT_ENCODING, []) if c.strip().lower() != "identity"]
    if coded:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the body without a Content-Encoding (not {coded[0][:32]!r})",
            headers={"Accept-Encoding": "identity"},
        )
    try:
        # A deadline on the whole body: a client that trickles it (or stops) would otherwise hold
        # this handler, and its connection, for as long as it likes. It also bounds a chunked body
        # whose framing breaks part-way: aiohttp's C parser queues that error for after the
        # handler and never hands it to the body being read, which then waits for ever.
        async with asyncio.timeout(BODY_TIMEOUT_S):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "request_too_large", "the request body is too large") from None
    except TimeoutError:
        raise ApiError(
            408, "request_timeout", f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", close=True
        ) from None
    except web_protocol.RequestPayloadError:
        # The body's framing is broken (aiohttp's pure-Python parser says so here): a 400, not a 500.
        raise ApiError(400, "bad_request", "the request body is not well-formed HTTP", close=True) from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:10]
        )
        raise ApiError(422, "invalid_request", problems) from None


# Health, readiness and metrics.


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "status": "ok",
            "service": request.app[SERVICE],
            "version": package_version("imgpipe"),
            "environment": request.app[ENVIRONMENT],
        }
    )


async def _readyz(request: web.Request) -> web.Response:
    checks: dict[str, Check] = request.app[READINESS]
    results: dict[str, str] = {}

    async def run(name: str, check: Check) -> None:
        try:
            async with asyncio.timeout(2.0):
                await check()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"error: {type(exc).__name__}"

    await asyncio.gather(*(run(name, check) for name, check in checks.items()))
    state = request.app[_READY]
    passing = all(value == "ok" for value in results.values())
    state.started = state.started or passing
    ready = passing or (state.only_until_started and state.started)
    return web.json_response({"ready": ready, "checks": results}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def watch_event_loop(service: str, interval_s: float = LOOP_CHECK_INTERVAL_S) -> None:
    """Observe, until cancelled, how late the running loop fires a timer due every `interval_s`.

    Everything in a service shares one loop: a call that blocks it (a synchronous client, a large
    join or parse, a thread that keeps the GIL) delays every request, message and heartbeat behind
    it, and shows here as lag, in `imgpipe_event_loop_lag_seconds{service}`.
    """
    loop = asyncio.get_running_loop()
    lag = EVENT_LOOP_LAG.labels(service)
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        # asyncio may run a timer up to its clock's resolution early: that is no lag.
        lag.observe(max(0.0, loop.time() - due))


async def _loop_watch(app: web.Application) -> AsyncIterator[None]:
    # First in `cleanup_ctx`, so it watches the loop from before the other resources start until
    # after they have stopped (start-up and shutdown block too).
    task = asyncio.create_task(watch_event_loop(app[SERVICE]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def base_app(
    service: str,
    *,
    environment: str,
    client_max_size: int = 1024**2,
    openapi: Mapping[str, Any] | None = None,
    serves_clients: bool = False,
) -> web.Application:
    """An application with the shared middleware, `/healthz`, `/readyz`, `/metrics`, and a watch on
    its event loop's lag.

    `/readyz` is 503 while one of the `READINESS` checks fails. For a service that `serves_clients`
    (api, status), only until every check has passed once: its dependencies (Redis, RabbitMQ, S3)
    are shared by every replica, so an outage of one would take them all out of their Service at
    once, and clients would get the load balancer's bare 503 instead of the service's own quick
    JSON one (`store_unavailable`, `broker_unavailable`, …), for requests that need the dependency
    and for those that do not. A replica that has never reached them gets no traffic, which is
    what a rollout during an outage needs: the old replicas stay.

    It also serves its OpenAPI document as `/openapi.json` and `/docs`: `openapi` when given (see
    `imgpipe.openapi`), otherwise one that describes just the routes above.
    """
    app = web.Application(middlewares=[request_context], client_max_size=client_max_size)
    app[SERVICE] = service
    app[ENVIRONMENT] = environment
    app[READINESS] = {}
    app[_READY] = _Readiness(only_until_started=serves_clients)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    add_openapi_routes(app, openapi if openapi is not None else health_document(service))
    app.on_cleanup.append(_close_verifier)
    app.cleanup_ctx.append(_loop_watch)
    return app


async def _close_verifier(app: web.Application) -> None:
    # The verifier may hold an HTTP session for the identity provider's JWKS.
    verifier = app.get(VERIFIER)
    if verifier is not None:
        await verifier.close()


def serve(
    factory: Callable[[], Awaitable[web.Application] | web.Application],
    *,
    prog: str,
    default_port: int,
    argv: list[str] | None = None,
    shutdown_timeout: float = 10.0,
    backlog: int = 4096,
) -> None:
    """The command line of a service: `--host` (default 0.0.0.0) and `--port`.

    `backlog` is the listen queue (the kernel caps it at net.core.somaxconn). aiohttp's default of
    128 overflows when hundreds of clients connect at once (SSE reconnects after a deploy), and a
    dropped SYN costs the client a 1 s, then 3 s, ... retransmission.
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    args = parser.parse_args(argv)
    web.run_app(
        factory(),  # type: ignore[arg-type]  # run_app accepts a coroutine too
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=shutdown_timeout,
        handler_cancellation=True,
        backlog=backlog,
        # Bodies are never inflated: `read_model` refuses a coded one (415). Inflated, a body
        # whose coding was broken failed aiohttp's drain of it after our answer, and every such
        # request logged an ERROR, with no request id, that any client could cause.
        auto_decompress=False,
    )
