"""The reconciler service: the schedule, the command consumer, and a port for health and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from imgpipe import resources
from imgpipe.runs import RunStore
from imgpipe.settings import AmqpSettings, RedisSettings, S3Settings, load
from imgpipe.telemetry import start_logging
from imgpipe.web import base_app

from imgpipe_reconciler.consumer import CommandConsumer
from imgpipe_reconciler.lock import RunLock
from imgpipe_reconciler.reconcile import Policy, Reconciler
from imgpipe_reconciler.schedule import Ticker
from imgpipe_reconciler.settings import ReconcileSettings

CONSUMER = web.AppKey("consumer", CommandConsumer)
TICKER = web.AppKey("ticker", Ticker)


def policy(settings: ReconcileSettings) -> Policy:
    return Policy(
        grace_s=settings.reconcile_grace_seconds,
        stuck_pending_s=settings.stuck_pending_s,
        stuck_processing_s=settings.stuck_processing_s,
    )


def _reconciler_ctx(settings: ReconcileSettings, namespace: str):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = app[resources.STORE]
        publisher = app[resources.PUBLISHER]
        reconciler = Reconciler(store, app[resources.STORAGE], publisher, policy(settings))
        consumer = CommandConsumer(
            app[resources.AMQP],
            publisher.topology,
            reconciler,
            RunLock(store.redis, namespace, settings.reconcile_lock_ttl_s),
            RunStore(store.redis, namespace),
        )
        ticker = Ticker(
            store.redis, namespace, publisher, settings.trigger(), dry_run=settings.reconcile_dry_run
        )
        app[CONSUMER] = consumer
        app[TICKER] = ticker
        # Subscribes in the background: the reconciler starts while RabbitMQ is down and consumes
        # once it is up (the `rabbitmq` check of `/readyz` fails until then).
        await consumer.start()
        ticker.start()
        yield
        await ticker.stop()
        await consumer.stop()

    return ctx


async def create_app() -> web.Application:
    """The reconciler application; every setting comes from the environment."""
    common = start_logging("reconciler")
    settings = load(ReconcileSettings)
    app = base_app("reconciler", environment=common.env)
    app.cleanup_ctx.extend(
        [
            resources.job_store(load(RedisSettings), common.namespace),
            resources.object_storage(load(S3Settings)),
            resources.amqp(load(AmqpSettings), common.namespace, consume=True),
            _reconciler_ctx(settings, common.namespace),
        ]
    )
    return app
