"""The job contract: variants, presets, request validation and the client's view of a record."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from imgpipe.models import (
    MAX_VARIANT_EDGE,
    MAX_VARIANTS,
    PRESETS,
    ErrorInfo,
    JobMessage,
    JobRecord,
    JobRequest,
    JobStatus,
    KeySource,
    UrlSource,
    Variant,
    VariantResult,
    read_written,
)
from pydantic import ValidationError


def test_presets_resolve_in_order_and_mix_with_custom_variants() -> None:
    custom = {"name": "banner", "width": 1200, "height": 300, "fit": "cover", "format": "png"}
    request = JobRequest.model_validate({"source": {"key": "k"}, "variants": ["medium", custom, "thumb"]})
    resolved = request.resolved_variants()
    assert [v.name for v in resolved] == ["medium", "banner", "thumb"]
    assert resolved[0] == PRESETS["medium"]
    assert resolved[1] == Variant(name="banner", width=1200, height=300, fit="cover", format="png")
    assert resolved[2] == PRESETS["thumb"]
    assert (resolved[2].width, resolved[2].height, resolved[2].format) == (200, 200, "jpeg")


def test_default_variants_are_the_thumb_preset() -> None:
    request = JobRequest.model_validate({"source": {"url": "https://img.example.com/a.jpg"}})
    assert isinstance(request.source, UrlSource)
    assert [v.name for v in request.resolved_variants()] == ["thumb"]


def test_a_variant_with_one_edge_is_valid() -> None:
    assert Variant(name="w", width=100).height is None
    assert Variant(name="h", height=100).width is None
    assert Variant(name="max", width=MAX_VARIANT_EDGE, height=MAX_VARIANT_EDGE, quality=100).quality == 100
    assert Variant(name="min", width=1, quality=1).quality == 1


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({}, "needs a width, a height or both"),
        ({"width": 100, "fit": "cover"}, "'cover' needs both"),
        ({"height": 100, "fit": "cover"}, "'cover' needs both"),
        ({"width": 0}, "greater than or equal to 1"),
        ({"height": 0}, "greater than or equal to 1"),
        ({"width": MAX_VARIANT_EDGE + 1}, "less than or equal to 8192"),
        ({"height": MAX_VARIANT_EDGE + 1}, "less than or equal to 8192"),
        ({"width": 10, "quality": 0}, "greater than or equal to 1"),
        ({"width": 10, "quality": 101}, "less than or equal to 100"),
        ({"width": 10, "format": "gif"}, "'jpeg', 'png', 'webp' or 'avif'"),
        ({"width": 10, "fit": "stretch"}, "'inside' or 'cover'"),
        ({"width": 10, "sharpen": True}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_variants_are_refused(fields: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        Variant.model_validate({"name": "v", **fields})
    assert needle in str(info.value)


@pytest.mark.parametrize("name", ["", "Upper", "-lead", "has space", "../x", "a" * 65])
def test_bad_variant_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="String should match pattern"):
        Variant(name=name, width=10)


def _request(variants: object) -> JobRequest:
    return JobRequest.model_validate({"source": {"key": "uploads/x"}, "variants": variants})


@pytest.mark.parametrize(
    ("variants", "needle"),
    [
        ([], "at least one variant"),
        (["nope"], "unknown preset 'nope'"),
        (["thumb", "thumb"], "unique"),
        (["thumb", {"name": "thumb", "width": 10}], "unique"),
        ([{"name": f"v{i}", "width": 10} for i in range(MAX_VARIANTS + 1)], f"at most {MAX_VARIANTS}"),
    ],
)
def test_invalid_variant_lists_are_refused(variants: list, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        _request(variants)
    assert needle in str(info.value)


def test_sixteen_variants_are_accepted() -> None:
    request = _request([{"name": f"v{i}", "width": 10} for i in range(MAX_VARIANTS)])
    assert len(request.resolved_variants()) == MAX_VARIANTS


@pytest.mark.parametrize(
    "body",
    [
        {"source": {"key": "k"}, "priority": 1},
        {"source": {"key": "k", "bucket": "other"}},
        {"source": {"url": "https://example.com/a.jpg", "headers": {}}},
    ],
)
def test_extra_fields_are_refused(body: dict) -> None:
    with pytest.raises(ValidationError):
        JobRequest.model_validate(body)


@pytest.mark.parametrize(
    "url", ["not a url", "ftp://example.com/a.jpg", "file:///etc/passwd", "http://", "javascript:alert(1)"]
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationError):
        JobRequest.model_validate({"source": {"url": url}})


def test_source_needs_a_key_or_a_url() -> None:
    for source in ({}, {"key": ""}, {"key": "k" * 1025}):
        with pytest.raises(ValidationError):
            JobRequest.model_validate({"source": source})
    assert isinstance(JobRequest.model_validate({"source": {"key": "k"}}).source, KeySource)


def _record(**update: object) -> JobRecord:
    base = JobRecord(
        id="j1",
        owner="alice",
        status=JobStatus.PENDING,
        created_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        updated_at=datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC),
        source=KeySource(key="uploads/x"),
        requested=[PRESETS["thumb"]],
    )
    return base.model_copy(update=update)


def test_public_view_of_a_pending_job() -> None:
    view = _record().public()
    assert view == {
        "id": "j1",
        "status": "pending",
        "created_at": "2024-05-01T12:00:00+00:00",
        "updated_at": "2024-05-01T12:00:05+00:00",
        "variants": [],
        "error": None,
    }


def test_public_view_of_a_finished_job_has_urls_and_hides_internals() -> None:
    result = VariantResult(
        name="thumb", format="jpeg", width=200, height=150, bytes=1234, key="variants/o/j1/t.jpg"
    )
    record = _record(status=JobStatus.SUCCEEDED, variants=[result], attempts=2, version=3)
    view = record.public(lambda key: f"https://cdn.example/{key}?sig=1")
    assert set(view) == {"id", "status", "created_at", "updated_at", "variants", "error"}
    assert view["status"] == "succeeded"
    assert view["variants"] == [
        {
            "name": "thumb",
            "format": "jpeg",
            "width": 200,
            "height": 150,
            "bytes": 1234,
            "key": "variants/o/j1/t.jpg",
            "url": "https://cdn.example/variants/o/j1/t.jpg?sig=1",
        }
    ]
    # Without url_for the url is present but empty.
    assert record.public()["variants"][0]["url"] is None


def test_public_view_of_a_failed_job_carries_the_error() -> None:
    record = _record(status=JobStatus.FAILED, error=ErrorInfo(code="source_not_found", message="gone"))
    assert record.public()["error"] == {"code": "source_not_found", "message": "gone"}


def test_terminal_statuses() -> None:
    assert {s for s in JobStatus if s.terminal} == {JobStatus.SUCCEEDED, JobStatus.FAILED}


def test_a_submitted_key_is_at_most_1024_bytes() -> None:
    """S3 counts a key's length in bytes of UTF-8, not in characters."""
    prefix = "uploads/o/"
    fits = prefix + "é" * ((1024 - len(prefix)) // 2)  # 1,024 bytes, 517 characters
    assert len(fits.encode()) == 1024
    assert JobRequest.model_validate({"source": {"key": fits}}).source == KeySource(key=fits)
    with pytest.raises(ValidationError, match="at most 1024 bytes"):
        JobRequest.model_validate({"source": {"key": fits + "x"}})


def test_a_stored_key_with_odd_segments_stays_readable() -> None:
    """Submitting `a//b` is refused (`JobRequest`), but a record or message that already holds one
    (written before that check, or by a backfill) must still parse: one unreadable record would stop
    the reconciler's runs and the job's status."""
    key = "uploads/o/batch//photo.jpg"
    with pytest.raises(ValidationError):
        JobRequest.model_validate({"source": {"key": key}})
    record = JobRecord.pending("j", "alice", KeySource(key=key), [PRESETS["thumb"]])
    assert JobRecord.model_validate_json(record.model_dump_json()).source == KeySource(key=key)
    message = JobMessage(
        id="j",
        owner="alice",
        source=KeySource(key=key),
        variants=[PRESETS["thumb"]],
        created_at=record.created_at,
    )
    assert JobMessage.model_validate_json(message.model_dump_json()).source == KeySource(key=key)


def test_what_a_later_release_wrote_is_read_and_a_request_is_held_to_the_contract() -> None:
    # A rolling upgrade or a rollback: a message or record with fields this release does not know,
    # at every level, is read for what it knows; a client's request with them is refused.
    message = {
        "id": "j1",
        "owner": "alice",
        "priority": 5,
        "source": {"key": "uploads/a/b", "version_id": "3"},
        "variants": [{"name": "t", "width": 10, "strip_metadata": False}],
        "created_at": "2026-12-07T00:00:00+00:00",
    }
    read = read_written(JobMessage, json.dumps(message))
    assert read.source == KeySource(key="uploads/a/b")
    assert read.variants == [Variant(name="t", width=10)]
    assert read_written(JobMessage, message) == read  # from a dict (a pub/sub payload) alike
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        JobMessage.model_validate(message)
    with pytest.raises(ValidationError):
        JobRequest.model_validate({"source": {"key": "uploads/a/b", "version_id": "3"}})
    # A URL source is still told from a key source by its fields.
    url = read_written(JobMessage, {**message, "source": {"url": "https://example.com/a.jpg", "headers": {}}})
    assert isinstance(url.source, UrlSource)
    # A value this release cannot take is not made up: a status it does not know stays an error.
    record = json.loads(
        JobRecord.pending("j1", "alice", KeySource(key="k"), [PRESETS["thumb"]]).model_dump_json()
    )
    with pytest.raises(ValidationError):
        read_written(JobRecord, json.dumps({**record, "status": "paused"}))
    # The record's own new fields are kept, and written back with it.
    kept = read_written(JobRecord, json.dumps({**record, "tenant": "t1"}))
    moved = kept.model_copy(update={"status": JobStatus.PROCESSING})
    assert json.loads(moved.model_dump_json())["tenant"] == "t1"
