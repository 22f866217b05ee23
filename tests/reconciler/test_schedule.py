"""The ticker in-process, against the real Redis and RabbitMQ."""

from __future__ import annotations

import asyncio

import aio_pika
import redis.asyncio as aioredis
from imgpipe import broker
from imgpipe.models import ReconcileCommand
from imgpipe_reconciler.schedule import Ticker, parse_cron

from tests.isolated import queue_depth
from tests.stack import AMQP_URL


class _HeldPublisher(broker.Publisher):
    """The real publisher, holding each reconcile command until `release` is set."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection, topology: broker.Topology) -> None:
        super().__init__(connection, topology)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def publish_reconcile(self, command: ReconcileCommand) -> None:
        self.entered.set()
        await self.release.wait()
        await super().publish_reconcile(command)


async def test_a_stop_lets_a_claimed_tick_be_queued(redis_client: aioredis.Redis, rc_namespace: str) -> None:
    """The replica stopping had claimed a tick and was waiting for the confirm; the shutdown then
    cancelled the tick, so the claim stayed with no command queued and no replica ran that tick."""
    connection = await broker.connect(AMQP_URL)
    publisher = _HeldPublisher(connection, broker.Topology(rc_namespace, (1, 2)))
    ticker = Ticker(redis_client, rc_namespace, publisher, parse_cron("* * * * * *"), dry_run=True)
    try:
        await publisher.open()
        before = asyncio.all_tasks()
        ticker.start()
        await asyncio.wait_for(publisher.entered.wait(), timeout=10)
        asyncio.get_running_loop().call_later(0.3, publisher.release.set)
        await ticker.stop()
        # What the process's exit does to a tick still running.
        left = [t for t in asyncio.all_tasks() - before if not t.done()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

        claims = [key.decode() async for key in redis_client.scan_iter(f"{rc_namespace}:reconcile:tick:*")]
        assert len(claims) == 1
        assert await queue_depth(publisher.topology.reconcile_queue) == 1
        channel = await connection.channel()
        queue = await channel.get_queue(publisher.topology.reconcile_queue)
        async with queue.iterator(no_ack=True) as messages:
            queued = ReconcileCommand.model_validate_json((await anext(messages)).body)
        assert queued.run_id == f"scheduled-{claims[0].rsplit(':', 1)[1]}"
    finally:
        await ticker.stop()
        await publisher.close()
        await connection.close()
