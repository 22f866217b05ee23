"""The per-user limiter and active-jobs quota against the real Redis (`imgpipe.limits`).

Most tests pass `now` explicitly, so windows and graces are exact and nothing sleeps; a few use the
Redis clock, as the api does.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from imgpipe.limits import QUOTA_RECHECK_S, RATE_LIMITED, TOO_MANY_ACTIVE_JOBS, Limits
from imgpipe.models import PRESETS, JobRecord, KeySource
from imgpipe.resources import redis_client as service_redis_client
from imgpipe.settings import RedisSettings
from imgpipe.store import JobStore, owner_id
from pydantic import SecretStr
from yarl import URL

from tests.isolated import BrokerProxy
from tests.stack import REDIS_URL, delete_keys

T0 = 1_800_000_000.0  # a fixed "now" (epoch seconds)
TTL_S = 3600


@pytest.fixture
async def ns(redis_client: aioredis.Redis, namespace: str) -> AsyncIterator[str]:
    ns = f"{namespace}-limits-{uuid.uuid4().hex[:8]}"
    try:
        yield ns
    finally:
        await delete_keys(redis_client, f"{ns}:*")


@pytest.fixture
def limits(redis_client: aioredis.Redis, ns: str) -> Limits:
    return Limits(redis_client, ns, ttl_s=TTL_S)


# Rate limits (GCRA).


async def test_exactly_the_limit_at_once_then_refused(limits: Limits) -> None:
    seen = [await limits.hit("jobs", "alice", limit=5, period_s=60, now=T0) for _ in range(5)]
    assert all(d.allowed for d in seen)
    assert [d.remaining for d in seen] == [4, 3, 2, 1, 0]
    refused = await limits.hit("jobs", "alice", limit=5, period_s=60, now=T0)
    assert not refused.allowed
    assert refused.code == RATE_LIMITED
    assert refused.remaining == 0
    assert refused.retry_after_s == pytest.approx(12.0)  # one more every 60/5 s
    assert refused.retry_after == 12
    assert refused.headers() == {"RateLimit-Limit": "5", "RateLimit-Remaining": "0", "Retry-After": "12"}


async def test_a_refused_hit_spends_nothing(limits: Limits) -> None:
    for _ in range(3):
        assert (await limits.hit("jobs", "alice", limit=3, period_s=60, now=T0)).allowed
    for _ in range(20):  # hammering while limited does not push the next slot further away
        refused = await limits.hit("jobs", "alice", limit=3, period_s=60, now=T0 + 1)
        assert not refused.allowed
        assert refused.retry_after_s == pytest.approx(19.0)
    assert (await limits.hit("jobs", "alice", limit=3, period_s=60, now=T0 + 20)).allowed


async def test_the_budget_refills_one_interval_at_a_time(limits: Limits) -> None:
    for _ in range(4):
        assert (await limits.hit("uploads", "alice", limit=4, period_s=3600, now=T0)).allowed
    assert not (await limits.hit("uploads", "alice", limit=4, period_s=3600, now=T0 + 899)).allowed
    one = await limits.hit("uploads", "alice", limit=4, period_s=3600, now=T0 + 900)
    assert (one.allowed, one.remaining) == (True, 0)
    again = await limits.hit("uploads", "alice", limit=4, period_s=3600, now=T0 + 900)
    assert not again.allowed
    assert again.retry_after_s == pytest.approx(900.0)


async def test_a_whole_period_later_the_whole_budget_is_back(limits: Limits) -> None:
    for _ in range(6):
        assert (await limits.hit("jobs", "alice", limit=6, period_s=60, now=T0)).allowed
    assert not (await limits.hit("jobs", "alice", limit=6, period_s=60, now=T0)).allowed
    later = [await limits.hit("jobs", "alice", limit=6, period_s=60, now=T0 + 60) for _ in range(7)]
    assert [d.allowed for d in later] == [True] * 6 + [False]


async def test_state_expires_once_the_budget_is_full_again(
    limits: Limits, redis_client: aioredis.Redis
) -> None:
    await limits.hit("jobs", "alice", limit=10, period_s=60, now=T0)
    # One request's worth of TAT: it means nothing after 6 s, so the key is gone by then.
    pttl = await redis_client.pttl(limits.rate_key("jobs", "alice"))
    assert 0 < pttl <= 6_001


async def test_fractional_intervals_never_let_more_through(limits: Limits) -> None:
    # 60/7 s is not a whole number of microseconds: rounding must not allow an 8th at once.
    seen = [await limits.hit("jobs", "alice", limit=7, period_s=60, now=T0) for _ in range(8)]
    assert [d.allowed for d in seen] == [True] * 7 + [False]
    assert seen[-1].retry_after_s == pytest.approx(60 / 7, abs=1e-5)
    assert seen[-1].retry_after == 9


async def test_owners_and_budgets_are_independent(limits: Limits) -> None:
    assert (await limits.hit("jobs", "alice", limit=1, period_s=60, now=T0)).allowed
    assert not (await limits.hit("jobs", "alice", limit=1, period_s=60, now=T0)).allowed
    assert (await limits.hit("jobs", "bob", limit=1, period_s=60, now=T0)).allowed
    assert (await limits.hit("uploads", "alice", limit=1, period_s=60, now=T0)).allowed
    assert limits.rate_key("jobs", "alice").endswith(owner_id("alice"))


async def test_zero_means_unlimited_and_writes_nothing(limits: Limits, redis_client: aioredis.Redis) -> None:
    for _ in range(50):
        decision = await limits.hit("jobs", "alice", limit=0, period_s=60)
        assert decision.allowed and decision.headers() == {}
    assert await redis_client.exists(limits.rate_key("jobs", "alice")) == 0


async def test_redis_clock(limits: Limits) -> None:
    seen = [await limits.hit("jobs", "alice", limit=3, period_s=3600) for _ in range(4)]
    assert [d.allowed for d in seen] == [True, True, True, False]
    assert 1 <= seen[-1].retry_after <= 1200


async def test_concurrent_hits_allow_exactly_the_limit(
    redis_client: aioredis.Redis, ns: str, limits: Limits
) -> None:
    # Several clients (as several api replicas would be) on their own connections.
    others = [aioredis.from_url(REDIS_URL) for _ in range(3)]
    try:
        limiters = [limits, *(Limits(client, ns, ttl_s=TTL_S) for client in others)]
        decisions = await asyncio.gather(
            *(limiters[i % 4].hit("jobs", "carol", limit=10, period_s=60) for i in range(60))
        )
    finally:
        for client in others:
            await client.aclose()
    assert sum(d.allowed for d in decisions) == 10


# The active-jobs quota.


async def _admit(
    limits: Limits, job_id: str, *, max_active: int = 3, rate: int = 0, now: float = T0, sub: str = "alice"
):
    return await limits.admit_job(sub, job_id, rate_limit=rate, period_s=60, max_active=max_active, now=now)


async def _job_hash(redis_client: aioredis.Redis, ns: str, job_id: str, rank: int) -> None:
    await redis_client.hset(f"{ns}:job:{job_id}", "rank", rank)


async def test_quota_admits_up_to_the_limit(limits: Limits, redis_client: aioredis.Redis, ns: str) -> None:
    for i in range(3):
        decision = await _admit(limits, f"j{i}")
        assert (decision.allowed, decision.active) == (True, i + 1)
        await _job_hash(redis_client, ns, f"j{i}", 0)
    refused = await _admit(limits, "j3")
    assert (refused.allowed, refused.code, refused.active) == (False, TOO_MANY_ACTIVE_JOBS, 3)
    assert refused.retry_after >= 1
    assert refused.headers() == {"Retry-After": str(refused.retry_after)}
    assert await limits.active_jobs("alice") == 3
    # Another user has a quota of their own.
    assert (await _admit(limits, "b0", sub="bob")).allowed


async def test_a_finished_job_frees_its_slot(limits: Limits, redis_client: aioredis.Redis, ns: str) -> None:
    store = JobStore(redis_client, ns, retention=timedelta(hours=1))
    records = []
    for _ in range(2):
        source = KeySource(key=f"uploads/{owner_id('alice')}/x")
        record = JobRecord.pending(uuid.uuid4().hex, "alice", source, [PRESETS["thumb"]])
        assert (await _admit(limits, record.id, max_active=2)).allowed
        await store.create(record)
        records.append(record)
    assert not (await _admit(limits, "next", max_active=2)).allowed
    # Processing is still active.
    await store.mark_processing(records[0].id)
    assert not (await _admit(limits, "next", max_active=2)).allowed
    current = await store.get(records[0].id)
    assert current is not None
    await store.mark_failed(current, "internal_error", "boom")
    decision = await _admit(limits, "next", max_active=2, now=T0 + QUOTA_RECHECK_S)
    assert (decision.allowed, decision.active) == (True, 2)
    assert await limits.active_jobs("alice") == 2  # the finished one was dropped


async def test_a_vanished_job_frees_its_slot(limits: Limits, redis_client: aioredis.Redis, ns: str) -> None:
    assert (await _admit(limits, "a", max_active=1)).allowed
    await _job_hash(redis_client, ns, "a", 1)
    assert not (await _admit(limits, "b", max_active=1)).allowed
    await redis_client.delete(f"{ns}:job:a")  # expired (after the retention) or deleted
    assert (await _admit(limits, "b", max_active=1, now=T0 + limits.grace_s + 1)).allowed


async def test_an_admitted_job_without_a_record_yet_keeps_its_slot_for_the_grace(limits: Limits) -> None:
    assert (await _admit(limits, "a", max_active=1, now=T0)).allowed
    # The api admits before it writes `pending`: no record is not "gone" yet.
    assert not (await _admit(limits, "b", max_active=1, now=T0 + limits.grace_s - 1)).allowed
    # A request that died between the two never writes it; its slot comes back after the grace.
    assert (await _admit(limits, "b", max_active=1, now=T0 + limits.grace_s + 1)).allowed


async def test_a_full_quota_is_looked_at_again_only_after_the_recheck(
    limits: Limits, redis_client: aioredis.Redis, ns: str
) -> None:
    """A refusal spends no rate: a client that ignored `Retry-After` had Redis walk the owner's jobs
    on every try. Refused once after a look, the owner is refused without one until the recheck."""
    for job in ("a", "b"):
        assert (await _admit(limits, job, max_active=2)).allowed
        await _job_hash(redis_client, ns, job, 1)
    assert not (await _admit(limits, "c", max_active=2)).allowed  # looked at both: active
    await _job_hash(redis_client, ns, "a", 2)  # finished just after
    soon = await _admit(limits, "c", max_active=2, now=T0 + QUOTA_RECHECK_S / 2)
    assert (soon.allowed, soon.code, soon.active) == (False, TOO_MANY_ACTIVE_JOBS, 2)
    assert await limits.active_jobs("alice") == 2  # not looked at: "a" is still counted
    later = await _admit(limits, "c", max_active=2, now=T0 + QUOTA_RECHECK_S)
    assert (later.allowed, later.active) == (True, 2)
    # A slot given back is seen at once: the set is not full any more.
    await limits.release_job("alice", "c")
    assert (await _admit(limits, "d", max_active=2, now=T0 + QUOTA_RECHECK_S)).allowed


async def test_release_gives_the_slot_back(limits: Limits, redis_client: aioredis.Redis, ns: str) -> None:
    assert (await _admit(limits, "a", max_active=1)).allowed
    await _job_hash(redis_client, ns, "a", 0)
    assert not (await _admit(limits, "b", max_active=1)).allowed
    await limits.release_job("alice", "a")
    assert (await _admit(limits, "b", max_active=1)).allowed


async def test_admitting_the_same_job_twice_takes_one_slot(limits: Limits) -> None:
    assert (await _admit(limits, "a", max_active=2)).allowed
    again = await _admit(limits, "a", max_active=2)
    assert (again.allowed, again.active) == (True, 1)
    assert (await _admit(limits, "b", max_active=2)).allowed


async def test_pruning_examines_a_bounded_number_of_members(redis_client: aioredis.Redis, ns: str) -> None:
    limits = Limits(redis_client, ns, ttl_s=TTL_S, prune_scan=2)
    for i in range(4):
        assert (await _admit(limits, f"j{i}", max_active=4, now=T0 + i)).allowed
        await _job_hash(redis_client, ns, f"j{i}", 2)  # all finished
    assert (await _admit(limits, "next", max_active=4, now=T0 + 10)).allowed
    # Only the two oldest were looked at (and dropped); the rest wait for a later call.
    members = [m.decode() for m in await redis_client.zrange(limits.active_key("alice"), 0, -1)]
    assert members == ["j2", "j3", "next"]


async def test_the_quota_set_expires(limits: Limits, redis_client: aioredis.Redis) -> None:
    await _admit(limits, "a")
    assert 0 < await redis_client.ttl(limits.active_key("alice")) <= TTL_S


async def test_rate_and_quota_are_decided_together(
    limits: Limits, redis_client: aioredis.Redis, ns: str
) -> None:
    for i in range(2):
        decision = await _admit(limits, f"j{i}", max_active=2, rate=5)
        assert decision.allowed
        await _job_hash(redis_client, ns, f"j{i}", 0)
    assert decision.remaining == 3
    # The quota refuses: the rate budget is not spent by it.
    for _ in range(10):
        assert (await _admit(limits, "x", max_active=2, rate=5)).code == TOO_MANY_ACTIVE_JOBS
    await _job_hash(redis_client, ns, "j0", 2)
    accepted = await _admit(limits, "j2", max_active=2, rate=5, now=T0 + QUOTA_RECHECK_S)
    assert (accepted.allowed, accepted.remaining) == (True, 2)
    # The rate refuses: no slot is taken by it.
    await redis_client.delete(f"{ns}:job:j1", f"{ns}:job:j2")  # both gone: quota is free
    for i in range(2):
        assert (await _admit(limits, f"r{i}", max_active=100, rate=5)).allowed
    refused = await _admit(limits, "over", max_active=100, rate=5)
    assert (refused.allowed, refused.code) == (False, RATE_LIMITED)
    assert refused.retry_after_s == pytest.approx(math.ceil(60 / 5))
    members = {m.decode() for m in await redis_client.zrange(limits.active_key("alice"), 0, -1)}
    assert "over" not in members


async def test_concurrent_admissions_take_exactly_the_free_slots(
    limits: Limits, redis_client: aioredis.Redis
) -> None:
    decisions = await asyncio.gather(
        *(limits.admit_job("dave", f"c{i}", rate_limit=0, period_s=60, max_active=4) for i in range(40))
    )
    assert sum(d.allowed for d in decisions) == 4
    assert await limits.active_jobs("dave") == 4


async def test_a_coalescer_on_another_client_is_refused(redis_client: aioredis.Redis, ns: str) -> None:
    # Admissions would go out on the coalescer's client and their releases on the limits' own.
    store = JobStore(redis_client, ns, retention=timedelta(hours=1))
    assert Limits(redis_client, ns, ttl_s=TTL_S, calls=store.calls).redis is redis_client
    other = aioredis.Redis.from_url(REDIS_URL)
    try:
        with pytest.raises(ValueError, match="same Redis client"):
            Limits(other, ns, ttl_s=TTL_S, calls=store.calls)
    finally:
        await other.aclose()


async def test_an_admission_whose_reply_was_lost_is_not_spent_twice(
    redis_client: aioredis.Redis, ns: str
) -> None:
    """The connection breaks between the admission and its reply; the client sends it again. The
    second run spent the rate again and answered 429 for a job it had admitted, whose slot then
    stayed counted with nothing to release it."""
    relay = BrokerProxy(target=URL(REDIS_URL).port or 6379)
    await relay.start()
    client = service_redis_client(
        RedisSettings(redis_url=SecretStr(str(URL(REDIS_URL).with_host("127.0.0.1").with_port(relay.port))))
    )
    try:
        # The script loaded and the connection made, on another owner.
        budget = {"rate_limit": 1, "period_s": 3600, "max_active": 5}
        assert (await Limits(redis_client, ns, ttl_s=TTL_S).admit_job("warm", "w", **budget)).allowed
        through = Limits(client, ns, ttl_s=TTL_S)
        await client.ping()
        relay.lose_reply_to(b"EVALSHA")
        admitted = await through.admit_job("alice", "job-a", **budget)
        assert admitted.allowed, admitted
        assert admitted.headers() == {}  # what is left is not known: no `RateLimit-Remaining: -1`
        assert await redis_client.zrange(through.active_key("alice"), 0, -1) == [b"job-a"]
        # The hour's one job is this one: the next is refused for the rate, not let through.
        refused = await through.admit_job("alice", "job-b", **budget)
        assert (refused.allowed, refused.code) == (False, RATE_LIMITED)
    finally:
        await relay.cut()
        await client.aclose()
