"""RabbitMQ topology and publishing, declared here once and used by the api and the worker.

    {ns}.jobs  (direct) --job--> {ns}.jobs            quorum queue the workers consume
    {ns}.retry (direct) --wait.<d>--> {ns}.jobs.wait.<d>s  waits d seconds (TTL), then dead-letters
                                                        back to {ns}.jobs, at least once: back-off
                                                        without a plugin
    {ns}.dead  (fanout) -------> {ns}.jobs.dead        what keeps failing, for people to look at

    {ns}.reconcile (direct) --reconcile--> {ns}.reconcile   reconciliation commands; quorum, single
                                                        active consumer: one run at a time however
                                                        many reconcilers run

`{ns}.jobs` also dead-letters to `{ns}.dead` when a message is rejected without requeue or is
redelivered more than `DELIVERY_LIMIT` times (a message that kills its consumer every time).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika
import pamqp.decode
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ConsumerTag,
)
from aio_pika.connection import make_url

from imgpipe.models import JobMessage, ReconcileCommand
from imgpipe.settings import retry_delay

log = logging.getLogger(__name__)


def _timestamp_or_none(value: bytes) -> tuple[int, datetime.datetime | None]:
    """pamqp's timestamp decoder, but a value `datetime` cannot hold decodes to None.

    AMQP's timestamp is any 64-bit number; a producer that writes microseconds gives one past the
    year 9999, and pamqp's ValueError then failed the whole frame: aiormq closed the connection
    with every delivery of the message, the worker's consumer reconnected until the broker's
    delivery limit dead-lettered it, and in the dead queue it stopped every listing and replay (the
    api's publishing connection closed with each try). We read no message's timestamp.
    """
    try:
        return _pamqp_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:  # cut short: the frame itself is broken
            raise
        return 8, None


# Installed where pamqp looks it up: the properties of a message (`by_type`) and header tables.
_pamqp_timestamp = pamqp.decode.timestamp
pamqp.decode.METHODS["timestamp"] = pamqp.decode.TABLE_MAPPING[b"T"] = _timestamp_or_none

JOB_ROUTING_KEY = "job"
RECONCILE_ROUTING_KEY = "reconcile"
#: Header counting deliveries across retries (RabbitMQ's own count resets on re-publish).
ATTEMPT_HEADER = "x-imgpipe-attempt"
REQUEST_ID_HEADER = "x-request-id"
REASON_HEADER = "x-imgpipe-reason"
#: Redeliveries (consumer crashed or nacked) after which the broker dead-letters on its own.
DELIVERY_LIMIT = 10
#: A publish's deadline (opening a channel, declaring, the broker's confirm), unless given another.
PUBLISH_TIMEOUT_S = 5.0
#: How long the outcome of a send whose caller stopped waiting is kept for its next try (see
#: `Publisher._publish`): longer than a retry loop sleeps between two tries.
ABANDONED_SEND_KEPT_S = 60.0


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
        # Not `.jobs.retry.<d>s`, the name of these queues before their dead-lettering was at least
        # once: a queue that exists with other arguments refuses the declaration (PRECONDITION_FAILED),
        # which would have stopped every upgraded service at its first declare. Those drain on their
        # own and are left to the operator (README, "Failures").
        return f"{self.namespace}.jobs.wait.{delay_s}s"

    def retry_key(self, delay_s: int) -> str:
        """The routing key of `retry_queue(delay_s)` on the retry exchange (the old queues keep the
        bare number, so a retry reaches one queue, not both)."""
        return f"wait.{delay_s}"

    def retry_delay(self, attempt: int) -> int:
        """Back-off before delivery number `attempt + 1`; the last configured delay repeats."""
        return retry_delay(self.retry_delays_s, attempt)

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
                    # A quorum queue dead-letters at most once by default: a message whose TTL ran
                    # out while the jobs queue could not take it (a leader election, a node restart
                    # in a cluster) was dropped, and its job waited for the reconciler. At least
                    # once, the queue keeps it and tries again (every 3 minutes, RabbitMQ's
                    # default); RabbitMQ allows that only with reject-publish overflow, which with
                    # no length limit here never refuses anything.
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
            await waiting.bind(retry, self.retry_key(delay))
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


#: Pause between reconnection attempts (aio-pika's default is 5 s): after a broker restart the
#: services are back within about this long.
RECONNECT_INTERVAL_S = 1.0


class BrokerUnavailable(ConnectionError):
    """RabbitMQ cannot take a message now: not connected, or the connection went away mid-publish."""


def robust_connection(
    url: str, *, reconnect_interval_s: float = RECONNECT_INTERVAL_S
) -> AbstractRobustConnection:
    """A robust connection that is not connected yet; `keep_connecting` connects it.

    Once connected it reconnects by itself and re-declares, on every channel, what was declared on
    it (exchanges, queues, bindings, consumers, prefetch).
    """
    return aio_pika.RobustConnection(
        make_url(url),
        client_properties={"product": "imgpipe"},
        reconnect_interval=reconnect_interval_s,
        # Keep trying the first connection too, instead of raising: a service started before its
        # broker serves /healthz and waits for it, as it does after any later connection loss.
        fail_fast=False,
    )


def is_up(connection: AbstractConnection) -> bool:
    """Whether a connection is connected right now (not closed; a robust one, not reconnecting)."""
    return not connection.is_closed and connection.connected.is_set()


async def keep_connecting(connection: AbstractRobustConnection, *, timeout_s: float = 10.0) -> None:
    """Connect `connection`, retrying for as long as it takes; returns once it is connected.

    Run it as a task and cancel it (then close the connection) to give up.
    """
    if not connection.connected.is_set():
        log.info("connecting to RabbitMQ", extra={"broker": str(connection)})
    await connection.connect(timeout=timeout_s)
    log.info("connected to RabbitMQ", extra={"broker": str(connection)})


async def connect(url: str, *, timeout_s: float = 10.0, wait_s: float = 30.0) -> AbstractRobustConnection:
    """A connected robust connection, for one-shot commands that need the broker now.

    The first connection is retried for up to `wait_s` (the broker may be starting too); after
    that it raises. Long-running services use `robust_connection` + `keep_connecting` instead.
    """
    deadline = asyncio.get_running_loop().time() + wait_s
    delay = 0.5
    while True:
        try:
            return await aio_pika.connect_robust(
                url,
                timeout=timeout_s,
                client_properties={"product": "imgpipe"},
                reconnect_interval=RECONNECT_INTERVAL_S,
            )
        except (TimeoutError, ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("RabbitMQ not reachable (%s); retrying in %.1fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def persistent_message(body: bytes, headers: dict, *, message_id: str) -> aio_pika.Message:
    """A JSON message the broker keeps on disk (every message of ours: jobs must survive restarts)."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        headers=headers,
    )


