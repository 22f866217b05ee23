"""One reconciliation: stuck jobs moved on, then the bucket compared with Redis and orphans deleted.

What is referenced (never deleted):

- `variants/{owner}/{job_id}/…` while the job record `{ns}:job:{job_id}` exists;
- `uploads/{owner}/{random}` while its presigned grant has not expired (`{ns}:grants`) or while a
  job record uses it as its source (the marker `{ns}:src:{key}`, which lives as long as the record).

Anything else under those prefixes is unreferenced: an orphan once it is older than the grace
period (by the listing's LastModified), kept otherwise. Keys outside `uploads/` and `variants/`, or
of a shape we never write, are not ours and are never touched.

Object keys carry no namespace, so a bucket is one namespace's: on a bucket two namespaces share,
each would take the other's objects for orphans. The first real run writes the namespace into
`NAMESPACE_MARKER` (only if no one has: a conditional PUT), and every run refuses a bucket that
marker gives to another namespace.

The bucket is listed a page (1000 keys) at a time and each page is checked with one Redis
pipeline, so memory stays flat and Redis sees two round trips per page, not one per object. Each
page is checked after it is listed, and its orphans are checked once more right before the
DeleteObjects call: an object that became referenced in between (a job submitted a moment ago)
is kept. That last check of an upload also marks it as being deleted, in the same Redis step
(`JobStore.mark_deleting`), and a job's create refuses a marked source: a job submitted after the
check cannot slip in before the delete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imgpipe.broker import Publisher, Waiting
from imgpipe.models import JobMessage, JobRecord, KeySource, read_written
from imgpipe.storage import UPLOAD_PREFIX, VARIANT_PREFIX, ObjectInfo, ObjectNotFound, Storage
from imgpipe.store import JobStore
from imgpipe.telemetry import (
    JOB_LATENCY,
    JOBS_FAILED,
    RECONCILE_BYTES_FREED,
    RECONCILE_DELETE_ERRORS,
    RECONCILE_DELETED,
    RECONCILE_KEPT_YOUNG,
    RECONCILE_LAST_SUCCESS,
    RECONCILE_RUNS,
    RECONCILE_SCANNED,
    RECONCILE_SECONDS,
    STUCK_JOBS,
)
from pydantic import ValidationError

from imgpipe_reconciler.lock import LockBusy, RunLock

log = logging.getLogger("imgpipe.reconciler")

#: Job records read per SCAN step (and per Redis pipeline).
_SCAN_BATCH = 1000
#: The error code a job gets when it never reached a terminal state in time.
TIMEOUT_CODE = "timeout"
#: The object naming the namespace the bucket belongs to (outside the prefixes a run judges).
NAMESPACE_MARKER = "imgpipe-namespace"
#: How long an upload marked for deletion refuses new jobs: far longer than a DeleteObjects call, and
#: than an api's gap between looking the object up and writing the job that uses it.
DELETING_MARK_S = 600.0


class BucketTaken(Exception):
    """The bucket belongs to another namespace: a run there would delete that namespace's objects."""


# Set `republished_at` (to ARGV[2], the run's stamp) only on a pending record nobody changed since
# it was read, once. A mark that is already this stamp is this run's own claim, whose answer was
# lost (redis-py sends a command again after a dropped connection): claimed.
_CLAIM_REPUBLISH = """
local mark = redis.call('HGET', KEYS[1], 'republished_at')
if mark == ARGV[2] then
  return 1
end
if not mark and redis.call('HGET', KEYS[1], 'rank') == '0'
   and redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'republished_at', ARGV[2])
  return 1
end
return 0
"""

# Take back this run's mark (ARGV[1], its stamp), and no other run's.
_UNCLAIM_REPUBLISH = """
if redis.call('HGET', KEYS[1], 'republished_at') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'republished_at')
  return 1
end
return 0
"""


@dataclass
class Summary:
    """What a run saw and did. The first eight fields are the documented summary."""

    scanned: int = 0
    referenced: int = 0
    orphans: int = 0
    deleted: int = 0
    kept_young: int = 0
    bytes_freed: int = 0
    dry_run: bool = False
    duration_s: float = 0.0
    #: Keys outside `uploads/` and `variants/` (or of a shape we never write): left alone.
    skipped_foreign: int = 0
    #: Bytes the orphans hold (what a real run frees; reported by dry runs too).
    orphan_bytes: int = 0
    #: Orphans S3 refused to delete (per-key errors); tried again next run.
    delete_errors: int = 0
    stuck_republished: int = 0
    stuck_failed: int = 0
    #: Jobs past their stuck window left alone, as jobs wait for the workers (a backlog, retries,
    #: no worker consuming) or the broker could not say: they may be waiting their turn (`_Judge`).
    stuck_left_waiting: int = 0
    #: Source markers written for job records that had none (records older than the markers).
    markers_restored: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Policy:
    grace_s: float
    stuck_pending_s: float
    stuck_processing_s: float


