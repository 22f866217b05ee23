"""Helpers for tests that need services of their own, next to the session `stack`.

`isolated_stack` starts services in a fresh namespace (so no session worker ever sees its jobs)
and removes that namespace's queues and keys afterwards. `start_unready` starts a service that
is not expected to become ready (a dependency is down). `sse` reads a Server-Sent Events stream
line by line, keeping `id:` and comments; `metric` reads one sample from Prometheus text.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pyvips
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
    """One event (`event`, `data`, `id`) or one comment line (`comment`)."""

    event: str | None = None
    data: dict[str, Any] | None = None
    id: int | None = None
    comment: str | None = None


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[SseItem]:
    """The items of an SSE response, as they arrive."""
    event: str | None = None
    ident: int | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            yield SseItem(comment=line[1:].strip())
        elif line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("id: "):
            ident = int(line[len("id: ") :])
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line == "":
            if event is not None:
                yield SseItem(event=event, data=json.loads("\n".join(data)), id=ident)
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
