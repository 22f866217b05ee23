"""The api service: presigned uploads and job submission.

`POST /jobs` answers 202 only once the job's `pending` record is in Redis and the broker has
confirmed the persistent message; if the broker cannot take it, the record is removed again and
the client gets a 503 it can retry (with the same Idempotency-Key).

Both routes spend the caller's per-user budgets (`imgpipe.limits`, shared by every replica through
Redis) after the request has been authenticated and validated but before any S3 or broker work, so
a client over its budget costs one Redis call. Admin-scope callers are exempt: they are operators
running tooling, and the budgets exist to keep users from crowding each other out.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from functools import partial
from typing import Any

from aiohttp import web
from imgpipe import resources
from imgpipe.auth import Principal, TokenVerifier
from imgpipe.broker import PUBLISH_TIMEOUT_S, Publisher
from imgpipe.limits import RATE_LIMITED, Decision, Limits
from imgpipe.models import JobMessage, JobRecord, JobRequest, JobStatus, KeySource
from imgpipe.settings import (
    AmqpSettings,
    AuthSettings,
    LimitSettings,
    RedisSettings,
    S3Settings,
    UrlSourceSettings,
    load,
)
from imgpipe.storage import ObjectNotFound, owns_key, upload_key
from imgpipe.store import Claim, Grant, IdempotencyConflict, JobStore, SourceDeleted
from imgpipe.telemetry import API_SUBMIT_STAGE, JOBS_ACCEPTED, job_id_var, request_id_var, start_logging
from imgpipe.urlsafety import UrlRejected, check_url
from imgpipe.web import VERIFIER, ApiError, authenticate, base_app, read_model
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from imgpipe_api import admin, openapi

log = logging.getLogger("imgpipe.api")

LIMITS = web.AppKey("limits", LimitSettings)
#: The allowed URL-source hosts and networks, parsed once (a bad network fails the start, not requests).
URL_POLICY = web.AppKey("url_policy", tuple)
QUOTAS = web.AppKey("quotas", Limits)
SUBMISSIONS = web.AppKey("submissions", set)
#: Withdrawals that found Redis out of reach, tried again in the background (`_withdraw_later`).
WITHDRAWALS = web.AppKey("withdrawals", set)
#: Idempotency-Key claims of failed requests, let go beside their answers (`_submit`).
RELEASES = web.AppKey("releases", set)

#: Clock difference tolerated between S3 (an object's LastModified, whole seconds) and the api
#: (a grant's expiry) before an upload counts as written after its grant expired.
GRANT_CLOCK_SKEW_S = 10

#: What may be uploaded: the formats the worker decodes (it checks the bytes again, not this label).
UPLOAD_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/gif", "image/avif", "image/heic", "image/tiff"}
)


class UploadRequest(BaseModel):
    """Body of `POST /uploads`."""

    model_config = ConfigDict(extra="forbid")

    content_type: str = Field(max_length=100)
    size: StrictInt = Field(ge=1)

    @field_validator("content_type")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()  # media types are case-insensitive (RFC 9110 §8.3.1)


_IDEMPOTENCY_KEY_MAX = 255
#: How long after its record was written a job whose claim is not marked accepted may still be
#: withdrawn by the request that made it (its publish deadline, then the withdrawal; the margin also
#: covers the clocks of two api replicas). A replay waits this out rather than answer 202 for it.
_WITHDRAWAL_WINDOW_S = PUBLISH_TIMEOUT_S + 5.0
#: How long a stopping api waits for the claims it is letting go: one Redis call each, within the
#: client's socket timeout.
_RELEASE_WINDOW_S = 5.0


def _too_many(decision: Decision, message: str) -> ApiError:
    """The 429 for a refused decision, with `Retry-After` (and the rate headers when they apply)."""
    return ApiError(429, decision.code or RATE_LIMITED, message, headers=decision.headers())


async def _spend_upload(request: web.Request, principal: Principal) -> Decision | None:
    """Spend one upload from the caller's hourly budget, or refuse with 429."""
    if principal.is_admin:
        return None
    limit = request.app[LIMITS].rate_uploads_per_hour
    decision = await request.app[QUOTAS].hit("uploads", principal.sub, limit=limit, period_s=3600)
    if not decision.allowed:
        raise _too_many(
            decision, f"at most {limit} uploads per hour; retry in {decision.retry_after} seconds"
        )
    return decision