@dataclass(frozen=True)
class _Judge:
    """Which stuck jobs a run may judge, from what waits for the workers.

    A job is stuck when nothing will take it further: its message is lost. But a message that waits
    in the jobs queue (a backlog, or no worker consuming) or in a retry queue is not lost, and a
    job's record says nothing of where its message is. So jobs are judged only when nothing waits:
    workers consume, and every message is with one of them, each of which marks its job at once
    (`processing`, or for one taken up again `taken_up_at`). A `pending` job is judged once the jobs
    queue is empty; a `processing` one once the retry queues are too.

    On a queue that never drains, a lost message would wait for that until the job's record
    expired: while workers consume, a `pending` job past `_BACKLOG_REPUBLISH_FACTOR` times its
    window is sent again anyway (`consuming`), once. A duplicate is harmless; it is only failed
    once nothing waits.
    """

    pending: bool
    processing: bool
    why: str = ""
    consuming: bool = False

    @classmethod
    def of(cls, waiting: Waiting | None) -> _Judge:
        if waiting is None:
            return cls(False, False, "the broker could not say what waits for the workers")
        if not waiting.consumers:
            return cls(False, False, "no worker consumes the jobs queue")
        if waiting.ready:
            return cls(False, False, f"{waiting.ready} job messages wait in the jobs queue", consuming=True)
        if waiting.retrying:
            why = f"{waiting.retrying} job messages wait out a retry's back-off"
            return cls(True, False, why, consuming=True)
        return cls(True, True, consuming=True)


# How many stuck windows a `pending` job may wait in a backlog before it is sent again anyway (the
# queue may never drain): past an hour at the default window, a backlog that long is rarer than a
# lost message, and the duplicate of a job still queued costs its worker one read of the record.
_BACKLOG_REPUBLISH_FACTOR = 4


def _classify(key: str) -> str | None:
    """`upload`, `variant`, or None for a key that is not ours."""
    parts = key.split("/")
    if key.startswith(UPLOAD_PREFIX) and len(parts) == 3 and all(parts):
        return "upload"
    if key.startswith(VARIANT_PREFIX) and len(parts) == 4 and all(parts):
        return "variant"
    return None


