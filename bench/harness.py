"""Shared plumbing: a private imgpipe stack (own namespace, own moto S3), stats, process memory.

The services are the installed `imgpipe-*` commands started as processes, exactly as in the e2e tests
(`tests/stack.py`), against the RabbitMQ and Redis on localhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.stack import (
    AMQP_URL,
    REDIS_URL,
    Service,
    Stack,
    drop_namespace,
    service_env,
    start_moto,
    token,
)

__all__ = ["AMQP_URL", "REDIS_URL", "BenchStack", "pct", "token", "vm_hwm_mb", "vm_rss_mb"]

REPO = Path(__file__).resolve().parent.parent
BUCKET = "imgpipe-bench"
OWNER = "bench"


def _image_malloc_conf() -> str:
    """The `MALLOC_CONF` the worker's image sets (read from its Dockerfile, so the two cannot drift)."""
    found = re.search(r"\bMALLOC_CONF=(\S+)", (REPO / "services/worker/Dockerfile").read_text())
    if found is None:
        raise RuntimeError("services/worker/Dockerfile sets no MALLOC_CONF")
    return found.group(1)


#: The worker runs with the allocator its image gives it (services/worker/Dockerfile: jemalloc, and
#: its MALLOC_CONF), when this machine has the library: memory and CPU figures of a worker on
#: glibc's malloc would not be those of the deployed one. For an A/B, `BENCH_WORKER_MALLOC=glibc`
#: runs them on glibc's, and `BENCH_WORKER_MALLOC_CONF` sets another jemalloc configuration.
WORKER_MALLOC_CONF = os.environ.get("BENCH_WORKER_MALLOC_CONF") or _image_malloc_conf()
_JEMALLOC = (
    None
    if os.environ.get("BENCH_WORKER_MALLOC") == "glibc"
    else next(
        (
            path
            for path in (
                Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                Path("/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"),
                Path("/usr/local/lib/libjemalloc.so.2"),
            )
            if path.exists()
        ),
        None,
    )
)


def worker_allocator() -> str:
    """The allocator bench workers run with, for the report."""
    return f"jemalloc ({_JEMALLOC}, {WORKER_MALLOC_CONF})" if _JEMALLOC else "glibc malloc (no jemalloc here)"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest-rank on the sorted values, linear in between)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratios(values: list[float], baselines: list[float]) -> list[float]:
    """Each round's figure over the same round's baseline. Rates drift with the machine from round to
    round; the ratio to a baseline measured in the same round much less, so figures are medians of these."""
    return [v / b for v, b in zip(values, baselines, strict=True)]


def _proc_status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return float("nan")


