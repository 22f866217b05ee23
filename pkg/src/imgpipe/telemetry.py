"""Structured JSON logs carrying `request_id` and `job_id`, and the Prometheus metrics.

Every log line passes through `Redactor` on its way out, so tokens, presigned URLs' signatures and
secrets never reach a log, whoever logged them. Every metric of every service is defined here so that
dashboards and alerts have one list of names.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from prometheus_client import Counter, Gauge, Histogram
from pythonjsonlogger.json import JsonFormatter

from imgpipe.settings import LOCAL_ENVIRONMENTS, CommonSettings, load

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def clean_request_id(value: object) -> str | None:
    """`value` if it is a sane request id (what a client or another publisher sent), else None.

    Ids come from outside (X-Request-ID, an AMQP header) and end up on every log line of the request
    or job: a bounded, plain one is kept, anything else is dropped rather than logged.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    # fullmatch: `$` would also match before a final newline ("abc\n"), which AMQP headers can carry.
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else None


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
# Finer at the low end: the steps of a job outside the render take milliseconds.
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _stage_series(name: str, each: str, stages: tuple[str, ...]) -> dict[str, Histogram]:
    """A histogram of the time of each of `stages` (its help lists them), as one series per stage.

    The series are made here so each exists from the start at zero (rates and dashboards have data
    before the first job), and so the services observe without a label lookup.
    """
    histogram = Histogram(
        name, f"Time of each {each} ({', '.join(stages)})", ["stage"], buckets=_STAGE_BUCKETS
    )
    return {stage: histogram.labels(stage) for stage in stages}


