"""Reconciler benchmark: scan rate and peak memory of `imgpipe-reconcile` over a large bucket.

    .venv/bin/python bench/reconcile.py --objects 100000

Starts a moto S3 server on a free port, fills a bucket with small orphaned uploads (plus a share of
foreign keys; no grace period, so each upload is a candidate checked against the jobs), then runs
`imgpipe-reconcile --dry-run` in a subprocess at 10% and at 100% of the objects and reports the scan
rate and the child's peak RSS: flat memory means the two peaks match. The same-run baseline is a bare
listing of the same bucket (boto3's `list_objects_v2` paginator, 1,000 keys a page, as the reconciler
pages), timed right after each run: moto's listing costs more per page the larger the bucket, and the
ratio says how much of the scan is ours.
Needs Redis and RabbitMQ on localhost (a throwaway namespace is used and removed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.client import Config

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
sys.path.insert(0, str(REPO))
from bench.harness import vm_hwm_mb  # noqa: E402
from tests.stack import drop_namespace, service_env, start_moto  # noqa: E402


def fill(s3: object, bucket: str, start: int, stop: int) -> None:
    def put(i: int) -> None:
        key = f"uploads/bench/{i:08d}" if i % 10 else f"other/{i:08d}"
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")  # type: ignore[attr-defined]

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(start, stop)))


def list_all(s3: object, bucket: str) -> tuple[int, float]:
    """Page through every key of `bucket` and do nothing else: the count and the seconds it took."""
    started = time.perf_counter()
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):  # type: ignore[attr-defined]
        count += page.get("KeyCount", 0)
    return count, time.perf_counter() - started


def reconcile(env: dict[str, str]) -> tuple[dict, float, float]:
    """One dry run in a child process: its summary, wall time and peak RSS in MiB.

    The peak is the child's VmHWM, polled while it runs. Not `getrusage`/`wait4`: a child's
    ru_maxrss includes the memory image it was forked from (this process, grown by the fill), so
    it would report this process's size rather than the reconciler's. VmHWM belongs to the
    program's own address space, which starts at exec.
    """
    started = time.perf_counter()
    peak = 0.0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(
            [str(BIN / "imgpipe-reconcile"), "--dry-run"], env=env, stdout=out, stderr=errors
        )
        while child.poll() is None:
            try:
                peak = max(peak, vm_hwm_mb(child.pid))
            except OSError:  # exited between poll() and the read
                break
            time.sleep(0.02)
        child.wait()
        elapsed = time.perf_counter() - started
        if child.returncode != 0:
            errors.seek(0)
            raise RuntimeError(
                f"imgpipe-reconcile failed ({child.returncode}): {errors.read().decode()[-2000:]}"
            )
        out.seek(0)
        summary = json.loads(out.read())
    return summary, elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args()
    server, endpoint = start_moto()
    namespace = f"imgpipe-bench-{uuid.uuid4().hex[:8]}"
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(max_pool_connections=32),
        )
        s3.create_bucket(Bucket="bench")
        # No grace: every upload is old enough to be an orphan, so the run does the whole of its work
        # (each candidate checked against the jobs and grants) rather than skip the fresh ones.
        overrides = {"IMGPIPE_LOG_LEVEL": "WARNING", "IMGPIPE_RECONCILE_GRACE_SECONDS": "0"}
        env = {**os.environ, **service_env(namespace, endpoint, bucket="bench", **overrides)}
        small = max(1, args.objects // 10)
        results = []
        filled = 0
        for target in (small, args.objects):
            started = time.perf_counter()
            fill(s3, "bench", filled, target)
            print(f"filled {target} objects ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
            filled = target
            summary, elapsed, peak = reconcile(env)
            assert summary["scanned"] == target, summary
            assert summary["orphans"] + summary["skipped_foreign"] == target, summary  # all of it judged
            listed, listing_s = list_all(s3, "bench")
            assert listed == target, listed
            results.append(
                {
                    "objects": target,
                    "seconds": round(elapsed, 2),
                    "scan_rate_per_s": round(target / summary["duration_s"]),
                    "listing_rate_per_s": round(target / listing_s),
                    "peak_rss_mib": round(peak, 1),
                    "orphans": summary["orphans"],
                    "skipped_foreign": summary["skipped_foreign"],
                }
            )
        growth = results[1]["peak_rss_mib"] - results[0]["peak_rss_mib"]
        print(json.dumps({"runs": results, "peak_rss_growth_mib": round(growth, 1)}, indent=2))
    finally:
        server.terminate()
        server.wait(10)
        drop_namespace(namespace)


if __name__ == "__main__":
    main()
