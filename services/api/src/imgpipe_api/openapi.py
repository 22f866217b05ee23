"""The api's OpenAPI document: uploads, jobs, the admin routes, health and metrics.

Request bodies are the models the handlers validate with (`UploadRequest`, `JobRequest`); answers
that handlers build as dicts get a model here. Every status and error code a handler, `read_model`,
`authenticate` or the middleware can answer with is listed, so the schemathesis fuzz in
`tests/test_openapi.py` fails when a handler grows an answer this document does not know.
"""

from __future__ import annotations

from datetime import datetime
from importlib.metadata import version as package_version
from typing import Any, Literal

from imgpipe.models import JobRequest
from imgpipe.openapi import (
    ADMIN,
    BEARER,
    FORBIDDEN,
    UNAUTHORIZED,
    Answer,
    JobView,
    Operation,
    Param,
    Response,
    build_document,
    error,
    meta_operations,
    unavailable,
)
from imgpipe.runs import RunRecord
from imgpipe.web import BODY_TIMEOUT_S
from pydantic import Field

from imgpipe_api.admin import ReplayRequest


class UploadGrant(Answer):
    """The 201 of `POST /uploads`: where and how to upload, and until when."""

    key: str = Field(description="The object's key; submit it as the job's `source.key`.")
    method: Literal["POST"]
    url: str = Field(description="The presigned form-upload URL.")
    fields: dict[str, str] = Field(description="Form fields to send before the file (as `file`).")
    expires_at: datetime


class JobLinks(Answer):
    self_: str = Field(alias="self")
    events: str


class AcceptedJob(JobView):
    """The 202 of `POST /jobs`: the job as `GET /jobs/{id}` shows it, with links."""

    links: JobLinks


class RunLinks(Answer):
    self_: str = Field(alias="self")


class QueuedRun(Answer):
    """The 202 of `POST /admin/reconcile`."""

    run_id: str
    status: Literal["queued"]
    dry_run: bool
    links: RunLinks


class DeadLetter(Answer):
    """One message in the dead-letter queue."""

    message_id: str | None
    job_id: str | None
    owner: str | None
    reason: str
    attempts: int | None
    dead_lettered_at: datetime | None
    request_id: str | None
    replayable: bool = Field(description="The message is a job we can publish again.")


class DeadLetters(Answer):
    """`GET /admin/dead-letters`."""

    count: int = Field(ge=0, description="Messages in the dead-letter queue, not just those listed.")
    items: list[DeadLetter]


class ReplayResult(Answer):
    replayed: list[str]
    not_found: list[str]


_TOO_LARGE_BODY = "request_too_large"
_CODED = ("Accept-Encoding",)  # on the 415 for a body sent with a Content-Encoding
_NOT_PLAIN_JSON = (
    "The body is not application/json, or has a Content-Encoding (bodies are sent uncompressed)."
)
_RETRY = ("Retry-After",)
#: What `read_model` answers for a body that does not arrive whole and well formed.
_BROKEN_BODY = error("The body's chunked framing is broken.", "bad_request")
_SLOW_BODY = error(
    f"The body did not arrive whole within {BODY_TIMEOUT_S:g} s; the connection is closed.", "request_timeout"
)
_RATE = ("RateLimit-Limit", "RateLimit-Remaining")
_BUSY = error("Another listing or replay is running; retry shortly.", "dead_letters_busy")


