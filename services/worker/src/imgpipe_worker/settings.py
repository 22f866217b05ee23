"""The worker's own settings (the shared ones live in `imgpipe.settings`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from imgpipe.settings import RetryDelays
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: How much lower than the rest of the worker the render threads run (`IMGPIPE_RENDER_NICE`).
DEFAULT_RENDER_NICE = 10

#: cgroup v2's CPU limit of the process's container: "<quota> <period>" in microseconds, or "max".
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = _CPU_MAX) -> int:
    """The CPUs this process can use: those it may run on, capped by its container's CPU limit.

    `os.cpu_count()` is the host's: in a pod or a container with `cpus:` set it would give a worker a
    render (and its memory) for every core of the node, not of the worker.
    """
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or a file we do not understand
        pass
    return max(1, count)


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGPIPE_", extra="ignore", frozen=True)

    #: Renders at once in one worker process; it holds one message more (the next job downloading).
    # Capped: the default must pass its own bound on a host with more CPUs than that.
    worker_concurrency: int = Field(default_factory=lambda: min(available_cpus(), 64), ge=1, le=64)
    #: Threads libvips may use for one image; jobs already run in parallel, so 1 is usually best.
    vips_concurrency: int = Field(default=1, ge=1, le=64)
    #: Added to the nice value of the render threads (and of the libvips threads they start), so the
    #: event loop (the broker's heartbeats, S3 transfers, status writes, /healthz) runs as soon as it
    #: has work instead of waiting a scheduler slice behind renders that fill every core. 0 turns it off.
    render_nice: int = Field(default=DEFAULT_RENDER_NICE, ge=0, le=19)
    #: Wall-clock limit for one job, fetch to upload.
    job_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    #: Wall-clock limit for decoding and encoding one job's variants; shorter than `job_timeout_s`.
    render_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    #: Memory a decoder holding a whole frame may need, and any step of a job's render (the decoder's
    #: state, the pixels it writes, an encoder), estimated from the header (`imaging.decode_bytes`,
    #: `imaging.job_bytes`), with what the job's source takes beyond `imaging.SOURCE_ROOM_BYTES`; a
    #: source or job over it fails with `image_too_large` before any pixel is decoded.
    max_decode_bytes: int = Field(default=192 * 1024 * 1024, ge=16 * 1024 * 1024, le=64 * 1024**3)
    #: On SIGTERM, how long jobs in flight may take to finish before they are handed back.
    shutdown_grace_s: float = Field(default=60.0, ge=0, le=3600)
    # The same variables as AmqpSettings' and RedisSettings': read here only to check that a job's
    # record outlives its back-off (`_retries_within_retention`).
    retry_delays_s: RetryDelays = (1, 5, 30, 120)
    job_retention_days: int = Field(default=7, ge=1, le=3650)

    @model_validator(mode="after")
    def _render_ends_within_the_job(self) -> WorkerSettings:
        # The job's timeout cannot stop a render (libvips calls are not interruptible): it only
        # stops the job waiting for one, which then renders on in its slot. The render timeout is
        # what ends a slow render; one not shorter than the job's would never be the limit that
        # applies, and every slow render would outlive its job and hold the slot meanwhile.
        if self.render_timeout_s >= self.job_timeout_s:
            raise ValueError(
                f"IMGPIPE_RENDER_TIMEOUT_S ({self.render_timeout_s:g}) must be shorter than "
                f"IMGPIPE_JOB_TIMEOUT_S ({self.job_timeout_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _retries_within_retention(self) -> WorkerSettings:
        # A job waiting out its back-off keeps its record as it stands; a take-up renews its life
        # (`JobStore.mark_processing`), but a single wait (and the attempt before it) as long as the
        # retention would still find the record gone, and the retry would drop its message: no
        # `failed` record, no dead letter.
        longest = max(self.retry_delays_s) + self.job_timeout_s
        retention_s = self.job_retention_days * 86_400
        if longest >= retention_s:
            raise ValueError(
                f"the longest of IMGPIPE_RETRY_DELAYS_S plus IMGPIPE_JOB_TIMEOUT_S ({longest:g} s) must "
                f"be shorter than IMGPIPE_JOB_RETENTION_DAYS ({retention_s} s)"
            )
        return self
