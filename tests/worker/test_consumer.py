"""The worker's consumer against the real RabbitMQ, Redis and (moto) S3, on a stack of its own.

Proved here: a bad image fails at once, without a retry; a transient failure is retried with the
configured back-off and then dead-lettered (or succeeds on a later attempt); poison messages go to
the dead-letter queue without stopping the worker; a duplicated message changes nothing; the job
store only moves forward.

The stack of this module runs in a namespace of its own, so its worker never competes with the
shared `stack` fixture's worker for messages, and its metrics count only this module's jobs.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiohttp
import pytest
import pyvips
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web
from imgpipe.broker import ATTEMPT_HEADER, JOB_ROUTING_KEY, REASON_HEADER, Topology
from imgpipe.models import (
    PRESETS,
    JobMessage,
    JobRecord,
    JobStatus,
    KeySource,
    UrlSource,
    Variant,
    VariantResult,
    utcnow,
)
from imgpipe.storage import StorageError
from imgpipe.store import JobStore, owner_id
from imgpipe_worker import consumer as consumer_module

from tests.stack import (
    AMQP_URL,
    BUCKET,
    REDIS_URL,
    Client,
    Service,
    Stack,
    drop_namespace,
    local_http,
    s3_client,
)

pytestmark = pytest.mark.e2e

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------------
# Helpers (test_faults.py uses them too).


def jpeg(width: int, height: int, quality: int = 85) -> bytes:
    """A colour JPEG with detail everywhere (a flat image would decode unrealistically fast)."""
    xyz = pyvips.Image.xyz(width, height)
    red = ((xyz[0] * 7) ^ (xyz[1] * 3)).cast("uchar")
    green = (xyz[0] // max(1, width // 255)).cast("uchar")
    blue = (xyz[1] // max(1, height // 255)).cast("uchar")
    return red.bandjoin([green, blue]).copy(interpretation="srgb").write_to_buffer(".jpg", Q=quality)


@dataclass
class OwnStack:
    """api + status (+ workers) in a namespace of their own; every process started is stopped at the end."""

    stack: Stack
    namespace: str
    logdir: Path
    s3_endpoint: str
    workers: list[Service] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(self.namespace, (1, 2))

    @property
    def worker(self) -> Service:
        return self.workers[-1]

    def start_worker(self, extra_env: dict[str, str] | None = None) -> Service:
        service = self.stack.start("worker", self.logdir, extra_env)
        self.workers.append(service)
        return service

    def client(self, http: aiohttp.ClientSession, sub: str = "alice") -> Client:
        return Client(http, self.stack, sub)


@contextmanager
def own_stack(
    base_env: dict[str, str],
    base_namespace: str,
    s3_endpoint: str,
    logdir: Path,
    label: str,
    *,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
) -> Iterator[OwnStack]:
    namespace = f"{base_namespace}-{label}-{uuid.uuid4().hex[:8]}"
    env = {
        **base_env,
        "IMGPIPE_NAMESPACE": namespace,
        "IMGPIPE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
        "IMGPIPE_WORKER_CONCURRENCY": "2",
        **(extra_env or {}),
    }
    own = OwnStack(Stack(env), namespace, logdir, s3_endpoint)
    try:
        for name in ("api", "status"):
            own.stack.services[name] = own.stack.start(name, logdir)
        for _ in range(workers):
            own.start_worker()
        yield own
    finally:
        for service in [*own.stack.services.values(), *own.workers]:
            own.stack.stop(service)
        drop_namespace(namespace)


async def eventually(probe: Callable[[], Awaitable[T | None] | T | None], within: float = 10.0) -> T:
    """Poll `probe` until it returns something truthy; that value is returned."""
    async with asyncio.timeout(within):
        while True:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            await asyncio.sleep(0.05)


async def metric(http: aiohttp.ClientSession, service: Service, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the service's /metrics whose labels include `labels`."""
    async with http.get(f"{service.url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    total = 0.0
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        sample, value = line.rsplit(" ", 1)
        if sample.split("{", 1)[0] == name and all(w in sample for w in wanted):
            total += float(value)
    return total


def log_records(service: Service, job_id: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines of a service (optionally only those of one job)."""
    records = []
    for line in service.log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (job_id is None or record.get("job_id") == job_id):
            records.append(record)
    return records


def s3_objects(endpoint: str, prefix: str) -> dict[str, tuple[str, Any]]:
    """Key -> (ETag, LastModified) of every object under `prefix`."""
    s3 = s3_client(endpoint)
    objects: dict[str, tuple[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            objects[item["Key"]] = (item["ETag"], item["LastModified"])
    return objects


def job_prefix(sub: str, job_id: str) -> str:
    return f"variants/{owner_id(sub)}/{job_id}/"


@asynccontextmanager
async def amqp_channel():
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def publish_raw(
    topology: Topology, body: bytes, *, message_id: str, headers: dict[str, Any] | None = None
) -> None:
    """Publish straight to `<ns>.jobs` (routing key `job`), confirmed by the broker."""
    async with amqp_channel() as channel:
        exchange = await channel.get_exchange(topology.jobs_exchange, ensure=False)
        message = aio_pika.Message(
            body,
            message_id=message_id,
            headers=headers or {},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, routing_key=JOB_ROUTING_KEY, mandatory=True)


async def take_dead_letters(
    topology: Topology, message_ids: set[str], within: float = 10.0
) -> dict[str, AbstractIncomingMessage]:
    """Wait for messages with these ids in `<ns>.jobs.dead` and take them; others are left there."""
    found: dict[str, AbstractIncomingMessage] = {}
    async with amqp_channel() as channel:
        queue = await channel.get_queue(topology.dead_queue, ensure=False)
        others: list[AbstractIncomingMessage] = []
        try:
            async with asyncio.timeout(within):
                while not message_ids <= found.keys():
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        await asyncio.sleep(0.05)
                    elif message.message_id in message_ids:
                        found[message.message_id] = message
                        await message.ack()
                    else:
                        others.append(message)  # held unacknowledged so the next get moves on
        except TimeoutError:
            missing = message_ids - found.keys()
            raise AssertionError(f"not dead-lettered within {within}s: {sorted(missing)}") from None
        finally:
            for message in others:
                await message.nack(requeue=True)
    return found


async def queue_depth(name: str) -> int:
    async with amqp_channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


@asynccontextmanager
async def image_server(body: bytes, *, failures: int | None):
    """An HTTP server on 127.0.0.1 that answers 503 `failures` times (always when None), then `body`.

    Yields `(url, hits)`; `hits` gets the monotonic time of every request.
    """
    hits: list[float] = []

    async def handle(_: web.Request) -> web.Response:
        hits.append(time.monotonic())
        if failures is None or len(hits) <= failures:
            return web.Response(status=503, text="busy, try later")
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}", handle)
    async with local_http(app) as base:
        yield f"{base}/{uuid.uuid4().hex}.jpg", hits


# --------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def own(
    base_env: dict[str, str], namespace: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OwnStack]:
    with own_stack(
        base_env, namespace, s3_endpoint, tmp_path_factory.mktemp("consumer-logs"), "consumer"
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    return jpeg(800, 600)


@pytest.fixture
def user(http: aiohttp.ClientSession, own: OwnStack) -> Client:
    return own.client(http)


async def _good_job_succeeds(user: Client, data: bytes) -> None:
    job = await user.submit({"key": await user.upload(data)}, ["thumb"])
    done = await user.wait(job["id"], within=20)
    assert done["status"] == "succeeded", done


# --------------------------------------------------------------------------------------------------------
# 0. Where a job's time goes: one observation per stage, and the stages fit inside the job's latency.

STAGES = ("queued", "fetch", "render_wait", "render", "upload", "finish")


async def _stage_figures(http: aiohttp.ClientSession, worker: Service) -> dict[str, tuple[float, float]]:
    """(count, sum) of each stage's histogram and of the succeeded and failed latencies."""
    figures = {}
    for stage in STAGES:
        figures[stage] = (
            await metric(http, worker, "imgpipe_job_stage_seconds_count", stage=stage),
            await metric(http, worker, "imgpipe_job_stage_seconds_sum", stage=stage),
        )
    for outcome in ("succeeded", "failed"):
        figures[outcome] = (
            await metric(http, worker, "imgpipe_job_latency_seconds_count", outcome=outcome),
            await metric(http, worker, "imgpipe_job_latency_seconds_sum", outcome=outcome),
        )
    return figures


def _deltas(before: dict, after: dict) -> dict[str, tuple[float, float]]:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in before}


async def _timed_job(user: Client, key: str) -> tuple[dict[str, Any], float]:
    """Submit a thumbnail job for `key` and wait for its end: the job's view and the seconds it took."""
    started = time.monotonic()
    job = await user.submit({"key": key}, ["thumb"])
    done = await user.wait(job["id"], within=20)
    return done, time.monotonic() - started


async def test_stage_metrics_account_for_a_job(
    own: OwnStack, user: Client, http: aiohttp.ClientSession, small_jpeg: bytes
) -> None:
    key = await user.upload(small_jpeg)
    before = await _stage_figures(http, own.worker)
    done, elapsed = await _timed_job(user, key)
    assert done["status"] == "succeeded", done
    delta = _deltas(before, await _stage_figures(http, own.worker))

    assert {k: count for k, (count, _) in delta.items()} == {
        **dict.fromkeys(STAGES, 1),
        "succeeded": 1,
        "failed": 0,
    }
    for stage in ("fetch", "render", "upload", "finish"):  # real work takes some time
        assert delta[stage][1] > 0, (stage, delta)
    # The stages are disjoint steps between the api's accepting the job and the status written, so
    # they add up to no more than its latency, which in turn is within what the client saw.
    stages_total = sum(seconds for k, (_, seconds) in delta.items() if k in STAGES)
    latency = delta["succeeded"][1]
    assert stages_total <= latency + 0.001, delta
    assert latency <= elapsed + 0.001, (latency, elapsed)


# --------------------------------------------------------------------------------------------------------
# 1. A bad image fails at once, with its code, and is not retried.


@pytest.mark.parametrize(
    ("kind", "content_type", "code"),
    [("random-bytes", "image/png", "unsupported_format"), ("truncated-jpeg", "image/jpeg", "corrupt_image")],
)
async def test_bad_image_fails_at_once_without_retry(
    own: OwnStack,
    user: Client,
    http: aiohttp.ClientSession,
    small_jpeg: bytes,
    kind: str,
    content_type: str,
    code: str,
) -> None:
    if kind == "random-bytes":
        data = b"\x00" + secrets.token_bytes(8191)  # no image format starts with a NUL
    else:
        data = small_jpeg[: len(small_jpeg) * 6 // 10]
    retried = await metric(http, own.worker, "imgpipe_jobs_retried_total")
    failed = await metric(http, own.worker, "imgpipe_jobs_failed_total", code=code)
    key = await user.upload(data, content_type)
    stages_before = await _stage_figures(http, own.worker)

    done, _ = await _timed_job(user, key)

    assert done["status"] == "failed", done
    assert done["error"]["code"] == code, done
    assert "gave up" not in done["error"]["message"]
    assert done["variants"] == []
    # Failed on its first delivery: no retry counted (below), nothing dead-lettered.
    assert await metric(http, own.worker, "imgpipe_jobs_retried_total") == retried
    assert await metric(http, own.worker, "imgpipe_jobs_failed_total", code=code) == failed + 1
    # It was taken, fetched and waited for its slot; the render failed, so nothing after it counts.
    counts = {k: n for k, (n, _) in _deltas(stages_before, await _stage_figures(http, own.worker)).items()}
    assert counts == {
        **dict.fromkeys(("queued", "fetch", "render_wait"), 1),
        **dict.fromkeys(("render", "upload", "finish", "succeeded"), 0),
        "failed": 1,
    }
    messages = [r["message"] for r in log_records(own.worker, done["id"])]
    assert messages.count("job failed") == 1, messages
    assert not any("retry" in m for m in messages), messages
    assert s3_objects(own.s3_endpoint, job_prefix(user.sub, done["id"])) == {}

    await _good_job_succeeds(user, small_jpeg)


# --------------------------------------------------------------------------------------------------------
# 2. Transient failures: back-off, retries, then the dead-letter queue (or success on a later attempt).


async def test_transient_failure_retries_with_backoff_then_dead_letters(
    own: OwnStack, user: Client, http: aiohttp.ClientSession, small_jpeg: bytes
) -> None:
    worker = own.worker
    retried = await metric(http, worker, "imgpipe_jobs_retried_total", code="url_http_error")
    dead = await metric(http, worker, "imgpipe_jobs_dead_lettered_total")
    async with image_server(small_jpeg, failures=None) as (url, hits):
        job = await user.submit({"url": url}, ["thumb"])
        done = await user.wait(job["id"], within=20)

        assert done["status"] == "failed", done
        assert done["error"]["code"] == "url_http_error", done
        assert "gave up after 3 attempts" in done["error"]["message"], done
        # IMGPIPE_MAX_ATTEMPTS=3 requests, spaced by IMGPIPE_RETRY_DELAYS_S=[1, 2].
        assert len(hits) == 3, hits
        gaps = [b - a for a, b in itertools.pairwise(hits)]
        # At least the back-off; the upper side is left open (a loaded machine delivers late).
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps

    assert await metric(http, worker, "imgpipe_jobs_retried_total", code="url_http_error") == retried + 2
    assert await metric(http, worker, "imgpipe_jobs_dead_lettered_total") == dead + 1

    letters = await take_dead_letters(own.topology, {job["id"]})
    letter = letters[job["id"]]
    assert "gave up after 3 attempts" in str(letter.headers[REASON_HEADER])
    assert letter.headers[ATTEMPT_HEADER] == 3
    assert JobMessage.model_validate_json(letter.body).id == job["id"]
    # Nothing is left waiting anywhere: no further attempt will come.
    for name in own.topology.queue_names():
        assert await queue_depth(name) == 0, name


async def test_transient_failure_then_success_on_third_attempt(
    own: OwnStack, user: Client, small_jpeg: bytes
) -> None:
    async with image_server(small_jpeg, failures=2) as (url, hits):
        job = await user.submit({"url": url}, ["thumb"])
        done = await user.wait(job["id"], within=20)
        assert done["status"] == "succeeded", done
        assert len(hits) == 3, hits
    assert [v["name"] for v in done["variants"]] == ["thumb"]
    records = log_records(own.worker, job["id"])
    assert [r.get("attempt") for r in records if r["message"] == "job succeeded"] == [3], records
    assert [r.get("attempt") for r in records if r["message"].startswith("transient failure")] == [1, 2]


# --------------------------------------------------------------------------------------------------------
# 3. Poison messages go to the dead-letter queue; the worker keeps serving.


async def test_poison_messages_are_dead_lettered_and_worker_keeps_serving(
    own: OwnStack, user: Client, small_jpeg: bytes
) -> None:
    tag = uuid.uuid4().hex[:8]
    poison = {
        f"bytes-{tag}": (b"\x00\xff\xfe garbage \x80" * 10, {}),
        f"json-{tag}": (json.dumps({"id": "x", "hello": "world"}).encode(), {}),
        f"empty-{tag}": (b"", {}),
        # A header the worker cannot read must not wedge a consumer slot either (two: every slot).
        f"header-a-{tag}": (b"{}", {ATTEMPT_HEADER: "not-a-number"}),
        f"header-b-{tag}": (b"[]", {ATTEMPT_HEADER: ["a", "list"]}),
    }
    for message_id, (body, headers) in poison.items():
        await publish_raw(own.topology, body, message_id=message_id, headers=headers)

    letters = await take_dead_letters(own.topology, set(poison))
    for message_id, letter in letters.items():
        assert letter.body == poison[message_id][0]
        deaths = letter.headers.get("x-death") or []
        assert deaths and deaths[0]["reason"] == "rejected", letter.headers
        assert deaths[0]["queue"] == own.topology.jobs_queue

    # Each is logged with what was wrong, not with what was sent (pydantic's errors carry the input:
    # a body of up to the broker's message size, from any publisher, in the logs).
    lines = [r["message"] for r in log_records(own.worker) if "unparseable" in r["message"]]
    assert len(lines) >= len(poison), lines
    assert not [line for line in lines if "garbage" in line or "hello" in line], lines
    # And under the message's id (its job's, as published), the header's complaint too.
    for message_id in poison:
        said = {r["message"].split(":")[0] for r in log_records(own.worker, message_id)}
        assert "unparseable message dead-lettered" in said, (message_id, said)
    for message_id in (f"header-a-{tag}", f"header-b-{tag}"):
        said = [r["message"] for r in log_records(own.worker, message_id)]
        assert any(line.startswith("unreadable x-imgpipe-attempt header") for line in said), said

    await _good_job_succeeds(user, small_jpeg)
    assert await queue_depth(own.topology.jobs_queue) == 0


# --------------------------------------------------------------------------------------------------------
# 4. A duplicated message is harmless.


async def test_duplicate_message_changes_nothing(
    own: OwnStack, user: Client, http: aiohttp.ClientSession, small_jpeg: bytes
) -> None:
    job = await user.submit(
        {"key": await user.upload(small_jpeg)},
        ["thumb", {"name": "card", "width": 300, "height": 300, "fit": "cover", "format": "webp"}],
    )
    done = await user.wait(job["id"], within=20)
    assert done["status"] == "succeeded", done
    prefix = job_prefix(user.sub, job["id"])
    objects = s3_objects(own.s3_endpoint, prefix)
    assert set(objects) == {v["key"] for v in done["variants"]}

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        store = JobStore(client, own.namespace, retention=timedelta(days=1))
        before = await store.get(job["id"])
        assert before is not None and before.status is JobStatus.SUCCEEDED
        # The message exactly as the api built it: everything comes from the record.
        body = JobMessage.of(before).model_dump_json()
        succeeded = await metric(http, own.worker, "imgpipe_jobs_succeeded_total")
        for _ in range(2):
            await publish_raw(own.topology, body.encode(), message_id=job["id"], headers={ATTEMPT_HEADER: 1})

        def acknowledged() -> bool:
            messages = [r["message"] for r in log_records(own.worker, job["id"])]
            return messages.count("job already succeeded; duplicate delivery acknowledged") == 2

        await eventually(acknowledged)
        after = await store.get(job["id"])
    finally:
        await client.aclose()

    assert after is not None
    assert after.status is JobStatus.SUCCEEDED
    assert (after.version, after.updated_at) == (before.version, before.updated_at)
    assert after.variants == before.variants
    status, polled = await user.get(job["id"])
    assert status == 200 and polled["status"] == "succeeded"
    assert polled["updated_at"] == done["updated_at"]
    assert await metric(http, own.worker, "imgpipe_jobs_succeeded_total") == succeeded
    # Same objects, not written again, and no second set.
    assert s3_objects(own.s3_endpoint, prefix) == objects
    assert await queue_depth(own.topology.jobs_queue) == 0


async def test_a_message_whose_job_has_no_record_is_dropped(
    own: OwnStack, user: Client, http: aiohttp.ClientSession, small_jpeg: bytes
) -> None:
    """A job withdrawn by the api (its publish timed out after the broker took it) or expired: the
    message is acknowledged, nothing is rendered or stored, and no record is made up for it."""
    key = await user.upload(small_jpeg)
    job_id = uuid.uuid4().hex
    body = JobMessage(
        id=job_id,
        owner=user.sub,
        source=KeySource(key=key),
        variants=[PRESETS["thumb"]],
        created_at=utcnow(),
    ).model_dump_json()
    succeeded = await metric(http, own.worker, "imgpipe_jobs_succeeded_total")
    await publish_raw(own.topology, body.encode(), message_id=job_id, headers={ATTEMPT_HEADER: 1})

    def dropped() -> bool:
        messages = [r["message"] for r in log_records(own.worker, job_id)]
        return "no record for job (expired or withdrawn); dropping message" in messages

    await eventually(dropped)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert await JobStore(client, own.namespace, retention=timedelta(days=1)).get(job_id) is None
    finally:
        await client.aclose()
    assert s3_objects(own.s3_endpoint, job_prefix(user.sub, job_id)) == {}
    assert await metric(http, own.worker, "imgpipe_jobs_succeeded_total") == succeeded
    assert await queue_depth(own.topology.jobs_queue) == 0


async def test_a_message_with_a_naive_created_at_is_settled(
    own: OwnStack, user: Client, small_jpeg: bytes
) -> None:
    """Only the api's own messages carry an aware `created_at`. Year 1 without a zone made the
    `queued` metric raise before the job's guard: the message was never settled and held a consumer
    slot until the broker's `consumer_timeout` (30 minutes). One message more than the worker's
    prefetch: were any of them left unsettled, the good job after them would wait behind them."""
    key = await user.upload(small_jpeg)
    job_ids = [uuid.uuid4().hex for _ in range(4)]
    sent = ["0001-01-01T00:00:00", "0001-01-01T00:00:00+10:00", "2026-01-01T00:00:00", "9999-12-31T23:59:59"]
    for job_id, created_at in zip(job_ids, sent, strict=True):
        body = JobMessage(
            id=job_id,
            owner=user.sub,
            source=KeySource(key=key),
            variants=[PRESETS["thumb"]],
            created_at=created_at,  # type: ignore[arg-type]  # validated as the worker would
        ).model_dump_json()
        assert f'"created_at":"{created_at}"' in body  # as sent
        await publish_raw(own.topology, body.encode(), message_id=job_id, headers={ATTEMPT_HEADER: 1})

    def dropped() -> bool:  # no record: acknowledged, as any message of a job withdrawn or expired
        return all(
            "no record for job (expired or withdrawn); dropping message"
            in [r["message"] for r in log_records(own.worker, job_id)]
            for job_id in job_ids
        )

    await eventually(dropped)
    await _good_job_succeeds(user, small_jpeg)
    assert await queue_depth(own.topology.jobs_queue) == 0


async def test_a_message_and_a_record_from_a_later_release_are_worked(
    own: OwnStack, user: Client, small_jpeg: bytes
) -> None:
    """A rolling upgrade: a newer api writes fields this worker does not know, at every level of the
    message and of the record. The message was refused (`extra_forbidden`) and dead-lettered, its
    job left `pending`; it is worked as this release understands it, and the record's own new field
    outlives this release's transitions of it."""
    key = await user.upload(small_jpeg)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        store = JobStore(client, own.namespace, retention=timedelta(days=1))
        later = {"priority": 5, "source": {"key": key, "version_id": "3"}}
        record = JobRecord.pending(uuid.uuid4().hex, user.sub, KeySource(key=key), [PRESETS["thumb"]])
        assert (await store.create(record)).applied
        written = json.loads(await client.hget(store.job_key(record.id), "data")) | {"tenant": "t1"}
        written["requested"][0]["strip_metadata"] = False
        written["source"] = later["source"]
        await client.hset(store.job_key(record.id), "data", json.dumps(written))
        message = json.loads(JobMessage.of(record).model_dump_json()) | {"priority": later["priority"]}
        message["source"] = later["source"]
        message["variants"][0]["strip_metadata"] = False
        await publish_raw(
            own.topology, json.dumps(message).encode(), message_id=record.id, headers={ATTEMPT_HEADER: 1}
        )

        async def done() -> bool:
            current = await store.get(record.id)
            return current is not None and current.status is JobStatus.SUCCEEDED

        await eventually(done)
        data = json.loads(await client.hget(store.job_key(record.id), "data"))
    finally:
        await client.aclose()
    assert data["tenant"] == "t1"  # kept through `processing` and `succeeded`
    assert [v["name"] for v in data["variants"]] == ["thumb"]
    assert await queue_depth(own.topology.dead_queue) == 0


def test_the_wait_of_a_message_from_elsewhere_is_never_an_error() -> None:
    from imgpipe_worker.consumer import _since_accepted

    now = time.time()
    assert _since_accepted(datetime.fromtimestamp(now - 5, UTC)) == pytest.approx(5, abs=1)
    # A naive time is UTC, whatever this host's zone.
    naive = datetime.fromtimestamp(now - 5, UTC).replace(tzinfo=None)
    assert _since_accepted(naive) == pytest.approx(5, abs=1)
    assert _since_accepted(datetime.min) > 6e10  # year 1, naive: `timestamp()` raised
    assert _since_accepted(datetime.max.replace(tzinfo=UTC)) == 0.0  # in the future: never negative


async def test_a_copy_failing_after_another_succeeded_leaves_no_dead_letter(
    own: OwnStack, http: aiohttp.ClientSession, small_jpeg: bytes
) -> None:
    """Two copies of a job's message run at once (a redelivery, the reconciler's re-publish); the one
    on its last attempt fails, transiently, after the other has succeeded. It dead-lettered the done
    job (an alert, a letter its replay cannot use) and counted a failure that was not recorded."""
    served: list[float] = []

    async def handle(_: web.Request) -> web.Response:
        served.append(time.monotonic())
        if len(served) == 1:  # the first copy's fetch: slow, and then refused
            await asyncio.sleep(1.5)
            return web.Response(status=503, text="busy")
        return web.Response(body=small_jpeg, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}", handle)
    failed = await metric(http, own.worker, "imgpipe_jobs_failed_total", code="url_http_error")
    dead = await metric(http, own.worker, "imgpipe_jobs_dead_lettered_total")
    client = aioredis.Redis.from_url(REDIS_URL)
    async with local_http(app) as base:
        try:
            store = JobStore(client, own.namespace, retention=timedelta(days=1))
            source = UrlSource(url=f"{base}/{uuid.uuid4().hex}.jpg")
            record = JobRecord.pending(uuid.uuid4().hex, "alice", source, [PRESETS["thumb"]])
            await store.create(record)
            body = JobMessage(
                id=record.id,
                owner=record.owner,
                source=source,
                variants=record.requested,
                created_at=record.created_at,
            ).model_dump_json()
            await publish_raw(own.topology, body.encode(), message_id=record.id, headers={ATTEMPT_HEADER: 3})
            await eventually(lambda: len(served) == 1)
            await publish_raw(own.topology, body.encode(), message_id=record.id, headers={ATTEMPT_HEADER: 1})

            def settled() -> bool:
                messages = [r["message"] for r in log_records(own.worker, record.id)]
                return "job already succeeded; this copy's failure not recorded" in messages

            await eventually(settled)
            done = await store.get(record.id)
        finally:
            await client.aclose()
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert await metric(http, own.worker, "imgpipe_jobs_failed_total", code="url_http_error") == failed
    assert await metric(http, own.worker, "imgpipe_jobs_dead_lettered_total") == dead
    assert await queue_depth(own.topology.dead_queue) == 0


# --------------------------------------------------------------------------------------------------------
# 8. The job store moves only forward.


async def test_job_store_refuses_backward_transitions(own: OwnStack) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        store = JobStore(client, own.namespace, retention=timedelta(minutes=5))
        pending = JobRecord.pending(
            uuid.uuid4().hex, "alice", KeySource(key="uploads/x/y"), [Variant(name="thumb", width=10)]
        )
        assert (await store.create(pending)).applied
        taken = await store.mark_processing(pending.id)
        assert taken.applied and taken.record is not None
        processing = taken.record
        assert processing.status is JobStatus.PROCESSING

        # processing -> pending: refused, through create and through the raw transition.
        assert not (await store.create(pending)).applied
        back = await store._apply(pending.model_copy(update={"updated_at": utcnow()}))
        assert not back.applied
        assert back.record is not None and back.record.status is JobStatus.PROCESSING
        assert back.record.version == processing.version

        result = VariantResult(name="thumb", format="jpeg", width=10, height=10, bytes=1, key="k")
        done = await store.mark_succeeded(processing, [result])
        assert done.applied and done.record is not None

        # succeeded -> processing, -> failed, -> succeeded again: all refused, nothing changes.
        assert not (await store.mark_processing(pending.id)).applied
        again = await store._apply(processing.model_copy(update={"updated_at": utcnow()}))
        assert not again.applied
        assert not (await store.mark_failed(processing, "internal_error", "late")).applied
        assert not (await store.mark_succeeded(processing, [])).applied
        final = await store.get(pending.id)
        assert final is not None
        assert final.status is JobStatus.SUCCEEDED
        assert final.version == done.record.version
        assert final.variants == [result]
        await store.delete(pending.id)
    finally:
        await client.aclose()


async def test_a_failed_upload_cancels_the_job_s_other_uploads() -> None:
    """Left running by `asyncio.gather`, they held their variants' bytes beside the job's retry."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow_put() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def failing_put() -> None:
        await started.wait()
        raise StorageError("storage_unavailable", "S3 PUT: connection reset", transient=True)

    async with asyncio.timeout(10):
        with pytest.raises(StorageError):
            await consumer_module._all([slow_put(), failing_put()])
        assert cancelled.is_set()