def _stat_fields(path: str) -> tuple[str, list[str]]:
    """The command name and the fields after it of a /proc `stat` file."""
    text = Path(path).read_text()
    return text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes `pids` (all their threads) have used so far, seconds."""
    total = 0
    for pid in pids:
        # Fields 14 and 15 of /proc/<pid>/stat, counted after the ")" that ends the command name.
        _, fields = _stat_fields(f"/proc/{pid}/stat")
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


#: The kinds of thread `thread_cpu_seconds` tells apart.
THREAD_KINDS = (
    "libvips threads",
    "Python threads",
    "event loop, user",
    "event loop, system",
    "ended and other",
)


def thread_cpu_seconds(pids: list[int]) -> Counter[str]:
    """CPU the processes `pids` have used so far, seconds, by kind of thread (`THREAD_KINDS`).

    The event loop is the main thread (user and system time apart: the system time is the sockets and
    the page faults). Python's threads (the worker's render threads, asyncio's executor) keep the
    process' command name, as CPython names no thread: a render thread also runs the part of libvips'
    work that happens on the thread that called it (the encoders, for one). libvips names its own
    threads ("libvips worker").
    Threads that have ended are no longer listed, their time only in the process' total: that, and
    what any other thread took, is "ended and other". libvips ends worker threads that sit idle
    (8 of a worker's in 40 jobs, about 4 ms of CPU a job), so under load most of it is libvips'.
    """
    ticks: Counter[str] = Counter()
    for pid in pids:
        process_name, fields = _stat_fields(f"/proc/{pid}/stat")
        unaccounted = int(fields[11]) + int(fields[12])
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                name, fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            except (FileNotFoundError, ProcessLookupError):  # it ended while we looked: in the total
                continue
            user, system = int(fields[11]), int(fields[12])
            unaccounted -= user + system
            if int(tid) == pid:
                ticks["event loop, user"] += user
                ticks["event loop, system"] += system
            elif name == process_name:
                ticks["Python threads"] += user + system
            elif "vips" in name:
                ticks["libvips threads"] += user + system
            else:
                ticks["ended and other"] += user + system
        ticks["ended and other"] += max(0, unaccounted)
    per_tick = 1 / os.sysconf("SC_CLK_TCK")
    return Counter({kind: ticks[kind] * per_tick for kind in THREAD_KINDS})


def machine_busy_seconds() -> float:
    """CPU time all the cores of this machine have spent busy so far (neither idle nor waiting for
    I/O), seconds: what every process and the kernel's own threads took, together. Steal (time a
    virtual machine's core waited for its host) is not this machine's work, and is left out."""
    # The first line of /proc/stat: user nice system idle iowait irq softirq steal (guest time is
    # counted in user already), in clock ticks.
    user, nice, system, _idle, _iowait, irq, softirq, _steal = (
        int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def local_server_pids() -> dict[str, int]:
    """The processes of the RabbitMQ and the Redis the benchmark uses, by name, where they run on
    this machine (and so share its cores with the worker); a server found elsewhere is left out."""
    found: dict[str, int] = {}
    try:
        with redis.Redis.from_url(REDIS_URL) as client:
            pid = int(client.info("server")["process_id"])
        if Path(f"/proc/{pid}/comm").read_text().strip().startswith("redis"):
            found["Redis"] = pid
    except (redis.RedisError, OSError, KeyError, ValueError):
        pass
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        # The Erlang VM that boots the `rabbit` application (`-s rabbit boot`).
        if b"beam.smp" in cmdline.split(b"\0", 1)[0] and b"rabbit" in cmdline:
            found["RabbitMQ"] = int(proc.name)
            break
    return found


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a process so far, MiB."""
    return _proc_status(pid, "VmHWM")


def vm_rss_mb(pid: int) -> float:
    return _proc_status(pid, "VmRSS")


class PySpy:
    """`py-spy record` of one process into a speedscope file (https://www.speedscope.app), from
    its start until `stop`. Non-blocking: the process is sampled without being paused."""

    def __init__(self, exe: str, pid: int, out: Path) -> None:
        args = ["record", "--pid", str(pid), "--rate", "500", "--nonblocking", "--format", "speedscope"]
        self.proc = subprocess.Popen(
            [exe, *args, "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)  # attached and sampling

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def py_spy_path() -> str | None:
    """The py-spy of this environment (in the dev group), else one on PATH."""
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def profiled(pid: int, out: Path | None, log: Callable[[str], None] = print) -> Iterator[None]:
    """A py-spy profile of process `pid` into `out` while the block runs; with no `out`, or no
    py-spy, the block alone."""
    exe = py_spy_path() if out is not None else None
    if out is None or exe is None:
        if out is not None:
            log("  py-spy not found: no profile")
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = PySpy(exe, pid, out)
    try:
        yield
    finally:
        spy.stop()
    log(f"  profile: {out}")


def scrape(url: str) -> str:
    """The Prometheus text of the service at `url` (its `/metrics`)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        return response.read().decode()


LOOP_LAG = "imgpipe_event_loop_lag_seconds"


def _samples(urls: list[str], name: str) -> Iterator[Sample]:
    """The samples of the metric family `name` of each service at `urls` (its `/metrics`)."""
    for url in urls:
        for family in text_string_to_metric_families(scrape(url)):
            if family.name == name:
                yield from family.samples


def loop_lag_totals(urls: list[str]) -> Counter[str]:
    """Running totals of the event-loop lag histograms (`imgpipe_event_loop_lag_seconds`) of the
    services at `urls`, added up: `count`, `sum`, and the ticks at or under each bucket bound (`le`)."""
    totals: Counter[str] = Counter()
    for sample in _samples(urls, LOOP_LAG):
        if sample.name.endswith("_bucket"):
            totals[sample.labels["le"]] += sample.value
        else:
            totals[sample.name.removeprefix(f"{LOOP_LAG}_")] += sample.value  # count, sum
    return totals


#: The workers' count of source downloads given up at their headers for want of room (`holds.Sources`).
SOURCES_DEFERRED = "imgpipe_worker_sources_deferred"


def counter_total(urls: list[str], name: str) -> float:
    """The counter `name` (its family's name, without `_total`) of the services at `urls`, added up."""
    return sum(sample.value for sample in _samples(urls, name) if sample.name == f"{name}_total")


def loop_lag_summary(ticks: Counter[str]) -> dict:
    """`ticks` (what `loop_lag_totals` grew by over a measurement) as figures: the ticks, their mean
    lag, the shares of them later than 5 and 25 ms, and the bucket bound the latest one is under."""
    count = ticks["count"]
    if not count:
        return {"ticks": 0}
    bounds = sorted((float(le), n) for le, n in ticks.items() if le not in ("count", "sum"))
    return {
        "ticks": int(count),
        "mean_ms": ticks["sum"] / count * 1000,
        "over_5ms": 1 - ticks["0.005"] / count,
        "over_25ms": 1 - ticks["0.025"] / count,
        "worst_under_ms": next(le for le, n in bounds if n >= count) * 1000,
    }


class BenchStack:
    """One namespace, one moto S3, and whichever services a measurement needs."""

    def __init__(self, logdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.namespace = f"imgpipe-bench-{uuid.uuid4().hex[:8]}"
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self._moto_log = (logdir / "moto.log").open("wb")
        self.moto, self.s3_url = start_moto(stdout=self._moto_log)
        self.env = service_env(
            self.namespace, self.s3_url, bucket=BUCKET, IMGPIPE_LOG_LEVEL="WARNING", **(extra_env or {})
        )
        self.s3 = self._boto()
        self.s3.create_bucket(Bucket=BUCKET)
        self.stack = Stack(self.env)
        self._services: list[Service] = []

    def _boto(self):
        import boto3
        from botocore.client import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(max_pool_connections=32),
        )

    # services

    def start(self, name: str, extra_env: dict[str, str] | None = None) -> Service:
        if name == "worker" and _JEMALLOC is not None:
            extra_env = {"LD_PRELOAD": str(_JEMALLOC), "MALLOC_CONF": WORKER_MALLOC_CONF, **(extra_env or {})}
        service = self.stack.start(name, self.logdir, extra_env)
        self._services.append(service)
        return service

    def stop(self, service: Service) -> None:
        self.stack.stop(service)
        if service in self._services:
            self._services.remove(service)

    def close(self) -> None:
        for service in list(self._services):
            self.stop(service)
        self.moto.terminate()
        try:
            self.moto.wait(10)
        except subprocess.TimeoutExpired:
            self.moto.kill()
        self._moto_log.close()
        drop_namespace(self.namespace)

    # data

    def upload(self, name: str, data: bytes, content_type: str) -> str:
        from imgpipe.store import owner_id

        key = f"uploads/{owner_id(OWNER)}/{name}-{uuid.uuid4().hex[:8]}"
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType=content_type)
        return key

    def job_store(self):
        from imgpipe.resources import redis_client
        from imgpipe.settings import RedisSettings
        from imgpipe.store import JobStore

        client = redis_client(RedisSettings(redis_url=REDIS_URL, redis_max_connections=256))
        return JobStore(client, self.namespace, retention=timedelta(hours=2))


async def open_publisher(namespace: str):
    from imgpipe import broker

    connection = await broker.connect(AMQP_URL)
    publisher = broker.Publisher(connection, broker.Topology(namespace))
    return connection, publisher


async def submit_direct(store, publisher, key: str, variants: list) -> str:
    """What `POST /jobs` does after validation, without HTTP: `pending` in Redis, publish, confirm."""
    from imgpipe.models import JobMessage, JobRecord, KeySource

    job_id = uuid.uuid4().hex
    record = JobRecord.pending(job_id, OWNER, KeySource(key=key), variants)
    await store.create(record)
    await publisher.publish_job(
        JobMessage(
            id=job_id, owner=OWNER, source=record.source, variants=variants, created_at=record.created_at
        )
    )
    return job_id


async def submit_and_wait(
    store, submit: Callable[[], Awaitable[list[str]]], timeout_s: float
) -> tuple[list[str], dict[str, float]]:
    """Run `submit()` (which returns job ids) and wait until every one of those jobs is terminal.

    Returns the ids and the moment (`time.monotonic()`) each was seen terminal. It listens to the
    store's change channel, the one the status service uses, subscribed before `submit()` runs so no
    change is missed. Polling Redis instead cost the benchmark process ~8 ms of CPU per job on the
    cores the pipeline under test was using; so does validating every change (three a job) into a
    `JobRecord`, as the store's own `subscribe` does: only terminal changes are parsed, for their id.
    """
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(store.channel)
    try:
        ids = await submit()
        wanted = set(ids)
        done: dict[str, float] = {}
        try:
            async with asyncio.timeout(timeout_s):
                while len(done) < len(wanted):
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message["data"]
                    if _SUCCEEDED not in data and _FAILED not in data:
                        continue
                    job_id = json.loads(data)["record"]["id"]
                    if job_id in wanted and job_id not in done:
                        done[job_id] = time.monotonic()
        except TimeoutError:
            raise TimeoutError(
                f"{len(wanted) - len(done)} of {len(wanted)} jobs not terminal after {timeout_s}s"
            ) from None
    finally:
        await pubsub.aclose()
    return ids, done


# A change's record as the store publishes it (compact JSON): its terminal statuses.
_SUCCEEDED = b'"status":"succeeded"'
_FAILED = b'"status":"failed"'


async def statuses(store, job_ids) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in job_ids:
        record = await store.get(job_id)
        key = record.status.value if record else "missing"
        if record is not None and record.error is not None:
            key += f":{record.error.code}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def in_turn(steps: list, round_index: int) -> list:
    """The contenders in the order they run in round `round_index`: each round starts one later.

    The machine's speed drifts over a round, and a fixed order would always put the same contenders
    furthest from the baseline they are divided by; in turn, each takes every place once in
    `len(steps)` rounds. The throughput and api sections run their contenders this way.
    """
    shift = round_index % len(steps)
    return steps[shift:] + steps[:shift]
