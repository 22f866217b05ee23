"""The SSRF-safe fetcher, against a real aiohttp server on 127.0.0.1 and stub DNS.

No external network: every name is answered by StubResolver, and the only server is
started here. Fetches to the local server need allowed_networks=127.0.0.0/8; the
default policy must refuse the very same server.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, ip_address
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from imgpipe.bodies import BodyNotAdmitted
from imgpipe_worker.fetch import (
    Fetched,
    FetchError,
    FetchPolicy,
    LookupThreads,
    SafeResolver,
    _resolve_redirect,
    fetch_url,
    make_session,
)
from multidict import CIMultiDict

from tests.stack import free_port, wait_http

LOCAL = (IPv4Network("127.0.0.0/8"),)
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 80  # ~20 KiB
CAP = 4096


class StubResolver(AbstractResolver):
    """Injected DNS: a fixed table; unknown names do not exist (never real DNS)."""

    def __init__(self, table: dict[str, list[str] | Exception] | None = None) -> None:
        self.table = table or {}
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        entry = self.table.get(host.removesuffix("."))  # SafeResolver asks for absolute names
        if entry is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if isinstance(entry, Exception):
            raise entry
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            }
            for address in entry
        ]

    async def close(self) -> None:
        pass


class Server:
    def __init__(self, server: TestServer, hits: list[str]) -> None:
        self.server = server
        self.hits = hits

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    release = asyncio.Event()
    hits: list[str] = []
    port_box: list[int] = []

    @web.middleware
    async def count(request: web.Request, handler):  # type: ignore[no-untyped-def]
        hits.append(request.path)
        return await handler(request)

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=IMAGE, content_type="image/png")

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html></html>", content_type="text/html")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (CAP * 3), content_type="image/jpeg")

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(12):
                await response.write(b"y" * 1024)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up once it had enough, as it should
        return response

    async def exact(request: web.Request) -> web.Response:
        return web.Response(body=b"z" * CAP, content_type="image/jpeg")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10)
        return web.Response(body=IMAGE)

    async def leisurely(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response(body=IMAGE, content_type="image/png")

    async def slow_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"a" * 10)
        await asyncio.wait_for(release.wait(), 10)
        return response

    async def gz(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b"\0" * 100_000),
            headers={"Content-Encoding": "gzip", "Content-Type": "image/png"},
        )

    async def gz_behind_identity(request: web.Request) -> web.Response:
        # Two Content-Encoding fields are one list (RFC 9110 §5.3): identity, then gzip.
        headers = CIMultiDict([("Content-Encoding", "identity"), ("Content-Encoding", "gzip")])
        headers["Content-Type"] = "image/png"
        return web.Response(body=gzip.compress(b"\0" * 100_000), headers=headers)

    def status(code: int):  # type: ignore[no-untyped-def]
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=code, text=f"status {code}")

        return handler

    def redirect(location: str, code: int = 302):  # type: ignore[no-untyped-def]
        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                status=code, headers={"Location": location.replace("{port}", str(port_box[0]))}
            )

        return handler

    async def long_reason(request: web.Request) -> web.Response:
        return web.Response(status=403, reason="Go away " + "R" * 8000)

    async def chain(request: web.Request) -> web.Response:
        left = int(request.match_info["n"])  # redirects still to go
        location = "/image" if left <= 1 else f"/chain/{left - 1}"
        return web.Response(status=301, headers={"Location": location})

    async def set_cookie(request: web.Request) -> web.Response:
        response = web.Response(body=IMAGE, content_type="image/png")
        response.set_cookie("session", "secret")
        return response

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "cookie": request.headers.get("Cookie"),
                "accept_encoding": request.headers.get("Accept-Encoding"),
                "user_agent": request.headers.get("User-Agent"),
                "host": request.headers.get("Host"),
            }
        )

    app = web.Application(middlewares=[count])
    app.router.add_get("/image", image)
    app.router.add_get("/html", html)
    app.router.add_get("/big", big)
    app.router.add_get("/big-chunked", big_chunked)
    app.router.add_get("/exact", exact)
    app.router.add_get("/slow", slow)
    app.router.add_get("/leisurely", leisurely)
    app.router.add_get("/slow-body", slow_body)
    app.router.add_get("/gzip", gz)
    app.router.add_get("/gzip-behind-identity", gz_behind_identity)
    for code in (401, 403, 404, 410, 429, 500, 503):
        app.router.add_get(f"/status/{code}", status(code))
    app.router.add_get("/redirect", redirect("/image"))
    app.router.add_get("/redirect-relative/x", redirect("../image", 307))
    app.router.add_get("/redirect-absolute", redirect("http://127.0.0.1:{port}/image", 308))
    app.router.add_get("/to-metadata", redirect("http://169.254.169.254/latest/meta-data/"))
    app.router.add_get("/to-metadata-decimal", redirect("http://2852039166/"))
    app.router.add_get("/to-ipv6-loopback", redirect("http://[::1]/"))
    app.router.add_get("/to-scheme-relative", redirect("//169.254.169.254/"))
    app.router.add_get("/to-file", redirect("file:///etc/passwd"))
    app.router.add_get("/to-gopher", redirect("gopher://127.0.0.1:6379/_FLUSHALL"))
    app.router.add_get("/to-other-port", redirect("http://127.0.0.1:6379/"))
    app.router.add_get("/to-private-name", redirect("http://internal.example.test:{port}/image"))

    async def redirect_to(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def trickle(request: web.Request) -> web.StreamResponse:
        # Never idle for long, never done: only a cap on the whole fetch stops it.
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            while not release.is_set():
                await response.write(b"t")
                await asyncio.sleep(0.05)
        except (ConnectionError, RuntimeError):
            pass
        return response

    app.router.add_get("/redirect-to", redirect_to)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/no-location", status(302))
    app.router.add_get("/loop", redirect("/loop"))
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/long-reason", long_reason)
    app.router.add_get("/set-cookie", set_cookie)
    app.router.add_get("/echo", echo)

    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    assert test_server.port is not None
    port_box.append(test_server.port)
    try:
        yield Server(test_server, hits)
    finally:
        release.set()
        await test_server.close()


#: The default policy but for ports: the test servers listen on free ports.
ANY_PORT = FetchPolicy(allowed_ports=None)


def local_policy(**overrides: object) -> FetchPolicy:
    values: dict[str, object] = {
        "allowed_networks": LOCAL,
        "allowed_ports": None,  # the test servers listen on free ports
        "max_bytes": CAP * 10,
        "total_timeout_s": 5.0,
    }
    values.update(overrides)
    return FetchPolicy(**values)  # type: ignore[arg-type]


async def fetch(url: str, policy: FetchPolicy, resolver: AbstractResolver | None = None) -> Fetched:
    async with make_session(policy, resolver=resolver or StubResolver()) as session:
        return await fetch_url(url, policy, session=session)


async def fetch_error(url: str, policy: FetchPolicy, resolver: AbstractResolver | None = None) -> FetchError:
    with pytest.raises(FetchError) as info:
        await fetch(url, policy, resolver)
    return info.value


# --------------------------------------------------------------------------- success paths


async def test_fetches_an_image(server: Server) -> None:
    result = await fetch(server.url("/image"), local_policy())
    assert result == Fetched(data=IMAGE, content_type="image/png", url=server.url("/image"))


async def test_non_image_content_type_is_reported_not_refused(server: Server) -> None:
    result = await fetch(server.url("/html"), local_policy())
    assert result.content_type == "text/html"
    assert result.data == b"<html></html>"


async def test_body_exactly_at_the_cap_is_accepted(server: Server) -> None:
    result = await fetch(server.url("/exact"), local_policy(max_bytes=CAP))
    assert len(result.data) == CAP


async def test_sends_safe_headers_and_keeps_no_cookies(server: Server) -> None:
    policy = local_policy()
    async with make_session(policy, resolver=StubResolver()) as session:
        await fetch_url(server.url("/set-cookie"), policy, session=session)
        echoed = await fetch_url(server.url("/echo"), policy, session=session)
    headers = json.loads(echoed.data)
    assert headers["cookie"] is None
    assert headers["accept_encoding"] == "identity"
    assert headers["user_agent"] == "imgpipe/0.1"


async def test_environment_proxy_is_ignored(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy would do its own DNS and connect wherever it likes; it must never be used.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    result = await fetch(server.url("/image"), local_policy())
    assert result.data == IMAGE


async def test_without_session_a_temporary_one_is_used(server: Server) -> None:
    result = await fetch_url(server.url("/image"), local_policy())
    assert result.data == IMAGE


# --------------------------------------------------------------------------- size limits


async def test_content_length_over_cap_is_refused_before_reading(server: Server) -> None:
    error = await fetch_error(server.url("/big"), local_policy(max_bytes=CAP))
    assert (error.code, error.transient) == ("url_too_large", False)
    assert "Content-Length" in error.message


async def test_streamed_body_over_cap_is_refused(server: Server) -> None:
    error = await fetch_error(server.url("/big-chunked"), local_policy(max_bytes=CAP))
    assert (error.code, error.transient) == ("url_too_large", False)
    assert "Content-Length" not in error.message


async def test_the_body_is_read_only_if_admit_has_room_for_it(server: Server) -> None:
    """Asked once, for the response that carries the body (not for the redirect before it), with its
    length; a body without one stops past the room it was given."""
    asked: list[int | None] = []

    def room(size: int | None) -> Callable[[int | None], int | None]:
        def admit(length: int | None) -> int | None:
            asked.append(length)
            return size

        return admit

    policy = local_policy()
    async with make_session(policy, resolver=StubResolver()) as session:
        with pytest.raises(BodyNotAdmitted) as refused:
            await fetch_url(server.url("/redirect"), policy, session=session, admit=room(len(IMAGE) - 1))
        assert refused.value.size == len(IMAGE)
        fetched = await fetch_url(server.url("/redirect"), policy, session=session, admit=room(len(IMAGE)))
        assert fetched.data == IMAGE
        with pytest.raises(BodyNotAdmitted) as refused:
            await fetch_url(server.url("/big-chunked"), policy, session=session, admit=room(2048))
        assert refused.value.size is None
        with pytest.raises(BodyNotAdmitted):
            await fetch_url(server.url("/big-chunked"), policy, session=session, admit=room(0))
        # Over the policy's own cap, it is too large whatever the room.
        error = await fetch_error(server.url("/big"), local_policy(max_bytes=CAP))
    assert error.code == "url_too_large"
    assert asked == [len(IMAGE), len(IMAGE), None, None]


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """`python -m http.server` on a directory, in a process of its own: (the directory, its URL)."""
    port = free_port()
    command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    server = subprocess.Popen([*command, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc=server)
        yield tmp_path, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


async def test_body_is_held_once(file_server: tuple[Path, str]) -> None:
    # The worker downloads one source while another renders: a body held twice at its end (bytes() of
    # the buffer it was read into) put one source more on its peak memory. The server is another
    # process, so what is traced is the client's memory alone.
    directory, base = file_server
    size = 8 * 1024 * 1024
    (directory / "source.jpg").write_bytes(bytes(range(256)) * (size // 256))
    url, policy = f"{base}/source.jpg", local_policy(max_bytes=size)
    await fetch_url(url, policy)  # imports and first-use allocations happen before the trace
    tracemalloc.start()
    try:
        result = await fetch_url(url, policy)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.data == bytes(range(256)) * (size // 256)
    assert peak < 1.25 * size, f"{peak / size:.2f} times the body"


@pytest.mark.parametrize("path", ["/gzip", "/gzip-behind-identity"])
async def test_compressed_body_is_refused(server: Server, path: str) -> None:
    error = await fetch_error(server.url(path), local_policy())
    assert (error.code, error.transient) == ("url_http_error", False)
    assert "gzip" in error.message


# --------------------------------------------------------------------------- timeouts and errors


async def test_slow_server_times_out(server: Server) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    error = await fetch_error(server.url("/slow"), local_policy(total_timeout_s=0.3))
    assert (error.code, error.transient) == ("url_timeout", True)
    assert loop.time() - started < 3


async def test_many_fetches_from_one_host_do_not_queue_into_a_connect_timeout(server: Server) -> None:
    """The session capped its connections at 8 a host, and aiohttp counts the wait for one in the
    connect timeout: a worker at concurrency 8 or more fetching from one CDN failed the ninth fetch
    with `url_timeout`, blaming a server that answered every request. How many fetches run at once
    is the worker's prefetch, not the pool's."""
    policy = local_policy(connect_timeout_s=0.5, total_timeout_s=10.0)
    async with make_session(policy, resolver=StubResolver()) as session:
        fetched = await asyncio.gather(
            *(fetch_url(server.url("/leisurely"), policy, session=session) for _ in range(20))
        )
    assert [f.data for f in fetched] == [IMAGE] * 20


async def test_total_time_is_capped_while_data_keeps_flowing(server: Server) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    error = await fetch_error(server.url("/trickle"), local_policy(total_timeout_s=0.5))
    assert (error.code, error.transient) == ("url_timeout", True)
    assert loop.time() - started < 3
    assert server.hits == ["/trickle"]


async def test_stalled_body_times_out(server: Server) -> None:
    error = await fetch_error(server.url("/slow-body"), local_policy(total_timeout_s=0.3))
    assert (error.code, error.transient) == ("url_timeout", True)


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (404, "url_not_found", False),
        (410, "url_not_found", False),
        (401, "url_http_error", False),
        (403, "url_http_error", False),
        (429, "url_http_error", True),
        (500, "url_http_error", True),
        (503, "url_http_error", True),
    ],
)
async def test_http_errors(server: Server, status: int, code: str, transient: bool) -> None:
    error = await fetch_error(server.url(f"/status/{status}"), local_policy())
    assert (error.code, error.transient) == (code, transient)
    assert str(status) in error.message


async def test_a_servers_reason_phrase_is_kept_short(server: Server) -> None:
    # The phrase is the server's (aiohttp reads up to 8 KiB of it), and goes into the job's record,
    # the worker's log and the dead letter's reason.
    error = await fetch_error(server.url("/long-reason"), local_policy())
    assert (error.code, error.message) == ("url_http_error", "HTTP 403 Go away " + "R" * 72)


def _self_signed(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


@pytest.mark.parametrize("tls", ["self-signed", "plain-http"])
async def test_tls_errors_are_told_without_openssls_text(tmp_path: Path, tls: str) -> None:
    # aiohttp's text quotes OpenSSL's, with our address and its C source file and line.
    async def image(request: web.Request) -> web.Response:
        return web.Response(body=IMAGE)

    app = web.Application()
    app.router.add_get("/image", image)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    context = _self_signed(tmp_path) if tls == "self-signed" else None
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        error = await fetch_error(f"https://127.0.0.1:{port}/image", local_policy())
    finally:
        await runner.cleanup()
    expected = {
        "self-signed": "TLS error: the server's certificate did not verify",
        "plain-http": "TLS error: the handshake failed",
    }[tls]
    assert (error.code, error.transient, error.message) == ("url_unreachable", False, expected)


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = await fetch_error(f"http://127.0.0.1:{port}/image", local_policy())
    assert (error.code, error.transient) == ("url_unreachable", True)


async def test_nonexistent_name_is_permanent() -> None:
    error = await fetch_error("http://nope.example.test/a.jpg", local_policy())
    assert (error.code, error.transient) == ("url_unreachable", False)


async def test_dns_temporary_failure_is_transient() -> None:
    resolver = StubResolver({"flaky.example.test": socket.gaierror(socket.EAI_AGAIN, "Try again")})
    error = await fetch_error("http://flaky.example.test/a.jpg", local_policy(), resolver)
    assert (error.code, error.transient) == ("url_unreachable", True)


async def test_invalid_url_is_rejected_before_any_io() -> None:
    error = await fetch_error("http://exa mple.com/", ANY_PORT)
    assert (error.code, error.transient) == ("url_invalid", False)


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("path", ["/redirect", "/redirect-relative/x", "/redirect-absolute", "/chain/5"])
async def test_follows_allowed_redirects(server: Server, path: str) -> None:
    result = await fetch(server.url(path), local_policy())
    assert result.data == IMAGE
    assert result.url == server.url("/image")


@pytest.mark.parametrize(
    "path",
    [
        "/to-metadata",
        "/to-metadata-decimal",
        "/to-ipv6-loopback",
        "/to-scheme-relative",
        "/to-file",
        "/to-gopher",
    ],
)
async def test_redirects_to_forbidden_targets_are_refused(server: Server, path: str) -> None:
    error = await fetch_error(server.url(path), local_policy())
    assert (error.code, error.transient) == ("url_forbidden", False)
    assert server.hits == [path]


async def test_a_redirect_to_a_port_not_allowed_is_refused_before_it_is_reached(server: Server) -> None:
    """The ports are checked on every hop, not only the URL the client gave."""
    policy = local_policy(allowed_ports=frozenset({server.port}))
    assert (await fetch(server.url("/redirect"), policy)).data == IMAGE
    error = await fetch_error(server.url("/to-other-port"), policy)
    assert (error.code, error.message) == ("url_forbidden", "port 6379 is not allowed")
    assert server.hits[-1] == "/to-other-port"


#: Every SSRF target, reached through a redirect from an allowed server.
REDIRECT_TARGETS = [
    "http://127.1/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://0.0.0.0/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://172.31.255.254/",
    "http://192.168.0.1/",
    "http://100.64.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://[fe80::]/",
    "http://localhost/",
    "http://metadata.google.internal/",
    "file:///etc/passwd",
    "ftp://example.com/a.jpg",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "data:image/png;base64,iVBORw0KGgo=",
]


@pytest.fixture
async def redirector() -> AsyncIterator[tuple[str, list[str]]]:
    """A server on 127.0.0.2 answering `/?to=X` with a redirect to X: (its base URL, its hits).

    Only 127.0.0.2/32 is exempted for it, so every spelling of 127.0.0.1 stays forbidden.
    """
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.query["to"])
        return web.Response(status=302, headers={"Location": request.query["to"]})

    app = web.Application()
    app.router.add_get("/", handler)
    test_server = TestServer(app, host="127.0.0.2")
    await test_server.start_server()
    try:
        yield f"http://127.0.0.2:{test_server.port}/", hits
    finally:
        await test_server.close()


@pytest.mark.parametrize("target", REDIRECT_TARGETS)
async def test_redirect_table_every_ssrf_target_is_refused(
    redirector: tuple[str, list[str]], target: str
) -> None:
    base, hits = redirector
    policy = replace(ANY_PORT, allowed_networks=(IPv4Network("127.0.0.2/32"),), total_timeout_s=5.0)
    error = await fetch_error(f"{base}?to={quote(target, safe='')}", policy)
    assert (error.code, error.transient) == ("url_forbidden", False), error.message
    assert hits == [target]  # the first hop was made; the redirect was not followed


async def test_redirect_to_name_resolving_to_private_address_is_refused(server: Server) -> None:
    resolver = StubResolver({"internal.example.test": ["10.0.0.7"]})
    error = await fetch_error(server.url("/to-private-name"), local_policy(), resolver)
    assert (error.code, error.transient) == ("url_forbidden", False)
    assert resolver.calls == ["internal.example.test."]  # absolute: no search list


async def test_redirect_loop_is_cut(server: Server) -> None:
    error = await fetch_error(server.url("/loop"), local_policy(max_redirects=3))
    assert (error.code, error.transient) == ("url_too_many_redirects", False)
    assert server.hits == ["/loop"] * 4


async def test_redirect_limit_is_exact(server: Server) -> None:
    assert (await fetch(server.url("/chain/2"), local_policy(max_redirects=2))).data == IMAGE
    error = await fetch_error(server.url("/chain/3"), local_policy(max_redirects=2))
    assert error.code == "url_too_many_redirects"
    error = await fetch_error(server.url("/redirect"), local_policy(max_redirects=0))
    assert error.code == "url_too_many_redirects"


async def test_redirect_without_location(server: Server) -> None:
    error = await fetch_error(server.url("/no-location"), local_policy())
    assert (error.code, error.transient) == ("url_http_error", False)


def test_redirect_resolution_and_downgrade() -> None:
    policy = ANY_PORT
    assert _resolve_redirect("https://example.com/a/b", "c.jpg", policy) == "https://example.com/a/c.jpg"
    assert _resolve_redirect("https://example.com/a/b", "/c.jpg", policy) == "https://example.com/c.jpg"
    assert _resolve_redirect("https://example.com/a", "//cdn.example.com/x", policy) == (
        "https://cdn.example.com/x"
    )
    assert _resolve_redirect("http://example.com/a", "https://example.com/b", policy) == (
        "https://example.com/b"
    )
    for location in ("http://example.com/b", "http://cdn.example.com/b"):
        with pytest.raises(FetchError) as info:
            _resolve_redirect("https://example.com/a", location, policy)
        assert info.value.code == "url_forbidden"
    with pytest.raises(FetchError) as info:
        _resolve_redirect(
            "https://images.example.com/a",
            "https://other.example.org/b",
            FetchPolicy(allowed_hosts=("images.example.com",), allowed_ports=None),
        )
    assert info.value.code == "url_forbidden"


@pytest.mark.parametrize("location", ["http://-1.8/", "/a\udcff"])  # aiohttp decodes bad bytes so
def test_a_redirect_to_an_unusable_location_is_url_invalid(location: str) -> None:
    """A hostile redirect fails the job as `url_invalid`, not as an internal error it retries."""
    with pytest.raises(FetchError) as info:
        _resolve_redirect("http://example.com/", location, ANY_PORT)
    assert (info.value.code, info.value.transient) == ("url_invalid", False)


# --------------------------------------------------------------------------- the address policy is real


async def test_default_policy_refuses_the_live_local_server(server: Server) -> None:
    # Same server the tests above fetch from: only allowed_networks made that possible.
    for url in (server.url("/image"), server.url("/image", host="127.1"), server.url("/image", host="[::1]")):
        error = await fetch_error(url, ANY_PORT)
        assert (error.code, error.transient) == ("url_forbidden", False)
    assert server.hits == []


async def test_public_name_resolving_to_loopback_is_refused(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = StubResolver({"images.example.test": ["127.0.0.1"]})
    error = await fetch_error(server.url("/image", host="images.example.test"), ANY_PORT, resolver)
    assert (error.code, error.transient) == ("url_forbidden", False)
    # What a name resolves to inside our network is for our log, not for the client's job record.
    assert error.message == "images.example.test resolves to an address that is not public"
    assert [r.__dict__.get("address") for r in caplog.records if r.name == "imgpipe.worker"] == ["127.0.0.1"]
    assert server.hits == []


async def test_public_name_resolving_to_loopback_works_when_allowed(server: Server) -> None:
    # Also shows the connector connects to what the resolver returned (there is no
    # real DNS here), i.e. the checked answer is the one used: no rebinding window.
    resolver = StubResolver({"images.example.test": ["127.0.0.1"]})
    url = server.url("/image", host="images.example.test")
    result = await fetch(url, local_policy(), resolver)
    assert result.data == IMAGE
    assert result.url == url
    assert resolver.calls == ["images.example.test."]  # absolute: no search list


async def test_any_forbidden_address_refuses_the_whole_host(server: Server) -> None:
    resolver = StubResolver({"mixed.example.test": ["93.184.216.34", "10.0.0.1"]})
    error = await fetch_error("http://mixed.example.test/a.jpg", ANY_PORT, resolver)
    assert (error.code, error.transient) == ("url_forbidden", False)


@pytest.mark.parametrize(
    "answer",
    [
        ["127.0.0.1"],
        ["10.1.2.3"],
        ["169.254.169.254"],
        ["::1"],
        ["::ffff:127.0.0.1"],
        ["fd00:ec2::254"],
        ["0.0.0.0"],
    ],
)
async def test_safe_resolver_refuses_forbidden_answers(answer: list[str]) -> None:
    resolver = SafeResolver((), inner=StubResolver({"x.example.test": answer}))
    with pytest.raises(Exception, match="not public") as info:
        await resolver.resolve("x.example.test", 80, socket.AF_UNSPEC)
    assert info.value.message == "x.example.test resolves to an address that is not public"  # type: ignore[attr-defined]


async def test_safe_resolver_passes_public_answers() -> None:
    resolver = SafeResolver((), inner=StubResolver({"x.example.test": ["93.184.216.34", "2606:2800::1"]}))
    results = await resolver.resolve("x.example.test", 443, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:2800::1"]
    assert resolver._inner.calls == ["x.example.test."]  # type: ignore[attr-defined]  # absolute
    await resolver.close()


async def test_url_lookups_do_not_wait_for_the_loop_s_default_executor() -> None:
    """aiohttp's default resolver runs `getaddrinfo` on the loop's default executor, which the
    worker's S3 lookups and boto3 calls share: a few lookups of URL sources left hanging by their
    name servers (a lookup cannot be cancelled) took every thread, and every job's S3 traffic
    waited. With that executor fully taken, a URL source's lookup is still answered."""
    loop = asyncio.get_running_loop()
    release = threading.Event()
    taken = [loop.run_in_executor(None, release.wait) for _ in range(40)]  # more than it has threads
    resolver = SafeResolver(())  # its default inner resolver
    assert isinstance(resolver._inner, LookupThreads)  # what `make_session` gets by default
    try:
        async with asyncio.timeout(10):
            found = await resolver._inner.resolve("localhost", 80, socket.AF_UNSPEC)
        assert {r["host"] for r in found} & {"127.0.0.1", "::1"}, found
        assert all(r["port"] == 80 for r in found)
    finally:
        release.set()
        await asyncio.gather(*taken)
        await resolver.close()


