"""Per-user rate limits and the concurrent-jobs quota, kept in Redis so every api replica shares them.

Rate limits use GCRA (the generic cell rate algorithm, a token bucket written as one timestamp):
for a limit of N per period, each request pushes the owner's "theoretical arrival time" (TAT) on by
period/N, and a request is refused while that would put the TAT more than a whole period ahead of
now. Why GCRA rather than a window:
- one small key per owner and limit, whatever N is (a sliding-window log holds N timestamps);
- exact: a fresh owner gets exactly N requests at once, then one more every period/N, with no
  doubled burst at a window boundary (fixed windows let 2N through across one);
- a refused request changes nothing, and the exact wait until the next one fits falls out of the
  same arithmetic, which is what `Retry-After` needs.

The concurrent-jobs quota is a per-owner ZSET of admitted job ids. A job is admitted only while
fewer than the limit are still active. Finished jobs are not removed by the worker: when the set is
full, the admission script itself looks at each member's job hash (`{ns}:job:{id}`, field `rank`:
2 is terminal, a missing hash is a job that is gone) and drops those, so the worker needs no
change. A member whose hash does not exist yet but that was admitted within `grace` is kept: the
api admits before it writes the `pending` record. A refusal after such a look is remembered for
`QUOTA_RECHECK_S`, and the owner's requests in that time are refused without one: a refusal spends
no rate, so a client that ignores `Retry-After` would otherwise have Redis walk the set on every
try (about 0.4 ms of its one thread at 100 members, as much as two PINGs). When more than
`PRUNE_SCAN` jobs are active, the oldest `PRUNE_SCAN` are looked at: a newer job that finished
counts until older ones finish too.

Every decision is one Lua script, so concurrent requests on several replicas cannot both take the
last slot. Time comes from the Redis server (`TIME`), not from the replicas, whose clocks may
differ; tests may pass `now` instead.

The scripts read job hashes by name rather than through KEYS; that is fine on a single Redis (or
Sentinel), which is what imgpipe uses, but would need hash tags on Redis Cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis

from imgpipe.coalesce import Coalescer
from imgpipe.store import owner_id

#: Most members the quota script examines in one call when the set is full: bounds the work per call.
PRUNE_SCAN = 1000
#: How long an admitted job may have no record before it counts as gone (the api admits first,
#: then checks the source on S3, then writes `pending`; a crashed request frees its slot after this).
ADMISSION_GRACE_S = 300
#: `Retry-After` for a full quota: nothing says when a job will finish, so a short, fixed hint.
QUOTA_RETRY_AFTER_S = 5
#: After a full quota was refused, how long the owner's next requests are refused without another
#: look at their jobs: a job that finishes meanwhile frees its slot this much later at most.
QUOTA_RECHECK_S = 1.0

# Shared Lua: the clock, and one GCRA step that does not write (the caller commits).
_LUA_COMMON = """
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Returns allowed (bool), remaining, wait (microseconds), the new TAT.
local function gcra(key, limit, period, now)
  -- A whole-microsecond interval, rounded up: the long-run rate never exceeds the limit.
  local interval = math.ceil(period / limit)
  local burst = interval * limit
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  if new_tat - now > burst then
    return false, 0, new_tat - burst - now, tat
  end
  return true, math.floor((burst - (new_tat - now)) / interval), 0, new_tat
end

local function commit(key, tat, now)
  -- The key lives exactly as long as it holds anything a fresh owner would not have.
  redis.call('SET', key, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
"""

# KEYS[1] the rate key. ARGV: now ('' = Redis clock), limit, period (us).
# Returns {allowed, remaining, wait_us}.
_HIT = (
    _LUA_COMMON
    + """
local now = clock(ARGV[1])
local ok, remaining, wait, tat = gcra(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), now)
if not ok then return {0, 0, wait} end
commit(KEYS[1], tat, now)
return {1, remaining, 0}
"""
)

# KEYS[1] the jobs rate key, KEYS[2] the owner's active set, KEYS[3] until when (us) a full set
# is refused without a look. ARGV: now ('' = Redis clock), rate limit (0 = none), rate period (us),
# active limit (0 = none), job id, job hash prefix, grace (us), set ttl (s), most members to
# examine, recheck (us).
# Returns {allowed, reason (0 ok, 1 rate, 2 active), remaining (-1 = no rate limit), wait_us, active}.
# A job the quota refuses does not spend the rate: the GCRA step is committed last. A job in the
# active set already was admitted by this very script, sent again after its reply was lost: allowed
# again, spending nothing (`remaining` -1: unknown). Without a quota there is no set to tell.
_ADMIT = (
    _LUA_COMMON
    + """
