"""Job records in Redis, moved only forward, with every change published for the status service.

A record is a hash `{ns}:job:{id}` with `rank` (0 pending, 1 processing, 2 terminal), `version`
(grows with every change) and `data` (the `JobRecord` JSON). Transitions run in a Lua script so
"only forward" is checked and applied atomically: a redelivered message or a second worker can
never move a finished job back, and a duplicate `succeeded` is a no-op.

A job whose source is an uploaded object also keeps a marker `{ns}:src:{key}`, written and given
the record's lifetime by the same script, so the reconciler can tell an upload in use with one
look-up and the marker never outlives the last record that needs it by more than the retention.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from imgpipe.coalesce import Coalescer
from imgpipe.models import ErrorInfo, JobRecord, JobStatus, KeySource, VariantResult, read_written, utcnow

log = logging.getLogger("imgpipe.store")

_RANK = {JobStatus.PENDING: 0, JobStatus.PROCESSING: 1, JobStatus.SUCCEEDED: 2, JobStatus.FAILED: 2}

# Shared by the scripts that write a record (_TRANSITION, _REOPEN) or renew it (_TAKEN_UP).
_LUA_RECORD = """
-- The record as it stands is this very write (its data holds its `updated_at`, to the microsecond):
-- the client sent the script again after a reply it lost on a dropped connection, and nothing
-- changed the record since. Its version, else nil.
local function already_written(key, data)
  local cur = redis.call('HMGET', key, 'version', 'data')
  if cur[2] == data then
    return tonumber(cur[1])
  end
  return nil
end
-- The record's Idempotency-Key claim (its name, noted at create) lasts as long as the record, if it
-- still holds this job: a retry with the key must find the job for as long as the job exists.
local function keep_claim(key, job_id, ttl)
  local claim = redis.call('HGET', key, 'idem')
  if not claim then return end
  local held = redis.call('GET', claim)
  if held and cjson.decode(held).job_id == job_id then
    redis.call('EXPIRE', claim, ttl)
  end
end
"""

# KEYS[1] job hash, KEYS[2] (optional) the source marker, KEYS[3] (optional) the source's deletion
# mark; ARGV: rank, data, ttl seconds, channel, create-only flag, the newest version the write may go
# over ('' for any: a newer one is a change the writer has not seen), job id (the marker's value),
# the Idempotency-Key claim a create makes last as long as the record ('' for none; a name, not a
# KEY, as the job hashes `Limits` reads: fine on one Redis; noted in the hash as `idem`, so that
# every later write keeps the claim as long as the record), and '' or `=` and the `taken_up_at` the
# write may go over (`=` alone: never taken up again; see `mark_failed`).
# Returns {1, new version} when applied, else {0, version, data} of the record as it stands (version 0
# and no data when the job does not exist), or {0, -1} for a create whose source is being deleted.
# A script sent again after its reply was lost finds its own write, and answers {1, version} again.
_TRANSITION = (
    _LUA_RECORD
    + """
local cur = redis.call('HGET', KEYS[1], 'rank')
if ARGV[5] == '1' then
  if cur then
    local mine = already_written(KEYS[1], ARGV[2])
    if mine then return {1, mine} end
    return {0, tonumber(redis.call('HGET', KEYS[1], 'version')), redis.call('HGET', KEYS[1], 'data')}
  end
  if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then
    return {0, -1}
  end
elseif not cur then
  return {0, 0, false}
elseif tonumber(cur) >= tonumber(ARGV[1])
    or (ARGV[6] ~= '' and tonumber(redis.call('HGET', KEYS[1], 'version')) > tonumber(ARGV[6]))
    or (ARGV[9] ~= '' and '=' .. (redis.call('HGET', KEYS[1], 'taken_up_at') or '') ~= ARGV[9]) then
  local mine = already_written(KEYS[1], ARGV[2])
  if mine then return {1, mine} end
  return {0, tonumber(redis.call('HGET', KEYS[1], 'version')), redis.call('HGET', KEYS[1], 'data')}