class Reconciler:
    """Runs reconciliations of one namespace and bucket."""

    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        publisher: Publisher,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._storage = storage
        self._publisher = publisher
        self.policy = policy
        self._clock = clock
        self._claim_republish = store.redis.register_script(_CLAIM_REPUBLISH)
        self._unclaim_republish = store.redis.register_script(_UNCLAIM_REPUBLISH)

    async def run(self, *, dry_run: bool, progress: Callable[[Summary], None] | None = None) -> Summary:
        """One reconciliation. A dry run deletes nothing and changes no job, and reports the same counts."""
        started = time.monotonic()
        summary = Summary(dry_run=dry_run)
        # Jobs first: a record missing its source marker gets it back before the bucket is judged.
        # Stuck jobs are this namespace's alone, so they are settled even on a bucket it cannot claim.
        await self._jobs(summary, dry_run)
        await self._claim_bucket(dry_run)
        if not dry_run:
            await self._store.prune_grants(self._clock())
        async for page in self._storage.iter_pages():
            await self._page(page, summary, dry_run)
            summary.duration_s = round(time.monotonic() - started, 3)
            if progress is not None:
                progress(summary)
        summary.duration_s = round(time.monotonic() - started, 3)
        return summary

    # The bucket.

    async def _claim_bucket(self, dry_run: bool) -> None:
        """Raise `BucketTaken` if the bucket is another namespace's; a real run claims a free one."""
        namespace = self._store.namespace
        try:
            marker = await self._storage.get(NAMESPACE_MARKER, max_bytes=1024)
        except ObjectNotFound:
            if dry_run:
                return
            # Conditional: two namespaces' first runs at once must not both take the bucket.
            if await self._storage.put_if_absent(
                NAMESPACE_MARKER, namespace.encode(), "text/plain; charset=utf-8"
            ):
                return
            marker = await self._storage.get(NAMESPACE_MARKER, max_bytes=1024)
        owner = marker.decode("utf-8", "replace")
        if owner != namespace:
            raise BucketTaken(
                f"bucket {self._storage.bucket!r} belongs to namespace {owner!r} (its {NAMESPACE_MARKER!r} "
                f"object), not to {namespace!r}: each namespace needs a bucket of its own"
            )

    async def _referenced(self, objects: Sequence[ObjectInfo]) -> list[bool]:
        """Whether each object is referenced now: one pipeline, one round trip."""
        now = self._clock()
        uploads = [o.key for o in objects if _classify(o.key) == "upload"]
        async with self._store.redis.pipeline(transaction=False) as pipe:
            for obj in objects:
                if _classify(obj.key) == "upload":
                    pipe.exists(self._store.source_marker(obj.key))
                else:
                    pipe.exists(self._store.job_key(obj.key.split("/")[2]))
            if uploads:
                pipe.zmscore(self._store.grants_key, uploads)
            answers = await pipe.execute()
        expiries = dict(zip(uploads, answers[len(objects)] if uploads else (), strict=True))
        result = []
        for obj, exists in zip(objects, answers, strict=False):
            expiry = expiries.get(obj.key)
            result.append(bool(exists) or (expiry is not None and float(expiry) > now))
        return result

    async def _page(self, page: list[ObjectInfo], summary: Summary, dry_run: bool) -> None:
        page = [obj for obj in page if obj.key != NAMESPACE_MARKER]  # the run's own, not counted
        summary.scanned += len(page)
        ours = []
        for obj in page:
            if _classify(obj.key) is None:
                summary.skipped_foreign += 1
            else:
                ours.append(obj)
        if not ours:
            return
        candidates = []
        cutoff = self._clock() - self.policy.grace_s
        for obj, referenced in zip(ours, await self._referenced(ours), strict=True):
            if referenced:
                summary.referenced += 1
            elif obj.last_modified.timestamp() > cutoff:
                summary.kept_young += 1
            else:
                candidates.append(obj)
        if not candidates:
            return
        orphans = await self._still_orphans(candidates, summary, dry_run)
        summary.orphans += len(orphans)
        summary.orphan_bytes += sum(o.size for o in orphans)
        if dry_run or not orphans:
            return
        # A call that fails (a timeout, the run cancelled) may still delete: boto3's thread goes on,
        # and S3 may have acted before the answer was lost. Its marks stay, for their 10 minutes.
        deleted = set(await self._storage.delete_many([o.key for o in orphans]))
        # What S3 answered it did not delete is still there: jobs may use it again at once.
        kept = [o.key for o in orphans if o.key not in deleted and _classify(o.key) == "upload"]
        if kept:
            await self._store.unmark_deleting(kept)
        freed = sum(o.size for o in orphans if o.key in deleted)
        summary.deleted += len(deleted)
        summary.bytes_freed += freed
        refused = len(orphans) - len(deleted)
        summary.delete_errors += refused
        RECONCILE_DELETED.inc(len(deleted))
        RECONCILE_BYTES_FREED.inc(freed)
        if refused:
            RECONCILE_DELETE_ERRORS.inc(refused)
            log.warning("S3 refused some deletes", extra={"refused": refused})

    async def _still_orphans(
        self, candidates: list[ObjectInfo], summary: Summary, dry_run: bool
    ) -> list[ObjectInfo]:
        """The candidates still unreferenced right before the delete (a job may have been submitted
        for one since the page was checked), the uploads among them marked so none can be from now on.
        """
        if dry_run:
            referenced = await self._referenced(candidates)
        else:
            uploads = [o for o in candidates if _classify(o.key) == "upload"]
            # A job's create and this mark are each one step in Redis: a create that comes first
            # wrote the marker, and is kept; one that comes after is refused (the api's 422).
            marked = await self._store.mark_deleting(
                [o.key for o in uploads], now=self._clock(), life_s=DELETING_MARK_S
            )
            by_key = {o.key: not flag for o, flag in zip(uploads, marked, strict=True)}
            # A variant's job id is never made again, so only a record that exists now can hold it.
            variants = [o for o in candidates if o.key not in by_key]
            by_key.update(
                (o.key, flag) for o, flag in zip(variants, await self._referenced(variants), strict=True)
            )
            referenced = [by_key[o.key] for o in candidates]
        orphans = []
        for obj, held in zip(candidates, referenced, strict=True):
            if held:
                summary.referenced += 1
            else:
                orphans.append(obj)
        return orphans

    # Jobs.

    async def _jobs(self, summary: Summary, dry_run: bool) -> None:
        try:
            waiting: Waiting | None = await self._publisher.waiting()
        except Exception as exc:
            log.warning("could not read what waits for the workers: %s", type(exc).__name__)
            waiting = None
        judge = _Judge.of(waiting)
        redis = self._store.redis
        batch: list[str] = []
        async for key in redis.scan_iter(match=self._store.job_pattern, count=_SCAN_BATCH):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) >= _SCAN_BATCH:
                await self._job_batch(batch, judge, summary, dry_run)
                batch = []
        if batch:
            await self._job_batch(batch, judge, summary, dry_run)
        if summary.stuck_left_waiting:
            log.warning(
                "jobs past their stuck window left alone: %s",
                judge.why,
                extra={"jobs": summary.stuck_left_waiting},
            )

    async def _job_batch(self, keys: list[str], judge: _Judge, summary: Summary, dry_run: bool) -> None:
        redis = self._store.redis
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, ["rank", "version", "data", "republished_at", "taken_up_at"])
                pipe.pttl(key)
            answers = await pipe.execute()
        now = self._clock()
        records: list[tuple[JobRecord, int, float | None, str]] = []
        markers: list[tuple[str, str, int]] = []
        for i in range(len(keys)):
            (rank, version, data, republished_at, taken_up_at), pttl = answers[2 * i], answers[2 * i + 1]
            if rank is None or not data or pttl is None or pttl <= 0:
                continue  # expired since the SCAN saw it, or not a record
            try:
                record = read_written(JobRecord, data)
            except ValidationError:
                # One record nobody can read (another version's, a hand edit) must not stop every
                # run of the namespace until it expires: it is left alone, and said so.
                log.warning("job record not readable; skipped", extra={"job_id": keys[i].rsplit(":", 1)[-1]})
                continue
            record.version = int(version or 0)
            if isinstance(record.source, KeySource):
                markers.append((self._store.source_marker(record.source.key), record.id, pttl))
            if int(rank) < 2:
                records.append(
                    (
                        record,
                        int(rank),
                        float(republished_at) if republished_at else None,
                        # As stored: the failing write is refused if a take-up changed it since.
                        taken_up_at.decode() if isinstance(taken_up_at, bytes) else taken_up_at or "",
                    )
                )
        if markers:
            # Records written before the markers existed get one with the record's remaining life.
            async with redis.pipeline(transaction=False) as pipe:
                for marker, job_id, pttl in markers:
                    pipe.set(marker, job_id, px=pttl, nx=True)
                summary.markers_restored += sum(1 for ok in await pipe.execute() if ok)
        for record, rank, republished_at, taken_up_at in records:
            await self._stuck(record, rank, republished_at, taken_up_at, now, judge, summary, dry_run)

    async def _stuck(
        self,
        record: JobRecord,
        rank: int,
        republished_at: float | None,
        taken_up_at: str,
        now: float,
        judge: _Judge,
        summary: Summary,
        dry_run: bool,
    ) -> None:
        idle = now - record.updated_at.timestamp()
        policy = self.policy
        if rank == 1:
            # Since it was last taken up: a retry or a redelivery keeps the record as it is.
            idle = min(idle, now - float(taken_up_at or 0.0))
            if idle <= policy.stuck_processing_s:
                return
            if not judge.processing:
                summary.stuck_left_waiting += 1
                return
            why = f"no progress for {idle:.0f}s while processing"
            # Not if it was taken up again since the read (a redelivery): that changes no version.
            await self._fail(record, why, summary, dry_run, taken_up=taken_up_at)
            return
        if idle <= policy.stuck_pending_s or (
            republished_at is not None and now - republished_at <= policy.stuck_pending_s
        ):
            return
        if not judge.pending:
            long_in_a_backlog = idle > _BACKLOG_REPUBLISH_FACTOR * policy.stuck_pending_s
            if judge.consuming and republished_at is None and long_in_a_backlog:
                await self._republish(record, idle, now, summary, dry_run)
            else:
                summary.stuck_left_waiting += 1
            return
        if republished_at is None:
            # Nothing waits for the workers, so its message is lost: sent again, once. (Were it not
            # lost after all, a duplicate is harmless; a loss is not.)
            await self._republish(record, idle, now, summary, dry_run)
        else:
            await self._fail(record, f"still pending {idle:.0f}s after it was accepted", summary, dry_run)

    async def _republish(
        self, record: JobRecord, idle: float, now: float, summary: Summary, dry_run: bool
    ) -> None:
        """Publish a `pending` job's message again, once: marked `republished_at` first."""
        if dry_run:
            summary.stuck_republished += 1
            return
        key, stamp = self._store.job_key(record.id), repr(now)
        message = JobMessage.of(record)
        try:
            if not await self._claim_republish(keys=[key], args=[record.version, stamp]):
                return
            await self._publisher.publish_job(message)
        except BaseException as exc:
            # Not re-published, or not known to be (an answer lost; the run cancelled: shutdown,
            # a lost lock): this run's mark goes, so that a later run publishes the job again
            # instead of failing one it never sent again.
            try:
                await asyncio.shield(self._unclaim_republish(keys=[key], args=[stamp]))
            except Exception as undo:
                log.warning(
                    "could not take back a re-publish mark: %s",
                    type(undo).__name__,
                    extra={"job_id": record.id},
                )
            if not isinstance(exc, Exception):
                raise
            log.warning(
                "could not re-publish a stuck job: %s", type(exc).__name__, extra={"job_id": record.id}
            )
            return
        summary.stuck_republished += 1
        STUCK_JOBS.labels("republished").inc()
        log.info("stuck pending job re-published", extra={"job_id": record.id, "idle_s": round(idle)})

    async def _fail(
        self, record: JobRecord, why: str, summary: Summary, dry_run: bool, *, taken_up: str | None = None
    ) -> None:
        if dry_run:
            summary.stuck_failed += 1
            return
        done = await self._store.mark_failed(
            record, TIMEOUT_CODE, f"the job did not finish: {why}", taken_up=taken_up
        )
        if done.applied:
            summary.stuck_failed += 1
            STUCK_JOBS.labels("failed").inc()
            # A job failed is a job failed, whoever failed it: the failure rate and the end-to-end
            # latency (by the wall clock, as the worker measures it) count these too.
            JOBS_FAILED.labels(code=TIMEOUT_CODE).inc()
            JOB_LATENCY["failed"].observe(max(0.0, time.time() - record.created_at.timestamp()))
            log.info("stuck job failed", extra={"job_id": record.id, "reason": why})


