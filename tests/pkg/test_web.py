"""The shared web layer in-process: what the middleware answers and counts for requests that go wrong."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import imgpipe.web
import pytest
from aiohttp import web, web_protocol
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from imgpipe.storage import StorageError
from imgpipe.web import READINESS, ApiError, base_app, read_model
from prometheus_client import REGISTRY
from pydantic import BaseModel

from tests.stack import local_http
from tests.worker.test_consumer import eventually


def _requests(route: str, status: str) -> float:
    labels = {"service": "webtest", "method": "GET", "route": route, "status": status}
    return REGISTRY.get_sample_value("imgpipe_http_requests_total", labels) or 0.0


async def test_a_storage_error_no_retry_helps_is_a_json_500(http: aiohttp.ClientSession) -> None:
    """Not an outage (S3 answered something we cannot use): still the JSON shape and a request id,
    not aiohttp's plain-text page."""

    async def broken(_: web.Request) -> web.Response:
        raise StorageError("storage_error", "S3 HEAD 'k': no usable size or date", transient=False)

    app = base_app("webtest", environment="test")
    app.router.add_get("/broken", broken)
    async with local_http(app) as base, http.get(f"{base}/broken") as response:
        assert response.status == 500
        assert (await response.json())["error"]["code"] == "internal_error"
        assert response.headers["X-Request-ID"]


async def test_a_client_that_goes_away_is_not_counted_as_a_server_error() -> None:
    """Counted 500, it set off the 5xx alert for clients that merely hung up."""
    started = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(30)
        return web.Response()

    app = base_app("webtest", environment="test")
    app.router.add_get("/slow", slow)
    before = _requests("/slow", "500"), _requests("/slow", "499")
    async with local_http(app, handler_cancellation=True) as base:
        async with aiohttp.ClientSession() as impatient:
            request = asyncio.create_task(impatient.get(f"{base}/slow"))
            await asyncio.wait_for(started.wait(), 5)
            request.cancel()
        await eventually(lambda: _requests("/slow", "499") == before[1] + 1)
    assert _requests("/slow", "500") == before[0]


async def test_a_reset_of_a_connection_of_ours_is_a_500_not_a_client_that_left(
    http: aiohttp.ClientSession,
) -> None:
    """Taken for the client hanging up, it was counted 499 and left to aiohttp: its plain 500 with
    no request id, and an ERROR line of its own with none either."""

    async def upstream_reset(_: web.Request) -> web.Response:
        raise ConnectionResetError("a dependency's socket was reset")

    app = base_app("webtest", environment="test")
    app.router.add_get("/reset", upstream_reset)
    before = _requests("/reset", "500"), _requests("/reset", "499")
    async with (
        local_http(app) as base,
        aiohttp.ClientSession() as http,
        http.get(f"{base}/reset") as response,
    ):
        assert response.status == 500
        assert (await response.json())["error"]["code"] == "internal_error"
        assert response.headers["X-Request-ID"]
    assert (_requests("/reset", "500"), _requests("/reset", "499")) == (before[0] + 1, before[1])


async def test_a_stream_whose_handler_fails_is_cut_short_not_followed_by_a_second_answer() -> None:
    """The 500 was written into the stream's body, a second status line inside the first answer."""

    async def stream_then_fail(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        raise RuntimeError("a bug, mid-stream")

    app = base_app("webtest", environment="test")
    app.router.add_get("/stream", stream_then_fail)
    before = _requests("/stream", "500")
    async with local_http(app) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)  # to the end: the connection is closed
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"data: one" in answer
    assert answer.count(b"HTTP/1.1") == 1, answer
    assert not answer.endswith(b"0\r\n\r\n")  # no last chunk: the client can tell it was cut short
    assert _requests("/stream", "500") == before + 1


def _lag(suffix: str, **labels: str) -> float:
    return (
        REGISTRY.get_sample_value(
            f"imgpipe_event_loop_lag_seconds_{suffix}", {"service": "looptest", **labels}
        )
        or 0.0
    )


async def test_every_app_watches_its_event_loop_and_sees_it_blocked() -> None:
    """A service's loop blocked for half a second shows as one late tick in its lag histogram; the
    watch runs while the app does, and stops with it."""
    app = base_app("looptest", environment="test")
    async with local_http(app):
        await eventually(lambda: _lag("count") >= 2)
        late_before = _lag("count") - _lag("bucket", le="0.25")
        time.sleep(0.5)  # noqa: ASYNC251  # the blocking call the watch is there to see
        await eventually(lambda: _lag("count") - _lag("bucket", le="0.25") > late_before)
        assert _lag("count") - _lag("bucket", le="0.25") == late_before + 1
        assert _lag("sum") >= 0.4
    stopped = _lag("count")
    await asyncio.sleep(0.3)
    assert _lag("count") == stopped


async def _readyz(http: aiohttp.ClientSession, base: str) -> tuple[int, dict]:
    async with http.get(f"{base}/readyz") as response:
        return response.status, await response.json()


async def test_readiness_of_a_service_that_serves_clients_gates_only_its_start(
    http: aiohttp.ClientSession,
) -> None:
    """api and status: 503 until every check has passed once; after that an outage of a shared
    dependency is named in the body but leaves the replica in its Service (200), where it answers
    the requests that need the dependency with its own JSON 503. Other services: 503 whenever a
    check fails."""
    up = {"redis": False}

    async def redis() -> None:
        if not up["redis"]:
            raise ConnectionError("down")

    for serves_clients in (True, False):
        up["redis"] = False
        app = base_app("webtest", environment="test", serves_clients=serves_clients)
        app[READINESS]["redis"] = redis
        async with local_http(app) as base:
            assert await _readyz(http, base) == (
                503,
                {"ready": False, "checks": {"redis": "error: ConnectionError"}},
            )
            up["redis"] = True
            assert await _readyz(http, base) == (200, {"ready": True, "checks": {"redis": "ok"}})
            up["redis"] = False
            status, body = await _readyz(http, base)
            assert body["checks"] == {"redis": "error: ConnectionError"}
            assert (status, body["ready"]) == ((200, True) if serves_clients else (503, False)), (
                serves_clients
            )


