"""The throughput section's accounting of CPU beside the worker: who is found, what is counted, and
how the report breaks the pipeline's machine CPU down. Nothing here asserts a timing."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.harness import cpu_seconds, local_server_pids, machine_busy_seconds


def test_the_local_rabbitmq_and_redis_are_found_as_their_own_processes() -> None:
    # The suite runs against a RabbitMQ and a Redis on this machine (tests/stack.py).
    found = local_server_pids()

    assert set(found) == {"RabbitMQ", "Redis"}, found
    assert Path(f"/proc/{found['Redis']}/comm").read_text().startswith("redis")
    assert b"beam.smp" in Path(f"/proc/{found['RabbitMQ']}/cmdline").read_bytes()
    assert cpu_seconds(list(found.values())) > 0


def test_machine_busy_time_counts_the_work_of_every_process() -> None:
    # One process spinning per core: the machine is busy throughout, whatever else runs, so a
    # figure that counted idle time (or one process only) would come out far short.
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = machine_busy_seconds()
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    for proc in procs:
        assert proc.wait(timeout=30) == 0
    busy = machine_busy_seconds() - before
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)

    assert spent >= 0.3 * len(procs), spent
    assert busy >= spent - 0.05 * len(procs), (busy, spent)  # a clock tick of rounding per process


def _summary(machine_raw: float, machine_pipeline: float) -> dict:
    layout = "1 worker x concurrency 2"
    return {
        "headline_layout": f"imgpipe ({layout})",
        "headline_label": layout,
        "machine_cpu_vs_raw": machine_raw / machine_pipeline,
        "cpu_ms_per_image": {
            "raw libvips": 80.0,
            f"imgpipe ({layout})": 85.0,
            f"S3 server (moto), {layout}": 6.0,
            f"RabbitMQ and Redis, {layout}": 1.5,
            f"benchmark process, {layout}": 1.0,
            "machine, raw libvips": machine_raw,
            f"machine, {layout}": machine_pipeline,
        },
    }


@pytest.mark.parametrize(("pipeline", "rest"), [(96.0, "2.5"), (92.0, "-1.5")])
def test_the_machine_row_gives_the_ratio_and_where_the_pipeline_spent_it(pipeline: float, rest: str) -> None:
    row = report._machine_row("1 variant", _summary(84.0, pipeline))

    assert row["value"] == f"84 ms / {pipeline:.0f} ms = {84.0 / pipeline:.2f}x"
    assert row["baseline"] == (
        "pipeline: the worker 85.0, S3 server 6.0, RabbitMQ and Redis 1.5, this benchmark's process 1.0, "
        f"the rest (kernel threads, other work) {rest} ms"
    )
