"""The latency section of `make bench`, small, against the real services: it measures and reports.

`make test` runs without the bench dependency group, but this section needs none of it; a change
that breaks it (a metric renamed, a stage added) fails here instead of in the next benchmark run.
Nothing here asserts a timing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import latency, report

pytestmark = pytest.mark.e2e


def test_latency_section_measures_every_stage_and_reports_it(tmp_path: Path) -> None:
    result = latency.measure(tmp_path, jobs=3, log=lambda *_: None)

    assert result["jobs"] == 3
    assert set(result["latency_ms"]) == set(result["overhead_ms"]) == {"p50", "p95", "p99"}
    stages = result["stages_ms"]
    # The api's request, then the worker's stages in their order, each seen for the measured jobs.
    assert list(stages) == ["api", *latency.STAGES]
    for mean in stages.values():
        assert math.isfinite(mean), stages  # NaN: no observation, i.e. a name the services lack
        assert mean >= 0, stages
    for name in ("api", "queued", "fetch", "render", "upload", "finish"):
        assert stages[name] > 0, stages
    # The api's request step by step, each taken by every measured job, and inside the request.
    steps = result["api_steps_ms"]
    assert list(steps) == ["admit", "source", "record", "publish"]
    assert all(math.isfinite(mean) and mean > 0 for mean in steps.values()), steps
    assert sum(steps.values()) <= stages["api"], (steps, stages)
    assert set(result["s3_calls_back_to_back_ms"]) == {"p50", "min"}

    rows = [row for row in report.rows({"latency": result}) if row["area"] == "latency"]
    breakdown = [row["value"] for row in rows if row["figure"].startswith("where a job's time goes")]
    assert len(breakdown) == 1, rows
    assert all(f"{name} " in breakdown[0] for name in stages), breakdown
    by_step = [row["value"] for row in rows if row["figure"].startswith("the api's request step by step")]
    assert len(by_step) == 1 and all(f"{name} " in by_step[0] for name in steps), rows
