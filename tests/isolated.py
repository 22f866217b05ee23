"""Helpers for tests that need services of their own, next to the session `stack`.

`isolated_stack` starts services in a fresh namespace (so no session worker ever sees its jobs)
and removes that namespace's queues and keys afterwards. `start_unready` starts a service that
is not expected to become ready (a dependency is down). `sse` reads a Server-Sent Events stream
line by line, keeping `id:` and comments; `metric` reads one sample from Prometheus text.
`BrokerProxy` stands between one process and RabbitMQ, to cut or stall its connections;
`raw_request` sends bytes an HTTP client library would refuse to.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pyvips
import yarl
from aiormq.exceptions import ChannelNotFoundEntity
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import AMQP_URL, Service, Stack, drop_namespace, spawn


def fresh_namespace() -> str:
    return f"imgpipe-test-{uuid.uuid4().hex[:10]}"


@contextmanager
def isolated_stack(
    base_env: dict[str, str], logdir: Path, services: dict[str, tuple[str, dict[str, str]]]
) -> Iterator[Stack]:
    """A stack in its own namespace: `services` maps a key to (service name, extra env).

    The services start in parallel; the namespace is dropped when the block ends.
    """
    stack = Stack({**base_env, "IMGPIPE_NAMESPACE": fresh_namespace()})
    try:
        with ThreadPoolExecutor(len(services)) as pool:
            started = {
                key: pool.submit(stack.start, name, logdir, extra) for key, (name, extra) in services.items()
            }
            failures = []
            for key, future in started.items():
                try:
                    stack.services[key] = future.result()
                except Exception as exc:  # keep going: the others started must be stopped below
                    failures.append(exc)
            if failures:
                raise failures[0]
        yield stack
    finally:
        for service in stack.services.values():
            stack.stop(service)
        drop_namespace(stack.env["IMGPIPE_NAMESPACE"])


@asynccontextmanager
async def temporary_worker(stack: Stack, logdir: Path) -> AsyncIterator[Service]:
    """A worker on `stack` for the block only: a module's shared stack is left as the next test expects."""
    service = await asyncio.to_thread(stack.start, "worker", logdir)
    stack.services["worker"] = service
    try:
        yield service
    finally:
        await asyncio.to_thread(stack.stop, service)
        del stack.services["worker"]


def start_unready(name: str, env: dict[str, str], logdir: Path) -> Service:
    """Start a service and wait only for `/healthz` (its `/readyz` is expected to say 503)."""
    return spawn(name, env, logdir, wait_for="/healthz", timeout=30)


async def queue_depth(queue: str) -> int:
    """Messages ready in `queue` (passive declare); 0 when the queue does not exist yet."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return 0
        return declared.declaration_result.message_count or 0


@dataclass
class SseItem:
    """One event (`event`, `data`, `id`) or one comment line (`comment`). `id` is the version the
    event's `id:` starts with; `last_event_id` the whole of it, as a client sends it back."""

    event: str | None = None
    data: dict[str, Any] | None = None
    id: int | None = None
    comment: str | None = None
    last_event_id: str | None = None


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[SseItem]:
    """The items of an SSE response, as they arrive."""
    event: str | None = None
    ident: str | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            yield SseItem(comment=line[1:].strip())
        elif line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("id: "):
            ident = line[len("id: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line == "":
            if event is not None:
                version = int(ident.partition(".")[0]) if ident is not None else None
                yield SseItem(event=event, data=json.loads("\n".join(data)), id=version, last_event_id=ident)
            event, ident, data = None, None, []


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def image(width: int = 64, height: int = 48, fmt: str = ".jpg") -> bytes:
    return pyvips.Image.xyz(width, height).extract_band(0).cast("uchar").write_to_buffer(fmt)


def without_urls(view: dict[str, Any]) -> dict[str, Any]:
    """A job view without the presigned variant URLs (their signatures carry the signing time)."""
    return {**view, "variants": [{**v, "url": None} for v in view["variants"]]}


class BrokerProxy:
    """A TCP relay to RabbitMQ (or to `target`, another local port) that a test can cut or stall: the
    server's outage as one process sees it, with the server itself, and what it holds, untouched."""

    def __init__(self, target: int = 5672) -> None:
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._lose_reply_to: bytes | None = None
        self._losing = False
        self._target = target
        self.port = 0

    async def start(self, port: int = 0) -> None:
        """Listen on `port` (by default a free one; after `cut`, the same one again: the outage ends)."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {client_writer, broker_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
            try:
                while data := await reader.read(65536):
                    await self._flowing.wait()  # stalled: held here, and dropped with the connection
                    if writer.is_closing():
                        break
                    if not replies and self._lose_reply_to is not None and self._lose_reply_to in data:
                        self._lose_reply_to, self._losing = None, True
                    elif replies and self._losing:
                        self._losing = False
                        client_writer.transport.abort()  # a reset, the answer never sent
                        break
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        await asyncio.gather(
            pipe(client_reader, broker_writer, replies=False),
            pipe(broker_reader, client_writer, replies=True),
        )

    def lose_reply_to(self, request: bytes) -> None:
        """Drop the answer to the next request that holds `request`, and its connection: the request
        was carried out, and its client cannot know (a connection that breaks between the two)."""
        self._lose_reply_to = request

    def stall(self) -> None:
        """Hold everything the relayed connections send, as a broker that stopped answering."""
        self._flowing.clear()

    def resume(self) -> None:
        """Relay again what a stall held, and what follows: the broker reads again, all of it."""
        self._flowing.set()

    def reset(self) -> None:
        """Drop every relayed connection (what a stall held goes with it) and relay new ones again."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        self._flowing.set()

    async def cut(self) -> None:
        """Stop listening and drop every relayed connection."""
        assert self._server is not None
        self._server.close()
        self.reset()
        await self._server.wait_closed()


async def raw_request(base: str, head: list[bytes], body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a request written byte for byte: `head` is the request line and headers."""
    url = yarl.URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        lines = [*head, b"Host: localhost", b"Content-Length: %d" % len(body), b"Connection: close"]
        writer.write(b"\r\n".join([*lines, b"", b""]) + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split(b" ", 2)[1]), json.loads(payload)