end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'rank', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
if KEYS[2] then
  redis.call('SET', KEYS[2], ARGV[7], 'EX', tonumber(ARGV[3]))
end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'idem', ARGV[8])
  redis.call('EXPIRE', ARGV[8], tonumber(ARGV[3]))
else
  keep_claim(KEYS[1], ARGV[7], tonumber(ARGV[3]))
end
redis.call('PUBLISH', ARGV[4], '{"version":' .. v .. ',"record":' .. ARGV[2] .. '}')
return {1, v}
"""
)

# The one way back: `failed` -> `pending`, for replaying a dead-lettered job. Kept apart from
# _TRANSITION so "only forward" stays the rule there. Applied only to a `failed` record still at the
# expected version (ARGV[4]), so two replays of one job reopen it once. `republished_at` (the
# reconciler's stuck-pending mark) is cleared: the reopened job gets the whole stuck-pending window.
# KEYS[1] job hash, KEYS[2] (optional) the source marker; ARGV: data, ttl seconds, channel,
# expected version, job id. Returns {applied (0/1), version, data}, the data even when applied; a
# script sent again after its reply was lost finds its own write, and answers applied again.
_REOPEN = (
    _LUA_RECORD
    + """
local cur = redis.call('HMGET', KEYS[1], 'version', 'data')
if not cur[1] then
  return {0, 0, false}
end
if cur[1] ~= ARGV[4] or cjson.decode(cur[2])['status'] ~= 'failed' then
  local mine = already_written(KEYS[1], ARGV[1])
  if mine then return {1, mine, ARGV[1]} end
  return {0, tonumber(cur[1]), cur[2]}
end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'rank', 0, 'data', ARGV[1])
redis.call('HDEL', KEYS[1], 'republished_at')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
if KEYS[2] then
  redis.call('SET', KEYS[2], ARGV[5], 'EX', tonumber(ARGV[2]))
end
keep_claim(KEYS[1], ARGV[5], tonumber(ARGV[2]))
redis.call('PUBLISH', ARGV[3], '{"version":' .. v .. ',"record":' .. ARGV[1] .. '}')
return {1, v, ARGV[1]}
"""
)


# Records a presigned upload, in one round trip (the pipeline of six commands it replaces cost the
# api ~300 µs of CPU a `POST /uploads` more). KEYS[1] the grants set, KEYS[2] (optional) the grant's
# terms hash; ARGV: upload key, its expiry (epoch s, as the set's score and in the terms), prune-below
# score, the set's expiry, the terms' expiry (both epoch s), content type, size. The set goes away by
# itself a day after the last grant expires (GT: a shorter grant never cuts the life of a longer one;
# NX: a set without an expiry gets one).
_RECORD_GRANT = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('EXPIREAT', KEYS[1], ARGV[4], 'GT')
redis.call('EXPIREAT', KEYS[1], ARGV[4], 'NX')
if KEYS[2] then
  redis.call('HSET', KEYS[2], 'content_type', ARGV[6], 'size', ARGV[7], 'expires_at', ARGV[2])
  redis.call('EXPIREAT', KEYS[2], ARGV[5])
end
return 1
"""

# Claim an Idempotency-Key: KEYS[1] the claim; ARGV: the claim's value, its life (s). Nothing (nil)
# when it is ours now, else the value that holds it, read in the same step, so the holder cannot
# expire between the two. A claim holding exactly our value is ours too: the Redis client re-sends
# a batch whose connection dropped, replies already read or not, and the second run must not take
# the first run's claim for someone else's (the key would answer 409 until it expired).
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return false
end
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  return false
end
return held
"""


# KEYS[1] a job's record, KEYS[2] (optional) its Idempotency-Key claim; ARGV[1] the job id. Deletes the
# record, and the claim if it holds this job, unless a replay has answered for the job (`_ANSWER`), or
# the record is no longer as it was created (version 1, `pending`: a withdrawal tried again late
# finds it published by the reconciler and taken up, or even failed and replayed): then nothing, and
# 0. One step, so that a job is either withdrawn or answered for, never both.
_WITHDRAW = """
local cur = redis.call('HMGET', KEYS[1], 'rank', 'version')
if cur[1] and (cur[1] ~= '0' or cur[2] ~= '1') then
  return 0