local now = clock(ARGV[1])
local active_limit = tonumber(ARGV[4])
-- Admitted already: the client sent the script again after a reply it lost on a dropped connection.
-- Admitted it stays, and nothing is spent twice.
if active_limit > 0 and redis.call('ZSCORE', KEYS[2], ARGV[5]) then
  return {1, 0, -1, 0, redis.call('ZCARD', KEYS[2])}
end
local rate_limit = tonumber(ARGV[2])
local remaining, tat = -1, nil
if rate_limit > 0 then
  local ok, rem, wait, next_tat = gcra(KEYS[1], rate_limit, tonumber(ARGV[3]), now)
  if not ok then return {0, 1, 0, wait, -1} end
  remaining, tat = rem, next_tat
end
local active = -1
if active_limit > 0 then
  local id = ARGV[5]
  active = redis.call('ZCARD', KEYS[2])
  if active >= active_limit then
    if now < tonumber(redis.call('GET', KEYS[3]) or 0) then return {0, 2, 0, 0, active} end
    local stale_before = now - tonumber(ARGV[7])
    local members = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[9]) - 1, 'WITHSCORES')
    for i = 1, #members, 2 do
      local rank = redis.call('HGET', ARGV[6] .. members[i], 'rank')
      if (rank and tonumber(rank) >= 2) or (not rank and tonumber(members[i + 1]) < stale_before) then
        redis.call('ZREM', KEYS[2], members[i])
        active = active - 1
      end
    end
    if active >= active_limit then
      -- Until when by the script's clock (tests pass their own); the key outlives that by a minute,
      -- so a slow caller's clock is what decides, never the key's expiry.
      local recheck = tonumber(ARGV[10])
      redis.call('SET', KEYS[3], string.format('%d', now + recheck), 'PX', math.ceil(recheck / 1000) + 60000)
      return {0, 2, 0, 0, active}
    end
  end
  redis.call('ZADD', KEYS[2], now, id)
  active = active + 1
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[8]))
end
if tat then commit(KEYS[1], tat, now) end
return {1, 0, remaining, 0, active}
"""
)

RATE_LIMITED = "rate_limited"
# KEYS[1] the owner's active set. ARGV: now ('' = Redis clock), job id, set ttl (s). The job is
# counted whatever the quota says: an admin put it back.
_HOLD = (
    _LUA_COMMON
    + """
