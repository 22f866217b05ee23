"""Worker memory: peak RSS (VmHWM) of a fresh worker process doing one kind of job, alone.

For each image a new worker is started (so its high-water mark belongs to that image only), at
concurrency 1 and at its configured (default) concurrency, with twice its prefetch (concurrency + 1)
jobs of the same image queued at once: every render slot is busy while the job held ahead downloads
its source, the worker's fullest state. Jobs ask for the four presets (thumb, small, medium, large),
the heaviest of the built-in requests. The idle RSS of a started worker is reported for reference.
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


async def _run(stack: BenchStack, key: str, jobs: int) -> dict:
    store = stack.job_store()
    connection, publisher = await open_publisher(stack.namespace)
    try:

        async def submit() -> list[str]:
            return await asyncio.gather(
                *(submit_direct(store, publisher, key, _variants(FOUR)) for _ in range(jobs))
            )

        ids, _ = await submit_and_wait(store, submit, 300)
        return await statuses(store, ids)
    finally:
        await connection.close()
        await store.redis.aclose()


def measure(logdir: Path, *, log=print) -> dict:
    default_concurrency = cpu_count()  # IMGPIPE_WORKER_CONCURRENCY's default
    stack = BenchStack(logdir)
    out: dict = {"default_concurrency": default_concurrency, "variants": FOUR, "images": {}}
    try:
        for name in IMAGES:
            spec = corpus.BY_NAME[name]
            key = stack.upload(name, corpus.generate(spec).read_bytes(), spec.content_type)
            row = {}
            for label, concurrency in (("concurrency 1", 1), (f"concurrency {default_concurrency}", None)):
                env = {"IMGPIPE_WORKER_CONCURRENCY": str(concurrency)} if concurrency else {}
                worker = stack.start("worker", env)
                idle = vm_rss_mb(worker.proc.pid)
                # Twice the prefetch: the second half waits in the queue while the first is held.
                result = asyncio.run(_run(stack, key, 2 * ((concurrency or default_concurrency) + 1)))
                row[label] = {"peak_rss_mb": vm_hwm_mb(worker.proc.pid), "idle_rss_mb": idle, "jobs": result}
                stack.stop(worker)
            out["images"][name] = row
            log(
                f"    {name}: "
                + ", ".join(f"{k} {v['peak_rss_mb']:.0f} MiB {v['jobs']}" for k, v in row.items())
            )
    finally:
        stack.close()
    return out
