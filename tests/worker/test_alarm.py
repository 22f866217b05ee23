"""A worker under a RabbitMQ resource alarm, against the real broker (its memory watermark lowered for
a few seconds, then set back to what it was)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import aiohttp
import pytest
from aiohttp import web

from tests.stack import local_http
from tests.worker.test_consumer import OwnStack, eventually, jpeg, own_stack

pytestmark = pytest.mark.e2e


def _ctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()


def _alarmed() -> bool:
    return "memory" in _ctl("eval", "rabbit_alarm:get_alarms().")


@contextmanager
def memory_alarm() -> Iterator[None]:
    """Raise the broker's memory alarm (a watermark of 1 byte) until the block ends."""
    watermark = _ctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    _ctl("set_vm_memory_high_watermark", "absolute", "1")
    try:
        deadline = time.monotonic() + 10
        while not _alarmed():
            assert time.monotonic() < deadline, "the memory alarm did not go off"
            time.sleep(0.1)
        yield
    finally:
        if watermark.startswith("{absolute,"):
            _ctl("set_vm_memory_high_watermark", "absolute", watermark.split(",")[1].rstrip("}"))
        else:
            _ctl("set_vm_memory_high_watermark", watermark)
        deadline = time.monotonic() + 10
        while _alarmed() and time.monotonic() < deadline:
            time.sleep(0.1)


@asynccontextmanager
async def held_source(body: bytes | None) -> AsyncIterator[tuple[str, list[float], asyncio.Event]]:
    """A URL whose server holds each request until `release` is set, then answers `body` (503 if None)."""
    hits: list[float] = []
    release = asyncio.Event()

    async def handle(_: web.Request) -> web.Response:
        hits.append(time.monotonic())
        await release.wait()
        if body is None:
            return web.Response(status=503, text="busy")
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}", handle)
    async with local_http(app) as base:
        yield f"{base}/source.jpg", hits, release


@pytest.fixture(scope="module")
def single(
    base_env: dict[str, str], namespace: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OwnStack]:
    with own_stack(
        base_env,
        namespace,
        s3_endpoint,
        tmp_path_factory.mktemp("alarm-logs"),
        "alarm",
        extra_env={"IMGPIPE_WORKER_CONCURRENCY": "1"},  # a prefetch of 2
    ) as stack:
        yield stack


async def test_a_worker_blocked_publishing_a_retry_still_acknowledges_its_finished_jobs(
    single: OwnStack, http: aiohttp.ClientSession
) -> None:
    """During a memory alarm RabbitMQ stops reading from connections that publish. The worker
    published a job's retry on the connection it consumed on, so the broker read none of its
    acknowledgements: a job it finished stayed unacknowledged, its prefetch stayed full, and the job
    queued behind waited for the alarm to end."""
    user = single.client(http)
    image = jpeg(320, 240)
    async with (
        held_source(None) as (refused, refused_hits, release_refused),
        held_source(image) as (good, good_hits, release_good),
        held_source(image) as (behind, behind_hits, release_behind),
    ):
        release_behind.set()
        first = await user.submit({"url": refused}, ["thumb"])
        second = await user.submit({"url": good}, ["thumb"])
        await eventually(lambda: refused_hits and good_hits)  # both held by the worker
        third = await user.submit({"url": behind}, ["thumb"])  # queued: the prefetch is full
        try:
            with memory_alarm():
                release_refused.set()  # a transient failure: its retry is published, and held
                await asyncio.sleep(1)
                release_good.set()  # finished and acknowledged during the alarm
                # Its acknowledgement frees the prefetch: the job behind it is delivered.
                await eventually(lambda: behind_hits, within=10)
        finally:
            release_refused.set()
            release_good.set()
        done = {job["id"]: await user.wait(job["id"], within=30) for job in (first, second, third)}
    assert done[second["id"]]["status"] == "succeeded"
    assert done[third["id"]]["status"] == "succeeded"
    assert done[first["id"]]["status"] == "failed"  # 503 on every attempt, after its retries