redis.call('ZADD', KEYS[1], clock(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
)

TOO_MANY_ACTIVE_JOBS = "too_many_active_jobs"


@dataclass(frozen=True)
class Decision:
    """The answer to "may this owner do this now?".

    `limit`/`remaining` describe the rate limit (None when there is none); `retry_after_s` is how
    long to wait before trying again (0 when allowed); `code` says which limit refused.
    """

    allowed: bool
    code: str | None = None
    limit: int | None = None
    remaining: int | None = None
    retry_after_s: float = 0.0
    active: int | None = None

    @property
    def retry_after(self) -> int:
        """Whole seconds for a `Retry-After` header: rounded up, at least 1."""
        return max(1, math.ceil(self.retry_after_s))

    def headers(self) -> dict[str, str]:
        """`RateLimit-Limit`/`RateLimit-Remaining` (when a rate limit applies) and `Retry-After`."""
        headers: dict[str, str] = {}
        if self.limit is not None and self.remaining is not None:
            headers["RateLimit-Limit"] = str(self.limit)
            headers["RateLimit-Remaining"] = str(self.remaining)
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


ALLOWED = Decision(allowed=True)


def _now_arg(now: float | None) -> str:
    return "" if now is None else str(int(now * 1_000_000))


class Limits:
    """The rate limits and the active-jobs quota of one namespace, for owners named by token `sub`.

    `calls` is the coalescer to send the calls through, a store's `JobStore.calls` on the same
    client (one on another client is refused); by default, one of its own.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        *,
        ttl_s: int,
        grace_s: float = ADMISSION_GRACE_S,
        prune_scan: int = PRUNE_SCAN,
        calls: Coalescer | None = None,
    ) -> None:
        self.redis = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.prune_scan = prune_scan
        self._hit = client.register_script(_HIT)
        self._admit = client.register_script(_ADMIT)
        self._hold = client.register_script(_HOLD)
        if calls is not None and calls.client is not client:
            # The admission goes out in the batches and its release (`ZREM`) on `client`: on two
            # clients, one user's active jobs could be counted in one Redis and released in another.
            raise ValueError("calls must be a coalescer on the same Redis client as the limits")
        # Every request spends from a budget (see `coalesce`); `calls` lets these calls go out with
        # the job store's of the same moment, in one batch instead of two.
        self._calls = calls or Coalescer(client)

    def rate_key(self, name: str, sub: str) -> str:
        return f"{self.namespace}:rate:{name}:{owner_id(sub)}"

    def active_key(self, sub: str) -> str:
        return f"{self.namespace}:active:{owner_id(sub)}"

    def _full_key(self, sub: str) -> str:
        return f"{self.namespace}:active-full:{owner_id(sub)}"

    async def hit(
        self, name: str, sub: str, *, limit: int, period_s: float, now: float | None = None
    ) -> Decision:
        """Spend one of `limit` per `period_s` from the owner's `name` budget, if there is one left.

        A limit of 0 means unlimited. A refused hit spends nothing.
        """
        if limit <= 0:
            return ALLOWED
        allowed, remaining, wait_us = await self._calls.script(
            self._hit, [self.rate_key(name, sub)], [_now_arg(now), limit, int(period_s * 1_000_000)]
        )
        return Decision(
            allowed=bool(allowed),
            code=None if allowed else RATE_LIMITED,
            limit=limit,
            remaining=int(remaining),
            retry_after_s=int(wait_us) / 1_000_000,
        )

    async def admit_job(
        self,
        sub: str,
        job_id: str,
        *,
        rate_limit: int,
        period_s: float,
        max_active: int,
        now: float | None = None,
    ) -> Decision:
        """Admit a new job: one of `rate_limit` per `period_s`, and one of `max_active` active slots.

        Both are decided together: a job the quota refuses does not spend the rate. Admitting the
        same `job_id` twice takes one slot. A 0 limit means unlimited.
        """
        if rate_limit <= 0 and max_active <= 0:
            return ALLOWED
        allowed, reason, remaining, wait_us, active = await self._calls.script(
            self._admit,
            [self.rate_key("jobs", sub), self.active_key(sub), self._full_key(sub)],
            [
                _now_arg(now),
                max(rate_limit, 0),
                int(period_s * 1_000_000),
                max(max_active, 0),
                job_id,
                f"{self.namespace}:job:",
                int(self.grace_s * 1_000_000),
                self.ttl_s,
                self.prune_scan,
                int(QUOTA_RECHECK_S * 1_000_000),
            ],
        )
        rate = rate_limit if rate_limit > 0 else None
        if allowed:
            # `remaining` -1: a job admitted already, sent again; what is left is not known then.
            return Decision(
                allowed=True,
                limit=rate,
                remaining=int(remaining) if rate and int(remaining) >= 0 else None,
                active=int(active) if max_active > 0 else None,
            )
        if int(reason) == 1:
            return Decision(
                allowed=False,
                code=RATE_LIMITED,
                limit=rate,
                remaining=0,
                retry_after_s=int(wait_us) / 1_000_000,
            )
        return Decision(
            allowed=False,
            code=TOO_MANY_ACTIVE_JOBS,
            retry_after_s=QUOTA_RETRY_AFTER_S,
            active=int(active),
        )

    async def hold_job(self, sub: str, job_id: str, *, now: float | None = None) -> None:
        """Count a job in its owner's active jobs without asking the quota: a dead letter an admin
        replays is active again (it left the set when it failed), and the owner's next jobs see it."""
        await self._calls.script(self._hold, [self.active_key(sub)], [_now_arg(now), job_id, self.ttl_s])

    async def release_job(self, sub: str, job_id: str) -> None:
        """Give a job's active slot back (the job was withdrawn or refused after admission)."""
        await self.redis.zrem(self.active_key(sub), job_id)

    async def active_jobs(self, sub: str) -> int:
        """Members of the owner's active set (finished jobs linger until the set fills up)."""
        return int(await self.redis.zcard(self.active_key(sub)))
