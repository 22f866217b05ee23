"""Connections tied to an aiohttp application's life (`cleanup_ctx`), each with a readiness check.

A service lists the resources it needs; each opens on start-up, registers a `/readyz` check and
closes on shutdown, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from imgpipe import broker
from imgpipe.settings import AmqpSettings, RedisSettings, S3Settings
from imgpipe.storage import Storage
from imgpipe.store import JobStore
from imgpipe.web import READINESS

log = logging.getLogger("imgpipe.resources")

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
        # One immediate retry, on a fresh connection, when a connection turns out to be dead: after
        # a Redis restart the pool still holds sockets to the old process, and a reset one is not
        # always noticed when it is taken from the pool. While Redis is down the retry is refused
        # at once too, so a 503 stays quick; timeouts are not retried.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
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


def object_storage(
    settings: S3Settings, *, pool: int = 16, create_bucket: bool = False, probe: bool = True
) -> CleanupCtx:
    """The bucket. `probe=False` for a service that only signs URLs (no S3 call): S3 being out of
    reach does not keep it from its work, so it is not one of its readiness checks."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        storage = Storage(settings, pool=pool)
        if create_bucket:
            await storage.ensure_bucket()
        app[STORAGE] = storage
        if probe:
            app[READINESS]["s3"] = storage.ping
        yield
        await storage.close()

    return ctx


def amqp(settings: AmqpSettings, namespace: str, *, consume: bool = False) -> CleanupCtx:
    """A robust connection (`AMQP`) and a confirming publisher (`PUBLISHER`).

    With `consume`, the publisher has a connection of its own and `AMQP` is for consuming only.
    During a resource alarm (memory, disk) RabbitMQ stops reading from every connection that
    publishes, acknowledgements included: a worker whose retry publish was held there could not
    acknowledge the jobs it finished meanwhile, and its prefetch stayed full until the alarm ended.
    A connection that only consumes is never blocked.

    The service starts whether or not RabbitMQ is up: the connections are made in the background
    and retried until they succeed, and `/readyz` fails its `rabbitmq` check until then (and during
    any later outage). Meanwhile every publish raises `broker.BrokerUnavailable` at once.
    """

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        url = settings.amqp_url.get_secret_value()
        connection = broker.robust_connection(url)
        consuming = broker.robust_connection(url) if consume else connection
        connections = [connection, consuming] if consume else [connection]
        connecting = [
            asyncio.create_task(broker.keep_connecting(c), name="amqp-connect") for c in connections
        ]
        topology = broker.Topology(namespace, settings.retry_delays_s)
        publisher = broker.Publisher(connection, topology)
        app[AMQP] = consuming
        app[PUBLISHER] = publisher

        async def ready() -> None:
            if not (broker.is_up(connection) and broker.is_up(consuming)):
                raise ConnectionError("not connected to RabbitMQ")

        app[READINESS]["rabbitmq"] = ready
        yield
        for task in connecting:
            task.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)
        try:
            await publisher.close()
        finally:
            # Closed whatever the publisher's close raised: a robust connection left open goes on
            # reconnecting, and its reconnection swallows the cancellation aiohttp's last step sends
            # every task left, which then waits for it for ever (a worker seen not to exit).
            closing = await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
            for failed in (r for r in closing if isinstance(r, Exception)):
                log.warning("could not close a RabbitMQ connection: %s", type(failed).__name__)

    return ctx
