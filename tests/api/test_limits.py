"""Per-user rate limits and the active-jobs quota, through real api processes that share one Redis.

Two stacks of their own, each with TWO api processes in one namespace and no worker (so accepted
jobs stay `pending`, which is what holds a quota slot):
- `rates`: 10 jobs per minute, 4 uploads per hour, no quota;
- `quota`: at most 3 active jobs, no rate limits.
Every test uses users of its own, so the budgets of one test never meet another's.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import aio_pika
import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from imgpipe.broker import Topology
from imgpipe.limits import QUOTA_RECHECK_S
from imgpipe.store import owner_id

from tests.e2e.test_outages import PrivateRedis
from tests.isolated import image, isolated_stack, start_unready, temporary_worker
from tests.stack import AMQP_URL, REDIS_URL, Stack, free_port, presigned_form, token

pytestmark = pytest.mark.e2e

JOBS_PER_MINUTE = 10
UPLOADS_PER_HOUR = 4
MAX_ACTIVE = 3
#: A URL source the api accepts (127.0.0.0/8 is allowed below) and nobody ever fetches.
URL_SOURCE = {"url": "http://127.0.0.1:9/never-fetched.jpg"}
RETRY_DELAYS = "[1, 2]"  # base_env's, so the test can re-declare the same topology


def _stack(base_env: dict[str, str], logdir: Any, extra: dict[str, str]) -> Any:
    env = {"IMGPIPE_URL_ALLOWED_NETWORKS": "127.0.0.0/8", **extra}
    return isolated_stack(base_env, logdir, {"api": ("api", env), "api2": ("api", env)})


@pytest.fixture(scope="module")
def rates(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    extra = {
        "IMGPIPE_RATE_JOBS_PER_MINUTE": str(JOBS_PER_MINUTE),
        "IMGPIPE_RATE_UPLOADS_PER_HOUR": str(UPLOADS_PER_HOUR),
        "IMGPIPE_MAX_ACTIVE_JOBS": "0",
    }
    with _stack(base_env, tmp_path_factory.mktemp("rates-logs"), extra) as stack:
        yield stack


@pytest.fixture(scope="module")
def quota(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    extra = {
        "IMGPIPE_RATE_JOBS_PER_MINUTE": "0",
        "IMGPIPE_RATE_UPLOADS_PER_HOUR": "0",
        "IMGPIPE_MAX_ACTIVE_JOBS": str(MAX_ACTIVE),
    }
    with _stack(base_env, tmp_path_factory.mktemp("quota-logs"), extra) as stack:
        yield stack


def _apis(stack: Stack) -> Iterator[str]:
    """The two api processes, alternately."""
    return itertools.cycle([stack.services["api"].url, stack.services["api2"].url])


def _auth(sub: str, scopes: str = "") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, scopes)}"}


async def _job(
    http: aiohttp.ClientSession, api: str, sub: str, source: dict | None = None, **headers: str
) -> tuple[int, dict, Any]:
    async with http.post(
        f"{api}/jobs", json={"source": source or URL_SOURCE}, headers={**_auth(sub), **headers}
    ) as response:
        return response.status, await response.json(), response.headers


async def _grant(http: aiohttp.ClientSession, api: str, sub: str) -> tuple[int, dict, Any]:
    async with http.post(
        f"{api}/uploads", json={"content_type": "image/jpeg", "size": 1000}, headers=_auth(sub)
    ) as response:
        return response.status, await response.json(), response.headers


async def _upload(http: aiohttp.ClientSession, api: str, sub: str, data: bytes) -> str:
    async with http.post(
        f"{api}/uploads", json={"content_type": "image/jpeg", "size": len(data)}, headers=_auth(sub)
    ) as response:
        assert response.status == 201, await response.text()
        grant = await response.json()
    form = presigned_form(grant["fields"], data, "image/jpeg")
    async with http.post(grant["url"], data=form) as response:
        assert response.status in (200, 201, 204), await response.text()
    return grant["key"]


def _assert_429(status: int, body: dict, headers: Any, code: str, *, most_s: int) -> None:
    assert (status, body["error"]["code"]) == (429, code), body
    assert body["error"]["message"]
    retry_after = headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= most_s


# Rate limits.


async def test_jobs_per_minute_exactly_across_two_apis(rates: Stack, http: aiohttp.ClientSession) -> None:
    apis = _apis(rates)
    remaining = []
    for _ in range(JOBS_PER_MINUTE):
        status, body, headers = await _job(http, next(apis), "rate-seq")
        assert status == 202, body
        assert headers["RateLimit-Limit"] == str(JOBS_PER_MINUTE)
        remaining.append(int(headers["RateLimit-Remaining"]))
    # Each replica counts what the other spent: one budget per user, not per process.
    assert remaining == list(range(JOBS_PER_MINUTE - 1, -1, -1))
    for _ in range(2):
        status, body, headers = await _job(http, next(apis), "rate-seq")
        _assert_429(status, body, headers, "rate_limited", most_s=60 // JOBS_PER_MINUTE)
        assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == (str(JOBS_PER_MINUTE), "0")


async def test_concurrent_jobs_on_two_apis_accept_exactly_the_limit(
    rates: Stack, http: aiohttp.ClientSession
) -> None:
    apis = _apis(rates)
    answers = await asyncio.gather(
        *(_job(http, next(apis), "rate-burst") for _ in range(3 * JOBS_PER_MINUTE))
    )
    statuses = [status for status, _, _ in answers]
    assert statuses.count(202) == JOBS_PER_MINUTE, answers
    assert statuses.count(429) == 2 * JOBS_PER_MINUTE
    for status, body, headers in answers:
        if status == 429:
            _assert_429(status, body, headers, "rate_limited", most_s=60 // JOBS_PER_MINUTE)


async def test_the_job_budget_refills(rates: Stack, http: aiohttp.ClientSession) -> None:
    apis = _apis(rates)
    for _ in range(JOBS_PER_MINUTE):
        assert (await _job(http, next(apis), "rate-refill"))[0] == 202
    status, body, headers = await _job(http, next(apis), "rate-refill")
    _assert_429(status, body, headers, "rate_limited", most_s=60 // JOBS_PER_MINUTE)
    # Retry-After is an honest promise: waiting that long is enough for one more, and only one.
    await asyncio.sleep(int(headers["Retry-After"]) + 0.2)
    status, body, _ = await _job(http, next(apis), "rate-refill")
    assert status == 202, body
    assert (await _job(http, next(apis), "rate-refill"))[0] == 429


async def test_uploads_per_hour_exactly_across_two_apis(rates: Stack, http: aiohttp.ClientSession) -> None:
    apis = _apis(rates)
    for left in range(UPLOADS_PER_HOUR - 1, -1, -1):
        status, body, headers = await _grant(http, next(apis), "upload-seq")
        assert status == 201, body
        assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == (
            str(UPLOADS_PER_HOUR),
            str(left),
        )
    status, body, headers = await _grant(http, next(apis), "upload-seq")
    _assert_429(status, body, headers, "rate_limited", most_s=3600 // UPLOADS_PER_HOUR)


async def test_concurrent_uploads_on_two_apis_grant_exactly_the_limit(
    rates: Stack, http: aiohttp.ClientSession
) -> None:
    apis = _apis(rates)
    answers = await asyncio.gather(*(_grant(http, next(apis), "upload-burst") for _ in range(12)))
    assert [status for status, _, _ in answers].count(201) == UPLOADS_PER_HOUR, answers
    assert {status for status, _, _ in answers} == {201, 429}


async def test_limits_are_per_user(rates: Stack, http: aiohttp.ClientSession) -> None:
    api = rates.services["api"].url
    for _ in range(JOBS_PER_MINUTE):
        assert (await _job(http, api, "per-user-alice"))[0] == 202
    for _ in range(UPLOADS_PER_HOUR):
        assert (await _grant(http, api, "per-user-alice"))[0] == 201
    assert (await _job(http, api, "per-user-alice"))[0] == 429
    assert (await _grant(http, api, "per-user-alice"))[0] == 429
    # Alice being limited does not limit Bob, on either api.
    for left, other in enumerate((rates.services["api"].url, rates.services["api2"].url)):
        status, body, headers = await _job(http, other, "per-user-bob")
        assert status == 202, body
        assert headers["RateLimit-Remaining"] == str(JOBS_PER_MINUTE - 1 - left)
        assert (await _grant(http, other, "per-user-bob"))[0] == 201


async def test_an_idempotent_replay_spends_nothing(rates: Stack, http: aiohttp.ClientSession) -> None:
    apis = _apis(rates)
    status, first, _ = await _job(http, next(apis), "rate-idem", **{"Idempotency-Key": "once"})
    assert status == 202, first
    for _ in range(2 * JOBS_PER_MINUTE):
        status, replay, headers = await _job(http, next(apis), "rate-idem", **{"Idempotency-Key": "once"})
        assert (status, replay["id"], headers["Idempotent-Replayed"]) == (202, first["id"], "true")
    # The whole budget but the first job is still there.
    for i in range(JOBS_PER_MINUTE - 1):
        status, body, _ = await _job(http, next(apis), "rate-idem", **{"Idempotency-Key": f"new-{i}"})
        assert status == 202, body
    status, body, headers = await _job(http, next(apis), "rate-idem", **{"Idempotency-Key": "one-too-many"})
    _assert_429(status, body, headers, "rate_limited", most_s=60 // JOBS_PER_MINUTE)


async def test_what_the_request_alone_shows_will_fail_spends_nothing_and_is_never_a_429(
    rates: Stack, quota: Stack, http: aiohttp.ClientSession
) -> None:
    """A URL the policy forbids, another user's upload key: refused as such (422, 403) before the
    request takes a slot or spends its rate, even for a user at the limit."""
    forbidden = {"url": "http://169.254.169.254/latest/meta-data/"}
    not_theirs = {"key": f"uploads/{owner_id('someone-else')}/{'0' * 32}"}
    for stack, sub in ((rates, "rate-refused"), (quota, "quota-refused-free")):
        apis = _apis(stack)
        for _ in range(JOBS_PER_MINUTE + 2):
            status, body, _ = await _job(http, next(apis), sub, forbidden)
            assert (status, body["error"]["code"]) == (422, "url_forbidden")
            status, body, _ = await _job(http, next(apis), sub, not_theirs)
            assert (status, body["error"]["code"]) == (403, "source_forbidden")
        assert (await _job(http, next(apis), sub))[0] == 202  # nothing was spent
    apis = _apis(quota)
    for _ in range(MAX_ACTIVE - 1):  # the quota user above has one job active already
        assert (await _job(http, next(apis), "quota-refused-free"))[0] == 202
    assert (await _job(http, next(apis), "quota-refused-free"))[1]["error"]["code"] == "too_many_active_jobs"
    status, body, _ = await _job(http, next(apis), "quota-refused-free", forbidden)
    assert (status, body["error"]["code"]) == (422, "url_forbidden")  # at the limit: still why it fails


async def test_admins_are_exempt(rates: Stack, http: aiohttp.ClientSession) -> None:
    api = rates.services["api"].url
    admin = {"Authorization": f"Bearer {token('rate-admin', 'admin')}"}
    for _ in range(JOBS_PER_MINUTE + 3):
        async with http.post(f"{api}/jobs", json={"source": URL_SOURCE}, headers=admin) as response:
            assert response.status == 202, await response.text()
            assert "RateLimit-Limit" not in response.headers
    for _ in range(UPLOADS_PER_HOUR + 2):
        async with http.post(
            f"{api}/uploads", json={"content_type": "image/png", "size": 10}, headers=admin
        ) as response:
            assert response.status == 201, await response.text()


# The active-jobs quota.


async def test_active_jobs_quota_exactly_across_two_apis(quota: Stack, http: aiohttp.ClientSession) -> None:
    apis = _apis(quota)
    for _ in range(MAX_ACTIVE):
        status, body, headers = await _job(http, next(apis), "quota-seq")
        assert status == 202, body
        assert "RateLimit-Limit" not in headers  # no rate limit configured on this stack
    for _ in range(2):
        status, body, headers = await _job(http, next(apis), "quota-seq")
        _assert_429(status, body, headers, "too_many_active_jobs", most_s=60)
    # Another user's slots are their own.
    assert (await _job(http, next(apis), "quota-seq-other"))[0] == 202


async def test_concurrent_jobs_on_two_apis_take_exactly_the_free_slots(
    quota: Stack, http: aiohttp.ClientSession
) -> None:
    apis = _apis(quota)
    answers = await asyncio.gather(*(_job(http, next(apis), "quota-burst") for _ in range(16)))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(202) == MAX_ACTIVE, answers
    for status, body, headers in answers:
        if status != 202:
            _assert_429(status, body, headers, "too_many_active_jobs", most_s=60)


async def test_a_refused_job_gives_its_slot_back(quota: Stack, http: aiohttp.ClientSession) -> None:
    apis = _apis(quota)
    missing = {"key": f"uploads/{owner_id('quota-refused')}/{'0' * 32}"}
    for _ in range(MAX_ACTIVE + 2):
        status, body, _ = await _job(http, next(apis), "quota-refused", missing)
        assert (status, body["error"]["code"]) == (422, "source_not_found")
    for _ in range(MAX_ACTIVE):
        status, body, _ = await _job(http, next(apis), "quota-refused")
        assert status == 202, body


async def test_a_withdrawn_job_gives_its_slot_back(quota: Stack, http: aiohttp.ClientSession) -> None:
    assert "worker" not in quota.services, "this test deletes the jobs queue under a consumer"
    api = quota.services["api"].url  # one process: its publisher channel is the one we break
    assert (await _job(http, api, "quota-withdrawn"))[0] == 202
    topology = Topology(quota.env["IMGPIPE_NAMESPACE"], (1, 2))
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        # Without its queue the jobs exchange routes nowhere: the api's mandatory publish comes
        # back, so it withdraws the job and answers 503.
        await channel.queue_delete(topology.jobs_queue)
        try:
            for _ in range(MAX_ACTIVE + 1):
                status, body, _ = await _job(http, api, "quota-withdrawn")
                assert (status, body["error"]["code"]) == (503, "broker_unavailable"), body
        finally:
            await topology.declare(await connection.channel())
    # One slot is held by the first job; the withdrawn ones gave theirs back.
    for _ in range(MAX_ACTIVE - 1):
        status, body, _ = await _job(http, api, "quota-withdrawn")
        assert status == 202, body
    assert (await _job(http, api, "quota-withdrawn"))[0] == 429


async def test_a_finished_job_frees_its_slot(
    quota: Stack, http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    """Last on this stack: it starts a worker, which then runs every pending job of the namespace."""
    apis = _apis(quota)
    key = await _upload(http, next(apis), "quota-done", image())
    jobs = []
    for _ in range(MAX_ACTIVE):
        status, body, _ = await _job(http, next(apis), "quota-done", {"key": key})
        assert status == 202, body
        jobs.append(body["id"])
    assert (await _job(http, next(apis), "quota-done", {"key": key}))[0] == 429

    async with temporary_worker(quota, tmp_path):
        client = aioredis.from_url(REDIS_URL)
        try:
            ns = quota.env["IMGPIPE_NAMESPACE"]
            async with asyncio.timeout(60):
                while True:
                    ranks = [await client.hget(f"{ns}:job:{job_id}", "rank") for job_id in jobs]
                    if all(rank == b"2" for rank in ranks):
                        break
                    await asyncio.sleep(0.2)
        finally:
            await client.aclose()
        # The worker knows nothing of quotas: the api sees the jobs are done and frees their slots,
        # once the recheck after the refusal above has passed.
        await asyncio.sleep(QUOTA_RECHECK_S)
        for _ in range(MAX_ACTIVE):
            status, body, _ = await _job(http, next(apis), "quota-done", {"key": key})
            assert status == 202, body


# Redis down.


async def _writes_refused_as_unavailable(http: aiohttp.ClientSession, api: Any, user: str) -> None:
    """`POST /uploads` and `POST /jobs` answer the 503 a client retries."""
    for path, body in (
        ("/uploads", {"content_type": "image/jpeg", "size": 10}),
        ("/jobs", {"source": URL_SOURCE}),
    ):
        async with http.post(f"{api.url}{path}", json=body, headers=_auth(user)) as response:
            answer = await response.json()
            assert (response.status, answer["error"]["code"]) == (503, "store_unavailable"), answer


async def test_a_full_redis_is_a_503_not_an_internal_error(
    base_env: dict[str, str], http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    """Under the `noeviction` policy the README asks for, a full Redis refuses writes (OOM). The api
    answered 500 internal_error with a stack trace in its log, where the README promises the 503 a
    client retries; the same for a replica after a failover (READONLY) or a full disk (MISCONF)."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    api = None
    try:
        env = {**base_env, "IMGPIPE_REDIS_URL": server.url, "IMGPIPE_URL_ALLOWED_NETWORKS": "127.0.0.0/8"}
        api = start_unready("api", env, tmp_path)
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)  # far below what it holds already
            await _writes_refused_as_unavailable(http, api, "full")
            admin.config_set("maxmemory", 0)
        upload = {"content_type": "image/jpeg", "size": 10}
        async with http.post(f"{api.url}/uploads", json=upload, headers=_auth("full")) as response:
            assert response.status == 201, await response.text()
    finally:
        if api is not None:
            api.proc.terminate()
            api.proc.wait(30)
        server.kill()
    assert "Traceback" not in api.log.read_text()


async def test_redis_down_is_a_503_not_a_free_pass(
    base_env: dict[str, str], http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    env = {
        **base_env,
        "IMGPIPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/15",
        # The job's URL source (loopback) passes the policy, so the answer is Redis's.
        "IMGPIPE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
    }
    api = start_unready("api", env, tmp_path)
    try:
        await _writes_refused_as_unavailable(http, api, "redis-down")
    finally:
        api.proc.terminate()
        api.proc.wait(30)
