"""The reconciler's settings and schedule: safe defaults, errors that name the variable, one tick id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from imgpipe.settings import ConfigError, load
from imgpipe_reconciler.schedule import parse_cron, tick_time
from imgpipe_reconciler.settings import ReconcileSettings

pytestmark = pytest.mark.usefixtures("clean_env")


def test_defaults_cover_an_upload_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "production")
    settings = load(ReconcileSettings)
    assert settings.reconcile_cron == "0 * * * *"
    assert settings.reconcile_grace_seconds >= settings.presign_ttl_s + settings.job_timeout_s
    assert settings.stuck_processing_s > settings.longest_processing_s() == 5 * 120 + 1 + 5 + 30 + 120


def test_a_stuck_processing_time_a_retrying_job_outlasts_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job keeps `processing`, unchanged, through every attempt and back-off: a shorter limit
    would fail jobs that are still being retried."""
    monkeypatch.setenv("IMGPIPE_ENV", "production")
    monkeypatch.setenv("IMGPIPE_STUCK_PROCESSING_S", "300")  # over one job's 120 s, under 756 s
    with pytest.raises(ConfigError, match=r"IMGPIPE_STUCK_PROCESSING_S.*IMGPIPE_MAX_ATTEMPTS.*\(756\)"):
        load(ReconcileSettings)
    monkeypatch.setenv("IMGPIPE_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("IMGPIPE_RETRY_DELAYS_S", "[10]")
    assert load(ReconcileSettings).longest_processing_s() == 2 * 120 + 10  # 250 < 300: accepted


def test_a_short_grace_is_refused_outside_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "production")
    monkeypatch.setenv("IMGPIPE_RECONCILE_GRACE_SECONDS", "600")
    with pytest.raises(ConfigError, match=r"IMGPIPE_RECONCILE_GRACE_SECONDS.*IMGPIPE_PRESIGN_TTL_S"):
        load(ReconcileSettings)
    monkeypatch.setenv("IMGPIPE_ENV", "test")
    assert load(ReconcileSettings).reconcile_grace_seconds == 600


@pytest.mark.parametrize("cron", ["every hour", "61 * * * *", "* * * *"])
def test_a_bad_cron_names_the_variable(monkeypatch: pytest.MonkeyPatch, cron: str) -> None:
    monkeypatch.setenv("IMGPIPE_RECONCILE_CRON", cron)
    with pytest.raises(ConfigError, match="IMGPIPE_RECONCILE_CRON"):
        load(ReconcileSettings)


def test_replicas_agree_on_the_tick() -> None:
    hourly = parse_cron("0 * * * *")
    top = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    # Two replicas firing a little apart name the same tick; a very late one names none.
    assert tick_time(hourly, top + timedelta(milliseconds=3)) == top
    assert tick_time(hourly, top + timedelta(seconds=12)) == top
    assert tick_time(hourly, top + timedelta(minutes=5)) is None
    every_5s = parse_cron("*/5 * * * * *")
    assert tick_time(every_5s, top + timedelta(seconds=7, milliseconds=900)) == top + timedelta(seconds=5)
