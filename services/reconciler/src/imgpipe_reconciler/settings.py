"""The reconciler's own settings (the shared ones live in `imgpipe.settings`)."""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger
from imgpipe.settings import LOCAL_ENVIRONMENTS, Environment, MaxAttempts, RetryDelays, retry_delay
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from imgpipe_reconciler.schedule import parse_cron


class ReconcileSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGPIPE_", extra="ignore", frozen=True)

    env: Environment = "production"
    #: When scheduled runs fire, in UTC: crontab's 5 fields, or 6 with a leading seconds field.
    reconcile_cron: str = "0 * * * *"
    #: Unreferenced objects younger than this (by their LastModified) are kept, never deleted.
    reconcile_grace_seconds: int = Field(default=7200, ge=0)
    #: Scheduled runs only report what they would delete (a first rollout); admin/CLI runs choose.
    reconcile_dry_run: bool = False
    #: Lifetime of the run lock; the holder renews it every third of this, so a crashed holder
    #: blocks the next run for at most this long.
    reconcile_lock_ttl_s: int = Field(default=120, ge=5, le=3600)
    #: A `pending` job unchanged for this long is published again once, then failed (`timeout`)
    #: if it is still pending this long after that; judged only while nothing waits for the workers
    #: (`reconcile._Judge`).
    stuck_pending_s: int = Field(default=900, ge=1)
    #: A `processing` job unchanged, and not taken up again, for this long is failed (`timeout`):
    #: longer than a job's time limit times its attempts plus the back-off, so a job that is still
    #: retrying is left alone; judged only while nothing waits for the workers (`reconcile._Judge`).
    stuck_processing_s: int = Field(default=3600, ge=1)
    # The same variables as S3Settings and the worker's settings: read here only to check that
    # the grace period covers an upload's whole window (the worker package is not a dependency).
    presign_ttl_s: int = Field(default=900, ge=60, le=7 * 24 * 3600)
    job_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    # And AmqpSettings': a job retrying stays `processing`, unchanged, through all its attempts.
    max_attempts: MaxAttempts = 5
    retry_delays_s: RetryDelays = (1, 5, 30, 120)

    def longest_processing_s(self) -> float:
        """How long a job may stay `processing`, unchanged, while it is still being worked on: every
        attempt's time limit and every back-off between them."""
        waits = sum(retry_delay(self.retry_delays_s, attempt) for attempt in range(1, self.max_attempts))
        return self.max_attempts * self.job_timeout_s + waits

    @field_validator("reconcile_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        parse_cron(value)  # raises ValueError with the reason
        return value

    @model_validator(mode="after")
    def _grace_covers_uploads(self) -> ReconcileSettings:
        minimum = int(self.presign_ttl_s + self.job_timeout_s)
        # Local and test runs may use any grace (tests use 0); elsewhere a short one would delete
        # an upload between its grant expiring and its job being written.
        if self.env not in LOCAL_ENVIRONMENTS and self.reconcile_grace_seconds < minimum:
            raise ValueError(
                f"IMGPIPE_RECONCILE_GRACE_SECONDS must be at least IMGPIPE_PRESIGN_TTL_S + "
                f"IMGPIPE_JOB_TIMEOUT_S ({minimum}) when IMGPIPE_ENV={self.env}"
            )
        longest = self.longest_processing_s()
        if self.env not in LOCAL_ENVIRONMENTS and self.stuck_processing_s <= longest:
            raise ValueError(
                f"IMGPIPE_STUCK_PROCESSING_S must be longer than IMGPIPE_MAX_ATTEMPTS x "
                f"IMGPIPE_JOB_TIMEOUT_S plus the IMGPIPE_RETRY_DELAYS_S between them ({longest:g}) "
                f"when IMGPIPE_ENV={self.env}"
            )
        return self

    def trigger(self) -> CronTrigger:
        return parse_cron(self.reconcile_cron)
