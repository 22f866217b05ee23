"""The worker's own settings; the shared ones are tested in tests/pkg/test_settings.py."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from imgpipe.settings import ConfigError, load
from imgpipe_worker import settings as settings_module
from imgpipe_worker.consumer import _lower_priority
from imgpipe_worker.settings import WorkerSettings, available_cpus

pytestmark = pytest.mark.usefixtures("clean_env")


def _timeouts(monkeypatch: pytest.MonkeyPatch, job: str | None, render: str | None) -> None:
    """Set the job and render timeouts; None leaves one at its default."""
    for name, value in (("IMGPIPE_JOB_TIMEOUT_S", job), ("IMGPIPE_RENDER_TIMEOUT_S", render)):
        if value is not None:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize(("job", "render"), [("60", "60"), ("30", "45"), (None, "120"), ("50", None)])
def test_render_timeout_must_be_shorter_than_job_timeout(
    monkeypatch: pytest.MonkeyPatch, job: str | None, render: str | None
) -> None:
    # The job's timeout cannot stop a render; a render limit at or over it would never apply.
    _timeouts(monkeypatch, job, render)
    with pytest.raises(ConfigError) as info:
        load(WorkerSettings)
    message = str(info.value)
    assert "IMGPIPE_RENDER_TIMEOUT_S" in message and "IMGPIPE_JOB_TIMEOUT_S" in message, message
    assert "validation error" not in message  # one readable line, not pydantic's dump


@pytest.mark.parametrize(("job", "render"), [(None, None), ("10", "9.5"), ("300", "60")])
def test_render_timeout_shorter_than_job_timeout_accepted(
    monkeypatch: pytest.MonkeyPatch, job: str | None, render: str | None
) -> None:
    _timeouts(monkeypatch, job, render)
    settings = load(WorkerSettings)
    assert settings.render_timeout_s < settings.job_timeout_s
    assert (settings.job_timeout_s, settings.render_timeout_s) == (float(job or 120), float(render or 60))


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [
        ("max 100000\n", None),  # no limit: the CPUs the process may run on
        ("150000 100000\n", 2),  # 1.5 CPUs: two renders, the second one partly throttled
        ("50000 100000\n", 1),
        ("100000 100000\n", 1),
        ("garbled\n", None),
        (None, None),  # no cgroup v2
    ],
)
def test_the_default_concurrency_is_the_cpus_the_worker_can_use(
    tmp_path: Path, cpu_max: str | None, cap: int | None
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    usable = len(os.sched_getaffinity(0))
    assert available_cpus(path) == (usable if cap is None else min(usable, cap))


def test_the_default_concurrency_fits_its_bound_on_a_large_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """96 CPUs and no cgroup limit: the default (one render slot a CPU) is capped at the bound, not
    refused as if IMGPIPE_WORKER_CONCURRENCY had been set too high."""
    monkeypatch.delenv("IMGPIPE_WORKER_CONCURRENCY", raising=False)
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 96)
    assert load(WorkerSettings).worker_concurrency == 64


@pytest.mark.parametrize(
    ("value", "accepted"), [(None, 10), ("0", 0), ("19", 19), ("20", None), ("-1", None)]
)
def test_render_nice_is_a_nice_increment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, accepted: int | None
) -> None:
    # Negative would ask for more priority than the loop's (root only); over 19 means nothing.
    if value is not None:
        monkeypatch.setenv("IMGPIPE_RENDER_NICE", value)
    if accepted is None:
        with pytest.raises(ConfigError, match="IMGPIPE_RENDER_NICE"):
            load(WorkerSettings)
    else:
        assert load(WorkerSettings).render_nice == accepted


@pytest.mark.parametrize(("nice", "expected"), [(0, 0), (4, 4), (10, 10), (30, 19)])
def test_render_threads_add_their_nice_to_the_threads_own(nice: int, expected: int) -> None:
    """Added, not set: a worker started at nice 5 (or 15) keeps its renders below its loop without
    asking for a priority only root may take; capped at 19. The thread's own value only."""
    seen: list[int] = []

    def start() -> None:
        _lower_priority(nice)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    with ThreadPoolExecutor(1, initializer=start) as pool:
        pool.submit(lambda: None).result()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, base + expected)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the process (this thread) is untouched


@pytest.mark.parametrize(("delays", "days"), [("[86400]", "1"), ("[60, 86100]", "1")])
def test_a_back_off_as_long_as_the_retention_is_refused(
    monkeypatch: pytest.MonkeyPatch, delays: str, days: str
) -> None:
    """A take-up renews a job's record, but a single wait (and the attempt before it) as long as
    the retention still found it gone: the retry then dropped its message, the job without an end."""
    _timeouts(monkeypatch, "300", "120")
    monkeypatch.setenv("IMGPIPE_RETRY_DELAYS_S", delays)
    monkeypatch.setenv("IMGPIPE_JOB_RETENTION_DAYS", days)
    with pytest.raises(ConfigError) as info:
        load(WorkerSettings)
    message = str(info.value)
    assert "IMGPIPE_RETRY_DELAYS_S plus IMGPIPE_JOB_TIMEOUT_S" in message, message
    assert "must be shorter than IMGPIPE_JOB_RETENTION_DAYS (86400 s)" in message, message
    assert "validation error" not in message  # one readable line, not pydantic's dump


@pytest.mark.parametrize(("delays", "days"), [(None, None), ("[86099]", "1"), ("[86400]", "2")])
def test_a_back_off_shorter_than_the_retention_is_accepted(
    monkeypatch: pytest.MonkeyPatch, delays: str | None, days: str | None
) -> None:
    _timeouts(monkeypatch, "300", "120")
    for name, value in (("IMGPIPE_RETRY_DELAYS_S", delays), ("IMGPIPE_JOB_RETENTION_DAYS", days)):
        if value is not None:
            monkeypatch.setenv(name, value)
    load(WorkerSettings)