async def _raw(base: str, request: bytes) -> tuple[bytes, bytes]:
    """Send `request` as it is; the answer's head and body (the server closes after it)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


async def test_a_request_aiohttp_cannot_parse_gets_json_that_does_not_quote_it() -> None:
    """aiohttp's own answer (no middleware sees such a request) was text quoting the bytes it choked
    on: the request line with `?access_token=<the JWT>`, or the first 8 KiB of an oversized header."""
    secret = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl"
    app = base_app("webtest", environment="test")
    async with local_http(app) as base:
        for request in (
            f"GET /jobs/x/events?access_token={secret}\x01 HTTP/1.1\r\nHost: a\r\n\r\n".encode(),
            f"GET /healthz HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {secret * 200}\r\n\r\n".encode(),
        ):
            head, body = await _raw(base, request)
            assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), head  # HTTP/1.0: unparsed
            assert b"content-type: application/json" in head.lower(), head
            assert json.loads(body)["error"]["code"] == "bad_request", body
            assert secret.encode()[:20] not in head + body


async def test_malformed_requests_are_logged_at_most_once_a_period_with_a_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING per request: any client could fill the logs with garbage at no cost of its own."""
    sampled = imgpipe.web._Sampled(period_s=3600)
    monkeypatch.setattr(imgpipe.web, "_MALFORMED_LINES", sampled)
    garbage = b"GET /healthz\x01 HTTP/1.1\r\nHost: a\r\n\r\n"
    app = base_app("webtest", environment="test")
    with caplog.at_level(logging.WARNING, logger="imgpipe.web"):
        async with local_http(app) as base:
            for _ in range(5):
                head, _body = await _raw(base, garbage)
                assert b" 400 " in head.split(b"\r\n")[0]  # every one is answered all the same
            sampled._next = 0.0  # the period is over
            await _raw(base, garbage)
    lines = [r for r in caplog.records if r.getMessage().startswith("malformed HTTP request refused")]
    assert [r.held_back for r in lines] == [0, 4]


class _Body(BaseModel):
    n: int


def _body_app() -> web.Application:
    async def count(request: web.Request) -> web.Response:
        return web.json_response({"n": (await read_model(request, _Body)).n})

    app = base_app("webtest", environment="test")
    app.router.add_post("/count", count)
    return app


async def _answer_to(base: str, *parts: bytes, pause_s: float = 0.2) -> tuple[bytes, dict, float]:
    """Send `parts` with a pause between them and keep the connection open: the answer's head, its
    JSON body, and how long after the last part it came."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause_s)
            writer.write(part)
            await writer.drain()
        sent = time.monotonic()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(v for k, v in _headers(head) if k == b"content-length"))
            body = json.loads(await reader.readexactly(length))
        return head, body, time.monotonic() - sent
    finally:
        writer.close()


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.strip().split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]


_HEAD = b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
_CHUNKED = _HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


async def test_a_body_that_does_not_arrive_in_time_gets_408_and_a_closed_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a deadline, a client that trickled its body (or whose chunked framing broke part-way,
    which aiohttp's C parser never hands to the body being read) held the handler for ever."""
    monkeypatch.setattr(imgpipe.web, "BODY_TIMEOUT_S", 0.5)
    async with local_http(_body_app(), handler_cancellation=True) as base:
        for parts in (
            (_HEAD + b"Content-Length: 100\r\n\r\n", b'{"n": 1'),  # 7 of its 100 bytes, then nothing
            (_CHUNKED, b'2\r\n{"\r\n', b"ZZ\r\n"),  # a chunk size that is not hex, after a good chunk
        ):
            answer, body, after_s = await _answer_to(base, *parts)
            assert answer.split(b"\r\n")[0] == b"HTTP/1.1 408 Request Timeout", answer
            assert body["error"]["code"] == "request_timeout", body
            assert (b"connection", b"close") in _headers(answer), answer
            assert after_s < 3, after_s
        # The same framing, well formed, is read as it arrives (the deadline is on the whole body).
        chunks = (b'5\r\n{"n":\r\n', b"2\r\n 7\r\n", b"1\r\n}\r\n0\r\n\r\n")
        answer, body, _ = await _answer_to(base, _CHUNKED, *chunks, pause_s=0.1)
        assert answer.split(b"\r\n")[0] == b"HTTP/1.1 200 OK" and body == {"n": 7}, (answer, body)


async def test_a_body_whose_framing_breaks_is_a_400_not_a_500() -> None:
    """aiohttp's pure-Python parser hands a broken chunked body to the reader as RequestPayloadError;
    it fell through to the middleware's catch-all as an internal error."""
    payload = StreamReader(web_protocol.RequestHandler.__new__(web_protocol.RequestHandler), 2**16)
    payload.set_exception(web_protocol.RequestPayloadError("invalid chunk size"))
    request = make_mocked_request(
        "POST", "/count", headers={"Content-Type": "application/json"}, payload=payload
    )
    with pytest.raises(ApiError) as raised:
        await read_model(request, _Body)
    assert (raised.value.status, raised.value.code, raised.value.close) == (400, "bad_request", True)