@dataclass(frozen=True)
class Subscription:
    """A consumer on a robust channel: the channel restores it after every reconnect."""

    channel: AbstractChannel
    queue: AbstractQueue
    tag: ConsumerTag

    @property
    def active(self) -> bool:
        """Subscribed on a channel that is open right now (it is not during a reconnect)."""
        return not self.channel.is_closed

    async def cancel(self) -> None:
        """Stop the deliveries, now and after any reconnect.

        Also while the broker is gone (its unacknowledged deliveries then come back by themselves):
        the robust queue forgets the consumer before it asks the broker, so the channel does not
        restore it when it reconnects, during a shutdown's grace period for instance.
        """
        was_active = self.active
        try:
            async with asyncio.timeout(5):
                await self.queue.cancel(self.tag)
        except Exception as exc:
            if was_active:
                log.warning("could not cancel consumer: %s", type(exc).__name__)


async def subscribe(
    connection: AbstractRobustConnection,
    topology: Topology,
    queue_name: str,
    on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
    *,
    prefetch: int,
) -> Subscription:
    """Consume `queue_name` as soon as the broker is reachable, retrying until subscribed.

    The consumer is put on the queue object that `declare` registered on the robust channel (a
    passive declare of a known name returns it): the channel restores that consumer after a
    reconnect, while one on a `get_queue` stand-in would silently stop for good.
    """
    delay = 0.5
    while True:
        await connection.ready()
        channel: AbstractChannel | None = None
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            await topology.declare(channel)
            queue = await channel.declare_queue(queue_name, passive=True)
            tag = await queue.consume(on_message)
        except Exception as exc:  # lost the connection half-way: wait for it and start over
            log.warning("could not subscribe, retrying in %ss: %s", delay, type(exc).__name__)
            if channel is not None:
                await close_quietly(channel)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        return Subscription(channel, queue, tag)


async def close_quietly(channel: AbstractChannel) -> None:
    """Close a channel within 5 s, whatever state it and its connection are in.

    Closed by the broker or half-opened, a robust channel is still closed here: only a channel
    closed by its owner is not reopened by aio-pika after a reconnect, on its own and unused.
    """
    try:
        async with asyncio.timeout(5):
            await channel.close()
    except Exception as exc:  # the connection is gone with it
        log.warning("could not close channel: %s", type(exc).__name__)


async def queue_counts(channel: AbstractChannel, name: str) -> tuple[int, int]:
    """The messages ready in queue `name` and its consumers, as the broker counts them now.

    A passive `Queue.Declare` of the queue object's own: a robust channel's
    `declare_queue(passive=True)` answers with the queue it declared before, without asking, so
    its counts are those of that moment.
    """
    queue = await channel.get_queue(name, ensure=False)
    declared = await queue.declare()
    return declared.message_count or 0, declared.consumer_count or 0


