"""Shared test fixtures: the real RabbitMQ and Redis on localhost, and a moto S3 server on a free port.

Every test session works in its own namespace (`IMGPIPE_NAMESPACE`), so its queues and keys never
meet another run's, and removes them at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.stack import (
    BUCKET,
    REDIS_URL,
    TESTDATA,
    Client,
    Stack,
    drop_namespace,
    s3_client,
    service_env,
    start_moto,
)


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
    proc, url = start_moto()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def base_env(namespace: str, s3_endpoint: str) -> dict[str, str]:
    """The environment every service of this session runs with."""
    env = service_env(
        namespace,
        s3_endpoint,
        IMGPIPE_RETRY_DELAYS_S="[1, 2]",
        IMGPIPE_MAX_ATTEMPTS="3",
        IMGPIPE_LOG_LEVEL="INFO",
        # Limits stay on (the code path runs everywhere) but far above what the suite does per user;
        # tests/api/test_limits.py starts its own apis with tiny ones.
        IMGPIPE_RATE_JOBS_PER_MINUTE="100000",
        IMGPIPE_RATE_UPLOADS_PER_HOUR="1000000",
        IMGPIPE_MAX_ACTIVE_JOBS="100000",
    )
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
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
    drop_namespace(namespace)


@pytest.fixture(scope="session")
def stack(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logdir = tmp_path_factory.mktemp("logs")
    # The e2e URL-source tests fetch from a server on 127.0.0.1; everything else private stays blocked.
    env = {**base_env, "IMGPIPE_URL_ALLOWED_NETWORKS": "127.0.0.0/8", "IMGPIPE_WORKER_CONCURRENCY": "2"}
    stack = Stack(env)
    try:
        for name in ("api", "status", "worker"):
            stack.services[name] = stack.start(name, logdir)
        yield stack
    finally:
        for service in stack.services.values():
            stack.stop(service)


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS keys in this process and none anywhere in botocore's default chain (request it after
    `env`, which sets moto's keys)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    """A client on the test Redis database, closed after the test."""
    client = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def alice(http: aiohttp.ClientSession, stack: Stack) -> Client:
    return Client(http, stack, "alice")


@pytest.fixture
def bob(http: aiohttp.ClientSession, stack: Stack) -> Client:
    return Client(http, stack, "bob")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray IMGPIPE_* or AWS_* in the developer's shell must not change what settings tests see."""
    for name in list(os.environ):
        if name.startswith(("IMGPIPE_", "AWS_")):
            monkeypatch.delenv(name)
