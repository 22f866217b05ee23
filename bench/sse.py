"""Status fan-out: N SSE clients on one status process, all watching one job, and one status change.

The clients run in `CLIENT_PROCS` separate processes (default 1; `BENCH_SSE_CLIENT_PROCS`). Each
stream is a bare `asyncio.Protocol` (one HTTP/1.1 request, then a byte search in what arrives) rather
than an aiohttp client: at 5,000 streams on a 2-core machine a full client costs more CPU than the
server it measures, and its own queueing would show up as "delivery latency". Each process opens its
share with at most `IN_FLIGHT` requests unanswered at a time (a paced ramp, as a real client
population arrives, instead of a SYN flood) and reports once every stream has either shown the first
(`pending`) event or failed, so a failed stream does not hold the round up until a timeout.

Then the harness moves the job to `processing` with `JobStore`, and every stream notes when that
event reached it; the streams stay open until the round ends, as a real client's would. Delivery
latency = arrival - the moment just before the transition (CLOCK_MONOTONIC is one clock for every
process on the machine). Each round uses a new job on the same status process; the headline is the
median of the rounds' figures. Memory is the status process's VmHWM over all rounds, and it is a
fresh process.

`profile_dir` records py-spy speedscope profiles of the status process (connect phase and fan-out
of the first round); open them at https://www.speedscope.app.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.harness import OWNER, BenchStack, PySpy, median, pct, py_spy_path, token, vm_hwm_mb, vm_rss_mb

#: Client processes. One leaves the other core to the status process: on 2 cores, two clients and
#: the server compete for CPU and the clients' queueing shows up as delivery latency.
CLIENT_PROCS = int(os.environ.get("BENCH_SSE_CLIENT_PROCS", "1"))
#: Requests a client process has sent and not yet seen answered (the `pending` event), at most.
IN_FLIGHT = 256
CONNECT_TIMEOUT_S = 120
DELIVERY_TIMEOUT_S = 60


def raise_fd_limit(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class _Round:
    """One process's share of one round: its streams and what happened to them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.answered = 0  # got 200 and the first event
        self.failed: dict[str, int] = {}
        self.arrivals: list[float] = []
        self.streams: list[_Stream] = []
        self.all_answered = asyncio.Event()
        self.all_arrived = asyncio.Event()

    def fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1
        self._check()

    def _check(self) -> None:
        failed = sum(self.failed.values())
        if self.answered + failed >= self.count:
            self.all_answered.set()
        if len(self.arrivals) + failed >= self.count:
            self.all_arrived.set()


class _Stream(asyncio.Protocol):
    """One SSE stream: send the request, then look for the two events in the bytes as they come."""

    def __init__(self, request: bytes, rnd: _Round, slot: asyncio.Semaphore) -> None:
        self.request = request
        self.round = rnd
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.stage = 0  # 0 waiting for the status line, 1 for `pending`, 2 for `processing`, 3 done

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()  # first thing: the arrival time is what is measured
        if self.stage == 3:
            return
        buffer = self.buffer + data
        if self.stage == 0:
            if len(buffer) < 12:
                self.buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 200"):
                self._finish(f"http {buffer[9:12].decode(errors='replace')}")
                return
            self.stage = 1
        if self.stage == 1 and b"event: pending" in buffer:
            self.stage = 2
            self.round.answered += 1
            self.slot.release()
            self.round._check()
        if self.stage == 2 and b"event: processing" in buffer:
            # The stream stays open (a real client's would, until the job ends): closing it here
            # would make the server handle thousands of disconnects in the middle of the fan-out.
            self.stage = 3
            self.round.arrivals.append(now)
            self.round._check()
            return
        self.buffer = buffer[-32:]  # enough to find a marker split across two reads

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stage < 3:
            self._finish("closed before processing" if self.stage == 2 else "closed early")

    def _finish(self, why: str) -> None:
        if self.stage < 2:
            self.slot.release()
        self.stage = 3
        self.round.fail(why)
        if self.transport is not None:
            self.transport.close()


