"""The reconciler as a service (`imgpipe-reconciler` processes): health and metrics, the admin
routes of the api that queue runs for it, and one run per tick however many replicas there are."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.isolated import isolated_stack, metric
from tests.reconciler.conftest import keys
from tests.stack import REDIS_URL, Stack, token

pytestmark = pytest.mark.e2e


async def _wait_run(http: aiohttp.ClientSession, stack: Stack, run_id: str, headers: dict) -> dict:
    async with asyncio.timeout(30):
        while True:
            async with http.get(f"{stack.api}/admin/reconcile/{run_id}", headers=headers) as response:
                assert response.status == 200, await response.text()
                body = await response.json()
            if body["status"] not in ("queued", "running"):
                return body
            await asyncio.sleep(0.1)


@pytest.fixture
def admin_stack(base_env: dict[str, str], bucket: str, tmp_path: Path) -> Iterator[Stack]:
    env = {"IMGPIPE_RECONCILE_GRACE_SECONDS": "0"}
    with isolated_stack(
        {**base_env, "IMGPIPE_S3_BUCKET": bucket},
        tmp_path,
        {"api": ("api", {}), "reconciler": ("reconciler", env)},
    ) as stack:
        yield stack


async def test_admin_routes_health_and_metrics(
    admin_stack: Stack, bucket: str, s3: Any, http: aiohttp.ClientSession
) -> None:
    stack = admin_stack
    url = f"{stack.api}/admin/reconcile"
    admin = {"Authorization": f"Bearer {token('ops', 'read admin')}"}
    async with http.post(url) as response:
        assert response.status == 401
    async with http.post(url, headers={"Authorization": f"Bearer {token('alice', 'read')}"}) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "forbidden"
    async with http.get(f"{url}/x", headers={"Authorization": f"Bearer {token('alice')}"}) as response:
        assert response.status == 403
    async with http.post(url, params={"dry_run": "maybe"}, headers=admin) as response:
        assert response.status == 422
    # Two answers to "may it delete?" are not one: refused, not the first (or the last) taken.
    conflicting = [("dry_run", "false"), ("dry_run", "true")]
    async with http.post(url, params=conflicting, headers=admin) as response:
        assert response.status == 422
        assert (await response.json())["error"]["code"] == "invalid_request"
    async with http.get(f"{url}/no-such-run", headers=admin) as response:
        assert response.status == 404

    s3.put_object(Bucket=bucket, Key="uploads/o/orphan", Body=b"abc")
    runs = {}
    for dry_run in ("true", "false"):
        async with http.post(url, params={"dry_run": dry_run}, headers=admin) as response:
            assert response.status == 202, await response.text()
            queued = await response.json()
            assert queued["status"] == "queued" and queued["dry_run"] is (dry_run == "true")
            assert response.headers["Location"] == f"/admin/reconcile/{queued['run_id']}"
        runs[dry_run] = await _wait_run(http, stack, queued["run_id"], admin)
    assert runs["true"]["status"] == "succeeded", runs["true"]
    assert runs["true"]["summary"]["orphans"] == 1 and runs["true"]["summary"]["deleted"] == 0
    assert runs["false"]["summary"]["deleted"] == 1
    assert runs["false"]["trigger"] == "admin" and runs["false"]["requested_by"] == "ops"
    assert keys(s3, bucket) == set()

    service = stack.services["reconciler"].url
    async with http.get(f"{service}/healthz") as response:
        assert (await response.json())["service"] == "reconciler"
    async with http.get(f"{service}/readyz") as response:
        assert response.status == 200
        assert set((await response.json())["checks"]) == {"redis", "s3", "rabbitmq"}
    async with http.get(f"{service}/metrics") as response:
        text = await response.text()
    assert metric(text, "imgpipe_reconcile_runs_total", result="succeeded") == 2
    assert metric(text, "imgpipe_reconcile_objects_scanned_total") == 2
    assert metric(text, "imgpipe_reconcile_objects_deleted_total") == 1
    assert metric(text, "imgpipe_reconcile_bytes_freed_total") == 3
    assert metric(text, "imgpipe_reconcile_duration_seconds_count") == 2
    assert metric(text, "imgpipe_reconcile_last_success_timestamp_seconds") > time.time() - 60


def _log_lines(path: Path) -> list[dict]:
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def test_two_replicas_run_each_tick_once(base_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    # A tick every second (the 6-field form) so a few ticks happen within the test.
    env = {"IMGPIPE_RECONCILE_CRON": "* * * * * *", "IMGPIPE_RECONCILE_GRACE_SECONDS": "0"}
    with isolated_stack(
        {**base_env, "IMGPIPE_S3_BUCKET": bucket},
        tmp_path,
        {"r1": ("reconciler", env), "r2": ("reconciler", env)},
    ) as stack:
        namespace = stack.env["IMGPIPE_NAMESPACE"]
        client = redis.Redis.from_url(REDIS_URL)

        def ticks() -> set[str]:
            return {k.decode().rsplit(":", 1)[1] for k in client.scan_iter(f"{namespace}:reconcile:tick:*")}

        # Polled, not slept: a loaded machine may fire the scheduler late.
        deadline = time.monotonic() + 30
        while len(ticks()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        for service in stack.services.values():
            stack.stop(service)
        taken = ticks()
        client.close()
        logs = [line for s in stack.services.values() for line in _log_lines(s.log)]

    queued = [line["tick"] for line in logs if line["message"] == "scheduled reconciliation queued"]
    finished = [line["run_id"] for line in logs if line["message"] == "reconciliation finished"]
    lost = [line for line in logs if line["message"] == "tick taken by another replica"]
    # A tick that came up while the run before it was going is dropped, not run after it.
    overtaken = [
        line["run_id"]
        for line in logs
        if line["message"] == "reconciliation skipped: the tick came up while another one was running"
    ]
    assert len(taken) >= 3
    assert sorted(queued) == sorted(taken)  # each tick published by exactly one replica
    assert lost, "the replicas did not compete for the ticks"
    assert len(finished) == len(set(finished))  # no tick ran twice
    assert set(finished) <= {f"scheduled-{t}" for t in taken}
    assert not set(finished) & set(overtaken)
    # The last tick may still have been queued at the stop.
    assert len(finished) + len(overtaken) >= len(taken) - 1
