"""Status fan-out: N SSE clients on one status process, all watching one job, and one status change.

The clients run in separate processes (`CLIENT_PROCS` of them, aiohttp, no connection limit), each
connects its share of streams in batches and reads the first (`pending`) event. Then the harness moves
the job to `processing` with `JobStore` and every client notes when that event reached it. Delivery
latency = arrival - the moment just before the transition (CLOCK_MONOTONIC is one clock for every
process on the machine). Memory is the status process's VmHWM, and it is a fresh process.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import time
from pathlib import Path

from bench.harness import OWNER, BenchStack, pct, token, vm_hwm_mb, vm_rss_mb

CLIENT_PROCS = 2


def _client(url: str, auth: str, count: int, ready, go, results) -> None:
    import aiohttp

    async def main() -> None:
        arrivals: list[float] = []
        connected = 0
        errors = 0
        first = asyncio.Event()
        pending_seen = 0

        async def stream(http: aiohttp.ClientSession) -> None:
            nonlocal connected, errors, pending_seen
            try:
                async with http.get(url, headers={"Authorization": auth}) as response:
                    if response.status != 200:
                        errors += 1
                        return
                    connected += 1
                    async for line in response.content:
                        if line.startswith(b"event: pending"):
                            pending_seen += 1
                            if pending_seen == count:
                                first.set()
                        elif line.startswith(b"event: processing"):
                            arrivals.append(time.monotonic())
                            return
            except Exception:
                errors += 1

        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=300, sock_connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            tasks = []
            for i in range(0, count, 200):
                tasks += [asyncio.create_task(stream(http)) for _ in range(min(200, count - i))]
                await asyncio.sleep(0.05)
            try:
                await asyncio.wait_for(first.wait(), 120)
            except TimeoutError:
                pass
            ready.put((connected, errors))
            await asyncio.gather(*tasks)
        results.put((arrivals, errors))

    asyncio.run(main())


def measure(logdir: Path, *, clients: int, log=print) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, clients + 2048))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the services started below
    stack = BenchStack(logdir)
    try:
        status = stack.start("status")
        pid = status.proc.pid
        idle_rss = vm_rss_mb(pid)
        from imgpipe.models import JobRecord, JobStatus, KeySource, utcnow

        async def create() -> JobRecord:
            store = stack.job_store()
            now = utcnow()
            record = JobRecord(
                id="sse" + "0" * 29,
                owner=OWNER,
                status=JobStatus.PENDING,
                created_at=now,
                updated_at=now,
                source=KeySource(key="uploads/x/y"),
                requested=[],
            )
            created = (await store.create(record)).record
            await store.redis.aclose()
            return created

        record = asyncio.run(create())
        ctx = mp.get_context("spawn")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        url = f"{status.url}/jobs/{record.id}/events"
        auth = f"Bearer {token(OWNER, ttl_s=3600)}"
        shares = [
            clients // CLIENT_PROCS + (1 if i < clients % CLIENT_PROCS else 0) for i in range(CLIENT_PROCS)
        ]
        procs = [ctx.Process(target=_client, args=(url, auth, n, ready, go, results)) for n in shares]
        started = time.monotonic()
        for p in procs:
            p.start()
        connected = errors = 0
        for _ in procs:
            c, e = ready.get(timeout=300)
            connected += c
            errors += e
        connect_s = time.monotonic() - started
        time.sleep(1.0)  # let the server settle
        rss_connected = vm_rss_mb(pid)

        async def move() -> float:
            from imgpipe.models import JobStatus as S

            store = stack.job_store()
            current = await store.get(record.id)
            nxt = current.model_copy(update={"status": S.PROCESSING, "updated_at": utcnow()})
            await store.redis.ping()  # connection open before the clock starts
            t0 = time.monotonic()
            await store._apply(nxt)  # what mark_processing does, minus its read
            await store.redis.aclose()
            return t0

        t0 = asyncio.run(move())
        arrivals: list[float] = []
        for _ in procs:
            a, e = results.get(timeout=300)
            arrivals += a
            errors += e
        for p in procs:
            p.join(30)
        latencies = [(a - t0) * 1000 for a in arrivals]
        hwm = vm_hwm_mb(pid)

        async def finish() -> None:
            store = stack.job_store()
            current = await store.get(record.id)
            await store.mark_succeeded(current, [])
            await store.redis.aclose()

        asyncio.run(finish())
    finally:
        stack.close()
    return {
        "clients": clients,
        "connected": connected,
        "received": len(latencies),
        "errors": errors,
        "connect_s": connect_s,
        "delivery_ms": {
            "p50": pct(latencies, 50),
            "p99": pct(latencies, 99),
            "max": max(latencies, default=float("nan")),
        },
        "status_rss_mb": {"idle": idle_rss, "connected": rss_connected, "peak": hwm},
    }
