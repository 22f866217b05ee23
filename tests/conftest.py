"""Shared test fixtures: the real RabbitMQ and Redis on localhost, and a moto S3 server on a free port.

Every test session works in its own namespace (`IMGPIPE_NAMESPACE`), so its queues and keys never
meet another run's, and removes them at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

REPO = Path(__file__).resolve().parent.parent
TESTDATA = Path(os.environ.get("IMGPIPE_TESTDATA", REPO.parent / "shared" / "testdata"))
AMQP_URL = os.environ.get("IMGPIPE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("IMGPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
JWT_SECRET = "test-secret-" + "x" * 32
BUCKET = "imgpipe-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, *, timeout: float = 30.0, status: int = 200, proc: subprocess.Popen | None = None) -> None:
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


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.fail(f"test images not found at {TESTDATA}; set IMGPIPE_TESTDATA")
    return TESTDATA


@pytest.fixture(scope="session")
def namespace() -> str:
    return f"imgpipe-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free port: real HTTP, real boto3, no AWS."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/", proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def base_env(namespace: str, s3_endpoint: str) -> dict[str, str]:
    """The environment every service of this session runs with."""
    env = {
        "IMGPIPE_ENV": "test",
        "IMGPIPE_NAMESPACE": namespace,
        "IMGPIPE_AMQP_URL": AMQP_URL,
        "IMGPIPE_REDIS_URL": REDIS_URL,
        "IMGPIPE_S3_ENDPOINT_URL": s3_endpoint,
        "IMGPIPE_S3_BUCKET": BUCKET,
        "IMGPIPE_S3_FORCE_PATH_STYLE": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "IMGPIPE_JWT_SECRET": JWT_SECRET,
        "IMGPIPE_RETRY_DELAYS_S": "[1, 2]",
        "IMGPIPE_MAX_ATTEMPTS": "3",
        "IMGPIPE_LOG_LEVEL": "INFO",
    }
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    return env


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`base_env` applied to this process, for tests that build apps and clients in-process."""
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    return base_env


@pytest.fixture(scope="session", autouse=True)
def _clean_namespace(namespace: str) -> Iterator[None]:
    yield
    _drop_namespace(namespace)


def _drop_namespace(namespace: str) -> None:
    """Remove this session's queues, exchanges and keys from the shared broker and Redis."""
    import asyncio

    import aio_pika
    import redis

    from imgpipe.broker import Topology

    async def drop_broker() -> None:
        topology = Topology(namespace)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            for name in [*topology.queue_names(), *(topology.retry_queue(d) for d in (1, 2))]:
                channel = await connection.channel()
                try:
                    await channel.queue_delete(name)
                except Exception:
                    pass
            for name in (topology.jobs_exchange, topology.retry_exchange, topology.dead_exchange):
                channel = await connection.channel()
                try:
                    await channel.exchange_delete(name)
                except Exception:
                    pass

    asyncio.run(drop_broker())
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
