"""The worker process: the job consumer, plus an HTTP port for health and metrics only."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from imgpipe import resources
from imgpipe.settings import (
    AmqpSettings,
    LimitSettings,
    RedisSettings,
    S3Settings,
    UrlSourceSettings,
    load,
)
from imgpipe.telemetry import start_logging
from imgpipe.web import READINESS, base_app

from imgpipe_worker import imaging
from imgpipe_worker.consumer import Consumer, ConsumerConfig
from imgpipe_worker.fetch import FetchPolicy
from imgpipe_worker.settings import WorkerSettings

CONSUMER = web.AppKey("consumer", Consumer)


def consumer_config(
    worker: WorkerSettings, limits: LimitSettings, urls: UrlSourceSettings, amqp: AmqpSettings
):
    return ConsumerConfig(
        concurrency=worker.worker_concurrency,
        job_timeout_s=worker.job_timeout_s,
        max_attempts=amqp.max_attempts,
        limits=imaging.Limits(
            max_bytes=limits.max_upload_bytes,
            max_pixels=limits.max_pixels,
            max_frames=limits.max_frames,
            timeout_s=worker.render_timeout_s,
            max_decode_bytes=worker.max_decode_bytes,
        ),
        fetch=FetchPolicy(
            max_bytes=min(urls.url_max_bytes, limits.max_upload_bytes),
            connect_timeout_s=urls.url_connect_timeout_s,
            total_timeout_s=urls.url_total_timeout_s,
            allowed_hosts=urls.hosts(),
            allowed_networks=urls.networks(),
            allowed_ports=urls.ports(),
        ),
        shutdown_grace_s=worker.shutdown_grace_s,
        render_nice=worker.render_nice,
    )


def _consumer_ctx(config: ConsumerConfig):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        consumer = Consumer(
            app[resources.AMQP],
            app[resources.PUBLISHER],
            app[resources.STORE],
            app[resources.STORAGE],
            config,
        )
        app[CONSUMER] = consumer
        # Subscribes in the background: the worker starts while RabbitMQ is down and consumes once
        # it is up; `/readyz` says whether it is consuming right now.
        await consumer.start()
        app[READINESS]["consumer"] = consumer.ready
        yield
        # Runs before the connections below close (cleanup is in reverse): jobs in flight finish.
        await consumer.stop()

    return ctx


async def create_app() -> web.Application:
    """The worker application; every setting comes from the environment."""
    common = start_logging("worker")
    worker = load(WorkerSettings)
    amqp = load(AmqpSettings)
    imaging.configure_libvips(concurrency=worker.vips_concurrency)
    config = consumer_config(worker, load(LimitSettings), load(UrlSourceSettings), amqp)
    app = base_app("worker", environment=common.env)
    app.cleanup_ctx.extend(
        [
            resources.job_store(load(RedisSettings), common.namespace),
            resources.object_storage(load(S3Settings), pool=max(10, 4 * worker.worker_concurrency)),
            resources.amqp(amqp, common.namespace, consume=True),
            _consumer_ctx(config),
        ]
    )
    return app
