"""End-to-end latency at light load: submit -> `succeeded`, against the raw processing time.

One job at a time through the real client path: `POST /jobs` on the api (source already uploaded),
then the job's SSE stream on the status service until `succeeded` arrives. The clock starts before the
POST and stops when the `succeeded` event is read. The raw processing time is `imaging.render` of the
same image and variants in this process, with libvips configured as the worker configures it; the
overhead of a job is its latency minus the median raw time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench import corpus
from bench.harness import OWNER, BenchStack, median, pct, token

IMAGE = "jpeg-12mp"
VARIANTS = ["thumb"]


def raw_render_s(samples: int) -> list[float]:
    from imgpipe.models import PRESETS
    from imgpipe_worker import imaging

    imaging.configure_libvips(concurrency=1)
    data = corpus.load()[IMAGE]
    variants = [PRESETS[n] for n in VARIANTS]
    limits = imaging.Limits()
    imaging.render(data, variants, limits)
    out = []
    for _ in range(samples):
        started = time.perf_counter()
        imaging.render(data, variants, limits)
        out.append(time.perf_counter() - started)
    return out


async def _jobs(api: str, status: str, key: str, count: int) -> list[float]:
    import aiohttp

    headers = {"Authorization": f"Bearer {token(OWNER)}"}
    body = {"source": {"key": key}, "variants": VARIANTS}
    out = []
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            started = time.perf_counter()
            async with http.post(f"{api}/jobs", json=body, headers=headers) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["id"]
            async with http.get(f"{status}/jobs/{job_id}/events", headers=headers) as response:
                assert response.status == 200
                async for line in response.content:
                    if line.startswith(b"event: "):
                        event = line[7:].strip()
                        if event == b"succeeded":
                            out.append(time.perf_counter() - started)
                            break
                        if event == b"failed":
                            raise RuntimeError(f"job {job_id} failed")
            await asyncio.sleep(0.05)  # light load: the system is idle between jobs
    return out


def measure(logdir: Path, *, jobs: int, log=print) -> dict:
    stack = BenchStack(logdir)
    try:
        spec = corpus.BY_NAME[IMAGE]
        key = stack.upload(spec.name, corpus.generate(spec).read_bytes(), spec.content_type)
        api = stack.start("api").url
        status = stack.start("status").url
        stack.start("worker")  # the default configuration
        asyncio.run(_jobs(api, status, key, 3))  # warm-up
        latencies = asyncio.run(_jobs(api, status, key, jobs))
    finally:
        stack.close()
    raw = raw_render_s(max(10, jobs // 3))
    raw_med = median(raw)
    overhead = [x - raw_med for x in latencies]
    ms = 1000
    return {
        "image": IMAGE,
        "variants": VARIANTS,
        "jobs": jobs,
        "latency_ms": {p: pct(latencies, q) * ms for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "raw_render_ms": {"p50": raw_med * ms, "min": min(raw) * ms},
        "overhead_ms": {p: pct(overhead, q) * ms for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
    }
