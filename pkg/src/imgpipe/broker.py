"""RabbitMQ topology and publishing, declared here once and used by the api and the worker.

    {ns}.jobs  (direct) --job--> {ns}.jobs            quorum queue the workers consume
    {ns}.retry (direct) --<d>--> {ns}.jobs.retry.<d>s  waits d seconds (TTL), then dead-letters
                                                        back to {ns}.jobs: back-off without a plugin
    {ns}.dead  (fanout) -------> {ns}.jobs.dead        what keeps failing, for people to look at

    {ns}.reconcile (direct) --reconcile--> {ns}.reconcile   reconciliation commands; quorum, single
                                                        active consumer: one run at a time however
                                                        many reconcilers run

`{ns}.jobs` also dead-letters to `{ns}.dead` when a message is rejected without requeue or is
redelivered more than `DELIVERY_LIMIT` times (a message that kills its consumer every time).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from imgpipe.models import JobMessage, ReconcileCommand

log = logging.getLogger(__name__)

JOB_ROUTING_KEY = "job"
RECONCILE_ROUTING_KEY = "reconcile"
#: Header counting deliveries across retries (RabbitMQ's own count resets on re-publish).
ATTEMPT_HEADER = "x-imgpipe-attempt"
REQUEST_ID_HEADER = "x-request-id"
REASON_HEADER = "x-imgpipe-reason"
#: Redeliveries (consumer crashed or nacked) after which the broker dead-letters on its own.
DELIVERY_LIMIT = 10


@dataclass(frozen=True)
class Topology:
    """The names and arguments of every exchange and queue of one namespace."""

    namespace: str
    retry_delays_s: tuple[int, ...] = (1, 5, 30, 120)

    @property
    def jobs_exchange(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def jobs_queue(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def retry_exchange(self) -> str:
        return f"{self.namespace}.retry"

    @property
    def dead_exchange(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.jobs.dead"

    @property
    def reconcile_exchange(self) -> str:
        return f"{self.namespace}.reconcile"

    @property
    def reconcile_queue(self) -> str:
        return f"{self.namespace}.reconcile"

    def exchange_names(self) -> list[str]:
        return [self.jobs_exchange, self.retry_exchange, self.dead_exchange, self.reconcile_exchange]

    def retry_queue(self, delay_s: int) -> str:
        return f"{self.namespace}.jobs.retry.{delay_s}s"

    def retry_delay(self, attempt: int) -> int:
        """Back-off before delivery number `attempt + 1`; the last configured delay repeats."""
        return self.retry_delays_s[min(max(attempt, 1), len(self.retry_delays_s)) - 1]

    def queue_names(self) -> list[str]:
        return [
            self.jobs_queue,
            self.dead_queue,
            *(self.retry_queue(d) for d in self.retry_delays_s),
            self.reconcile_queue,
        ]

    async def declare(self, channel: AbstractChannel) -> AbstractExchange:
        """Declare everything (idempotent); returns the jobs exchange."""
        jobs = await channel.declare_exchange(self.jobs_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        retry = await channel.declare_exchange(
            self.retry_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dead = await channel.declare_exchange(self.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        queue = await channel.declare_queue(
            self.jobs_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": self.dead_exchange,
                "x-delivery-limit": DELIVERY_LIMIT,
            },
        )
        await queue.bind(jobs, JOB_ROUTING_KEY)
        dead_queue = await channel.declare_queue(
            self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead, "")
        for delay in self.retry_delays_s:
            waiting = await channel.declare_queue(
                self.retry_queue(delay),
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": delay * 1000,
                    "x-dead-letter-exchange": self.jobs_exchange,
                    "x-dead-letter-routing-key": JOB_ROUTING_KEY,
                },
            )
            await waiting.bind(retry, str(delay))
        reconcile = await channel.declare_exchange(
            self.reconcile_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        commands = await channel.declare_queue(
            self.reconcile_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # Every reconciler replica consumes, but the broker delivers to one at a time.
                "x-single-active-consumer": True,
                "x-dead-letter-exchange": self.dead_exchange,
                "x-delivery-limit": DELIVERY_LIMIT,
            },
        )
        await commands.bind(reconcile, RECONCILE_ROUTING_KEY)
        return jobs


async def connect(url: str, *, timeout_s: float = 10.0, wait_s: float = 30.0) -> AbstractRobustConnection:
    """A connection that reconnects by itself and re-declares what was declared on it.

    The first connection is retried for up to `wait_s`, so a service started together with its
    broker (compose, a rolling restart) waits for it instead of crashing.
    """
    deadline = asyncio.get_running_loop().time() + wait_s
    delay = 0.5
    while True:
        try:
            return await aio_pika.connect_robust(
                url, timeout=timeout_s, client_properties={"product": "imgpipe"}
            )
        except (TimeoutError, ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("RabbitMQ not reachable (%s); retrying in %.1fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class Publisher:
    """Publishes with publisher confirms: `publish_*` returns only once the broker has the message."""

    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self._connection = connection
        self.topology = topology
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> AbstractChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                # on_return_raises: an unroutable message (queue deleted) is an error, not a silent drop.
                channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                await self.topology.declare(channel)
                self._channel = channel
            return self._channel

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict,
        *,
        message_id: str,
        timeout_s: float,
    ) -> None:
        channel = await self._open()
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=headers,
        )
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(message, routing_key=routing_key, mandatory=True, timeout=timeout_s)

    async def publish_job(self, job: JobMessage, *, attempt: int = 1, timeout_s: float = 5.0) -> None:
        headers = {ATTEMPT_HEADER: attempt}
        if job.request_id:
            headers[REQUEST_ID_HEADER] = job.request_id
        await self._publish(
            self.topology.jobs_exchange,
            JOB_ROUTING_KEY,
            job.model_dump_json().encode(),
            headers,
            message_id=job.id,
            timeout_s=timeout_s,
        )

    async def publish_reconcile(self, command: ReconcileCommand, *, timeout_s: float = 5.0) -> None:
        """Queue a reconciliation for whichever reconciler is the active consumer."""
        await self._publish(
            self.topology.reconcile_exchange,
            RECONCILE_ROUTING_KEY,
            command.model_dump_json().encode(),
            {},
            message_id=command.run_id,
            timeout_s=timeout_s,
        )

    async def publish_retry(
        self, body: bytes, headers: dict, *, message_id: str, attempt: int, timeout_s: float = 5.0
    ) -> int:
        """Park a message in the retry queue for its back-off; returns the delay chosen."""
        delay = self.topology.retry_delay(attempt)
        await self._publish(
            self.topology.retry_exchange,
            str(delay),
            body,
            {**headers, ATTEMPT_HEADER: attempt + 1},
            message_id=message_id,
            timeout_s=timeout_s,
        )
        return delay

    async def publish_dead(
        self, body: bytes, headers: dict, *, message_id: str, reason: str, timeout_s: float = 5.0
    ) -> None:
        await self._publish(
            self.topology.dead_exchange,
            "",
            body,
            {**headers, REASON_HEADER: reason[:512]},
            message_id=message_id,
            timeout_s=timeout_s,
        )

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
