"""End-to-end latency at light load: submit -> `succeeded`, against the raw processing time.

One job at a time through the real client path: `POST /jobs` on the api (source already uploaded),
then the job's SSE stream on the status service until `succeeded` arrives. The clock starts before the
POST and stops when the `succeeded` event is read. The raw processing time is `imaging.render` of the
same image and variants in this process, with libvips configured as the worker configures it, timed
once right after each job (after the same pause), so that a job and its baseline see the machine in
the same state: on a shared machine the render time drifts by a fifth within minutes, and a baseline
taken once, before or after all the jobs, would move the overhead by that much. The overhead of a job
is its latency minus the raw time taken beside it. The three S3 calls of a job are also timed on their
own against the same S3 server, and the overhead net of them is reported beside it.

Where the time goes: the mean of each stage over the measured jobs, from the services' own metrics
(scraped before and after them): the api's `POST /jobs` request, then the worker's stages (`queued`
from the api's creating the record to the worker taking the message, `fetch`, `render_wait`,
`render`, `upload`, `finish`), as `imgpipe_job_stage_seconds` gives them in production.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from imgpipe.telemetry import API_SUBMIT_STAGES, JOB_STAGES

from bench import corpus
from bench.harness import OWNER, BenchStack, median, pct, scrape, token
from tests.isolated import metric
from tests.stack import s3_settings

IMAGE = "jpeg-12mp"
VARIANTS = ["thumb"]
STAGES = JOB_STAGES  # the worker's, in their order
# The api's steps that a request without an Idempotency-Key takes, in their order.
API_STEPS = tuple(step for step in API_SUBMIT_STAGES if step not in ("claim", "accept"))


def raw_renderer() -> Callable[[], float]:
    """A function that renders the job's image and variants once in this process and returns the seconds."""
    from imgpipe.models import PRESETS
    from imgpipe_worker import imaging

    imaging.configure_libvips(concurrency=1)
    data = corpus.load()[IMAGE]
    variants = [PRESETS[n] for n in VARIANTS]
    limits = imaging.Limits()
    imaging.render(data, variants, limits)

    def once() -> float:
        started = time.perf_counter()
        imaging.render(data, variants, limits)
        return time.perf_counter() - started

    return once


async def _jobs(
    api: str, status: str, key: str, count: int, raw: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run `count` jobs one at a time; each job's latency, and the raw render timed right after it."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token(OWNER)}"}
    body = {"source": {"key": key}, "variants": VARIANTS}
    out, raws = [], []
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
            raws.append(raw())  # blocks this loop, which has nothing else to do now
            await asyncio.sleep(0.05)  # and the next job starts from the same idle state
    return out, raws


async def _s3_calls(stack: BenchStack, key: str, count: int, *, pause_s: float) -> list[float]:
    """Time, one after the other, the three S3 calls a job makes, as the services make them, with
    `pause_s` of idleness before each set (a job's pause, or none: back to back).

    The api's HEAD of the source, the worker's GET of it and its PUT of the thumbnail, through
    `imgpipe.storage` against the same S3 server. On moto these take a large, fixed share of the
    latency that S3 or MinIO would not, so the report also gives the overhead net of them. Timed
    from the client, they hold the client's own work too (signing, the HTTP round trip), work the
    services do in the job as well: the net figure is a floor, not the pipeline's cost without S3.
    """
    from imgpipe.storage import Storage

    storage = Storage(s3_settings(stack.s3_url, stack.env["IMGPIPE_S3_BUCKET"]))
    thumb = await storage.get(key, max_bytes=1 << 30)  # any bytes of a thumbnail's size will do
    thumb = thumb[:20_000]
    out = []
    try:
        for i in range(count + 2):
            started = time.perf_counter()
            await storage.head(key)
            await storage.get(key, max_bytes=1 << 30)
            await storage.put(f"variants/bench/{i}.jpg", thumb, "image/jpeg")
            if i >= 2:  # the first two warm the connections up
                out.append(time.perf_counter() - started)
            await asyncio.sleep(pause_s)
    finally:
        await storage.close()
    return out


def _stage_totals(api: str, worker: str) -> dict[str, tuple[float, float]]:
    """(count, seconds) so far of the api's `POST /jobs` and its steps, and of each of the worker's
    job stages."""
    api_text, worker_text = scrape(api), scrape(worker)
    route = {"service": "api", "method": "POST", "route": "/jobs"}
    totals = {
        "api": (
            metric(api_text, "imgpipe_http_request_duration_seconds_count", **route),
            metric(api_text, "imgpipe_http_request_duration_seconds_sum", **route),
        )
    }
    for step in API_STEPS:
        totals[f"api {step}"] = (
            metric(api_text, "imgpipe_api_submit_stage_seconds_count", stage=step),
            metric(api_text, "imgpipe_api_submit_stage_seconds_sum", stage=step),
        )
    for stage in STAGES:
        totals[stage] = (
            metric(worker_text, "imgpipe_job_stage_seconds_count", stage=stage),
            metric(worker_text, "imgpipe_job_stage_seconds_sum", stage=stage),
        )
    return totals


def _stage_means_ms(before: dict, after: dict) -> dict[str, float]:
    means = {}
    for name in before:
        count = after[name][0] - before[name][0]
        means[name] = (after[name][1] - before[name][1]) / count * 1000 if count else float("nan")
    return means


def measure(logdir: Path, *, jobs: int, log=print) -> dict:
    stack = BenchStack(logdir)
    try:
        spec = corpus.BY_NAME[IMAGE]
        key = stack.upload(spec.name, corpus.generate(spec).read_bytes(), spec.content_type)
        api = stack.start("api").url
        status = stack.start("status").url
        worker = stack.start("worker").url  # the default configuration
        raw_once = raw_renderer()
        asyncio.run(_jobs(api, status, key, 3, raw_once))  # warm-up
        before = _stage_totals(api, worker)
        latencies, raw = asyncio.run(_jobs(api, status, key, jobs, raw_once))
        means = _stage_means_ms(before, _stage_totals(api, worker))
        s3 = asyncio.run(_s3_calls(stack, key, max(10, jobs // 3), pause_s=0.05))
        s3_warm = asyncio.run(_s3_calls(stack, key, max(10, jobs // 3), pause_s=0))
    finally:
        stack.close()
    raw_med = median(raw)
    overhead = [x - r for x, r in zip(latencies, raw, strict=True)]
    ms = 1000
    return {
        "image": IMAGE,
        "variants": VARIANTS,
        "jobs": jobs,
        "latency_ms": {p: pct(latencies, q) * ms for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "raw_render_ms": {"p50": raw_med * ms, "min": min(raw) * ms},
        "overhead_ms": {p: pct(overhead, q) * ms for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        # The S3 server's share: HEAD + GET of the source and PUT of a thumbnail, one job's worth.
        "s3_calls_ms": {"p50": median(s3) * ms, "min": min(s3) * ms},
        # The same calls back to back: what a pause's idleness adds to them on this machine.
        "s3_calls_back_to_back_ms": {"p50": median(s3_warm) * ms, "min": min(s3_warm) * ms},
        "overhead_net_of_s3_ms": {"p50": (pct(overhead, 50) - median(s3)) * ms},
        # Means over the measured jobs, from the services' metrics: the api's request, then the worker;
        # and the api's request step by step.
        "stages_ms": {k: v for k, v in means.items() if not k.startswith("api ")},
        "api_steps_ms": {k.removeprefix("api "): v for k, v in means.items() if k.startswith("api ")},
    }