async def _admit_job(request: web.Request, principal: Principal, job_id: str) -> Decision | None:
    """Spend one job from the caller's per-minute budget and take an active slot, or refuse (429)."""
    if principal.is_admin:
        return None
    limits = request.app[LIMITS]
    decision = await request.app[QUOTAS].admit_job(
        principal.sub,
        job_id,
        rate_limit=limits.rate_jobs_per_minute,
        period_s=60,
        max_active=limits.max_active_jobs,
    )
    if decision.allowed:
        return decision
    if decision.code == RATE_LIMITED:
        raise _too_many(
            decision,
            f"at most {limits.rate_jobs_per_minute} jobs per minute; retry in {decision.retry_after} seconds",
        )
    raise _too_many(
        decision,
        f"at most {limits.max_active_jobs} of your jobs may be pending or processing at once; "
        "retry when one has finished",
    )


async def _release_slot(
    app: web.Application, principal: Principal, job_id: str, admitted: Decision | None
) -> None:
    """Give back the active slot of a job that was not accepted after all."""
    if admitted is None or admitted.active is None:
        return
    try:
        await app[QUOTAS].release_job(principal.sub, job_id)
    except Exception:
        # The slot is not lost: with no job record behind it, admission drops it after its grace.
        log.warning("could not release the active-job slot of a withdrawn job")


