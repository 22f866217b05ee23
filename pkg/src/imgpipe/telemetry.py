"""Structured JSON logs carrying `request_id` and `job_id`, and the Prometheus metrics.

Every metric of every service is defined here so that dashboards and alerts have one list of names.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from pythonjsonlogger.json import JsonFormatter

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

# Buckets sized for image work: tens of milliseconds up to the job time limit.
_JOB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

HTTP_REQUESTS = Counter(
    "imgpipe_http_requests_total", "HTTP requests answered", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "imgpipe_http_request_duration_seconds", "HTTP request latency", ["service", "method", "route"]
)
JOBS_ACCEPTED = Counter("imgpipe_jobs_accepted_total", "Jobs accepted by the api (answered 202)")
JOBS_SUCCEEDED = Counter("imgpipe_jobs_succeeded_total", "Jobs the worker finished successfully")
JOBS_FAILED = Counter("imgpipe_jobs_failed_total", "Jobs that ended failed, by error code", ["code"])
JOBS_RETRIED = Counter("imgpipe_jobs_retried_total", "Transient failures parked for a retry", ["code"])
JOBS_DEAD_LETTERED = Counter("imgpipe_jobs_dead_lettered_total", "Messages sent to the dead-letter queue")
JOB_SECONDS = Histogram(
    "imgpipe_job_processing_seconds", "Worker time per job, fetch to status", buckets=_JOB_BUCKETS
)
VARIANT_SECONDS = Histogram(
    "imgpipe_variant_render_seconds", "Render time per job by output format", ["format"], buckets=_JOB_BUCKETS
)
JOBS_IN_FLIGHT = Gauge("imgpipe_worker_jobs_in_flight", "Jobs the worker is processing now")
WORKER_CONCURRENCY = Gauge(
    "imgpipe_worker_concurrency", "Jobs the worker may process at once (utilization = in_flight / this)"
)
SSE_CONNECTIONS = Gauge("imgpipe_sse_connections", "Open Server-Sent Events streams")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class _Formatter(JsonFormatter):
    def __init__(self, service: str, env: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._service = service
        # Production logs carry the exception's type and message, never a stack trace.
        self._traces = env != "production"

    def add_fields(self, log_record: dict, record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record["service"] = self._service
        if not self._traces:
            log_record.pop("exc_info", None)
            log_record.pop("stack_info", None)
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                log_record["error"] = f"{type(exc).__name__}: {exc}"

    def formatException(self, ei: Any) -> str:
        return super().formatException(ei) if self._traces else ""


def setup_logging(service: str, *, env: str, level: str = "INFO") -> None:
    """JSON lines on stderr for this process; idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(
            service,
            env,
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            timestamp=False,
        )
    )
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries' chatter at INFO (every reconnect attempt, every request) belongs at WARNING.
    for noisy in ("aiormq", "aio_pika", "botocore", "boto3", "urllib3", "aiohttp.access", "pyvips"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# The reconciler (orphaned objects, stuck jobs).
RECONCILE_RUNS = Counter(
    "imgpipe_reconcile_runs_total", "Reconciliation runs by result", ["result", "dry_run"]
)
RECONCILE_SECONDS = Histogram(
    "imgpipe_reconcile_duration_seconds",
    "Duration of a reconciliation run",
    buckets=(1, 5, 15, 60, 300, 900, 3600),
)
RECONCILE_SCANNED = Counter("imgpipe_reconcile_objects_scanned_total", "Objects listed in the bucket")
RECONCILE_DELETED = Counter("imgpipe_reconcile_objects_deleted_total", "Orphaned objects deleted")
RECONCILE_KEPT_YOUNG = Counter(
    "imgpipe_reconcile_objects_kept_young_total",
    "Unreferenced objects kept because they are inside the grace period",
)
RECONCILE_BYTES_FREED = Counter("imgpipe_reconcile_bytes_freed_total", "Bytes freed by deleting orphans")
RECONCILE_LAST_SUCCESS = Gauge(
    "imgpipe_reconcile_last_success_timestamp_seconds", "Unix time of the last successful reconciliation"
)
STUCK_JOBS = Counter(
    "imgpipe_stuck_jobs_total", "Jobs found stuck in pending/processing, by action taken", ["action"]
)