#: The stages of one delivery of a job in the worker, in order. `queued` runs from the api's creating
#: the job's record to a worker taking it (first delivery only: a retry's wait is its back-off); `fetch` from
#: then to the source's bytes in hand; `render_wait` is the wait for a render slot; then `render`,
#: `upload` (the variants' PUTs) and `finish` (the `succeeded` status written). A stage is observed
#: when it completes, so a job that fails adds no stage from the one it failed in onwards.
JOB_STAGES = ("queued", "fetch", "render_wait", "render", "upload", "finish")
JOB_STAGE = _stage_series("imgpipe_job_stage_seconds", "stage of a job in the worker", JOB_STAGES)
#: The steps of `POST /jobs` in the api, in order: `claim` (the Idempotency-Key's claim, sent with one
#: only), `admit` (the caller's rate and active-job budgets; not for admins), `source` (the source's
#: HEAD on S3 beside its upload grant, or the URL's policy check), `record` (the `pending` record
#: written), `publish` (the job in the broker, its confirm received: a quorum queue confirms once the
#: message is on disk) and `accept` (the Idempotency-Key marked accepted). Each is observed when it
#: completes, so a request refused at a step adds none from that step on.
API_SUBMIT_STAGES = ("claim", "admit", "source", "record", "publish", "accept")
API_SUBMIT_STAGE = _stage_series(
    "imgpipe_api_submit_stage_seconds", "step of POST /jobs in the api", API_SUBMIT_STAGES
)
JOB_LATENCY_SECONDS = Histogram(
    "imgpipe_job_latency_seconds",
    "Record created by the api to terminal status written, by outcome (succeeded, failed)",
    ["outcome"],
    buckets=_STAGE_BUCKETS,
)
# One series per outcome, made here for the same reasons as the stages'.
JOB_LATENCY = {outcome: JOB_LATENCY_SECONDS.labels(outcome) for outcome in ("succeeded", "failed")}
VARIANT_SECONDS = Histogram(
    "imgpipe_variant_render_seconds", "Render time per job by output format", ["format"], buckets=_JOB_BUCKETS
)
JOBS_IN_FLIGHT = Gauge("imgpipe_worker_jobs_in_flight", "Jobs the worker is processing now")
SOURCES_DEFERRED = Counter(
    "imgpipe_worker_sources_deferred_total",
    "Source downloads given up at their headers for want of room beside the sources held, and made again",
)
WORKER_CONCURRENCY = Gauge(
    "imgpipe_worker_concurrency", "Jobs the worker may process at once (utilization = in_flight / this)"
)
SSE_CONNECTIONS = Gauge("imgpipe_sse_connections", "Open Server-Sent Events streams")
SSE_REFUSED = Counter(
    "imgpipe_sse_refused_total",
    "Event streams refused: the user's limit per process (user) or the process's (process) reached",
    ["reason"],
)
#: How often every service checks its event loop for lag (`imgpipe.web.watch_event_loop`).
LOOP_CHECK_INTERVAL_S = 0.1
EVENT_LOOP_LAG = Histogram(
    "imgpipe_event_loop_lag_seconds",
    f"How late the event loop ran a timer due every {LOOP_CHECK_INTERVAL_S:g} s: how long ready work "
    "waited behind whatever held the loop (a blocking call, a long stretch of Python, another thread "
    "holding the GIL, a process short of CPU)",
    ["service"],
    # From the scheduler's own jitter (well under 0.5 ms on an idle loop) to a loop that stopped.
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

#: Library loggers and the least level they log at, even at IMGPIPE_LOG_LEVEL=DEBUG: their INFO is
#: chatter (every reconnect attempt, every request) and botocore's DEBUG spells out request
#: signatures. libvips warns about every oddity of an untrusted file, as often as the file makes it
#: (a PNG of empty text chunks: two lines a chunk), from its own threads, where no job id is known;
#: what fails a job is in the job's error instead.
NOISY_LOGGERS = {
    "aiormq": logging.WARNING,
    "aio_pika": logging.WARNING,
    "botocore": logging.WARNING,
    "boto3": logging.WARNING,
    "s3transfer": logging.WARNING,
    "urllib3": logging.WARNING,
    "aiohttp.access": logging.WARNING,
    "pyvips": logging.ERROR,
}
#: What a scrubbed value is replaced with.
REDACTED = "[REDACTED]"
#: Secret values shorter than this are not scrubbed verbatim: "guest" or "testing" would blank out
#: ordinary words everywhere. The patterns still catch them where they sit in URLs and fields.
MIN_SECRET_LENGTH = 8
#: Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = ("IMGPIPE_JWT_SECRET", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: Environment variables holding URLs whose password is a secret.
SECRET_URL_ENV_VARS = ("IMGPIPE_AMQP_URL", "IMGPIPE_REDIS_URL")

# The patterns run over the finished JSON line, so they must match values as JSON spells them: a
# newline is the two characters `\n`, a quote is `\"`. No value class contains a backslash or a
# quote, so a replacement can never eat the escape or the quote that ends a JSON string. A key is
# matched by its last word (`X-Amz-Signature` by `Signature`), which keeps the pattern cheap.
_GAP = r"(?:\s|\\[nrt])*"  # whitespace, raw or escaped
_RULES = (
    # `Authorization: Bearer <token>` in any spelling; the scheme stays, so the line still says what it was.
    r"(?P<bearer>(?i:bearer)(?:\s|\\[nrt])+)[A-Za-z0-9._~+/=-]{12,}",
    # JWTs, and any base64 JSON (`eyJ` is `{"`): the presigned POST policy, a token without its scheme.
    r"eyJ[A-Za-z0-9_+/=-]{8,}(?:\.[A-Za-z0-9_+/=-]*){0,2}",
    # A secret-sounding key, then its value:
    r"(?i:token|signature|credential|secret|passw(?:or)?d|policy)(?:"
    # - quoted, as in JSON and Python reprs: {"x-amz-signature": "…"}, {'X-Amz-Security-Token': b'…'};
    rf"(?P<quoted>\\?[\"']{_GAP}:{_GAP}b?\\?[\"'])[^\"'\\]+"
    # - in query strings, forms and headers: access_token=…, X-Amz-Signature=…, Credential=…;
    # (also `password = 'x'` and `token="x"`, as dataclass and pydantic reprs write them);
    rf"|(?P<assign>{_GAP}={_GAP}\\?[\"']?)[^\s\"'\\&,;<>#)\]}}]+"
    # - `Signature:\n<hex>` (botocore at DEBUG): long values only, so that ordinary sentences such as
    #   "token: Signature has expired" stay readable.
    rf"|(?P<colon>{_GAP}:{_GAP})[A-Za-z0-9+/=_.~%-]{{16,}})",
    # The password in a URL's userinfo: amqp://user:pass@host, redis://:pass@host.
    r"(?P<userinfo>://[^\s/@:\"'\\]*:)[^\s/@\"'\\]+(?=@)",
)
#: The characters a rule's match can start with: the engine skips every other position at once.
_RULE_STARTS = "BbeTtSsCcPp:"
#: Groups that end the part of a match that stays (the key, the scheme): only what follows goes.
_KEEP = ("bearer", "quoted", "assign", "colon", "userinfo")
#: Lower-case fragments at least one of which is in any line a rule can match: lines without any
#: (nearly all of them) skip the regular expression.
_TRIGGERS = ("token", "signature", "credential", "secret", "passw", "policy", "bearer", "eyj", "://")


def _spellings(secret: str) -> set[str]:
    """The secret as it may show up in a JSON line: raw, JSON-escaped, percent-decoded."""
    forms = {secret, json.dumps(secret)[1:-1]}
    decoded = unquote(secret)
    if decoded != secret:
        forms |= {decoded, json.dumps(decoded)[1:-1]}
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


class Redactor:
    """Scrubs tokens, signatures, URL passwords and known secret values out of log lines.

    One compiled pattern, one pass over the line. `secrets` are exact values (the JWT key, the S3
    secret) removed wherever they appear; the patterns catch the rest by shape.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        exact = set().union(*(_spellings(secret) for secret in secrets if secret))
        # Longest first: a secret that contains another is removed whole.
        self._exact = sorted(exact, key=len, reverse=True)
        starts = "".join(sorted(set(_RULE_STARTS).union(value[0] for value in self._exact)))
        alternatives = [*(re.escape(value) for value in self._exact), *_RULES]
        self._pattern = re.compile(f"(?=[{re.escape(starts)}])(?:{'|'.join(alternatives)})")

    def _replace(self, match: re.Match[str]) -> str:
        for group in _KEEP:
            if match.group(group) is not None:
                return match.string[match.start() : match.end(group)] + REDACTED
        return REDACTED

    def __call__(self, text: str) -> str:
        lowered = text.lower()
        if any(trigger in lowered for trigger in _TRIGGERS) or any(value in text for value in self._exact):
            return self._pattern.sub(self._replace, text)
        return text


def secrets_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """The secret values this process was configured with: keys, and the passwords of its URLs."""
    environ = dict(os.environ if environ is None else environ)
    found = [environ[name] for name in SECRET_ENV_VARS if environ.get(name)]
    for name in SECRET_URL_ENV_VARS:
        try:
            password = urlsplit(environ.get(name, "")).password
        except ValueError:
            continue
        if password:
            found.append(password)
    return found


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class _Formatter(JsonFormatter):
    def __init__(self, service: str, env: str, redactor: Redactor, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._service = service
        self._redact = redactor
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

    def format(self, record: logging.LogRecord) -> str:
        # The finished line, so the message, every `extra` field and the exception text are covered.
        return self._redact(super().format(record))


def start_logging(service: str) -> CommonSettings:
    """A service's first step: its logging, then its common settings, then its logging as they say.

    Logging comes first so that a refused common setting (a bad `IMGPIPE_ENV` itself) is a JSON line
    too; until the settings are read, an environment not known to be local or test gets no traces.
    """
    raw = os.environ.get("IMGPIPE_ENV", "production")  # unset is production (`CommonSettings.env`)
    setup_logging(service, env=raw if raw in LOCAL_ENVIRONMENTS else "production")
    common = load(CommonSettings)
    setup_logging(service, env=common.env, level=common.log_level)
    return common


def setup_logging(service: str, *, env: str, level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """JSON lines on stderr for this process, redacted; idempotent.

    Besides `secrets`, the values of `SECRET_ENV_VARS` and the passwords of `SECRET_URL_ENV_VARS`
    are scrubbed wherever they appear.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(
            service,
            env,
            Redactor([*secrets_from_env(), *secrets]),
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
    for noisy, least in NOISY_LOGGERS.items():
        logging.getLogger(noisy).setLevel(least)
    # What no handler caught (a refused setting at start-up, a thread's exception) and warnings go
    # out as JSON lines too, instead of Python's plain-text traceback, which production must not have.
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


_UNCAUGHT = logging.getLogger("imgpipe.uncaught")


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    _UNCAUGHT.critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_unraisable(args: Any) -> None:
    """An exception Python could not raise (in a `__del__`, a finalizer): logged, not printed."""
    if args.exc_type is None:
        return
    _UNCAUGHT.error(
        "exception ignored in %s",
        args.err_msg or repr(args.object),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # what threading's own hook does
    thread = args.thread.name if args.thread is not None else "?"
    _UNCAUGHT.error(
        "uncaught exception in thread %s",
        thread,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


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
# A run S3 refuses deletes to still succeeds (the orphans are tried again next run): only this says so.
RECONCILE_DELETE_ERRORS = Counter(
    "imgpipe_reconcile_delete_errors_total",
    "Orphaned objects S3 refused to delete (per-key DeleteObjects errors); tried again next run",
)
RECONCILE_LAST_SUCCESS = Gauge(
    "imgpipe_reconcile_last_success_timestamp_seconds", "Unix time of the last successful reconciliation"
)
STUCK_JOBS = Counter(
    "imgpipe_stuck_jobs_total", "Jobs found stuck in pending/processing, by action taken", ["action"]
)