def _client(commands, replies) -> None:
    """A client process: for each `(url, auth, count)` command, one round of `count` streams."""
    raise_fd_limit(65536)

    async def one_round(url: str, auth: str, count: int) -> tuple[dict, dict]:
        loop = asyncio.get_running_loop()
        parts = urlsplit(url)
        request = (
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: {auth}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        rnd = _Round(count)
        slot = asyncio.Semaphore(IN_FLIGHT)
        started = time.monotonic()

        async def open_one() -> None:
            stream = _Stream(request, rnd, slot)
            try:
                await loop.create_connection(lambda: stream, parts.hostname, parts.port)
            except OSError as exc:
                stream.stage = 3
                slot.release()
                rnd.fail(f"connect: {type(exc).__name__}")
                return
            rnd.streams.append(stream)

        opening = []
        for _ in range(count):
            await slot.acquire()
            opening.append(asyncio.create_task(open_one()))
        try:
            await asyncio.wait_for(rnd.all_answered.wait(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            pass
        connect_s = time.monotonic() - started
        ready = {"answered": rnd.answered, "failed": dict(rnd.failed), "connect_s": connect_s}
        replies.put(("ready", ready))
        try:
            await asyncio.wait_for(rnd.all_arrived.wait(), DELIVERY_TIMEOUT_S)
        except TimeoutError:
            pass
        for stream in rnd.streams:
            if stream.transport is not None:
                stream.transport.close()
        await asyncio.gather(*opening, return_exceptions=True)
        return ready, {"arrivals": rnd.arrivals, "failed": dict(rnd.failed)}

    async def main() -> None:
        while True:
            command = await asyncio.to_thread(commands.get)
            if command is None:
                return
            _, result = await one_round(*command)
            replies.put(("result", result))

    asyncio.run(main())


def _merge(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def measure(
    logdir: Path, *, clients: int, rounds: int = 3, profile_dir: Path | None = None, log=print
) -> dict:
    raise_fd_limit(clients + 4096)  # inherited by the status process started below
    stack = BenchStack(logdir)
    ctx = mp.get_context("spawn")
    procs: list = []
    commands: list = []
    try:
        # Every client is one user here (so one token serves them all): lift the per-user and
        # per-process stream limits, which would otherwise answer most of them 429.
        status = stack.start(
            "status",
            {"IMGPIPE_SSE_MAX_STREAMS_PER_USER": str(clients), "IMGPIPE_SSE_MAX_STREAMS": str(clients)},
        )
        pid = status.proc.pid
        idle_rss = vm_rss_mb(pid)
        from imgpipe.models import JobRecord, JobStatus, KeySource, utcnow

        async def create(job_id: str) -> JobRecord:
            store = stack.job_store()
            record = JobRecord.pending(job_id, OWNER, KeySource(key="uploads/x/y"), [])
            created = (await store.create(record)).record
            await store.redis.aclose()
            return created

        async def move(job_id: str) -> float:
            store = stack.job_store()
            current = await store.get(job_id)
            nxt = current.model_copy(update={"status": JobStatus.PROCESSING, "updated_at": utcnow()})
            await store.redis.ping()  # connection open before the clock starts
            t0 = time.monotonic()
            await store._apply(nxt)  # what mark_processing does, minus its read
            await store.redis.aclose()
            return t0

        async def finish(job_id: str) -> None:
            store = stack.job_store()
            current = await store.get(job_id)
            await store.mark_succeeded(current, [])
            await store.redis.aclose()

        auth = f"Bearer {token(OWNER, ttl_s=3600)}"
        shares = [
            clients // CLIENT_PROCS + (1 if i < clients % CLIENT_PROCS else 0) for i in range(CLIENT_PROCS)
        ]
        replies = ctx.Queue()
        commands = [ctx.Queue() for _ in shares]
        procs = [ctx.Process(target=_client, args=(q, replies)) for q in commands]
        for p in procs:
            p.start()
        py_spy = py_spy_path() if profile_dir is not None else None
        if profile_dir is not None and py_spy is None:
            log("  py-spy not found: no profiles")

        per_round = []
        for n in range(rounds):
            record = asyncio.run(create(f"sse{n:03d}" + "0" * 26))
            url = f"{status.url}/jobs/{record.id}/events"
            spy = None
            if py_spy and n == 0:
                profile_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
                spy = PySpy(py_spy, pid, profile_dir / "status-connect.speedscope.json")  # type: ignore[operator]
            for q, share in zip(commands, shares, strict=True):
                q.put((url, auth, share))
            answered, failed, connect_s = 0, {}, 0.0
            for _ in procs:
                kind, ready = replies.get(timeout=CONNECT_TIMEOUT_S + 60)
                assert kind == "ready", kind
                answered += ready["answered"]
                _merge(failed, ready["failed"])
                connect_s = max(connect_s, ready["connect_s"])
            if spy is not None:
                spy.stop()
            time.sleep(1.0)  # let the server settle
            rss_connected = vm_rss_mb(pid)
            if py_spy and n == 0:
                spy = PySpy(py_spy, pid, profile_dir / "status-fanout.speedscope.json")  # type: ignore[operator]
            t0 = asyncio.run(move(record.id))
            arrivals: list[float] = []
            failed = {}  # the results count every failure of the round, the connect phase's too
            for _ in procs:
                kind, result = replies.get(timeout=DELIVERY_TIMEOUT_S + 60)
                assert kind == "result", kind
                arrivals += result["arrivals"]
                _merge(failed, result["failed"])
            if spy is not None:
                spy.stop()
            asyncio.run(finish(record.id))
            latencies = [(a - t0) * 1000 for a in arrivals]
            one = {
                "connected": answered,
                "received": len(latencies),
                "errors": sum(failed.values()),
                "error_kinds": failed,
                "connect_s": connect_s,
                "delivery_ms": {
                    "p50": pct(latencies, 50),
                    "p99": pct(latencies, 99),
                    "max": max(latencies, default=float("nan")),
                },
                "rss_connected_mb": rss_connected,
            }
            per_round.append(one)
            log(
                f"  round {n + 1}: {answered}/{clients} connected in {connect_s:.1f}s, "
                f"{len(latencies)} received, p50/p99 {one['delivery_ms']['p50']:.0f}/"
                f"{one['delivery_ms']['p99']:.0f} ms, errors {failed or 0}"
            )
            time.sleep(1.0)  # the closed streams are gone before the next round
        hwm = vm_hwm_mb(pid)
    finally:
        for q in commands:
            q.put(None)
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        stack.close()

    def mid(key: str, sub: str | None = None) -> float:
        return median([r[key][sub] if sub else r[key] for r in per_round])

    return {
        "clients": clients,
        "rounds": per_round,
        # The headline: the worst round's counts (every round must deliver to every client), the
        # median round's times.
        "connected": min(r["connected"] for r in per_round),
        "received": min(r["received"] for r in per_round),
        "errors": max(r["errors"] for r in per_round),
        "connect_s": mid("connect_s"),
        "delivery_ms": {
            "p50": mid("delivery_ms", "p50"),
            "p99": mid("delivery_ms", "p99"),
            "max": max(r["delivery_ms"]["max"] for r in per_round),
        },
        "status_rss_mb": {
            "idle": idle_rss,
            "connected": max(r["rss_connected_mb"] for r in per_round),
            "peak": hwm,
        },
    }