async def create_upload(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    body = await read_model(request, UploadRequest)
    limits = request.app[LIMITS]
    if body.content_type not in UPLOAD_TYPES:
        raise ApiError(
            415,
            "unsupported_content_type",
            f"content_type must be one of {', '.join(sorted(UPLOAD_TYPES))}",
        )
    if body.size > limits.max_upload_bytes:
        raise ApiError(413, "upload_too_large", f"size may be at most {limits.max_upload_bytes} bytes")
    storage = request.app[resources.STORAGE]
    # The grant allows at most the declared size, so a client cannot declare small and send large.
    # Signed before the budget is spent: with no credentials to sign with (a 503), the client's
    # retries must not use up its uploads for the hour.
    grant = storage.presign_upload(upload_key(principal.sub), body.content_type, body.size)
    spent = await _spend_upload(request, principal)
    # What it allows is kept too: `POST /jobs` checks the stored object against it (`_check_grant`).
    await request.app[resources.STORE].record_grant(
        grant.key, grant.expires_at, content_type=body.content_type, size=body.size
    )
    return web.json_response(
        {
            "key": grant.key,
            "method": "POST",
            "url": grant.url,
            "fields": grant.fields,
            "expires_at": datetime.fromtimestamp(grant.expires_at, UTC).isoformat(),
        },
        status=201,
        headers=spent.headers() if spent else None,
    )


def _refuse_source(request: web.Request, principal: Principal, job: JobRequest) -> None:
    """Refuse what the request alone shows will fail: a source key that is not the caller's, a URL
    the policy forbids. No I/O, so it comes before the request spends anything (an Idempotency-Key
    claim, an active-job slot, its rate): such a request is a 403 or a 422, never a 429."""
    source = job.source
    if isinstance(source, KeySource):
        if not owns_key(principal.sub, source.key):
            raise ApiError(403, "source_forbidden", "the source key does not belong to you")
        return
    rejected = _url_policy_error(request, str(source.url))
    if rejected is not None:
        raise rejected


async def _check_source(request: web.Request, job: JobRequest) -> None:
    """Refuse at submit time what can be known to fail: a 4xx now beats a failed job later. (What
    the request alone shows was refused before: `_refuse_source`.)"""
    source = job.source
    if isinstance(source, KeySource):
        # The object and its grant are looked up together (S3 and Redis, one wait instead of two);
        # their errors are then raised in the order the checks read, the object's first.
        head, grant = await asyncio.gather(
            request.app[resources.STORAGE].head(source.key),
            request.app[resources.STORE].grant(source.key),
            return_exceptions=True,
        )
        if isinstance(head, ObjectNotFound):
            raise ApiError(422, "source_not_found", "no object with that key; upload it first")
        if isinstance(head, BaseException):
            raise head
        limit = request.app[LIMITS].max_upload_bytes
        if head["ContentLength"] > limit:
            raise ApiError(413, "source_too_large", f"the source is over {limit} bytes")
        if isinstance(grant, BaseException):
            raise grant
        if grant is not None:
            _check_grant(grant, head)
        # No grant on record: the object was put there with S3 credentials (an operator, a backfill,
        # a benchmark) or its grant is older than the job retention. Only the prefix, which only
        # our grants and S3 credentials can write under, and the size limit above vouch for it.


def _check_grant(grant: Grant, head: dict) -> None:
    """Refuse an uploaded object that is not what its grant allowed.

    S3 enforces the grant's policy itself; moto and some S3-compatible stores do not, and a
    refusal here costs less than a job that fails later.
    """
    written = head["LastModified"].timestamp()
    if written > grant.expires_at + GRANT_CLOCK_SKEW_S:
        raise ApiError(422, "upload_expired", "the source was uploaded after its upload grant expired")
    stored_type = str(head.get("ContentType", "")).strip().lower()
    if stored_type != grant.content_type:
        raise ApiError(
            422,
            "source_type_mismatch",
            f"the source was stored as {stored_type or 'no type'!r}, not the {grant.content_type!r} "
            "its upload was granted for",
        )
    if head["ContentLength"] > grant.size:
        raise ApiError(
            413,
            "source_too_large",
            f"the source has {head['ContentLength']} bytes, "
            f"more than the {grant.size} declared for its upload",
        )


def _fingerprints(principal: Principal, job: JobRequest) -> tuple[str, str]:
    """The request's fingerprint as releases up to 2026-12-07 make it (defaults included: what
    they store and compare, so a retry that reaches one of their pods, or follows a rollback, is
    the same request there), and without defaults (a field a later release adds with a default
    does not change it, so a retry reaching such a release's pod is the same request too). A key
    holding either is this request. The first can go once no release before this one runs and
    their keys have expired (the job retention)."""

    def digest(dump: str) -> str:
        return hashlib.sha256(f"{principal.sub}\n{dump}".encode()).hexdigest()

    return digest(job.model_dump_json()), digest(job.model_dump_json(exclude_defaults=True))


def _in_progress() -> ApiError:
    return ApiError(
        409,
        "idempotency_in_progress",
        "a request with this Idempotency-Key is in progress",
        headers={"Retry-After": "1"},
    )


async def _replay(request: web.Request, principal: Principal, held: Claim, idem_key: str) -> web.Response:
    store = request.app[resources.STORE]
    record = await store.get(held.job_id)
    if record is None or record.owner != principal.sub:
        # The first request with this key is still in flight (or failed and is being released).
        raise _in_progress()
    if not held.accepted and record.status is JobStatus.PENDING:
        # The record is written before the publish; until the broker confirms it, the first request
        # may still withdraw the job, and a 202 for it now would promise a job that never runs. Past
        # the window the first request has usually ended: a job it neither withdrew nor marked (the
        # api stopped in between) is one the reconciler re-publishes, so it is answered for, once
        # noted so (a first request slower than the window then cannot withdraw it any more).
        age = datetime.now(UTC).timestamp() - record.created_at.timestamp()
        if age < _WITHDRAWAL_WINDOW_S or not await store.answer_replay(principal.sub, idem_key, record.id):
            raise _in_progress()
    return _accepted(record, replayed=True)


def _accepted(record: JobRecord, *, replayed: bool = False, admitted: Decision | None = None) -> web.Response:
    body = record.public()
    body["links"] = {"self": f"/jobs/{record.id}", "events": f"/jobs/{record.id}/events"}
    headers = {"Location": f"/jobs/{record.id}", **(admitted.headers() if admitted else {})}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(body, status=202, headers=headers)


def _url_rejection(request: web.Request, raw: bytes) -> ApiError | None:
    """The `url_*` error for a URL source the model refused (its scheme), instead of `invalid_request`."""
    try:
        source = json.loads(raw).get("source")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: nesting the model refused
        return None
    if not isinstance(source, dict) or set(source) != {"url"} or not isinstance(source["url"], str):
        return None
    return _url_policy_error(request, source["url"])


def _url_policy_error(request: web.Request, url: str) -> ApiError | None:
    """The 422 for a URL source the fetch policy refuses (checked without DNS; the worker checks again)."""
    hosts, networks, ports = request.app[URL_POLICY]
    try:
        check_url(url, allowed_hosts=hosts, allowed_networks=networks, allowed_ports=ports)
    except UrlRejected as exc:
        return ApiError(422, exc.code, exc.message)
    return None


async def create_job(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    try:
        job = await read_model(request, JobRequest)
    except ApiError as exc:
        # `file:`, `ftp:` and the like fail the model's http(s) URL type; say why in the URL's terms.
        refined = _url_rejection(request, await request.read()) if exc.code == "invalid_request" else None
        if refined is not None:
            raise refined from None
        raise
    idem_keys = request.headers.getall("Idempotency-Key", [])
    idem_key = idem_keys[0] if idem_keys else None
    if len(idem_keys) > 1 or (
        idem_key is not None
        and not (0 < len(idem_key) <= _IDEMPOTENCY_KEY_MAX and idem_key.isascii() and idem_key.isprintable())
    ):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"send one Idempotency-Key of 1-{_IDEMPOTENCY_KEY_MAX} printable ASCII characters",
        )
    _refuse_source(request, principal, job)

    # From its first write on, the request is carried to its end even when its client goes away (a
    # disconnect cancels the handler): cut short between two writes, it would leave a claimed key, a
    # taken slot or a `pending` record behind that nothing withdraws or publishes.
    job_id = uuid.uuid4().hex
    submission = asyncio.ensure_future(_submit(request, principal, job, job_id, idem_key))
    running = request.app[SUBMISSIONS]
    running.add(submission)
    submission.add_done_callback(partial(_submitted, running))
    try:
        return await asyncio.shield(submission)
    except asyncio.CancelledError:
        # Its client is gone: how the submission ends is for no handler any more, so for the log.
        submission.add_done_callback(partial(_ended_unseen, job_id))
        raise
    except Exception:
        job_id_var.set(job_id)  # for the line the error middleware writes (the task set its own copy)
        raise


def _submitted(running: set[asyncio.Task], submission: asyncio.Task) -> None:
    running.discard(submission)
    if not submission.cancelled():
        submission.exception()  # retrieved: the handler re-raises it, or `_ended_unseen` reports it


def _ended_unseen(job_id: str, submission: asyncio.Task) -> None:
    """Log how a submission whose client went away ended, when it failed other than with an answer."""
    error = None if submission.cancelled() else submission.exception()
    if error is not None and not isinstance(error, ApiError):
        # In the handler's context (request id), not the task's: the job id goes in by hand.
        log.error(
            "job submission failed after its client went away", exc_info=error, extra={"job_id": job_id}
        )


async def _submit(
    request: web.Request, principal: Principal, job: JobRequest, job_id: str, idem_key: str | None
) -> web.Response:
    """Claim, admit, check, record and publish a validated job: all of it, or none of it."""
    clock = _StageClock()
    store = request.app[resources.STORE]
    publisher: Publisher = request.app[resources.PUBLISHER]
    fingerprint, asked = _fingerprints(principal, job) if idem_key else ("", "")
    if idem_key:
        try:
            held = await store.claim_idempotency(principal.sub, idem_key, job_id, fingerprint, also=(asked,))
        except IdempotencyConflict:
            raise ApiError(
                422, "idempotency_key_reused", "this Idempotency-Key was used for a different request"
            ) from None
        except BaseException:
            # A lost reply (a timeout) may hide a claim Redis did make: the retry the 503 asks for
            # would be told "in progress" until the claim expired, with nothing in progress. In the
            # background: after a timeout, awaited, it kept the 503 waiting another timeout.
            _in_background(request.app, RELEASES, _release_claim(store, principal.sub, idem_key, job_id))
            raise
        clock.lap("claim")
        if held is not None:
            return await _replay(request, principal, held, idem_key)
    job_id_var.set(job_id)  # in this task's context: what it logs from here on is about this job

    # Limits come after the idempotency claim, so a replay above never spends the budget.
    claim = (principal.sub, idem_key) if idem_key else None
    admitted: Decision | None = None
    kept = False  # a record may be in Redis after all: its slot and key stay with it
    try:
        admitted = await _admit_job(request, principal, job_id)
        if admitted is not None:
            clock.lap("admit")
        await _check_source(request, job)
        clock.lap("source")
        record = JobRecord.pending(job_id, principal.sub, job.source, job.resolved_variants())
        try:
            await store.create(record, claim=claim)
        except SourceDeleted:
            # Found by the HEAD a moment ago, but the reconciler has just taken it for an orphan.
            raise ApiError(
                422, "source_not_found", "the source is being deleted as an unused upload; upload it again"
            ) from None
        except BaseException:
            # A lost reply (a timeout, a dropped connection) may hide a record Redis did write, one
            # the reconciler would publish: take it back before its slot and key are let go.
            withdrawn = await _withdraw(store, job_id, claim)
            kept = not withdrawn
            if withdrawn is None:
                _withdraw_later(request.app, principal, job_id, claim, admitted)
            raise
        clock.lap("record")
    except BaseException:
        if not kept:
            await _release_slot(request.app, principal, job_id, admitted)
            if idem_key:
                await _release_claim(store, principal.sub, idem_key, job_id)
        raise

    message = JobMessage.of(record, request_id=request_id_var.get())
    try:
        await publisher.publish_job(message)  # within its own deadline (5 s): then a 503, not a hang
    except (Exception, asyncio.CancelledError) as exc:
        # Not in the broker: take the job back so nothing claims a job that will never run.
        log.warning("publish failed: %s", type(exc).__name__)
        withdrawn = await _withdraw(store, job_id, claim)
        if withdrawn:
            await _release_slot(request.app, principal, job_id, admitted)
        elif withdrawn is None:
            _withdraw_later(request.app, principal, job_id, claim, admitted)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ApiError(503, "broker_unavailable", "the job could not be queued; retry later") from None
    clock.lap("publish")

    if idem_key:
        try:
            await store.accept_idempotency(principal.sub, idem_key, job_id, fingerprint, also=(asked,))
        except Exception:
            # The job is in the broker all the same; replays answer for it once the window is past.
            log.warning("could not mark the Idempotency-Key accepted")
        else:
            clock.lap("accept")
    JOBS_ACCEPTED.inc()
    log.info("job accepted", extra={"variants": len(record.requested)})
    return _accepted(record, admitted=admitted)


class _StageClock:
    """Times the steps of one submission (`imgpipe_api_submit_stage_seconds`), each from the end of
    the step before it: what runs between two steps counts to the later one."""

    __slots__ = ("_mark",)

    def __init__(self) -> None:
        self._mark = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        API_SUBMIT_STAGE[stage].observe(now - self._mark)
        self._mark = now


async def _release_claim(store: JobStore, owner: str, key: str, job_id: str) -> None:
    """Free an Idempotency-Key this request claimed, if it still holds its job; best effort: the
    request's own error is what its client is answered, and a claim left holds for `CLAIM_HOLD_S`."""
    try:
        await store.release_idempotency(owner, key, job_id)
    except Exception as exc:
        log.warning("could not release the Idempotency-Key: %s", type(exc).__name__)


async def _withdraw(store: JobStore, job_id: str, claim: tuple[str, str] | None) -> bool | None:
    """Take back a job that is not in the broker, with its Idempotency-Key: True when it is gone,
    None when Redis could not be asked (`_withdraw_later` then tries again).

    Not withdrawn (a replay has already answered 202 for it, it was taken up meanwhile, or Redis is
    out of reach), its record, if it was written, stays for the reconciler to publish: the job is
    not withdrawn after all, so it keeps its slot and its key (a retry with the key then gets this
    job, not a second one beside it).
    """
    try:
        withdrawn = await store.withdraw(job_id, claim=claim)
    except Exception as exc:
        log.warning("could not withdraw the job: %s; trying again in the background", type(exc).__name__)
        return None
    if withdrawn:
        log.info("job withdrawn")
    else:
        log.warning("job not withdrawn: answered for by a replay, or taken up, meanwhile")
    return withdrawn


#: How long a withdrawal that found Redis out of reach is tried again, and the pauses between tries:
#: an outage longer than that leaves the job as before (its record, if written, for the reconciler;
#: its key held until the claim expires).
WITHDRAW_RETRY_S = 120.0
_WITHDRAW_PAUSES_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


def _withdraw_later(
    app: web.Application,
    principal: Principal,
    job_id: str,
    claim: tuple[str, str] | None,
    admitted: Decision | None,
) -> None:
    """Try a withdrawal again in the background until Redis answers (a failover, a restart).

    Left undone, a key whose record was never written answered `409 idempotency_in_progress` to
    every retry its 503 asked for until the claim expired (`CLAIM_HOLD_S`, ten minutes); a record
    that was written would be published by the reconciler, a job its client was told had failed.
    Once Redis answers, it is withdrawn as it would have been at once, its slot and key let go;
    unless a replay has answered for it meanwhile, and then it stays.
    """

    async def again() -> None:
        store = app[resources.STORE]
        loop = asyncio.get_running_loop()
        until = loop.time() + WITHDRAW_RETRY_S
        failure = ""
        for pause in itertools.chain(_WITHDRAW_PAUSES_S, itertools.repeat(_WITHDRAW_PAUSES_S[-1])):
            if loop.time() + pause > until:
                log.warning("gave up withdrawing the job (%s); left for the reconciler", failure)
                return
            await asyncio.sleep(pause)
            try:
                withdrawn = await store.withdraw(job_id, claim=claim)
            except Exception as exc:
                failure = type(exc).__name__
                continue
            if withdrawn:
                log.info("job withdrawn, late")
                await _release_slot(app, principal, job_id, admitted)
            else:
                log.warning("job not withdrawn: answered for by a replay, or taken up, meanwhile")
            return

    _in_background(app, WITHDRAWALS, again())


def _in_background(app: web.Application, kind: web.AppKey[set], work: Coroutine[Any, Any, None]) -> None:
    """Run `work` beside the request, in a copy of its context (its lines carry the job's ids), held
    in `app[kind]` until it ends (`_submissions` says what becomes of it when the api stops)."""
    task = asyncio.ensure_future(work)
    running = app[kind]
    running.add(task)
    task.add_done_callback(running.discard)


async def _submissions(app: web.Application) -> AsyncIterator[None]:
    """The submissions under way; at shutdown, those whose clients went away are let finish first,
    then the releases of failed ones' claims (one Redis call each), and the withdrawals still
    waiting for Redis are given up (as when the api stops mid-outage)."""
    app[SUBMISSIONS] = running = set()
    app[WITHDRAWALS] = withdrawals = set()
    app[RELEASES] = releases = set()
    yield
    # Before the Redis and broker connections close (this context is torn down before theirs).
    if running:
        await asyncio.wait(running, timeout=_WITHDRAWAL_WINDOW_S)
    if releases:
        # Cancelled, a claim would hold its key for `CLAIM_HOLD_S`: the retries elsewhere told 409.
        await asyncio.wait(releases, timeout=_RELEASE_WINDOW_S)
    for task in tuple(withdrawals):
        task.cancel()
    await asyncio.gather(*withdrawals, return_exceptions=True)


async def _quotas(app: web.Application) -> AsyncIterator[None]:
    """The per-user limits, on the job store's Redis client, their calls batched with the store's."""
    store = app[resources.STORE]
    app[QUOTAS] = Limits(store.redis, store.namespace, ttl_s=store.retention_s, calls=store.calls)
    yield


async def create_app() -> web.Application:
    """The api application; every setting comes from the environment."""
    common = start_logging("api")
    auth = load(AuthSettings)
    limits = load(LimitSettings)
    app = base_app(
        "api",
        environment=common.env,
        client_max_size=64 * 1024,
        openapi=openapi.document(),
        serves_clients=True,
    )
    app[VERIFIER] = TokenVerifier(auth)
    app[LIMITS] = limits
    urls = load(UrlSourceSettings)
    app[URL_POLICY] = (urls.hosts(), urls.networks(), urls.ports())
    app.cleanup_ctx.extend(
        [
            resources.job_store(load(RedisSettings), common.namespace),
            _quotas,
            resources.object_storage(load(S3Settings)),
            resources.amqp(load(AmqpSettings), common.namespace),
            _submissions,
        ]
    )
    app.router.add_post("/uploads", create_upload)
    app.router.add_post("/jobs", create_job)
    admin.add_routes(app)
    return app
