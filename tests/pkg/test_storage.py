"""Object storage against a real S3 API (a moto server over HTTP): presigned forms, reads, writes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import boto3
import pytest
from imgpipe.settings import S3Settings
from imgpipe.storage import (
    UPLOAD_PREFIX,
    ObjectNotFound,
    ObjectTooLarge,
    Storage,
    StorageError,
    owns_key,
    upload_key,
    variant_key,
)
from imgpipe.store import owner_id

from tests.stack import free_port, presigned_form


def _settings(endpoint: str, bucket: str, **extra: object) -> S3Settings:
    return S3Settings(
        s3_endpoint_url=endpoint,
        s3_bucket=bucket,
        s3_force_path_style=True,
        aws_region="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        **extra,
    )


def _raw(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
async def storage(s3_endpoint: str) -> AsyncIterator[Storage]:
    bucket = f"imgpipe-unit-{uuid.uuid4().hex[:12]}"
    storage = Storage(_settings(s3_endpoint, bucket))
    await storage.ensure_bucket()
    try:
        yield storage
    finally:
        raw = _raw(s3_endpoint)
        for obj in raw.list_objects_v2(Bucket=bucket).get("Contents", []):
            raw.delete_object(Bucket=bucket, Key=obj["Key"])
        raw.delete_bucket(Bucket=bucket)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_ensure_bucket_creates_once_and_is_idempotent(s3_endpoint: str) -> None:
    bucket = f"imgpipe-unit-{uuid.uuid4().hex[:12]}"
    raw = _raw(s3_endpoint)
    assert bucket not in {b["Name"] for b in raw.list_buckets()["Buckets"]}
    storage = Storage(_settings(s3_endpoint, bucket))
    try:
        await storage.ensure_bucket()
        await storage.put("a", b"kept", "text/plain")
        await storage.ensure_bucket()
        await storage.ping()
        assert await storage.get("a", max_bytes=10) == b"kept"  # the second call did not recreate it
    finally:
        raw.delete_object(Bucket=bucket, Key="a")
        raw.delete_bucket(Bucket=bucket)


async def _post_form(http: aiohttp.ClientSession, url: str, fields: dict, data: bytes, ctype: str) -> int:
    async with http.post(url, data=presigned_form(fields, data, ctype)) as response:
        await response.read()
        return response.status


async def test_presigned_upload(storage: Storage, http: aiohttp.ClientSession) -> None:
    key = upload_key("alice")
    grant = storage.presign_upload(key, "image/png", max_bytes=1024)
    assert grant.key == key
    assert grant.fields["key"] == key
    assert grant.fields["Content-Type"] == "image/png"
    assert time.time() + 800 < grant.expires_at <= time.time() + 900
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
    status = await _post_form(http, grant.url, grant.fields, data, "image/png")
    assert status in (200, 201, 204)
    head = await storage.head(key)
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(data)
    assert await storage.get(key, max_bytes=1024) == data


async def test_get_limits_and_missing(storage: Storage) -> None:
    await storage.put("big", b"x" * 100, "application/octet-stream")
    assert await storage.get("big", max_bytes=100) == b"x" * 100
    with pytest.raises(ObjectTooLarge) as too_large:
        await storage.get("big", max_bytes=99)
    assert (too_large.value.code, too_large.value.transient) == ("source_too_large", False)
    with pytest.raises(ObjectNotFound) as missing:
        await storage.get("uploads/nobody/nothing", max_bytes=100)
    assert (missing.value.code, missing.value.transient) == ("source_not_found", False)
    with pytest.raises(ObjectNotFound):
        await storage.head("uploads/nobody/nothing")


async def test_put_then_presigned_download(storage: Storage, http: aiohttp.ClientSession) -> None:
    key = variant_key("alice", "job-1", "thumb", "webp")
    await storage.put(key, b"RIFF....WEBP", "image/webp")
    url = storage.presign_download(key)
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/webp"
        assert await response.read() == b"RIFF....WEBP"


def test_key_layout() -> None:
    mine = upload_key("alice")
    assert mine.startswith(f"{UPLOAD_PREFIX}{owner_id('alice')}/")
    assert upload_key("alice") != mine
    assert owns_key("alice", mine)
    assert not owns_key("bob", mine)
    prefix = f"{UPLOAD_PREFIX}{owner_id('alice')}/"
    for key in (
        f"{prefix}../{owner_id('bob')}/x",
        f"{prefix}x/../../{owner_id('bob')}/y",
        f"{prefix}..",
        f"{UPLOAD_PREFIX}{owner_id('alice')}",  # no slash: a prefix of someone else's id
        f"{UPLOAD_PREFIX}{owner_id('alice')}x/y",
        f"variants/{owner_id('alice')}/j/t.jpg",
        f"/{prefix}x",
        "",
    ):
        assert not owns_key("alice", key), key
    assert variant_key("alice", "j1", "thumb", "jpeg") == f"variants/{owner_id('alice')}/j1/thumb.jpg"
    assert variant_key("alice", "j1", "thumb", "jpeg") == variant_key("alice", "j1", "thumb", "jpeg")
    assert variant_key("bob", "j1", "thumb", "jpeg") != variant_key("alice", "j1", "thumb", "jpeg")
    assert variant_key("alice", "j1", "small", "avif").endswith("/j1/small.avif")


async def test_unreachable_endpoint_is_transient() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    storage = Storage(_settings(closed, "nowhere"))
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        await storage.put("k", b"x", "text/plain")
    assert info.value.transient
    assert info.value.code == "storage_unavailable"
    with pytest.raises(StorageError) as info:
        await storage.get("k", max_bytes=10)
    assert info.value.transient
    assert time.monotonic() - started < 15


async def test_public_endpoint_is_used_for_presigned_urls(s3_endpoint: str, storage: Storage) -> None:
    port = urlsplit(s3_endpoint).port
    public = f"http://localhost:{port}"
    signer = Storage(_settings(s3_endpoint, storage.bucket, s3_public_endpoint_url=public))
    await signer.put("k", b"through the public name", "text/plain")
    url = signer.presign_download("k")
    assert urlsplit(url).netloc == f"localhost:{port}"
    grant = signer.presign_upload("uploads/x", "image/jpeg", max_bytes=10)
    assert urlsplit(grant.url).netloc == f"localhost:{port}"
    # Without it, URLs name the endpoint the services use.
    assert urlsplit(storage.presign_download("k")).netloc == urlsplit(s3_endpoint).netloc
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert await response.read() == b"through the public name"