@dataclass(frozen=True)
class Waiting:
    """What waits for the workers at one moment (`Publisher.waiting`)."""

    #: Messages in the jobs queue not yet delivered to a worker.
    ready: int
    #: Messages in the retry queues, waiting out their back-off.
    retrying: int
    #: Consumers of the jobs queue: the workers taking jobs.
    consumers: int


@dataclass
class _Send:
    """One message on its way to the broker (`Publisher._publish`)."""

    task: asyncio.Future[None]
    #: A caller stopped waiting for it (its deadline passed) while the connection was up.
    abandoned: bool = False

    def confirmed(self) -> bool:
        task = self.task
        if not task.done() or task.cancelled():
            return False
        # Retrieved here, once: a send nobody waits for any more must not log it as never retrieved.
        return task.exception() is None


class Publisher:
    """Publishes with publisher confirms: `publish_*` returns only once the broker has the message.

    While the connection is down every `publish_*` raises `BrokerUnavailable` at once rather than
    waiting for a reconnect: a caller holding an HTTP request answers 503 now, and one that can
    wait retries by itself. The channel is re-opened (and the topology re-declared) after a
    reconnect, by the robust connection or, if the channel was lost some other way, here.
    """

    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self._connection = connection
        self.topology = topology
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}  # of `_channel`, by name
        self._lock = asyncio.Lock()
        self._sending: dict[tuple[str, str, str, bytes, str], _Send] = {}  # by what is sent (`_publish`)

    @property
    def connected(self) -> bool:
        """Whether the connection to RabbitMQ is up right now."""
        return is_up(self._connection)

    async def open(self) -> None:
        """Open the channel and declare the topology now, instead of at the first publish."""
        await self._exchange(self.topology.jobs_exchange)

    async def _exchange(self, name: str) -> AbstractExchange:
        """The exchange `name` on the open channel, opening (and declaring) a new channel if needed."""
        channel = self._channel
        if channel is None or channel.is_closed:
            # Only here, not on every publish, is the lock taken: the channel is open nearly always.
            async with self._lock:
                if self._channel is None or self._channel.is_closed:
                    if self._channel is not None:  # lost to a channel error: aio-pika is not to reopen it
                        await close_quietly(self._channel)
                    self._channel, self._exchanges = await self._open_channel(), {}
                channel = self._channel
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = self._exchanges[name] = await channel.get_exchange(name, ensure=False)
        return exchange

    async def _open_channel(self) -> AbstractChannel:
        """A new confirming channel, with the topology declared on it.

        Cut short (the publish's deadline, on a broker slow to answer), the half-made channel is
        closed: left behind, a robust channel is reopened and re-declared after every loss of it and
        every reconnect, one more for each publish that timed out here, up to the connection's limit.
        """
        # on_return_raises: an unroutable message (queue deleted) is an error, not a silent drop.
        opened = self._connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            await opened
            await self.topology.declare(opened)
        except BaseException:
            await asyncio.shield(close_quietly(opened))
            raise
        return opened

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict,
        *,
        message_id: str,
        timeout_s: float,
        keep_sending: bool = False,
    ) -> None:
        """Send one message and wait at most `timeout_s` for the broker's confirm.

        A send cut short by the deadline is cancelled, unless `keep_sending`: then it outlives its
        caller, and the same message published again meanwhile waits for that send instead of
        making another copy. For callers that try again until the broker has the message (the
        worker settling a retry or a dead letter): a broker in a resource alarm stops reading the
        connection, and the confirms with it, while the connection stays up, and every try put
        one more copy in the socket, each of which reached the queue when the alarm ended and ran
        as the job's next attempt. A kept send ends when the broker confirms, refuses, or the
        connection is lost (a try after that makes a new one); confirmed, it is remembered for
        `ABANDONED_SEND_KEPT_S` if a caller gave up on it.
        """
        # A robust channel waits for the reconnect before it sends anything; nobody should wait on
        # an outage of unknown length inside a publish, so say no now.
        if not self.connected:
            raise BrokerUnavailable("not connected to RabbitMQ")
        send = self._kept_send(exchange, routing_key, body, headers, message_id) if keep_sending else None
        try:
            # One deadline for opening the channel, declaring and the confirm.
            async with asyncio.timeout(timeout_s):
                if send is None:
                    message = persistent_message(body, headers, message_id=message_id)
                    await self._send(exchange, routing_key, message)
                else:
                    await asyncio.shield(send.task)
        except aio_pika.exceptions.DeliveryError:
            raise  # the broker answered (returned or nacked): not an outage
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if send is not None and send.task.cancelled() and task is not None and not task.cancelling():
                raise BrokerUnavailable("the publisher was closed") from None  # `close`, not our caller
            raise
        except (TimeoutError, ConnectionError, RuntimeError, aio_pika.exceptions.AMQPError) as exc:
            if send is not None and send.confirmed():
                return  # confirmed in the very pass its deadline fell in: the message is in
            # The connection dropped while we waited (pending confirms are failed with it), or the
            # channel broke: the next publish opens a fresh one (`_exchange`).
            if not self.connected:
                raise BrokerUnavailable("the connection to RabbitMQ was lost") from exc
            if send is not None:
                send.abandoned = True
            raise

    def _kept_send(
        self, exchange: str, routing_key: str, body: bytes, headers: dict, message_id: str
    ) -> _Send:
        """The send of this very message under way (or kept, confirmed), else a new one."""
        # The same message: its headers may hold lists and tables (a dead letter's), so by their repr.
        key = (exchange, routing_key, message_id, body, repr(sorted(headers.items())))
        send = self._sending.get(key)
        if send is None or (send.task.done() and not send.confirmed()):
            message = persistent_message(body, headers, message_id=message_id)
            task = asyncio.create_task(self._send(exchange, routing_key, message), name="amqp-publish")
            send = self._sending[key] = _Send(task)
            task.add_done_callback(lambda _: self._settled(key, send))
        return send

    async def _send(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        """Open the channel if needed (declaring the topology), publish, and wait for the confirm."""
        target = await self._exchange(exchange)
        await target.publish(message, routing_key=routing_key, mandatory=True)

    def _settled(self, key: tuple, send: _Send) -> None:
        confirmed = send.confirmed()
        if self._sending.get(key) is not send:
            return
        if confirmed and send.abandoned:
            # Its caller gave up on it, and may be about to try again: the next try is told the
            # message is in, not given a second copy.
            asyncio.get_running_loop().call_later(ABANDONED_SEND_KEPT_S, self._forget, key, send)
        else:
            del self._sending[key]

    def _forget(self, key: tuple, send: _Send) -> None:
        if self._sending.get(key) is send:
            del self._sending[key]

    async def publish_job(
        self, job: JobMessage, *, attempt: int = 1, timeout_s: float = PUBLISH_TIMEOUT_S
    ) -> None:
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

    async def publish_reconcile(
        self, command: ReconcileCommand, *, timeout_s: float = PUBLISH_TIMEOUT_S
    ) -> None:
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
        self,
        body: bytes,
        headers: dict,
        *,
        message_id: str,
        attempt: int,
        timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> int:
        """Park a message in the retry queue for its back-off; returns the delay chosen."""
        delay = self.topology.retry_delay(attempt)
        await self._publish(
            self.topology.retry_exchange,
            self.topology.retry_key(delay),
            body,
            {**headers, ATTEMPT_HEADER: attempt + 1},
            message_id=message_id,
            timeout_s=timeout_s,
            keep_sending=True,  # the worker tries again until it is in: one copy, not one a try
        )
        return delay

    async def publish_dead(
        self,
        body: bytes,
        headers: dict,
        *,
        message_id: str,
        reason: str,
        timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        await self._publish(
            self.topology.dead_exchange,
            "",
            body,
            {**headers, REASON_HEADER: reason[:512]},
            message_id=message_id,
            timeout_s=timeout_s,
            keep_sending=True,
        )

    async def waiting(self, *, timeout_s: float = PUBLISH_TIMEOUT_S) -> Waiting:
        """How many job messages wait in the jobs queue and in the retry queues, and how many
        workers consume. On a channel of its own, which declares the topology first (idempotent, as
        every component does: a fresh namespace has empty queues, not missing ones), then counts.
        The retry queues are counted before the jobs queue: a retry that moves from one to the other
        meanwhile is counted at least once."""
        if not self.connected:
            raise BrokerUnavailable("not connected to RabbitMQ")
        topology = self.topology
        async with asyncio.timeout(timeout_s):
            channel = self._connection.channel(publisher_confirms=False)
            try:
                await channel
                await topology.declare(channel)
                retrying = 0
                for delay in sorted(set(topology.retry_delays_s)):
                    retrying += (await queue_counts(channel, topology.retry_queue(delay)))[0]
                ready, consumers = await queue_counts(channel, topology.jobs_queue)
            finally:
                await asyncio.shield(close_quietly(channel))
        return Waiting(ready=ready, retrying=retrying, consumers=consumers)

    async def close(self) -> None:
        sends = [send.task for send in self._sending.values() if not send.task.done()]
        self._sending.clear()
        for task in sends:
            task.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        channel, self._channel = self._channel, None
        if channel is not None:
            await close_quietly(channel)
