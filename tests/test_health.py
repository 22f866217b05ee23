"""Health, readiness, metrics, request ids and the JSON error shape, on every service as a process."""

from __future__ import annotations

import asyncio
import re
import time
from importlib.metadata import version
from pathlib import Path

import aiohttp
import pytest

from tests.isolated import image, metric, start_unready
from tests.stack import Client, Stack, free_port, token
from tests.worker.test_consumer import eventually

pytestmark = pytest.mark.e2e

SERVICES = ("api", "status", "worker")
DEPENDENCIES = {
    "api": {"redis", "s3", "rabbitmq"},
    "status": {"redis", "events"},  # it only signs S3 URLs: no call to S3, so no check of it
    "worker": {"redis", "s3", "rabbitmq", "consumer"},
}


def _url(stack: Stack, service: str) -> str:
    return stack.services[service].url


@pytest.mark.parametrize("service", SERVICES)
async def test_healthz(http: aiohttp.ClientSession, stack: Stack, service: str) -> None:
    async with http.get(f"{_url(stack, service)}/healthz") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["version"] == version("imgpipe")
    assert body["environment"] == "test"
    assert body["service"] == service


@pytest.mark.parametrize("service", SERVICES)
async def test_readyz_lists_every_dependency(http: aiohttp.ClientSession, stack: Stack, service: str) -> None:
    async with http.get(f"{_url(stack, service)}/readyz") as response:
        assert response.status == 200
        body = await response.json()
    assert body == {"ready": True, "checks": dict.fromkeys(DEPENDENCIES[service], "ok")}


@pytest.mark.parametrize("service", SERVICES)
async def test_metrics_is_prometheus_text(http: aiohttp.ClientSession, stack: Stack, service: str) -> None:
    base = _url(stack, service)
    async with http.get(f"{base}/healthz"):
        pass
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    # The healthz call above was measured, labelled with this service and its route.
    assert metric(text, "imgpipe_http_request_duration_seconds_count", service=service, route="/healthz") >= 1
    if service == "api":
        assert "imgpipe_jobs_accepted_total" in text
    if service == "worker":
        assert "imgpipe_jobs_succeeded_total" in text
        assert "imgpipe_job_processing_seconds" in text


async def _scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as response:
        return await response.text()


async def test_job_metrics_count_real_work(http: aiohttp.ClientSession, stack: Stack, alice: Client) -> None:
    api_before = metric(await _scrape(http, stack.api), "imgpipe_jobs_accepted_total")
    worker_before = await _scrape(http, _url(stack, "worker"))
    job = await alice.submit({"key": await alice.upload(image())})
    assert (await alice.wait(job["id"]))["status"] == "succeeded"

    assert metric(await _scrape(http, stack.api), "imgpipe_jobs_accepted_total") == api_before + 1
    worker_after = await _scrape(http, _url(stack, "worker"))
    for name in ("imgpipe_jobs_succeeded_total", "imgpipe_job_processing_seconds_count"):
        assert metric(worker_after, name) >= metric(worker_before, name) + 1, name


@pytest.mark.parametrize("service", SERVICES)
async def test_request_id_is_echoed(http: aiohttp.ClientSession, stack: Stack, service: str) -> None:
    async with http.get(f"{_url(stack, service)}/healthz", headers={"X-Request-ID": "req-42.a:b"}) as r:
        assert r.headers["X-Request-ID"] == "req-42.a:b"


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("sent", [None, "has spaces in it", "x" * 129, "semi;colon"])
async def test_request_id_is_generated_when_absent_or_unusable(
    http: aiohttp.ClientSession, stack: Stack, service: str, sent: str | None
) -> None:
    headers = {"X-Request-ID": sent} if sent is not None else {}
    ids = set()
    for _ in range(2):
        async with http.get(f"{_url(stack, service)}/healthz", headers=headers) as response:
            ids.add(response.headers["X-Request-ID"])
    assert len(ids) == 2, "a fresh id for every request"
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids


async def test_request_id_on_errors_and_job_routes(http: aiohttp.ClientSession, stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {token('alice')}"}
    async with http.post(f"{stack.api}/jobs", json={}, headers={**auth, "X-Request-ID": "r-1"}) as response:
        assert response.status == 422
        assert response.headers["X-Request-ID"] == "r-1"
    async with http.get(f"{stack.status}/jobs/nope", headers={"X-Request-ID": "r-2"}) as response:
        assert response.status == 401
        assert response.headers["X-Request-ID"] == "r-2"


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("path", ["/nope", "/jobs/abc/nope", "/healthz/x"])
async def test_unknown_route_is_404_json(
    http: aiohttp.ClientSession, stack: Stack, service: str, path: str
) -> None:
    auth = {"Authorization": f"Bearer {token('alice')}"}
    async with http.get(f"{_url(stack, service)}{path}", headers=auth) as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        body = await response.json()
        assert "X-Request-ID" in response.headers
    assert body["error"]["code"] == "not_found"
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("service", "method", "path", "allowed"),
    [
        ("api", "GET", "/jobs", "POST"),
        ("api", "DELETE", "/uploads", "POST"),
        ("status", "POST", "/jobs/abc", "GET"),
        ("status", "DELETE", "/jobs/abc/events", "GET"),
        ("worker", "POST", "/healthz", "GET"),
    ],
)
async def test_wrong_method_is_405_json(
    http: aiohttp.ClientSession, stack: Stack, service: str, method: str, path: str, allowed: str
) -> None:
    async with http.request(method, f"{_url(stack, service)}{path}") as response:
        assert response.status == 405
        assert response.content_type == "application/json"
        assert allowed in response.headers["Allow"]
        body = await response.json()
    assert body["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(("service", "ready"), [("status", True), ("api", False)])
async def test_s3_out_of_reach_makes_only_its_callers_unready(
    http: aiohttp.ClientSession, base_env: dict[str, str], tmp_path: Path, service: str, ready: bool
) -> None:
    """status only signs download links: S3 out of reach must not take it out of its Service."""
    env = {**base_env, "IMGPIPE_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing there
    proc = await asyncio.to_thread(start_unready, service, env, tmp_path)
    try:

        async def settled() -> dict | None:
            async with http.get(f"{proc.url}/readyz") as response:
                body = await response.json()
            # Ready, or failing on S3 alone (its other checks need a moment at start-up).
            waiting = [k for k, v in body["checks"].items() if v != "ok" and k != "s3"]
            return None if waiting else body

        body = await eventually(settled, within=15)
        assert body["ready"] is ready, body
        assert ("s3" in body["checks"]) is not ready
    finally:
        Stack(env).stop(proc)


@pytest.mark.parametrize("service", ["status", "api"])
async def test_redis_down_starts_healthy_but_not_ready(
    http: aiohttp.ClientSession, base_env: dict[str, str], tmp_path: Path, service: str
) -> None:
    closed = free_port()  # nothing listens there
    env = {**base_env, "IMGPIPE_REDIS_URL": f"redis://127.0.0.1:{closed}/0"}
    proc = await asyncio.to_thread(start_unready, service, env, tmp_path)
    try:
        async with http.get(f"{proc.url}/healthz") as response:
            assert response.status == 200
        started = time.monotonic()
        async with http.get(f"{proc.url}/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert time.monotonic() - started < 3
        assert body["ready"] is False
        assert body["checks"]["redis"].startswith("error")
        assert body["checks"].get("s3", "ok") == "ok"
        # A request that needs Redis is a quick 503 in the usual error shape, not a hang or a 500.
        auth = {"Authorization": f"Bearer {token('alice')}"}
        if service == "status":
            request = http.get(f"{proc.url}/jobs/abc", headers=auth)
        else:
            request = http.post(
                f"{proc.url}/uploads", json={"content_type": "image/png", "size": 9}, headers=auth
            )
        async with asyncio.timeout(5), request as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "store_unavailable"
    finally:
        Stack(env).stop(proc)
