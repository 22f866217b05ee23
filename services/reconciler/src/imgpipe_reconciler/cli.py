"""`imgpipe-reconcile [--dry-run] [--grace-seconds N]`: one reconciliation in the foreground.

Prints the summary as one JSON object on stdout, and progress on stderr every 10,000 objects or
every 5 seconds. Takes the same lock as the service, so it never overlaps a scheduled run.
Exit codes: 0 done, 1 the run failed, 2 bad configuration, 3 another reconciliation is running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import timedelta

from imgpipe import broker
from imgpipe.resources import redis_client
from imgpipe.settings import AmqpSettings, CommonSettings, ConfigError, RedisSettings, S3Settings, load
from imgpipe.storage import Storage
from imgpipe.store import JobStore
from imgpipe.telemetry import setup_logging

from imgpipe_reconciler.app import policy
from imgpipe_reconciler.lock import LockBusy, RunLock
from imgpipe_reconciler.reconcile import Reconciler, Summary, reconcile_once
from imgpipe_reconciler.settings import ReconcileSettings

#: The summary's documented keys, in order; the extra counters follow them.
SUMMARY_KEYS = (
    "scanned",
    "referenced",
    "orphans",
    "deleted",
    "kept_young",
    "bytes_freed",
    "dry_run",
    "duration_s",
)


class _Progress:
    def __init__(self, every_objects: int = 10_000, every_s: float = 5.0) -> None:
        self._every_objects = every_objects
        self._every_s = every_s
        self._next_count = every_objects
        self._next_time = time.monotonic() + every_s

    def __call__(self, summary: Summary) -> None:
        if summary.scanned < self._next_count and time.monotonic() < self._next_time:
            return
        self._next_count = summary.scanned + self._every_objects
        self._next_time = time.monotonic() + self._every_s
        rate = summary.scanned / summary.duration_s if summary.duration_s else 0.0
        print(
            f"imgpipe-reconcile: {summary.scanned} objects scanned ({rate:.0f}/s), "
            f"{summary.orphans} orphans, {summary.kept_young} kept young",
            file=sys.stderr,
            flush=True,
        )


async def _run(args: argparse.Namespace, common: CommonSettings, settings: ReconcileSettings) -> Summary:
    amqp = load(AmqpSettings)
    redis_settings = load(RedisSettings)
    client = redis_client(redis_settings)
    connection = await broker.connect(amqp.amqp_url.get_secret_value())
    publisher = broker.Publisher(connection, broker.Topology(common.namespace, amqp.retry_delays_s))
    storage = Storage(load(S3Settings))
    try:
        store = JobStore(
            client, common.namespace, retention=timedelta(days=redis_settings.job_retention_days)
        )
        reconciler = Reconciler(store, storage, publisher, policy(settings))
        return await reconcile_once(
            reconciler,
            RunLock(client, common.namespace, settings.reconcile_lock_ttl_s),
            dry_run=args.dry_run,
            run_id=f"cli-{uuid.uuid4().hex[:12]}",
            trigger="cli",
            progress=_Progress(),
        )
    finally:
        await storage.close()
        await publisher.close()
        await connection.close()
        await client.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="imgpipe-reconcile", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="report what would be done; delete nothing")
    parser.add_argument(
        "--grace-seconds",
        type=int,
        metavar="N",
        help="override IMGPIPE_RECONCILE_GRACE_SECONDS for this run (same validation)",
    )
    args = parser.parse_args(argv)
    if args.grace_seconds is not None:
        # Through the environment, so the override is validated (and named) like the variable.
        os.environ["IMGPIPE_RECONCILE_GRACE_SECONDS"] = str(args.grace_seconds)
    try:
        common = load(CommonSettings)
        settings = load(ReconcileSettings)
    except ConfigError as exc:
        print(f"imgpipe-reconcile: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging("reconcile", env=common.env, level=common.log_level)
    try:
        summary = asyncio.run(_run(args, common, settings))
    except LockBusy:
        print("imgpipe-reconcile: another reconciliation is running; try again later", file=sys.stderr)
        sys.exit(3)
    except Exception as exc:
        print(f"imgpipe-reconcile: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    print(
        f"imgpipe-reconcile: done: {summary.scanned} objects scanned, {summary.deleted} deleted "
        f"in {summary.duration_s:.1f}s",
        file=sys.stderr,
    )
    print(json.dumps(summary.as_dict()))


if __name__ == "__main__":
    main()
