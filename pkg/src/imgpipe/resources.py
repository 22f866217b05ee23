"""Connections tied to an aiohttp application's life (`cleanup_ctx`), each with a readiness check.

A service lists the resources it needs; each opens on start-up, registers a `/readyz` check and
closes on shutdown, in reverse order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from imgpipe import broker
from imgpipe.settings import AmqpSettings, RedisSettings, S3Settings
from imgpipe.storage import Storage
from imgpipe.store import JobStore
from imgpipe.web import READINESS

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]

STORE = web.AppKey("store", JobStore)
STORAGE = web.AppKey("storage", Storage)
AMQP = web.AppKey("amqp", AbstractRobustConnection)
PUBLISHER = web.AppKey("publisher", broker.Publisher)


def redis_client(settings: RedisSettings) -> aioredis.Redis:
    # A bounded pool that makes a burst wait for a free connection instead of failing, and short
    # timeouts: a Redis that is down must turn into a quick 503, never a hanging request.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url.get_secret_value(),
        max_connections=settings.redis_max_connections,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=15,
        retry_on_timeout=False,
    )
    return aioredis.Redis.from_pool(pool)  # from_pool: closing the client closes the pool


def job_store(settings: RedisSettings, namespace: str) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = redis_client(settings)
        store = JobStore(client, namespace, retention=timedelta(days=settings.job_retention_days))
        app[STORE] = store
        app[READINESS]["redis"] = client.ping
        yield
        await client.aclose()

    return ctx


def object_storage(settings: S3Settings, *, pool: int = 16, create_bucket: bool = False) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        storage = Storage(settings, pool=pool)
        if create_bucket:
            await storage.ensure_bucket()
        app[STORAGE] = storage
        app[READINESS]["s3"] = storage.ping
        yield

    return ctx


def amqp(settings: AmqpSettings, namespace: str) -> CleanupCtx:
    """A robust connection and a confirming publisher on it."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        connection = await broker.connect(settings.amqp_url.get_secret_value())
        topology = broker.Topology(namespace, settings.retry_delays_s)
        publisher = broker.Publisher(connection, topology)
        app[AMQP] = connection
        app[PUBLISHER] = publisher

        async def ready() -> None:
            if connection.is_closed or not connection.connected.is_set():
                raise ConnectionError("not connected to RabbitMQ")

        app[READINESS]["rabbitmq"] = ready
        yield
        await publisher.close()
        await connection.close()

    return ctx
