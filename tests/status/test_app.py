"""The status application in-process (real Redis and S3): cases that need a hand on its hub's timing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from imgpipe import resources
from imgpipe.models import JobRecord, JobStatus, KeySource, VariantResult, utcnow
from imgpipe.store import JobStore
from imgpipe_status.app import HUB, create_app
from imgpipe_status.openapi import document

from tests.isolated import sse
from tests.stack import local_http, token


@pytest.fixture
async def status(env: dict[str, str]) -> AsyncIterator[tuple[str, JobStore]]:
    """The app's base URL and its job store, once its hub follows the job channel."""
    app = await create_app()
    async with local_http(app) as base:
        await asyncio.wait_for(app[HUB].connected.wait(), 10)
        yield base, app[resources.STORE]


async def _pending(store: JobStore) -> JobRecord:
    record = JobRecord.pending(uuid.uuid4().hex, "alice", KeySource(key="uploads/x/y"), [])
    created = (await store.create(record)).record
    assert created is not None
    return created


async def test_a_last_event_id_from_another_replica_is_not_answered_from_an_older_cache(
    status: tuple[str, JobStore], http: aiohttp.ClientSession
) -> None:
    """The client was sent `succeeded` (id 2) by another replica and reconnects here before this
    replica's hub has the change's message: it is told the stream is over, not sent `pending` again."""
    base, store = status
    job = await _pending(store)
    url, auth = f"{base}/jobs/{job.id}/events", {"Authorization": f"Bearer {token('alice')}"}
    async with http.get(url, headers=auth) as watching:  # keeps the job followed, cached at id 1
        first = [item async for item in _events(watching, 1)]
        assert [(item.id, item.event) for item in first] == [(1, "pending")]
        done = job.model_copy(update={"status": JobStatus.SUCCEEDED, "updated_at": utcnow()})
        # Written as the store writes a change, but not published: no message reaches this hub.
        await store.redis.hset(
            store.job_key(job.id),
            mapping={"version": 2, "rank": 2, "data": done.model_dump_json(exclude={"version"})},
        )
        async with http.get(url, headers={**auth, "Last-Event-ID": "2"}) as again:
            assert again.status == 204
        async with http.get(url, headers={**auth, "Last-Event-ID": "1"}) as behind:
            assert [(item.id, item.event) async for item in _events(behind, 1)] == [(2, "succeeded")]


async def test_a_state_the_store_lost_is_not_taken_for_the_one_it_has(
    status: tuple[str, JobStore], http: aiohttp.ClientSession
) -> None:
    """A Redis failover lost `processing` (version 2) after the client was sent it, and the worker
    then wrote `succeeded` as version 2. The client's reconnect with the id of the state it has
    got 204 (the stream is over, as far as it knew) and never saw the job succeed."""
    base, store = status
    job = await _pending(store)
    processing = (await store.mark_processing(job.id)).record
    assert processing is not None
    sent = f"2.{_micros(processing.updated_at)}"  # the id every replica gave that state
    # The failover: the store is back at `pending`, as a replica that missed the last write has it.
    await store.redis.hset(
        store.job_key(job.id),
        mapping={"version": 1, "rank": 1, "data": job.model_dump_json(exclude={"version"})},
    )
    succeeded = (await store.mark_succeeded(processing, [])).record
    assert succeeded is not None and succeeded.version == 2  # the lost version, handed out again

    url, auth = f"{base}/jobs/{job.id}/events", {"Authorization": f"Bearer {token('alice')}"}
    async with http.get(url, headers={**auth, "Last-Event-ID": sent}) as again:
        assert again.status == 200
        [end] = [item async for item in _events(again, 1)]
    assert (end.id, end.event, end.last_event_id) == (2, "succeeded", f"2.{_micros(succeeded.updated_at)}")
    async with http.get(url, headers={**auth, "Last-Event-ID": end.last_event_id or ""}) as over:
        assert over.status == 204
    # An id of the version alone (as sent before ids carried the moment) cannot tell the two apart.
    async with http.get(url, headers={**auth, "Last-Event-ID": "2"}) as legacy:
        assert legacy.status == 204


def _micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


async def test_head_on_an_event_stream_is_refused(
    status: tuple[str, JobStore], http: aiohttp.ClientSession
) -> None:
    """HEAD must not open a stream: aiohttp would write the events as a body nobody frames."""
    base, store = status
    job = await _pending(store)
    auth = {"Authorization": f"Bearer {token('alice')}"}
    async with asyncio.timeout(5), http.head(f"{base}/jobs/{job.id}/events", headers=auth) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
    async with asyncio.timeout(5), http.head(f"{base}/jobs/{job.id}", headers=auth) as polled:
        assert polled.status == 200  # a plain GET route keeps its HEAD


async def test_a_replica_that_cannot_sign_urls_refuses_the_stream_before_it_starts(
    env: dict[str, str], no_aws_credentials: None, http: aiohttp.ClientSession
) -> None:
    """A replica with no S3 credentials (STS down at its start) can sign no variant URL. `GET /jobs/{id}`
    answered 503 for a succeeded job, but its stream sent a 200's headers and then, inside the chunked
    body, a second response (the 503): EventSource took it for a network error, reconnecting forever."""
    app = await create_app()
    async with local_http(app) as base:
        await asyncio.wait_for(app[HUB].connected.wait(), 10)
        store = app[resources.STORE]
        job = await _pending(store)
        url, auth = f"{base}/jobs/{job.id}", {"Authorization": f"Bearer {token('alice')}"}
        async with http.get(f"{url}/events", headers=auth) as watching:
            assert [(item.id, item.event) async for item in _events(watching, 1)] == [(1, "pending")]
            processing = (await store.mark_processing(job.id)).record
            assert processing is not None
            variant = VariantResult(name="thumb", format="jpeg", width=1, height=1, bytes=1, key="variants/k")
            await store.mark_succeeded(processing, [variant])
            async with asyncio.timeout(5):  # ended, with nothing it could send
                rest = [item async for item in sse(watching) if item.event is not None]
            assert [item.event for item in rest] == ["processing"]
        paths = document()["paths"]
        for path, route in ((url, "/jobs/{job_id}"), (f"{url}/events", "/jobs/{job_id}/events")):
            # The reconnect is refused as the poll is, and as the document says.
            async with http.get(path, headers=auth) as response:
                assert response.status == 503
                assert (await response.json())["error"]["code"] == "storage_unavailable"
            assert "storage_unavailable" in paths[route]["get"]["responses"]["503"]["x-error-codes"]


async def _events(response: aiohttp.ClientResponse, count: int) -> AsyncIterator:
    async with asyncio.timeout(5):
        async for item in sse(response):
            if item.event is not None:
                yield item
                count -= 1
                if count == 0:
                    return