def operations() -> tuple[Operation, ...]:
    """Every route of the api."""
    from imgpipe_api.app import UploadRequest  # here, not at the top: app.py imports this module

    return (
        Operation(
            "POST",
            "/uploads",
            "createUpload",
            "Get a presigned upload for one image.",
            {
                201: Response(
                    "The grant: a form POST to `url` with `fields`, then the file, before `expires_at`.",
                    model=UploadGrant,
                    optional_headers=_RATE,
                ),
                400: _BROKEN_BODY,
                401: UNAUTHORIZED,
                408: _SLOW_BODY,
                413: error(
                    "`size` is over the upload limit, or the body is too large.",
                    "upload_too_large",
                    _TOO_LARGE_BODY,
                ),
                415: error(
                    f"{_NOT_PLAIN_JSON[:-1]}, or `content_type` is not an accepted image type.",
                    "unsupported_media_type",
                    "unsupported_content_type",
                    optional_headers=_CODED,
                ),
                422: error("The body does not validate; the message says where.", "invalid_request"),
                429: error(
                    "Too many uploads in the caller's window.",
                    "rate_limited",
                    headers=_RETRY,
                    optional_headers=_RATE,
                ),
                503: unavailable(
                    "store_unavailable",
                    "storage_unavailable",
                    description="The job store is down, or there are no credentials to sign the "
                    "grant with yet; retry later. Spends none of the caller's uploads.",
                ),
            },
            description="The grant fixes the key, the content type and the maximum size. Accepted "
            "types: image/jpeg, image/png, image/webp, image/gif, image/avif, image/heic, image/tiff.",
            tags=("jobs",),
            security=BEARER,
            body=UploadRequest,
        ),
        Operation(
            "POST",
            "/jobs",
            "createJob",
            "Submit a job: a source and the variants to make of it.",
            {
                202: Response(
                    "Accepted: the job is recorded and in the broker.",
                    model=AcceptedJob,
                    headers=("Location",),
                    optional_headers=("Idempotent-Replayed", *_RATE),
                ),
                400: error(
                    "The Idempotency-Key header is empty, too long, or not printable ASCII; or the "
                    "body's chunked framing is broken.",
                    "invalid_idempotency_key",
                    "bad_request",
                ),
                401: UNAUTHORIZED,
                403: error("The source key is not under the caller's upload prefix.", "source_forbidden"),
                409: error(
                    "The first request with this Idempotency-Key is still being handled: until the "
                    "broker has confirmed its job, that request may still withdraw it.",
                    "idempotency_in_progress",
                    headers=_RETRY,
                ),
                408: _SLOW_BODY,
                413: error(
                    "The source is bigger than its grant or the limit, or the body is too large.",
                    "source_too_large",
                    _TOO_LARGE_BODY,
                ),
                415: error(_NOT_PLAIN_JSON, "unsupported_media_type", optional_headers=_CODED),
                422: error(
                    "The request cannot be done as asked; the code says why.",
                    "invalid_request",
                    "source_not_found",
                    "upload_expired",
                    "source_type_mismatch",
                    "url_invalid",
                    "url_forbidden",
                    "idempotency_key_reused",
                ),
                429: error(
                    "Too many jobs in the caller's window, or too many not yet finished.",
                    "rate_limited",
                    "too_many_active_jobs",
                    headers=_RETRY,
                    optional_headers=_RATE,
                ),
                503: unavailable(
                    "broker_unavailable",
                    "store_unavailable",
                    "storage_unavailable",
                    description="A dependency is down; retry later, with the same `Idempotency-Key`. The job "
                    "was not accepted, but one the api could not take back (Redis failing too) stays "
                    "`pending` and is queued later: the key then answers with it instead of a second job.",
                ),
            },
            description="Answered 202 only once the job is recorded as `pending` and the broker has "
            "confirmed it. Follow it with `GET /jobs/{id}` or `GET /jobs/{id}/events` on the status "
            "service.\n\nSend an `Idempotency-Key` so that a retried POST returns the same job.",
            tags=("jobs",),
            security=BEARER,
            params=(
                Param(
                    "Idempotency-Key",
                    "header",
                    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
                    "A retry with the same key and body answers the job the first request created.",
                ),
            ),
            body=JobRequest,
        ),
        Operation(
            "POST",
            "/admin/reconcile",
            "queueReconcile",
            "Queue a reconciliation run.",
            {
                202: Response("Queued.", model=QueuedRun, headers=("Location",)),
                401: UNAUTHORIZED,
                403: FORBIDDEN,
                422: error("`dry_run` is not true or false.", "invalid_request"),
                503: unavailable("broker_unavailable", "store_unavailable"),
            },
            description="Without `dry_run=false` it is a dry run, which deletes nothing.",
            tags=("admin",),
            security=ADMIN,
            params=(
                Param(
                    "dry_run",
                    "query",
                    {"type": "boolean", "default": True},
                    "Only report what would be deleted (`true`, the default) or delete it (`false`).",
                ),
            ),
        ),
        Operation(
            "GET",
            "/admin/reconcile/{run_id}",
            "getReconcile",
            "A reconciliation run, with its summary once it is done.",
            {
                200: Response("The run.", model=RunRecord),
                401: UNAUTHORIZED,
                403: FORBIDDEN,
                404: error("No run with that id (runs are kept for 7 days).", "run_not_found"),
                503: unavailable("store_unavailable"),
            },
            tags=("admin",),
            security=ADMIN,
            params=(Param("run_id", "path", {"type": "string"}, "The `run_id` of the 202.", True),),
        ),
        Operation(
            "GET",
            "/admin/dead-letters",
            "listDeadLetters",
            "List the messages in the dead-letter queue without removing them.",
            {
                200: Response("The queue's depth and its first `limit` messages.", model=DeadLetters),
                401: UNAUTHORIZED,
                403: FORBIDDEN,
                409: _BUSY,
                422: error("`limit` is not an integer from 1 to 1000.", "invalid_request"),
                503: unavailable("broker_unavailable", "store_unavailable"),
            },
            description="Messages come in the queue's order, which is not their age: each listing "
            "hands the messages it read back to the broker, which does not keep their order once "
            "more than a few dozen come back at once.",
            tags=("admin",),
            security=ADMIN,
            params=(
                Param(
                    "limit",
                    "query",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    "How many messages to list.",
                ),
            ),
        ),
        Operation(
            "POST",
            "/admin/dead-letters/replay",
            "replayDeadLetters",
            "Put dead-lettered jobs back to `pending` and queue them again.",
            {
                200: Response(
                    "What was replayed, and which ids have no replayable message or job.", model=ReplayResult
                ),
                400: _BROKEN_BODY,
                401: UNAUTHORIZED,
                403: FORBIDDEN,
                408: _SLOW_BODY,
                409: _BUSY,
                413: error("The body is too large.", _TOO_LARGE_BODY),
                415: error(_NOT_PLAIN_JSON, "unsupported_media_type", optional_headers=_CODED),
                422: error("The body does not validate; the message says where.", "invalid_request"),
                503: unavailable(
                    "broker_unavailable",
                    "store_unavailable",
                    description="A dependency is down; retry later. Jobs replayed before it went down stay "
                    "replayed (a retry of the same ids lists them under `not_found`).",
                ),
            },
            tags=("admin",),
            security=ADMIN,
            body=ReplayRequest,
        ),
        *meta_operations(),
    )


def document() -> dict[str, Any]:
    """The api's OpenAPI document."""
    return build_document(
        title="imgpipe api",
        version=package_version("imgpipe"),
        description="Presigned uploads, job submission and the admin routes. Jobs are read and "
        'followed on the status service. Errors are `{"error": {"code", "message"}}`; branch '
        "on `code`. Request bodies are uncompressed JSON of at most 64 KiB (413 `request_too_large` "
        f"beyond that), sent whole within {BODY_TIMEOUT_S:g} s (408 `request_timeout` otherwise).",
        operations=operations(),
    )