async def test_allow_listed_names_are_looked_up_as_written() -> None:
    # The operator vouches for them: as written, a name is found in /etc/hosts (a pod's
    # `hostAliases`) and completed from the search list (`minio` in Kubernetes); every other name is
    # looked up as an absolute name, which neither applies to.
    inner = StubResolver({"minio": ["93.184.216.34"], "x.example.test": ["93.184.216.34"]})
    resolver = SafeResolver((), inner=inner, allowed_hosts=("minio", "*.example.test"))
    for host in ("minio", "x.example.test"):
        await resolver.resolve(host, 80, socket.AF_UNSPEC)
    await SafeResolver((), inner=inner).resolve("x.example.test", 80, socket.AF_UNSPEC)
    assert inner.calls == ["minio", "x.example.test", "x.example.test."]


async def test_peer_address_is_checked_even_if_the_resolver_is_bypassed(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth: simulate a resolver bug; each socket is still vetted before it
    # connects, so the server never even sees a connection.
    async def unchecked(self: SafeResolver, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:
        return await self._inner.resolve(host, port, socket.AddressFamily(family))

    monkeypatch.setattr(SafeResolver, "resolve", unchecked)
    resolver = StubResolver({"images.example.test": ["127.0.0.1"]})
    error = await fetch_error(server.url("/image", host="images.example.test"), ANY_PORT, resolver)
    assert (error.code, error.transient) == ("url_forbidden", False)
    assert error.message == "refusing to connect to an address that is not public"
    assert server.hits == []


async def test_allowed_host_is_fetched_and_a_redirect_off_the_list_refused(server: Server) -> None:
    resolver = StubResolver({"images.example.com": ["127.0.0.1"]})
    policy = local_policy(allowed_hosts=("images.example.com",))
    result = await fetch(server.url("/image", host="images.example.com"), policy, resolver)
    assert result.data == IMAGE
    target = quote(server.url("/image"), safe="")  # the same server, under a name not on the list
    error = await fetch_error(
        server.url(f"/redirect-to?to={target}", host="images.example.com"), policy, resolver
    )
    assert (error.code, error.transient) == ("url_forbidden", False)
    assert server.hits == ["/image", "/redirect-to"]


async def test_allowed_hosts_policy_applies(server: Server) -> None:
    policy = local_policy(allowed_hosts=("images.example.com",))
    error = await fetch_error(server.url("/image"), policy)
    assert (error.code, error.transient) == ("url_forbidden", False)
    assert server.hits == []


async def test_only_safe_sessions_are_accepted() -> None:
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(ValueError, match="make_session"):
            await fetch_url("https://example.com/a.jpg", ANY_PORT, session=plain)
    async with make_session(ANY_PORT) as session:
        with pytest.raises(ValueError, match="allowed_networks"):
            await fetch_url("https://example.com/a.jpg", local_policy(), session=session)