def note_skipped(*, dry_run: bool, run_id: str, trigger: str, reason: str = "another one is running") -> None:
    """Count and log a run that did not happen because another one held the lock (or, `reason`,
    was going when the command came up)."""
    RECONCILE_RUNS.labels("skipped", "true" if dry_run else "false").inc()
    log.info("reconciliation skipped: %s", reason, extra={"run_id": run_id, "trigger": trigger})


async def reconcile_once(
    reconciler: Reconciler,
    lock: RunLock,
    *,
    dry_run: bool,
    run_id: str,
    trigger: str,
    progress: Callable[[Summary], None] | None = None,
    report_skipped: bool = True,
) -> Summary:
    """A run under the lock, with its metrics and its one log line. Raises `LockBusy` if one is running.

    With `report_skipped` False, a `LockBusy` is neither counted nor logged: for a caller that tries
    again, and calls `note_skipped` once if it gives up.
    """
    label = "true" if dry_run else "false"
    started = time.monotonic()
    try:
        async with lock.held():
            summary = await reconciler.run(dry_run=dry_run, progress=progress)
    except LockBusy:
        if report_skipped:
            note_skipped(dry_run=dry_run, run_id=run_id, trigger=trigger)
        raise
    except BaseException as exc:
        RECONCILE_RUNS.labels("failed", label).inc()
        RECONCILE_SECONDS.observe(time.monotonic() - started)
        log.error(
            "reconciliation failed: %s: %s",
            type(exc).__name__,
            exc,
            extra={"run_id": run_id, "trigger": trigger, "dry_run": dry_run},
        )
        raise
    RECONCILE_RUNS.labels("succeeded", label).inc()
    RECONCILE_SECONDS.observe(summary.duration_s)
    RECONCILE_SCANNED.inc(summary.scanned)
    RECONCILE_KEPT_YOUNG.inc(summary.kept_young)
    RECONCILE_LAST_SUCCESS.set(time.time())
    log.info("reconciliation finished", extra={"run_id": run_id, "trigger": trigger, **summary.as_dict()})
    return summary
