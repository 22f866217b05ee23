"""The status service's OpenAPI document: a job by id, its event stream, health and metrics."""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Any

from imgpipe.models import JobStatus
from imgpipe.openapi import (
    BEARER,
    UNAUTHORIZED,
    JobView,
    Operation,
    Param,
    Response,
    build_document,
    error,
    meta_operations,
    unavailable,
)

_JOB_ID = Param("job_id", "path", {"type": "string"}, "The `id` that `POST /jobs` answered.", True)
_LAST_EVENT_ID = Param(
    "Last-Event-ID",
    "header",
    {"type": "string", "pattern": "^[0-9]+([.][0-9]{1,20})?$"},
    "The `id:` of the last event the client has (`<version>.<microseconds>`); EventSource sends it "
    "when it reconnects. A version alone is taken as the ids before the moment were. Ignored "
    "unless of that shape.",
)
_NOT_FOUND = error("No such job, or another user's: ids are not for probing.", "job_not_found")
_UNAVAILABLE = unavailable(
    "store_unavailable",
    "storage_unavailable",
    description="The job store is down, or there are no credentials to sign the download links "
    "with yet; retry later.",
)


def operations() -> tuple[Operation, ...]:
    """Every route of the status service."""
    return (
        Operation(
            "GET",
            "/jobs/{job_id}",
            "getJob",
            "A job: its status, its variants with download links, and its error if it failed.",
            {
                200: Response("The job.", model=JobView),
                401: UNAUTHORIZED,
                404: _NOT_FOUND,
                503: _UNAVAILABLE,
            },
            description="`status` goes pending → processing → succeeded | failed and never back, "
            "except when an admin replays a failed job: failed → pending, at a higher version. "
            "Each variant's `url` is a time-limited GET link.",
            tags=("jobs",),
            security=BEARER,
            params=(_JOB_ID,),
        ),
        Operation(
            "GET",
            "/jobs/{job_id}/events",
            "jobEvents",
            "The job's changes as Server-Sent Events, until it ends.",
            {
                200: Response(
                    "An event stream: `retry:` first, then the current state (unless `Last-Event-ID` "
                    "is its id) and every change. Each event's `event:` is the status, `id:` the "
                    "version and the moment of the write (`<version>.<microseconds since the "
                    "epoch>`) and `data:` the job as `GET /jobs/{job_id}` shows it; "
                    "`: keep-alive` comments fill idle time.",
                    events=JobView,
                    event_names=tuple(status.value for status in JobStatus),
                ),
                204: Response(
                    "The job has ended and `Last-Event-ID` is its current state's id (a version "
                    "alone: that version or later): the client has the last event already. No body; "
                    "EventSource stops reconnecting."
                ),
                401: UNAUTHORIZED,
                404: _NOT_FOUND,
                429: error(
                    "The user holds `IMGPIPE_SSE_MAX_STREAMS_PER_USER` streams on this replica "
                    "already: close some, or poll.",
                    "too_many_streams",
                    headers=("Retry-After",),
                ),
                503: unavailable(
                    "store_unavailable",
                    "storage_unavailable",
                    "streams_at_capacity",
                    description="The job store is down, there are no credentials to sign the "
                    "download links with yet, or this replica holds `IMGPIPE_SSE_MAX_STREAMS` "
                    "streams already; retry later.",
                ),
            },
            description="The stream ends after a terminal status, or when the token it was opened "
            "with expires (its `exp` plus the leeway): then with a `token_expired` event, which has "
            "no `id:` and whose `data:` is an error as the 401 answers carry it. EventSource "
            "clients cannot send headers, so the token may come as `?access_token=` instead. When "
            "`Last-Event-ID` is the id of the job's current state, a running job's stream skips that "
            "state and only sends later changes, and an ended job answers 204; any other id (one "
            "of a state a Redis failover lost, too) gets the current state first.",
            tags=("jobs",),
            security=(*BEARER, {"accessToken": []}),
            params=(_JOB_ID, _LAST_EVENT_ID),
        ),
        *meta_operations(),
    )


def document() -> dict[str, Any]:
    """The status service's OpenAPI document."""
    return build_document(
        title="imgpipe status",
        version=package_version("imgpipe"),
        description="Read jobs and follow them as they change. Jobs are submitted on the api "
        'service. Errors are `{"error": {"code", "message"}}`; branch on `code`.',
        operations=operations(),
    )
