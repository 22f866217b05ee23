"""The job contract shared by every service: requests, variants, records and the wire message.

The HTTP API, the broker message and the Redis record all use these models, so a field means the
same thing everywhere and a change to the contract is made in one place.

Two releases run side by side during a rolling upgrade, and a rollback runs the older against what
the newer wrote. So a client's request is held to the contract exactly (a field it does not define
is refused), but what a release wrote, a message or a record, is read with `read_written`: a field
a later release added is dropped, and the job goes on as this release understands it, instead of
being dead-lettered or answered 500. A release may add fields; it must not make a new field needed
by a reader, nor add a status or format value, before the release before it can read them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

#: Largest edge a variant may ask for; bigger outputs are a different product (originals).
MAX_VARIANT_EDGE = 8192
#: How many variants one job may ask for.
MAX_VARIANTS = 16
#: The longest object key S3 takes, in bytes of UTF-8.
MAX_KEY_BYTES = 1024

VariantName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
ImageFormat = Literal["jpeg", "png", "webp", "avif"]

CONTENT_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "avif": "image/avif",
}
EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp", "avif": "avif"}


def utcnow() -> datetime:
    return datetime.now(UTC)


# The validation context of what a release wrote (`read_written`).
_WRITTEN = {"written": True}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _written_by_a_later_release(cls, data: Any, info: ValidationInfo) -> Any:
        """What a release wrote (`read_written`) without the fields this model does not define."""
        if isinstance(data, dict) and info.context and info.context.get("written"):
            return {key: value for key, value in data.items() if key in cls.model_fields}
        return data


_Model = TypeVar("_Model", bound=BaseModel)


def read_written(model: type[_Model], data: str | bytes | dict[str, Any]) -> _Model:
    """`data`, a message or record a release of imgpipe wrote (this one, a later or an earlier one),
    as `model`: fields this release does not know are dropped, at every level but a record's own
    (`JobRecord` keeps those). A value it cannot take (a status it does not know) is still a
    `ValidationError`."""
    if isinstance(data, dict):
        return model.model_validate(data, context=_WRITTEN)
    return model.model_validate_json(data, context=_WRITTEN)


class Variant(_Strict):
    """One output image: a box to fit into, a fit mode and an encoding."""

    name: VariantName
    # Strict: JSON `true` or `"100"` is not a size (lax pydantic made `true` a 1-pixel variant).
    width: StrictInt | None = Field(default=None, ge=1, le=MAX_VARIANT_EDGE)
    height: StrictInt | None = Field(default=None, ge=1, le=MAX_VARIANT_EDGE)
    fit: Literal["inside", "cover"] = "inside"
    format: ImageFormat = "jpeg"
    quality: StrictInt = Field(default=82, ge=1, le=100)

    @model_validator(mode="after")
    def _box(self) -> Variant:
        if self.width is None and self.height is None:
            raise ValueError("a variant needs a width, a height or both")
        if self.fit == "cover" and (self.width is None or self.height is None):
            raise ValueError("fit 'cover' needs both width and height")
        return self


#: Server-side presets, asked for by name (`"variants": ["thumb"]`).
PRESETS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(name="thumb", width=200, height=200, fit="inside", format="jpeg", quality=80),
        Variant(name="small", width=640, height=640, fit="inside", format="webp", quality=80),
        Variant(name="medium", width=1280, height=1280, fit="inside", format="webp", quality=82),
        Variant(name="large", width=2048, height=2048, fit="inside", format="jpeg", quality=85),
    )
}
DEFAULT_VARIANTS: tuple[str, ...] = ("thumb",)


class KeySource(_Strict):
    """An object already in the bucket, normally one uploaded through `POST /uploads`."""

    key: str = Field(min_length=1, max_length=MAX_KEY_BYTES)


class UrlSource(_Strict):
    """An http(s) URL the worker fetches (safely: see `imgpipe.urlsafety`)."""

    url: HttpUrl


class JobRequest(_Strict):
    """Body of `POST /jobs`."""

    source: KeySource | UrlSource
    variants: list[VariantName | Variant] = Field(default_factory=lambda: list(DEFAULT_VARIANTS))

    @field_validator("source")
    @classmethod
    def _plain_key(cls, value: KeySource | UrlSource) -> KeySource | UrlSource:
        # S3 takes `a/./b` literally, but HTTP clients normalise the path they send, so the request
        # would not be the one that was signed: real S3 answers 403, which reads as an outage. Checked
        # here, on what clients submit, not on `KeySource`: records and messages already written with
        # such a key (a backfill's `a//b`) must stay readable.
        if isinstance(value, KeySource):
            if any(s in ("", ".", "..") for s in value.key.split("/")):
                raise ValueError("a key has no empty, '.' or '..' path segments")
            # S3's limit is in bytes (`max_length` counts characters): a longer key is answered 400
            # KeyTooLongError, which reads as a broken deployment (503), not as the caller's mistake.
            if len(value.key.encode()) > MAX_KEY_BYTES:
                raise ValueError(f"a key is at most {MAX_KEY_BYTES} bytes in UTF-8")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: list[str | Variant]) -> list[str | Variant]:
        if not value:
            raise ValueError("at least one variant is needed")
        if len(value) > MAX_VARIANTS:
            raise ValueError(f"at most {MAX_VARIANTS} variants per job")
        for item in value:
            if isinstance(item, str) and item not in PRESETS:
                raise ValueError(f"unknown preset {item!r}; known: {', '.join(sorted(PRESETS))}")
        names = [item if isinstance(item, str) else item.name for item in value]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique within a job")
        return value

    def resolved_variants(self) -> list[Variant]:
        """Presets replaced by their definitions, in the order asked for."""
        return [PRESETS[item] if isinstance(item, str) else item for item in self.variants]


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class ErrorInfo(_Strict):
    code: str
    message: str


class VariantResult(_Strict):
    """A variant as stored: where it is and what it came out as."""

    name: str
    format: ImageFormat
    width: int
    height: int
    bytes: int
    key: str


class JobMessage(_Strict):
    """What the api publishes and the worker consumes. Self-contained: the worker needs no lookup."""

    id: str
    owner: str
    source: KeySource | UrlSource
    variants: list[Variant]
    request_id: str | None = None
    created_at: datetime

    @classmethod
    def of(cls, record: JobRecord, *, request_id: str | None = None) -> JobMessage:
        """The message for `record`: everything the worker needs comes from the record."""
        return cls(
            id=record.id,
            owner=record.owner,
            source=record.source,
            variants=record.requested,
            request_id=request_id,
            created_at=record.created_at,
        )


class JobRecord(BaseModel):
    """The job as kept in Redis. `version` grows with every change so listeners can order updates.

    Fields a later release added are kept (`extra="allow"`) and written back with the record, so an
    older worker's transition does not erase them; a nested model's (a variant's) are dropped.
    """

    model_config = ConfigDict(extra="allow")

    id: str
    owner: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    version: int = 0
    source: KeySource | UrlSource
    requested: list[Variant]
    variants: list[VariantResult] = Field(default_factory=list)
    error: ErrorInfo | None = None
    #: How many times an admin replayed the job from the dead-letter queue (`failed` -> `pending`).
    replays: int = 0

    @classmethod
    def pending(
        cls,
        job_id: str,
        owner: str,
        source: KeySource | UrlSource,
        requested: list[Variant],
        *,
        at: datetime | None = None,
    ) -> JobRecord:
        """A new job as `POST /jobs` records it: `pending`, created and last changed `at` (now)."""
        at = at or utcnow()
        return cls(
            id=job_id,
            owner=owner,
            status=JobStatus.PENDING,
            created_at=at,
            updated_at=at,
            source=source,
            requested=requested,
        )

    def public(self, url_for: Callable[[str], str] | None = None) -> dict[str, Any]:
        """The client's view (`GET /jobs/{id}`, SSE events, the 202 of `POST /jobs`).

        `url_for` turns a variant's key into a time-limited download link.
        """
        return {
            "id": self.id,
            "status": self.status.value,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "variants": [
                {**v.model_dump(), "url": url_for(v.key) if url_for else None} for v in self.variants
            ],
            "error": self.error.model_dump() if self.error else None,
        }


class ReconcileCommand(_Strict):
    """A request for one reconciliation run, as queued on `{ns}.reconcile`."""

    run_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    dry_run: bool = False
    #: Who asked: the schedule, an admin through the api, or the command line.
    trigger: Literal["schedule", "admin", "cli"] = "schedule"
    requested_by: str | None = None
    requested_at: datetime = Field(default_factory=utcnow)