end
if KEYS[2] then
  local held = redis.call('GET', KEYS[2])
  if held then
    local claim = cjson.decode(held)
    if claim.job_id == ARGV[1] then
      if claim.answered then return 0 end
      redis.call('DEL', KEYS[2])
    end
  end
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1] an Idempotency-Key claim; ARGV[1] a job id. Deletes the claim if it holds that job.
_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held and cjson.decode(held).job_id == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] an Idempotency-Key claim, KEYS[2] its job's record; ARGV[1] the job id. Notes on the claim
# that a replay answered 202 for the job, if the claim still holds it and its record still exists.
_ANSWER = """
local held = redis.call('GET', KEYS[1])
if not held or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local claim = cjson.decode(held)
if claim.job_id ~= ARGV[1] then return 0 end
if not (claim.accepted or claim.answered) then
  claim.answered = true
  redis.call('SET', KEYS[1], cjson.encode(claim), 'KEEPTTL')
end
return 1
"""


_REDIS_OUTAGES = (
    RedisConnectionError,
    RedisTimeoutError,
    OutOfMemoryError,
    ReadOnlyError,
    MasterDownError,
    TryAgainError,
)


def redis_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the job store cannot be used right now, as opposed to a bug.

    Out of reach (connection refused or lost, a timeout, still loading its data), and also up but
    refusing writes for a while: full under `noeviction` (OOM), a replica after a failover
    (READONLY), its disk full (MISCONF), a script running (BUSY). All are outages to wait out:
    a 503 to a client, a write a worker retries.
    """
    if isinstance(exc, _REDIS_OUTAGES):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(("MISCONF", "BUSY "))


def owner_id(sub: str) -> str:
    """A stable, path-safe id for a token subject (subjects may hold any character)."""
    return hashlib.sha256(sub.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Transition:
    """What a transition did: `applied` is False when the job was already as far or further."""

    applied: bool
    record: JobRecord | None


#: How long an Idempotency-Key claim holds before its job's record is written: far longer than a
#: request can take from its claim to its record (its S3 look-up included), much shorter than a retention.
CLAIM_HOLD_S = 600


#: Seconds of silence on the change subscription before it is PINGed, and then without an answer
#: before it counts as broken (`JobStore.subscribe`): a dead connection is noticed within twice this.
#: The same 5 s the clients wait for any other reply (`socket_timeout`, resources.py), so a Redis
#: that cannot answer a PING in it is out of reach for the subscription as for every command; and
#: short enough that a status process stops answering from what it knew, and /readyz says so, within
#: seconds. One PING per quiet 5 s per status process costs Redis nothing.
SUBSCRIPTION_PING_S = 5.0
# Not redis-py's own health-check payload: the answer to that one is swallowed by the client.
_SUBSCRIPTION_PING = "imgpipe-subscription-ping"


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""


class SourceDeleted(Exception):
    """The job's uploaded source is being deleted as an orphan (`JobStore.mark_deleting`)."""


# A `processing` job taken up again (a redelivery, a retry out of its back-off queue) keeps its
# record as it is, but notes when: the reconciler times "no progress" from the later of that and the
# record's `updated_at`, so a job that waited its turn again is not taken for stuck. The record, its
# source marker and its Idempotency-Key claim live the retention from then, as from a write: their
# lives counted from the first `processing` write, and a job retried past the retention expired
# between two attempts (its next one then found no record, and dropped the message). Only on a
# processing record (rank 1): never a key written anew. KEYS[1] job hash, KEYS[2] (optional) the
# source marker; ARGV: now (epoch s), ttl seconds, job id.
_TAKEN_UP = (
    _LUA_RECORD
    + """
if redis.call('HGET', KEYS[1], 'rank') == '1' then
  local ttl = tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'taken_up_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ttl)
  if KEYS[2] then
    redis.call('SET', KEYS[2], ARGV[3], 'EX', ttl)
  end
  keep_claim(KEYS[1], ARGV[3], ttl)
  return 1
end
return 0
"""
)

