"""Worker memory: peak RSS (VmHWM) of a fresh worker process doing one kind of job, alone.

For each image and request a new worker is started (so its high-water mark belongs to that job
only), with twice its prefetch (concurrency + 1) jobs of the same image and request queued at once:
every render slot is busy while the job held ahead downloads its source, the worker's fullest state.
At concurrency 1, the target's setting, each image is asked for each built-in preset alone and for
the four together, and the worst of these is its figure: one variant is made straight from the
decode and several from one intermediate, so either can be the hungrier (a progressive JPEG's
`large` alone once peaked 11 MiB over its four presets). At the configured (default) concurrency,
the four presets. The idle RSS of a started worker is reported for reference.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench import corpus
from bench.harness import (
    BenchStack,
    cpu_count,
    open_publisher,
    statuses,
    submit_and_wait,
    submit_direct,
    vm_hwm_mb,
    vm_rss_mb,
)
from bench.throughput import FOUR, _variants

#: A 24 MP photo, baseline and progressive; the largest image the default pixel limit takes; and the
#: hungriest decodes the default decode budget takes (`corpus.MEMORY`): "any accepted input".
IMAGES = ("jpeg-24mp", "jpeg-24mp-progressive", "jpeg-100mp", "jpeg-26mp-progressive", "avif-12mp")


#: The requests each image is measured with at concurrency 1: the four presets, and each alone.
REQUESTS = {"4 presets": tuple(FOUR), **{f"{name} alone": (name,) for name in FOUR}}


async def _run(stack: BenchStack, key: str, presets: tuple[str, ...], jobs: int) -> dict:
    store = stack.job_store()
    connection, publisher = await open_publisher(stack.namespace)
    try:

        async def submit() -> list[str]:
            return await asyncio.gather(
                *(submit_direct(store, publisher, key, _variants(presets)) for _ in range(jobs))
            )

        ids, _ = await submit_and_wait(store, submit, 300)
        return await statuses(store, ids)
    finally:
        await connection.close()
        await store.redis.aclose()


def _peak(stack: BenchStack, key: str, presets: tuple[str, ...], concurrency: int | None, jobs: int) -> dict:
    """A fresh worker's peak and idle RSS over `jobs` jobs of `presets`, queued at once."""
    env = {"IMGPIPE_WORKER_CONCURRENCY": str(concurrency)} if concurrency else {}
    worker = stack.start("worker", env)
    try:
        idle = vm_rss_mb(worker.proc.pid)
        result = asyncio.run(_run(stack, key, presets, jobs))
        return {"peak_rss_mb": vm_hwm_mb(worker.proc.pid), "idle_rss_mb": idle, "jobs": result}
    finally:
        stack.stop(worker)


def measure(logdir: Path, *, log=print) -> dict:
    default_concurrency = cpu_count()  # IMGPIPE_WORKER_CONCURRENCY's default
    stack = BenchStack(logdir)
    out: dict = {"default_concurrency": default_concurrency, "variants": FOUR, "images": {}}
    try:
        for name in IMAGES:
            spec = corpus.BY_NAME[name]
            key = stack.upload(name, corpus.generate(spec).read_bytes(), spec.content_type)
            # Twice the prefetch: the second half waits in the queue while the first is held.
            requests = {label: _peak(stack, key, presets, 1, 4) for label, presets in REQUESTS.items()}
            worst = max(requests, key=lambda label: requests[label]["peak_rss_mb"])
            row = {
                "concurrency 1": requests[worst] | {"worst_request": worst, "requests": requests},
                f"concurrency {default_concurrency}": _peak(
                    stack, key, tuple(FOUR), None, 2 * (default_concurrency + 1)
                ),
            }
            out["images"][name] = row
            log(
                f"    {name}: concurrency 1 "
                + ", ".join(f"{k} {v['peak_rss_mb']:.0f} MiB" for k, v in requests.items())
                + f"; concurrency {default_concurrency} (4 presets) "
                + f"{row[f'concurrency {default_concurrency}']['peak_rss_mb']:.0f} MiB"
            )
    finally:
        stack.close()
    return out
