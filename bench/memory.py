"""Worker memory: peak RSS (VmHWM) of a fresh worker process doing one kind of job, alone.

For each image and request a new worker is started (so its high-water mark belongs to that job
only), with twice its prefetch (concurrency + 1) jobs of the same image and request queued at once:
every render slot is busy while the job held ahead downloads its source, the worker's fullest state.
At concurrency 1, the target's setting, each image is asked for each built-in preset alone, for
the four together, and for two large custom variants (`CUSTOM`), and the worst of these is its
figure: one variant is made straight from the decode and several from one intermediate, so either
can be the hungrier (a progressive JPEG's `large` alone once peaked 11 MiB over its four presets).
A custom variant may be refused by the worker's budget (`image_too_large`, before any decoding):
then it proves no peak, and the report says so. At the configured (default) concurrency, the four
presets. The idle RSS of a started worker is reported for reference.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from imgpipe.models import PRESETS, Variant

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
from bench.throughput import FOUR

#: A 24 MP photo, baseline and progressive; the largest image the default pixel limit takes; and the
#: hungriest decodes the default decode budget takes, one of them with a source that fills the room
#: set aside for sources (`corpus.MEMORY`): "any accepted input".
IMAGES = (
    "jpeg-24mp",
    "jpeg-24mp-progressive",
    "jpeg-100mp",
    "jpeg-26mp-progressive",
    "jpeg-26mp-progressive-grainy",
    "avif-12mp",
)


#: Custom variants with the largest outputs a client is likely to ask for: a full-size PNG (the
#: hungriest output for what it holds) and a 4096 px WebP. Before the budget held a job as a whole,
#: these took a worker at concurrency 1 to 428 and 312 MiB on the 26 MP progressive JPEG.
CUSTOM = {
    "full-size PNG": (Variant(name="full", width=8192, height=8192, format="png"),),
    "4096 px WebP": (Variant(name="web", width=4096, height=4096, format="webp"),),
}

#: The requests each image is measured with at concurrency 1: the four presets, each alone, and
#: `CUSTOM`.
REQUESTS: dict[str, tuple[Variant, ...]] = {
    "4 presets": tuple(PRESETS[name] for name in FOUR),
    **{f"{name} alone": (PRESETS[name],) for name in FOUR},
    **CUSTOM,
}

#: The status of a job the worker's budget refused (`imgpipe_worker.imaging`, before any decoding).
REFUSED = "failed:image_too_large"


def refused(run: dict) -> bool:
    """Whether every job of a request was refused by the budget: it then proves no peak."""
    return set(run["jobs"]) == {REFUSED}


async def _run(stack: BenchStack, key: str, variants: tuple[Variant, ...], jobs: int) -> dict:
    store = stack.job_store()
    connection, publisher = await open_publisher(stack.namespace)
    try:

        async def submit() -> list[str]:
            return await asyncio.gather(
                *(submit_direct(store, publisher, key, list(variants)) for _ in range(jobs))
            )

        ids, _ = await submit_and_wait(store, submit, 300)
        return await statuses(store, ids)
    finally:
        await connection.close()
        await store.redis.aclose()


def _peak(
    stack: BenchStack, key: str, variants: tuple[Variant, ...], concurrency: int | None, jobs: int
) -> dict:
    """A fresh worker's peak and idle RSS over `jobs` jobs of `variants`, queued at once."""
    env = {"IMGPIPE_WORKER_CONCURRENCY": str(concurrency)} if concurrency else {}
    worker = stack.start("worker", env)
    try:
        idle = vm_rss_mb(worker.proc.pid)
        result = asyncio.run(_run(stack, key, variants, jobs))
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
            requests = {label: _peak(stack, key, variants, 1, 4) for label, variants in REQUESTS.items()}
            measured = [label for label, run in requests.items() if not (label in CUSTOM and refused(run))]
            worst = max(measured, key=lambda label: requests[label]["peak_rss_mb"])
            row = {
                "concurrency 1": requests[worst]
                | {"worst_request": worst, "requests": requests, "may_refuse": list(CUSTOM)},
                f"concurrency {default_concurrency}": _peak(
                    stack, key, REQUESTS["4 presets"], None, 2 * (default_concurrency + 1)
                ),
            }
            out["images"][name] = row
            log(
                f"    {name}: concurrency 1 "
                + ", ".join(
                    f"{k} {'refused' if refused(v) else format(v['peak_rss_mb'], '.0f') + ' MiB'}"
                    for k, v in requests.items()
                )
                + f"; concurrency {default_concurrency} (4 presets) "
                + f"{row[f'concurrency {default_concurrency}']['peak_rss_mb']:.0f} MiB"
            )
    finally:
        stack.close()
    return out