# KEYS[1] the grants set, then for each upload: its source marker and its deletion mark; ARGV: now
# (epoch s), the marks' life (ms), then the uploads' keys. Returns, for each, 1 when it was still
# unreferenced and is now marked, else 0. One step, so a job's create (which writes the marker and
# refuses a marked source, also in one step) lands wholly before or wholly after it.
_MARK_DELETING = """
local now = tonumber(ARGV[1])
local marked = {}
for i = 3, #ARGV do
  local n = i - 2
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if redis.call('EXISTS', KEYS[2 * n]) == 1 or (expiry and tonumber(expiry) > now) then
    marked[n] = 0
  else
    redis.call('SET', KEYS[2 * n + 1], '1', 'PX', ARGV[2])
    marked[n] = 1
  end
end
return marked
"""


@dataclass(frozen=True)
class Claim:
    """Who holds an Idempotency-Key: the job it was claimed for, and whether that job is known to be
    in the broker (`accept_idempotency`); until then the first request may still withdraw it."""

    job_id: str
    accepted: bool


@dataclass(frozen=True)
class Grant:
    """What a presigned upload allowed: its key, content type, declared size and expiry (epoch s)."""

    key: str
    content_type: str
    size: int
    expires_at: float


def _claim(job_id: str, fingerprint: str, also: Sequence[str]) -> dict[str, object]:
    """An idempotency claim as stored: releases before 2026-12-07 read `job_id` and `fingerprint`."""
    return {"job_id": job_id, "fingerprint": fingerprint, **({"also": list(also)} if also else {})}


def _parse(version: int, data: bytes | str | None) -> JobRecord | None:
    if not data:
        return None
    record = read_written(JobRecord, data)
    record.version = int(version)
    return record


