"""`imgpipe-reconcile` as an operator runs it: the JSON summary on stdout, progress on stderr, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import redis

from tests.reconciler.conftest import keys
from tests.stack import BIN, REDIS_URL

SUMMARY = {
    "scanned",
    "referenced",
    "orphans",
    "deleted",
    "kept_young",
    "bytes_freed",
    "dry_run",
    "duration_s",
}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imgpipe-reconcile"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dry_run_then_real_run(rc_env: dict[str, str], s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="uploads/someone/lost", Body=b"12345")
    s3.put_object(Bucket=bucket, Key="elsewhere/kept", Body=b"1")
    dry = _cli(rc_env, "--dry-run", "--grace-seconds", "0")
    assert dry.returncode == 0, dry.stderr
    summary = json.loads(dry.stdout)
    assert SUMMARY <= set(summary)
    assert (summary["scanned"], summary["orphans"], summary["deleted"], summary["dry_run"]) == (2, 1, 0, True)
    assert "imgpipe-reconcile: done" in dry.stderr
    assert "reconciliation finished" in dry.stderr  # the one structured log line of the run

    real = _cli(rc_env, "--grace-seconds", "0")
    assert real.returncode == 0, real.stderr
    result = json.loads(real.stdout)
    assert (result["orphans"], result["deleted"], result["bytes_freed"]) == (1, 1, 5)
    assert keys(s3, bucket) == {"elsewhere/kept"}


def test_exit_codes(rc_env: dict[str, str], rc_namespace: str) -> None:
    bad = _cli(rc_env, "--grace-seconds", "-1")
    assert bad.returncode == 2 and "IMGPIPE_RECONCILE_GRACE_SECONDS" in bad.stderr
    assert bad.stdout == ""

    client = redis.Redis.from_url(REDIS_URL)
    client.set(f"{rc_namespace}:reconcile:lock", "someone-else", ex=30)
    try:
        busy = _cli(rc_env, "--dry-run")
    finally:
        client.delete(f"{rc_namespace}:reconcile:lock")
        client.close()
    assert busy.returncode == 3 and "another reconciliation is running" in busy.stderr

    missing = _cli({**rc_env, "IMGPIPE_S3_BUCKET": "no-such-bucket-here"}, "--dry-run")
    assert missing.returncode == 1 and "failed" in missing.stderr
    assert missing.stdout == ""
