"""The throughput section's accounting of CPU beside the worker: who is found, what is counted, and
how the report breaks the pipeline's machine CPU down, and the workers' event-loop lag read from
their metrics. Nothing here asserts a timing of the machine."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from imgpipe.telemetry import SOURCES_DEFERRED as SOURCES_DEFERRED_COUNTER
from imgpipe.web import base_app
from prometheus_client import REGISTRY

from bench import report
from bench.harness import (
    LOOP_LAG,
    SOURCES_DEFERRED,
    THREAD_KINDS,
    counter_total,
    cpu_seconds,
    in_turn,
    local_server_pids,
    loop_lag_summary,
    loop_lag_totals,
    machine_busy_seconds,
    thread_cpu_seconds,
)
from tests.stack import local_http
from tests.worker.test_consumer import eventually


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


def test_machine_busy_time_leaves_idle_time_out() -> None:
    # One process spinning for 0.3 s of CPU on a machine otherwise left alone for a second: counted
    # with its idle time, the figure would be about the cores' whole second each.
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    cores = os.cpu_count() or 1
    started, before = time.monotonic(), machine_busy_seconds()
    assert subprocess.run([sys.executable, "-c", spin], timeout=30).returncode == 0
    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    busy, wall = machine_busy_seconds() - before, time.monotonic() - started

    assert busy >= 0.3 - 0.05, busy
    # The rest of the machine (RabbitMQ, Redis, this process) stays far below the idle cores' time.
    assert busy < 0.3 + 0.5 * (wall * cores - 0.3), (busy, wall, cores)


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


async def test_the_event_loop_lag_of_a_service_is_read_from_its_metrics() -> None:
    """Read from the service's /metrics as the section reads its workers': a loop blocked for 0.4 s
    shows as one tick later than 25 ms whose bucket is 0.5 s, and the quiet ticks around it."""
    app = base_app("benchlag", environment="test")
    async with local_http(app) as url:
        await eventually(lambda: REGISTRY.get_sample_value(f"{LOOP_LAG}_count", {"service": "benchlag"}))
        before = await asyncio.to_thread(loop_lag_totals, [url])
        await asyncio.sleep(0.35)  # three or four quiet ticks
        time.sleep(0.4)  # noqa: ASYNC251  # the loop blocked
        await asyncio.sleep(0.25)
        after = await asyncio.to_thread(loop_lag_totals, [url])
    lag = loop_lag_summary(after - before)

    assert lag["ticks"] >= 4, lag
    assert lag["worst_under_ms"] == 500, lag
    assert 0 < lag["over_25ms"] <= 1 / 4, lag
    assert lag["mean_ms"] >= 300 / lag["ticks"], lag


def test_the_lag_row_gives_both_layouts() -> None:
    ticks = Counter({"count": 10, "sum": 0.05, "0.005": 9, "0.025": 10, "0.05": 10, "+Inf": 10})
    quiet = Counter({"count": 4, "sum": 0.001, "0.005": 4, "0.025": 4, "+Inf": 4})
    s = {
        "headline_label": "1 worker x concurrency 2",
        "loop_lag": {
            "1 worker x concurrency 2": loop_lag_summary(ticks),
            "2 workers x concurrency 1": loop_lag_summary(quiet),
        },
    }
    row = report._lag_row("1 variant", s)

    assert row["figure"] == "1 variant: the worker's event-loop lag (10 ticks)"
    assert row["value"] == "mean 5.00 ms, 10% of ticks over 5 ms, 0% over 25 ms, the latest under 25 ms"
    assert row["baseline"] == (
        "2 workers x concurrency 1: mean 0.25 ms, 0% of ticks over 5 ms, 0% over 25 ms, the latest under 5 ms"
    )


# A child that spins in its main thread, in a Python thread that stays and in one that ends, and has
# libvips make a thumbnail on two threads; then waits, so that its threads can be read.
_THREADED = """
import sys, threading, time
import pyvips

def spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass

ended = threading.Thread(target=spin, args=(0.3,))
ended.start()
ended.join()
staying = threading.Thread(target=lambda: (spin(0.3), threading.Event().wait()), daemon=True)
staying.start()
spin(0.3)
pyvips.concurrency_set(2)
image = pyvips.Image.gaussnoise(3000, 3000)
image.resize(0.1).write_to_buffer(".png")
time.sleep(0.5)  # the staying thread has spun by now
print("ready", flush=True)
sys.stdin.read()
"""


def test_the_threads_of_a_process_are_counted_by_kind() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _THREADED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            kinds = thread_cpu_seconds([child.pid])
            total = cpu_seconds([child.pid])
        finally:
            child.kill()

    assert list(kinds) == list(THREAD_KINDS)
    # 0.3 s each, read in clock ticks of 10 ms
    assert kinds["event loop, user"] + kinds["event loop, system"] >= 0.25, kinds
    assert kinds["Python threads"] >= 0.25, kinds  # the thread that stays
    assert kinds["ended and other"] >= 0.25, kinds  # the thread that ended: in the process' total only
    assert kinds["libvips threads"] > 0, kinds
    assert abs(sum(kinds.values()) - total) <= 0.02, (kinds, total)


def test_the_threads_row_breaks_the_worker_down_beside_the_raw_loop() -> None:
    layout = "1 worker x concurrency 2"
    s = _summary(84.0, 96.0)
    parts = dict(zip(THREAD_KINDS, (64.0, 3.8, 4.1, 2.7, 0.2), strict=True))
    s["cpu_ms_per_image"].update({f"worker's {kind}, {layout}": ms for kind, ms in parts.items()})

    row = report._threads_row("1 variant", s)

    assert row is not None
    assert row["figure"] == "1 variant: the worker's CPU per image by thread"
    assert row["value"] == (
        "libvips 64.0, Python threads (the renders, and the libvips work they run) 3.8, event loop 6.8 "
        "(user 4.1, system 2.7), "
        "ended threads (libvips' idle workers) and others 0.2 ms"
    )
    assert row["baseline"] == "raw loop 80.0 ms"
    assert report._threads_row("1 variant", _summary(84.0, 96.0)) is None  # a run from before it


def test_each_contender_takes_every_place_in_turn() -> None:
    steps = [
        "raw libvips",
        "Pillow",
        "imgpipe (2 workers x concurrency 1)",
        "imgpipe (1 worker x concurrency 2)",
    ]
    orders = [in_turn(steps, r) for r in range(len(steps) + 1)]

    assert orders[0] == steps  # the first round in the listed order
    for place in range(len(steps)):
        assert sorted(order[place] for order in orders[: len(steps)]) == sorted(steps)
    assert orders[len(steps)] == steps  # and round again


async def test_a_counter_of_a_service_is_read_from_its_metrics() -> None:
    """The workers' deferred downloads are read as their event-loop lag is: every service exports
    the shared registry's counters, so a plain one shows what the worker's counter grew by."""
    app = base_app("benchcount", environment="test")
    async with local_http(app) as url:
        before = await asyncio.to_thread(counter_total, [url, url], SOURCES_DEFERRED)
        SOURCES_DEFERRED_COUNTER.inc(3)
        after = await asyncio.to_thread(counter_total, [url, url], SOURCES_DEFERRED)
    assert after - before == 6  # added up over the services asked


def test_the_deferred_row_gives_both_layouts_over_all_rounds() -> None:
    s = {
        "headline_label": "1 worker x concurrency 2",
        "jobs_per_round": 48,
        "rounds": {"raw libvips": [1.0] * 5},
        "sources_deferred": {"1 worker x concurrency 2": 0, "2 workers x concurrency 1": 7},
    }
    row = report._deferred_row("1 variant", s)

    assert row["value"] == "0 of 240 jobs"
    assert row["baseline"] == "2 workers x concurrency 1: 7"