class JobStore:
    """Reads and writes job records of one namespace."""

    def __init__(self, client: aioredis.Redis, namespace: str, *, retention: timedelta) -> None:
        self.redis = client
        self.namespace = namespace
        self.retention_s = int(retention.total_seconds())
        self.channel = f"{namespace}:events"
        self._script = client.register_script(_TRANSITION)
        self._reopen_script = client.register_script(_REOPEN)
        self._grant_script = client.register_script(_RECORD_GRANT)
        self._claim_script = client.register_script(_CLAIM)
        self._withdraw_script = client.register_script(_WITHDRAW)
        self._answer_script = client.register_script(_ANSWER)
        self._release_script = client.register_script(_RELEASE)
        self._mark_deleting = client.register_script(_MARK_DELETING)
        self._taken_up_script = client.register_script(_TAKEN_UP)
        #: The calls every job makes go out with the other requests' calls of the moment (`coalesce`).
        self.calls = Coalescer(client)

    def job_key(self, job_id: str) -> str:
        return f"{self.namespace}:job:{job_id}"

    @property
    def job_pattern(self) -> str:
        """A SCAN pattern for every job record of this namespace."""
        return f"{self.namespace}:job:*"

    def source_marker(self, key: str) -> str:
        """The key that says "a job record uses this uploaded object as its source"."""
        return f"{self.namespace}:src:{key}"

    def deleting_mark(self, key: str) -> str:
        """The key that says "the reconciler is deleting this uploaded object": no new job may use it."""
        return f"{self.namespace}:deleting:{key}"

    async def mark_deleting(self, keys: Sequence[str], *, now: float, life_s: float) -> list[bool]:
        """Mark for deletion each uploaded object of `keys` that no job and no live grant references,
        at once: from then on, `create` refuses a job with that source. Whether each one was marked.

        The mark outlives the delete by far (`life_s`): an api that looked the object up just before
        it went may write its record long after.
        """
        if not keys:
            return []
        redis_keys = [self.grants_key]
        for key in keys:
            redis_keys += [self.source_marker(key), self.deleting_mark(key)]
        marked = await self._mark_deleting(keys=redis_keys, args=[repr(now), int(life_s * 1000), *keys])
        return [bool(flag) for flag in marked]

    async def unmark_deleting(self, keys: Sequence[str]) -> None:
        """Lift the marks of objects that were not deleted after all (S3 refused): jobs may use them again."""
        if keys:
            await self.redis.delete(*(self.deleting_mark(key) for key in keys))

    async def _apply(
        self,
        record: JobRecord,
        *,
        create: bool = False,
        seen_version: int | None = None,
        claim: tuple[str, str] | None = None,
        taken_up: str | None = None,
    ) -> Transition:
        data = record.model_dump_json(exclude={"version"})
        keys = [self.job_key(record.id)]
        if isinstance(record.source, KeySource):
            keys.append(self.source_marker(record.source.key))
            if create:
                keys.append(self.deleting_mark(record.source.key))
        applied, version, *stored = await self.calls.script(
            self._script,
            keys,
            [
                _RANK[record.status],
                data,
                self.retention_s,
                self.channel,
                "1" if create else "0",
                "" if seen_version is None else str(seen_version),
                record.id,
                "" if claim is None else self._idem_key(*claim),
                "" if taken_up is None else f"={taken_up}",
            ],
        )
        if applied:
            # The record as written is the one in hand: no need to send it back and parse it again.
            return Transition(True, record.model_copy(update={"version": int(version)}))
        if version == -1:
            raise SourceDeleted(record.source.key)  # type: ignore[union-attr]  # only a KeySource
        return Transition(False, _parse(version, stored[0]))

    async def create(self, record: JobRecord, *, claim: tuple[str, str] | None = None) -> Transition:
        """Store a new `pending` record; not applied (returns the existing one) if the id exists.

        `claim` is the (owner, Idempotency-Key) claimed for it: written with the record, it is kept
        as long as the record (see `claim_idempotency`). Raises `SourceDeleted` when its uploaded
        source is being deleted as an orphan.
        """
        return await self._apply(record, create=True, claim=claim)

    async def get(self, job_id: str) -> JobRecord | None:
        version, data = await self.calls.command("HMGET", self.job_key(job_id), "version", "data")
        return _parse(int(version or 0), data)

    async def delete(self, job_id: str) -> None:
        await self.redis.delete(self.job_key(job_id))

    async def mark_processing(self, job_id: str) -> Transition:
        """Take the job up: `pending` -> `processing`, from the record as it stands.

        Not applied, with the record, when it is already processing (a redelivery or a retry: when is
        noted, as `taken_up_at`), finished or gone. The write is from the record just read, and never
        over a newer version of it: a replay between the read and the write is not written over.
        """
        for _ in range(3):
            current = await self.get(job_id)
            if current is None or current.status.terminal:
                return Transition(False, current)
            if current.status is JobStatus.PROCESSING:
                keys = [self.job_key(job_id)]
                if isinstance(current.source, KeySource):
                    keys.append(self.source_marker(current.source.key))
                await self.calls.script(
                    self._taken_up_script, keys, [repr(time.time()), self.retention_s, job_id]
                )
                return Transition(False, current)
            record = current.model_copy(update={"status": JobStatus.PROCESSING, "updated_at": utcnow()})
            taken = await self._apply(record, seen_version=current.version)
            if taken.applied or taken.record is None or taken.record.status is not JobStatus.PENDING:
                return taken
            # Still pending, at another version (failed and replayed meanwhile): read it again.
        return taken

    async def mark_succeeded(self, current: JobRecord, variants: list[VariantResult]) -> Transition:
        """Move the job to `succeeded`, unless a version newer than `current` (the worker's
        `processing` record) was written since: a worker that held a job across its failure and
        replay must not finish the replayed job with its old copy's result. Not applied then, with
        the record as it stands. An older version (a Redis failover that lost the last writes) is
        written over: the job is done."""
        record = current.model_copy(
            update={
                "status": JobStatus.SUCCEEDED,
                "variants": variants,
                "error": None,
                "updated_at": utcnow(),
            }
        )
        return await self._apply(record, seen_version=current.version)

    async def mark_failed(
        self, current: JobRecord, code: str, message: str, *, taken_up: str | None = None
    ) -> Transition:
        """Move the job to `failed`, unless a version newer than `current` was written since: the
        reconciler must not fail a job a worker has just taken up, nor a worker that held a job
        across its failure and replay fail the replayed job. Not applied then, with the record.

        `taken_up`: the `taken_up_at` read with a `processing` `current` ('' for none). Not applied
        either if the job was taken up again since: a redelivery or a retry changes only that.
        """
        record = current.model_copy(
            update={
                "status": JobStatus.FAILED,
                "error": ErrorInfo(code=code, message=message[:1000]),
                "updated_at": utcnow(),
            }
        )
        return await self._apply(record, seen_version=current.version, taken_up=taken_up)

    async def reopen(self, current: JobRecord) -> Transition:
        """Move a `failed` job back to `pending` (error cleared, `replays` counted), to replay it.

        Applied only if the stored record is still `failed` at `current.version`; otherwise the
        result is not applied and carries the stored record (None when it expired).
        """
        record = current.model_copy(
            update={
                "status": JobStatus.PENDING,
                "error": None,
                "replays": current.replays + 1,
                "updated_at": utcnow(),
            }
        )
        keys = [self.job_key(record.id)]
        if isinstance(record.source, KeySource):
            keys.append(self.source_marker(record.source.key))
        applied, version, stored = await self._reopen_script(
            keys=keys,
            args=[
                record.model_dump_json(exclude={"version"}),
                self.retention_s,
                self.channel,
                str(current.version),
                record.id,
            ],
        )
        return Transition(bool(applied), _parse(version, stored))

    # Idempotency keys: (owner, key) -> job id and a fingerprint of the request that created it.

    def _idem_key(self, owner: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"{self.namespace}:idem:{owner_id(owner)}:{digest}"

    async def claim_idempotency(
        self, owner: str, key: str, job_id: str, fingerprint: str, *, also: Sequence[str] = ()
    ) -> Claim | None:
        """Claim `key` for `job_id`; returns None when claimed, else the claim that holds it.

        The claim holds for `CLAIM_HOLD_S` only, until `create` writes its job's record and makes it
        last as long: a request that dies in between (a crash) leaves the key taken for minutes,
        not for the whole retention. Raises `IdempotencyConflict` when the key holds a different
        request: one none of whose fingerprints is `fingerprint` or one of `also` (other ways of
        fingerprinting the same request, of releases before or after; `fingerprint` is the one
        every release reads).
        """
        value = json.dumps(_claim(job_id, fingerprint, also))
        existing = await self.calls.script(
            self._claim_script, [self._idem_key(owner, key)], [value, min(CLAIM_HOLD_S, self.retention_s)]
        )
        if existing is None:
            return None
        held = json.loads(existing)
        if {held["fingerprint"], *held.get("also", ())}.isdisjoint({fingerprint, *also}):
            raise IdempotencyConflict(key)
        return Claim(str(held["job_id"]), bool(held.get("accepted") or held.get("answered")))

    async def accept_idempotency(
        self, owner: str, key: str, job_id: str, fingerprint: str, *, also: Sequence[str] = ()
    ) -> None:
        """Note on the claim of `key` that its job is in the broker: a replay can answer for it at once.

        Only an existing claim is rewritten, and it keeps its expiry.
        """
        value = json.dumps(_claim(job_id, fingerprint, also) | {"accepted": True})
        await self.calls.command("SET", self._idem_key(owner, key), value, "XX", "KEEPTTL")

    async def release_idempotency(self, owner: str, key: str, job_id: str) -> None:
        """Free `key` for another request, if its claim still holds `job_id`.

        Only then: once a withdrawal has let go of the claim, a retry may have claimed the key for
        its own job, and deleting that claim would let a third request make the job again.
        """
        await self.calls.script(self._release_script, [self._idem_key(owner, key)], [job_id])

    async def answer_replay(self, owner: str, key: str, job_id: str) -> bool:
        """Note that a replay of `key` answers for `job_id`, which is not known to be in the broker.

        False when that cannot be: the job has been withdrawn, or its claim released. Once noted,
        `withdraw` leaves the job alone (the reconciler publishes a `pending` job nobody did).
        """
        keys = [self._idem_key(owner, key), self.job_key(job_id)]
        return bool(await self.calls.script(self._answer_script, keys, [job_id]))

    async def withdraw(self, job_id: str, *, claim: tuple[str, str] | None = None) -> bool:
        """Take back a job that did not reach the broker: delete its record, and release `claim`
        (owner, Idempotency-Key) if it holds the job. False, changing nothing, when a replay has
        answered for the job (`answer_replay`): it stays, to be published by the reconciler; or when
        its record is no longer as it was created (published and taken up meanwhile).
        """
        keys = [self.job_key(job_id)] + ([self._idem_key(*claim)] if claim else [])
        return bool(await self.calls.script(self._withdraw_script, keys, [job_id]))

    # Upload grants: presigned uploads not yet expired count as referenced (the reconciler reads them).

    @property
    def grants_key(self) -> str:
        return f"{self.namespace}:grants"

    def grant_key(self, key: str) -> str:
        """The hash holding what the grant for upload `key` allowed (see `grant`)."""
        return f"{self.namespace}:grant:{key}"

    async def record_grant(
        self, key: str, expires_at: float, *, content_type: str | None = None, size: int | None = None
    ) -> None:
        """Note a presigned upload; with `content_type` and `size`, also what it allowed.

        What it allowed is kept for the job retention after the grant expires, so `POST /jobs` can
        compare the stored object with it (`grant`).
        """
        keys = [self.grants_key]
        if content_type is not None and size is not None:
            keys.append(self.grant_key(key))
        await self.calls.script(
            self._grant_script,
            keys,
            [
                key,
                repr(expires_at),
                repr(expires_at - 7 * 24 * 3600),
                int(max(expires_at, time.time())) + 24 * 3600,
                int(expires_at) + self.retention_s,
                content_type or "",
                size or 0,
            ],
        )

    async def grant(self, key: str) -> Grant | None:
        """What the grant for upload `key` allowed; None when none was recorded (or it is gone)."""
        content_type, size, expires_at = await self.calls.command(
            "HMGET", self.grant_key(key), "content_type", "size", "expires_at"
        )
        if content_type is None or size is None or expires_at is None:
            return None
        if isinstance(content_type, bytes):
            content_type = content_type.decode()
        return Grant(key=key, content_type=content_type, size=int(size), expires_at=float(expires_at))

    async def prune_grants(self, now: float) -> int:
        """Drop grants that have expired; returns how many."""
        return int(await self.redis.zremrangebyscore(self.grants_key, "-inf", now))

    @asynccontextmanager
    async def subscribe(
        self,
        *,
        unreadable: Callable[[str], None] | None = None,
        ping_s: float = SUBSCRIPTION_PING_S,
    ) -> AsyncIterator[AsyncIterator[tuple[int, JobRecord]]]:
        """Subscribe to every change in this namespace; yields an iterator of `(version, record)`.

        The subscription is live when the context is entered (Redis has confirmed it), so a caller
        that registers its interest first and then reads the current state misses nothing in between.

        The iterator raises `redis.ConnectionError` when the subscription breaks, even when the client
        has restored it by itself: what was published in between is lost, so the caller must read
        again whatever it follows. It also raises it when the connection goes silent: after `ping_s`
        with nothing from Redis it sends a PING on the subscription, and when nothing (no change, no
        answer) has come `ping_s` later, the subscription is taken for broken.

        A change this version cannot read (another version's record, a hand edit) is logged and
        skipped, and `unreadable` is told its job id when the message names one: what the caller
        knew of that job is out of date, and reading the job again would fail the same way.
        """
        pubsub = self.redis.pubsub()  # subscribe confirmations kept: `_changes` needs to see them
        try:
            await pubsub.subscribe(self.channel)
            # Sending SUBSCRIBE is not enough: a read on another connection could still be served
            # before it. And `_changes` takes every confirmation after this one for a reconnect.
            confirmed = await pubsub.get_message(timeout=10.0)
            if confirmed is None or confirmed["type"] != "subscribe":
                raise aioredis.ConnectionError("Redis did not confirm the subscription")
            yield self._changes(pubsub, unreadable, ping_s)
        finally:
            await pubsub.aclose()

    @staticmethod
    async def _changes(
        pubsub: PubSub, unreadable: Callable[[str], None] | None = None, ping_s: float = SUBSCRIPTION_PING_S
    ) -> AsyncIterator[tuple[int, JobRecord]]:
        loop = asyncio.get_running_loop()
        heard = loop.time()  # when Redis last sent anything on this connection
        pinged: float | None = None  # when our unanswered PING went out
        while True:
            if pinged is None and loop.time() >= heard + ping_s:
                # redis-py's own health check only sends a PING and drops its answer; it never
                # notices one that does not come. A half-open connection (Redis killed without a
                # FIN, a partition, a proxy that stopped forwarding) reads as a quiet channel for
                # ever, and the caller would go on trusting what it knows. Our PING carries a
                # payload of its own, so redis-py hands its answer to us instead of dropping it.
                await pubsub.ping(_SUBSCRIPTION_PING)
                pinged = loop.time()
            deadline = (pinged + ping_s) if pinged is not None else (heard + ping_s)
            # Never a zero wait: what the socket has already received must be read before the
            # deadline is judged (the caller may have spent a while on the previous change).
            message = await pubsub.get_message(timeout=max(deadline - loop.time(), 0.05))
            if message is None:
                if pinged is not None and loop.time() >= pinged + ping_s:
                    raise aioredis.ConnectionError(
                        f"no answer on the subscription for {ping_s:g}s after a PING"
                    )
                continue
            # Anything at all from Redis (a change, the answer) shows the connection carries it.
            heard, pinged = loop.time(), None
            if message["type"] == "subscribe":
                # The connection dropped (killed, evicted for its output buffer, reset) and redis-py,
                # retrying the read on a new one, subscribed again by itself: this confirmation is
                # the only trace of it. Changes published in the gap are lost, so this is a break.
                raise aioredis.ConnectionError("the subscription was interrupted and restored")
            if message["type"] != "message":
                continue
            payload: Any = None
            try:
                payload = json.loads(message["data"])
                record = read_written(JobRecord, payload["record"])
                record.version = int(payload["version"])
            except (ValueError, KeyError, TypeError) as exc:  # ValidationError is a ValueError
                # One message this version cannot read (a newer version's status during a rolling
                # upgrade, a hand edit) is no break of the subscription: taken for one, it made every
                # subscriber resubscribe and re-read, for ever if the record stays unreadable.
                job_id = _job_id_of(payload)
                log.warning(
                    "job change not readable; skipped: %s", type(exc).__name__, extra={"job_id": job_id}
                )
                if job_id is not None and unreadable is not None:
                    unreadable(job_id)
                continue
            yield record.version, record


def _job_id_of(payload: object) -> str | None:
    """The job id an unreadable change names, if it names one (to tell who follows that job)."""
    record = payload.get("record") if isinstance(payload, dict) else None
    job_id = record.get("id") if isinstance(record, dict) else None
    return job_id if isinstance(job_id, str) else None
