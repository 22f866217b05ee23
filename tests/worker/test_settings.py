"""The worker's own settings; the shared ones are tested in tests/pkg/test_settings.py."""

from __future__ import annotations

import os

import pytest
from imgpipe.settings import ConfigError, load
from imgpipe_worker.settings import WorkerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray IMGPIPE_* in the developer's shell must not change what these tests see."""
    for name in list(os.environ):
        if name.startswith("IMGPIPE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("job", "render"), [("60", "60"), ("30", "45"), (None, "120"), ("50", None)])
def test_render_timeout_must_be_shorter_than_job_timeout(
    monkeypatch: pytest.MonkeyPatch, job: str | None, render: str | None
) -> None:
    # The job's timeout cannot stop a render; a render limit at or over it would never apply.
    if job is not None:
        monkeypatch.setenv("IMGPIPE_JOB_TIMEOUT_S", job)
    if render is not None:
        monkeypatch.setenv("IMGPIPE_RENDER_TIMEOUT_S", render)
    with pytest.raises(ConfigError) as info:
        load(WorkerSettings)
    message = str(info.value)
    assert "IMGPIPE_RENDER_TIMEOUT_S" in message and "IMGPIPE_JOB_TIMEOUT_S" in message, message
    assert "validation error" not in message  # one readable line, not pydantic's dump


@pytest.mark.parametrize(("job", "render"), [(None, None), ("10", "9.5"), ("300", "60")])
def test_render_timeout_shorter_than_job_timeout_accepted(
    monkeypatch: pytest.MonkeyPatch, job: str | None, render: str | None
) -> None:
    if job is not None:
        monkeypatch.setenv("IMGPIPE_JOB_TIMEOUT_S", job)
    if render is not None:
        monkeypatch.setenv("IMGPIPE_RENDER_TIMEOUT_S", render)
    settings = load(WorkerSettings)
    assert settings.render_timeout_s < settings.job_timeout_s
    assert (settings.job_timeout_s, settings.render_timeout_s) == (float(job or 120), float(render or 60))
