"""Reconciler fixtures: a fresh namespace and a fresh bucket per test, so the shared suite's keys and
objects are never counted or deleted, and in-process pieces (store, storage, publisher) on them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import aio_pika
import aio_pika.abc
import pytest
import redis.asyncio as aioredis
from imgpipe import broker
from imgpipe.models import JobMessage
from imgpipe.storage import Storage
from imgpipe.store import JobStore
from imgpipe_reconciler.reconcile import NAMESPACE_MARKER

from tests.isolated import fresh_namespace
from tests.stack import AMQP_URL, drop_namespace, s3_client, s3_settings


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    return s3_client(s3_endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"rc-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def rc_namespace() -> Iterator[str]:
    ns = fresh_namespace()
    yield ns
    drop_namespace(ns)


@pytest.fixture
def rc_env(base_env: dict[str, str], rc_namespace: str, bucket: str) -> dict[str, str]:
    """The services' environment on this test's namespace and bucket."""
    return {**base_env, "IMGPIPE_NAMESPACE": rc_namespace, "IMGPIPE_S3_BUCKET": bucket}


@pytest.fixture
def store(redis_client: aioredis.Redis, rc_namespace: str) -> JobStore:
    return JobStore(redis_client, rc_namespace, retention=timedelta(hours=2))


@pytest.fixture
async def storage(rc_env: dict[str, str]) -> AsyncIterator[Storage]:
    storage = Storage(s3_settings(rc_env["IMGPIPE_S3_ENDPOINT_URL"], rc_env["IMGPIPE_S3_BUCKET"]))
    try:
        yield storage
    finally:
        await storage.close()


@pytest.fixture
async def publisher(rc_namespace: str) -> AsyncIterator[broker.Publisher]:
    connection = await broker.connect(AMQP_URL)
    publisher = broker.Publisher(connection, broker.Topology(rc_namespace, (1, 2)))
    try:
        yield publisher
    finally:
        await publisher.close()
        await connection.close()


class Taker:
    """A consumer of a namespace's jobs queue that takes messages and holds them, unacknowledged,
    until it goes (then the broker puts them back): a worker, as far as the queue can tell."""

    def __init__(self, namespace: str, prefetch: int) -> None:
        self._namespace, self._prefetch = namespace, prefetch
        self.taken: list[JobMessage] = []
        self._took = asyncio.Event()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Taker:
        self._connection = await aio_pika.connect(AMQP_URL)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        topology = broker.Topology(self._namespace, (1, 2))
        await topology.declare(channel)
        queue = await channel.get_queue(topology.jobs_queue, ensure=False)

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.taken.append(JobMessage.model_validate_json(message.body))
            self._took.set()

        await queue.consume(take)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._connection is not None
        await self._connection.close()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.taken) < count:
                self._took.clear()
                await self._took.wait()


@pytest.fixture
async def taker(rc_namespace: str) -> AsyncIterator[Taker]:
    """A worker taking (and holding) the jobs of this test's namespace: stuck jobs are judged only
    while one consumes the jobs queue and nothing waits in it."""
    async with Taker(rc_namespace, prefetch=100) as taking:
        yield taking


def keys(s3: Any, bucket: str, *, marker: bool = False) -> set[str]:
    """The bucket's keys; without the namespace marker a real run writes, unless `marker`."""
    found: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update(item["Key"] for item in page.get("Contents", ()))
    return found if marker else found - {NAMESPACE_MARKER}
