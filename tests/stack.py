"""The services started as processes (the installed `imgpipe-*` commands), and a client for them.

The client does only what a real client does: HTTP to the api and status services, and the
presigned form POST straight to the S3 endpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from imgpipe.auth import TokenVerifier
from imgpipe.settings import AuthSettings, S3Settings

REPO = Path(__file__).resolve().parent.parent
TESTDATA = Path(os.environ.get("IMGPIPE_TESTDATA", REPO.parent / "shared" / "testdata"))
AMQP_URL = os.environ.get("IMGPIPE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("IMGPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
JWT_SECRET = "test-secret-" + "x" * 32
BUCKET = "imgpipe-test"


# Ports `free_port` has handed out in this process. The port it returns is free only until someone
# binds it: two callers close together (services started from a thread pool) could be given the same
# one by the kernel, and the second service's health check was then answered by the first.
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A local TCP port nothing listens on, never one this process has handed out before."""
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def wait_http(
    url: str, *, timeout: float = 30.0, status: int = 200, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == status:
                    return
                last = response.status
        except urllib.error.HTTPError as exc:
            last = exc.code
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


def start_moto(stdout: Any = subprocess.DEVNULL, *, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on `port` (by default a free one; real HTTP for real boto3): the process and
    its URL. Its buckets live in its memory: a new one on an old port starts empty.

    The caller stops the process. Used by the tests, the benchmarks and `ops/lint/dashboards.sh`.
    """
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.s3server", str(port)],
        stdout=stdout,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/", proc=proc)  # ListBuckets
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def s3_client(endpoint: str) -> Any:
    """A boto3 client on the test S3 at `endpoint` (moto takes any credentials)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def service_env(namespace: str, s3_url: str, *, bucket: str = BUCKET, **overrides: str) -> dict[str, str]:
    """The environment of services in `namespace` on the local RabbitMQ and Redis and `s3_url`."""
    return {
        "IMGPIPE_ENV": "test",
        "IMGPIPE_NAMESPACE": namespace,
        "IMGPIPE_AMQP_URL": AMQP_URL,
        "IMGPIPE_REDIS_URL": REDIS_URL,
        "IMGPIPE_S3_ENDPOINT_URL": s3_url,
        "IMGPIPE_S3_BUCKET": bucket,
        "IMGPIPE_S3_FORCE_PATH_STYLE": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "IMGPIPE_JWT_SECRET": JWT_SECRET,
        # The tests' image servers listen on free ports; the default policy (80 and 443) is tested
        # on its own.
        "IMGPIPE_URL_ALLOWED_PORTS": "*",
        **overrides,
    }


def s3_settings(endpoint: str, bucket: str, **extra: Any) -> S3Settings:
    """Settings for `imgpipe.storage.Storage` on the test S3 at `endpoint` (path style, moto's keys)."""
    return S3Settings(
        s3_endpoint_url=endpoint,
        s3_bucket=bucket,
        s3_force_path_style=True,
        aws_region="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        **extra,
    )


#: Retry delays of every topology our runs declare: the tests' (1, 2) and the defaults (1, 5, 30, 120).
_RETRY_DELAYS_S = (1, 2, 5, 30, 120)


def drop_namespace(namespace: str) -> None:
    """Remove a namespace's queues, exchanges and Redis keys from the shared broker and Redis."""
    import aio_pika
    import redis
    from imgpipe.broker import Topology

    topology = Topology(namespace, retry_delays_s=_RETRY_DELAYS_S)

    async def drop_broker() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            # A fresh channel each: a failed delete closes the channel it was sent on.
            for name in topology.queue_names():
                channel = await connection.channel()
                try:
                    await channel.queue_delete(name)
                except Exception:
                    pass
            for name in topology.exchange_names():
                channel = await connection.channel()
                try:
                    await channel.exchange_delete(name)
                except Exception:
                    pass

    asyncio.run(drop_broker())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{namespace}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


async def delete_keys(client: Any, pattern: str) -> None:
    """Delete every key of the async Redis `client` that matches `pattern` (a test's own keys)."""
    keys = [key async for key in client.scan_iter(pattern, count=1000)]
    if keys:
        await client.delete(*keys)


BIN = REPO / ".venv" / "bin"


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def spawn(name: str, env: dict[str, str], logdir: Path, *, wait_for: str, timeout: float) -> Service:
    """Start `imgpipe-<name>` on a free port with `env`, and wait until `wait_for` answers 200.

    A service that does not answer in time is killed (nobody else holds its process to stop it).
    """
    port = free_port()
    log = logdir / f"{name}-{port}.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(BIN / f"imgpipe-{name}"), "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    service = Service(name, f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_http(f"{service.url}{wait_for}", timeout=timeout, proc=proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{name} did not answer {wait_for}:\n{service.tail()}") from None
    return service


@dataclass
class Stack:
    env: dict[str, str]
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.services["api"].url

    @property
    def status(self) -> str:
        return self.services["status"].url

    def start(self, name: str, logdir: Path, extra_env: dict[str, str] | None = None) -> Service:
        return spawn(name, {**self.env, **(extra_env or {})}, logdir, wait_for="/readyz", timeout=60)

    def stop(self, service: Service, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if service.proc.poll() is None:
            service.proc.send_signal(sig)
            try:
                service.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()
        return service.proc.returncode


def presigned_form(fields: Mapping[str, str], data: bytes, content_type: str) -> aiohttp.FormData:
    """The body of a presigned POST upload: every field of the grant, then the file (S3 wants it last)."""
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", data, filename="upload", content_type=content_type)
    return form


@asynccontextmanager
async def local_http(app: web.Application, *, handler_cancellation: bool = False) -> AsyncIterator[str]:
    """Serve `app` on a free port of 127.0.0.1 for the block; yields its base URL.

    `handler_cancellation` as the services are served (`imgpipe.web.serve`): a handler whose client
    goes away is cancelled.
    """
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=0.1, handler_cancellation=handler_cancellation
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def token(sub: str, scopes: str = "", ttl_s: int = 600) -> str:
    return TokenVerifier(AuthSettings(env="test", jwt_secret=JWT_SECRET)).issue(
        sub, scopes=scopes, ttl_s=ttl_s
    )


class Client:
    """A user of imgpipe, holding a token."""

    def __init__(self, http: aiohttp.ClientSession, stack: Stack, sub: str) -> None:
        self.http = http
        self.stack = stack
        self.sub = sub
        self.headers = {"Authorization": f"Bearer {token(sub)}"}

    async def upload(self, data: bytes, content_type: str = "image/jpeg") -> str:
        async with self.http.post(
            f"{self.stack.api}/uploads",
            json={"content_type": content_type, "size": len(data)},
            headers=self.headers,
        ) as response:
            assert response.status == 201, await response.text()
            grant = await response.json()
        form = presigned_form(grant["fields"], data, content_type)
        async with self.http.post(grant["url"], data=form) as response:
            assert response.status in (200, 201, 204), await response.text()
        return grant["key"]

    async def submit(self, source: dict[str, Any], variants: list | None = None, **headers: str) -> dict:
        body: dict[str, Any] = {"source": source}
        if variants is not None:
            body["variants"] = variants
        async with self.http.post(
            f"{self.stack.api}/jobs", json=body, headers={**self.headers, **headers}
        ) as response:
            assert response.status == 202, await response.text()
            return await response.json()

    async def get(self, job_id: str) -> tuple[int, dict]:
        async with self.http.get(f"{self.stack.status}/jobs/{job_id}", headers=self.headers) as response:
            return response.status, await response.json()

    async def events(self, job_id: str, *, query_token: bool = False) -> list[tuple[str, dict]]:
        """Every SSE event of the job until the stream ends."""
        url = f"{self.stack.status}/jobs/{job_id}/events"
        kwargs: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=90)}
        if query_token:
            kwargs["params"] = {"access_token": self.headers["Authorization"].split()[1]}
        else:
            kwargs["headers"] = self.headers
        events: list[tuple[str, dict]] = []
        async with self.http.get(url, **kwargs) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            event, data = None, []
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
                    data.append(line[len("data: ") :])
                elif line == "" and event is not None:
                    events.append((event, json.loads("\n".join(data))))
                    event, data = None, []
        return events

    async def wait(self, job_id: str, within: float = 60) -> dict:
        """Poll until the job is terminal."""
        async with asyncio.timeout(within):
            while True:
                status, body = await self.get(job_id)
                assert status == 200, body
                if body["status"] in ("succeeded", "failed"):
                    return body
                await asyncio.sleep(0.1)

    async def download(self, url: str) -> bytes:
        async with self.http.get(url) as response:
            assert response.status == 200, await response.text()
            return await response.read()
