"""Object storage against a real S3 API (a moto server over HTTP): presigned forms, reads, writes."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from http.client import HTTPConnection
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from imgpipe import storage as storage_module
from imgpipe.bodies import BodyNotAdmitted
from imgpipe.settings import S3Settings, load
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

from tests.stack import free_port, local_http, presigned_form, s3_client, s3_settings


def _raw(endpoint: str):  # type: ignore[no-untyped-def]
    return s3_client(endpoint)


@pytest.fixture
async def storage(s3_endpoint: str) -> AsyncIterator[Storage]:
    bucket = f"imgpipe-unit-{uuid.uuid4().hex[:12]}"
    storage = Storage(s3_settings(s3_endpoint, bucket))
    await storage.ensure_bucket()
    try:
        yield storage
    finally:
        await storage.close()
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
    storage = Storage(s3_settings(s3_endpoint, bucket))
    try:
        await storage.ensure_bucket()
        await storage.put("a", b"kept", "text/plain")
        await storage.ensure_bucket()
        await storage.ping()
        assert await storage.get("a", max_bytes=10) == b"kept"  # the second call did not recreate it
    finally:
        await storage.close()
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


async def test_get_reads_a_body_only_if_admit_has_room_for_it(storage: Storage) -> None:
    await storage.put("sized", b"x" * 100, "application/octet-stream")
    asked: list[int | None] = []

    def room(size: int) -> Callable[[int | None], int | None]:
        def admit(length: int | None) -> int | None:
            asked.append(length)
            return size

        return admit

    with pytest.raises(BodyNotAdmitted) as refused:
        await storage.get("sized", max_bytes=1000, admit=room(99))
    assert refused.value.size == 100
    assert await storage.get("sized", max_bytes=1000, admit=room(100)) == b"x" * 100
    assert asked == [100, 100]


async def test_get_holds_the_body_once(storage: Storage, s3_endpoint: str) -> None:
    # A worker downloads a source while another renders: a body held twice at its end (a join of
    # the chunks, or bytes() of a buffer) put one source more on the worker's peak memory. The S3
    # server is another process: what is traced here is the client's memory alone.
    size = 8 * 1024 * 1024
    _raw(s3_endpoint).put_object(Bucket=storage.bucket, Key="source", Body=bytes(range(256)) * (size // 256))
    await storage.get("source", max_bytes=size)  # the connection and its buffers exist from here on
    tracemalloc.start()
    try:
        body = await storage.get("source", max_bytes=size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert body == bytes(range(256)) * (size // 256)
    assert peak < 1.25 * size, f"{peak / size:.2f} times the body"


async def test_a_storage_holds_no_s3_model_until_it_lists(s3_endpoint: str, storage: Storage) -> None:
    # A boto3 client holds S3's service model and endpoint rules, about 10 MiB. The api, the status
    # service and the worker only sign URLs, move objects and probe the bucket: none of that may keep
    # one. The reconciler's listing needs a client, and shows the measure sees one.
    gc.collect()
    tracemalloc.start()
    try:
        fresh = Storage(s3_settings(s3_endpoint, storage.bucket))
        try:
            await fresh.ping()
            await fresh.put("uploads/o/a", b"bytes", "text/plain")
            assert await fresh.get("uploads/o/a", max_bytes=10) == b"bytes"
            assert (await fresh.head("uploads/o/a"))["ContentLength"] == 5
            fresh.presign_upload("uploads/o/b", "image/png", 100)
            fresh.presign_download("uploads/o/a")
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
            assert held < 2 * 2**20, f"{held / 2**20:.1f} MiB held"
            assert [[o.key for o in page] async for page in fresh.iter_pages("uploads/")] == [["uploads/o/a"]]
            listed, _ = tracemalloc.get_traced_memory()
            assert listed > held + 5 * 2**20, f"{listed / 2**20:.1f} MiB held after a listing"
        finally:
            await fresh.close()
    finally:
        tracemalloc.stop()


async def test_ping_fails_for_a_missing_bucket(s3_endpoint: str) -> None:
    storage = Storage(s3_settings(s3_endpoint, f"imgpipe-missing-{uuid.uuid4().hex[:12]}"))
    try:
        with pytest.raises(StorageError) as info:
            await storage.ping()
        assert info.value.message.startswith("S3: no bucket")
    finally:
        await storage.close()


async def test_put_if_absent_stores_once(storage: Storage) -> None:
    key = f"claims/{uuid.uuid4().hex}"
    assert await storage.put_if_absent(key, b"first", "text/plain")
    assert not await storage.put_if_absent(key, b"second", "text/plain")
    assert await storage.get(key, max_bytes=100) == b"first"


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
    storage = Storage(s3_settings(closed, "nowhere"))
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as info:
            await storage.put("k", b"x", "text/plain")
        assert info.value.transient
        assert info.value.code == "storage_unavailable"
        with pytest.raises(StorageError) as info:
            await storage.get("k", max_bytes=10)
        assert info.value.transient
    finally:
        await storage.close()
    assert time.monotonic() - started < 15


class FlakyS3:
    """An S3 endpoint that answers each object request with the next status of a script."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.queries: list[dict[str, str]] = []
        self.raw_paths: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, dict(request.headers)))
        self.raw_paths.append(request.raw_path.partition("?")[0])
        self.queries.append(dict(request.query))
        await request.read()
        status = self.statuses.pop(0) if self.statuses else 200
        # A redirect points back at the same request: a client that follows it loops.
        headers = {"Location": request.path_qs} if 300 <= status < 400 else None
        return web.Response(
            status=status, body=b"stored bytes" if status == 200 else b"<Error/>", headers=headers
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_transfers_retry_what_s3_asks_to_retry(status: int) -> None:
    s3 = FlakyS3(status, status)
    async with local_http(s3.app()) as endpoint:
        storage = Storage(s3_settings(endpoint, "bucket"))
        try:
            assert await storage.get("uploads/k", max_bytes=100) == b"stored bytes"
            assert [m for m, _, _ in s3.seen] == ["GET"] * 3
            s3.statuses = [status] * 3  # one more than the attempts
            with pytest.raises(StorageError) as info:
                await storage.put("variants/k.jpg", b"data", "image/jpeg")
        finally:
            await storage.close()
    assert info.value.transient
    assert str(status) in info.value.message
    assert [m for m, _, _ in s3.seen[3:]] == ["PUT"] * 3


@pytest.mark.parametrize(("status", "code"), [(403, "storage_error"), (400, "storage_error")])
async def test_transfers_do_not_retry_a_refusal_but_a_job_does(status: int, code: str) -> None:
    s3 = FlakyS3(status, status)
    async with local_http(s3.app()) as endpoint:
        storage = Storage(s3_settings(endpoint, "bucket"))
        try:
            with pytest.raises(StorageError) as info:
                await storage.get("uploads/k", max_bytes=100)
            assert (info.value.code, info.value.transient) == (code, True)
            with pytest.raises(StorageError) as info:
                await storage.put("variants/k.jpg", b"data", "image/jpeg")
            assert (info.value.code, info.value.transient) == (code, True)
        finally:
            await storage.close()
    assert len(s3.seen) == 2


async def test_transfers_follow_no_redirect() -> None:
    # S3 does not redirect a presigned request; whatever does is not followed (nor sent the signature).
    s3 = FlakyS3(*[307] * 40)
    async with local_http(s3.app()) as endpoint:
        storage = Storage(s3_settings(endpoint, "bucket"))
        try:
            for call in (
                lambda: storage.get("uploads/k", max_bytes=100),
                lambda: storage.put("variants/k.jpg", b"data", "image/jpeg"),
                lambda: storage.head("uploads/k"),
            ):
                with pytest.raises(StorageError) as info:
                    await call()
                assert "HTTP 307" in info.value.message
                assert "X-Amz-" not in info.value.message
        finally:
            await storage.close()
    assert [m for m, _, _ in s3.seen] == ["GET", "PUT", "HEAD"]


class HangingS3:
    """An endpoint that takes connections and never answers (`async with`: closed at the end)."""

    def __init__(self) -> None:
        self.connections: list[asyncio.StreamWriter] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HangingS3:
        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections.append(writer)
            await reader.read()  # until the connection is closed

        self._server = await asyncio.start_server(hang, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        """Stop listening and drop every connection taken (the calls on them then fail)."""
        if self._server is None:
            return
        self._server.close()
        for writer in self.connections:
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def __aexit__(self, *_: object) -> None:
        await self.close()


async def test_readiness_probes_while_s3_hangs_share_one_call() -> None:
    # Each probe gives up after its timeout.
    async with HangingS3() as s3:
        storage = Storage(s3_settings(s3.url, "bucket"))
        try:
            for _ in range(5):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await storage.ping()
            assert len(s3.connections) == 1  # one HeadBucket out, not one blocked thread per probe
        finally:
            await s3.close()
            with pytest.raises(StorageError):  # the call in flight ends once its connection does
                await storage.ping()
            await storage.close()


async def test_a_head_that_s3_never_answers_gives_up_within_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`POST /jobs` checks its source with a HEAD: on an S3 that takes connections and never answers
    it waited three reads of 30 s, past the gateway's timeout, holding the job's key and slot."""
    monkeypatch.setattr(storage_module, "_HEAD_DEADLINE_S", 0.5)
    async with HangingS3() as s3:
        storage = Storage(s3_settings(s3.url, "bucket"))
        started = time.monotonic()
        try:
            with pytest.raises(StorageError) as info:
                await storage.head("uploads/k")
        finally:
            await storage.close()
    assert (info.value.code, info.value.transient) == ("storage_unavailable", True)
    assert 0.5 <= time.monotonic() - started < 2


async def test_a_missing_bucket_is_the_deployments_fault_not_a_missing_source() -> None:
    """S3 answers 404 for a missing bucket too: a wrong name or a deleted bucket failed every job for
    good as `source_not_found`. It is a transient `storage_error` (dead-lettered, to be replayed)."""

    async def no_bucket(request: web.Request) -> web.Response:
        body = b"<?xml version='1.0'?><Error><Code>NoSuchBucket</Code></Error>"
        return web.Response(status=404, body=body, content_type="application/xml")

    async def no_key(request: web.Request) -> web.Response:
        body = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>"
        return web.Response(status=404, body=body, content_type="application/xml")

    for handler, missing_bucket in ((no_bucket, True), (no_key, False)):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        async with local_http(app) as endpoint:
            storage = Storage(s3_settings(endpoint, "bucket"))
            try:
                with pytest.raises(StorageError) as info:
                    await storage.get("uploads/k", max_bytes=100)
            finally:
                await storage.close()
        if missing_bucket:
            assert (info.value.code, info.value.transient) == ("storage_error", True)
            assert "no bucket" in info.value.message
        else:
            assert isinstance(info.value, ObjectNotFound)


def test_presigned_urls_name_the_buckets_region() -> None:
    """With `addressing_style` "auto", botocore signed every URL for S3's global endpoint
    (`bucket.s3.amazonaws.com`), which opt-in regions refuse and a new bucket elsewhere answers with
    a redirect for a while: the uploads' form, the download links and the services' own transfers."""
    for region in ("eu-west-1", "af-south-1"):
        settings = S3Settings(
            s3_bucket="imgpipe", aws_region=region, aws_access_key_id="k", aws_secret_access_key="s"
        )
        storage = Storage(settings)
        expected = f"https://imgpipe.s3.{region}.amazonaws.com/"
        assert storage.presign_upload("uploads/o/k", "image/jpeg", 100).url == expected
        assert storage.presign_download("variants/o/j/t.jpg").startswith(f"{expected}variants/o/j/t.jpg?")
        assert str(storage._transfer_url("HEAD", "uploads/o/k")).startswith(f"{expected}uploads/o/k?")


async def test_temporary_keys_from_the_environment_sign_with_their_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys handed to boto3 come without the environment's `AWS_SESSION_TOKEN` (boto3 reads it only
    when it finds the keys itself): S3 refuses temporary keys signed without their token."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    storage = Storage(load(S3Settings))
    try:
        query = parse_qs(urlsplit(storage.presign_download("variants/o/j/t.jpg")).query)
        assert query["X-Amz-Security-Token"] == ["FwoGZXIvYXdzEXAMPLETOKEN"]
        assert query["X-Amz-Credential"][0].startswith("ASIAEXAMPLE/")
        form = storage.presign_upload("uploads/o/k", "image/jpeg", 100).fields
        assert form["x-amz-security-token"] == "FwoGZXIvYXdzEXAMPLETOKEN"
    finally:
        await storage.close()


def test_a_session_token_alone_leaves_the_default_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    # Handed to boto3 without keys, a token made credentials of no keys, in place of the chain's.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    assert storage_module._session(load(S3Settings)).get_credentials() is None  # nothing in the chain here


async def test_head_without_a_date_is_refused() -> None:
    s3 = FlakyS3()  # answers 200 with no Last-Modified: not an S3 we can check a grant against
    async with local_http(s3.app()) as endpoint:
        storage = Storage(s3_settings(endpoint, "bucket"))
        try:
            with pytest.raises(StorageError) as info:
                await storage.head("uploads/k")
        finally:
            await storage.close()
    assert (info.value.code, info.value.transient) == ("storage_error", False)
    assert [m for m, _, _ in s3.seen] == ["HEAD"]


async def test_put_stores_type_and_cache_control(storage: Storage, s3_endpoint: str) -> None:
    await storage.put("variants/o/j/thumb.webp", b"RIFF....WEBP", "image/webp")
    head = _raw(s3_endpoint).head_object(Bucket=storage.bucket, Key="variants/o/j/thumb.webp")
    assert head["ContentType"] == "image/webp"
    assert head["CacheControl"] == "private, max-age=31536000, immutable"  # the users' own images
    assert head["ContentLength"] == 12


async def test_put_signs_the_headers_it_sends() -> None:
    # moto does not check signatures; S3 and MinIO refuse a PUT whose signed headers differ from
    # those sent. So check what goes over the wire: both headers sent are named as signed.
    s3 = FlakyS3()
    async with local_http(s3.app()) as endpoint:
        storage = Storage(s3_settings(endpoint, "bucket"))
        try:
            await storage.put("variants/k.png", b"data", "image/png")
        finally:
            await storage.close()
    ((method, path, headers),) = s3.seen
    assert (method, path) == ("PUT", "/bucket/variants/k.png")
    assert headers["Content-Type"] == "image/png"
    assert headers["Cache-Control"] == "private, max-age=31536000, immutable"
    assert s3.queries[0]["X-Amz-SignedHeaders"] == "cache-control;content-type;host"
    assert s3.queries[0]["X-Amz-Signature"]


@pytest.mark.parametrize(
    "key",
    [
        "uploads/o/IMG_0001 (1).jpg",
        "uploads/o/backfill:2024=a,b;c@d!e$f&g'h*i.png",
        "uploads/o/ümlaut+plus.jpg",
    ],
)
async def test_transfers_send_the_path_they_signed(key: str) -> None:
    # S3 checks a presigned request's signature against the path it receives. Signed as botocore
    # quotes the key, the path must go out byte for byte so: yarl un-escaped `(`, `:`, `=`, ... on
    # the way (S3: 403 SignatureDoesNotMatch; moto checks no signature, hence this capture).
    s3 = FlakyS3()
    async with local_http(s3.app()) as endpoint:
        storage = Storage(s3_settings(endpoint, "bucket"))
        try:
            await storage.get(key, max_bytes=100)
            await storage.put(key, b"data", "image/png")
        finally:
            await storage.close()
    signed = "/bucket/" + quote(key, safe="/~")
    assert s3.raw_paths == [signed, signed]
    assert [path for _, path, _ in s3.seen] == ["/bucket/" + key] * 2  # the same object, for S3


async def test_without_credentials_storage_is_unavailable_not_an_error(no_aws_credentials: None) -> None:
    # No keys and none in the default chain: every call fails as S3 being out of reach does
    # (transient: the api answers 503, a job is retried and dead-lettered), not as a bug (a 500).
    s3 = FlakyS3()
    async with local_http(s3.app()) as endpoint:
        settings = S3Settings(s3_endpoint_url=endpoint, s3_bucket="bucket", s3_force_path_style=True)
        storage = Storage(settings)
        try:
            for call in (
                lambda: storage.head("uploads/k"),
                lambda: storage.get("uploads/k", max_bytes=100),
                lambda: storage.put("variants/k.jpg", b"data", "image/jpeg"),
            ):
                with pytest.raises(StorageError) as info:
                    await call()
                assert (info.value.code, info.value.transient) == ("storage_unavailable", True)
            for sign in (
                lambda: storage.presign_upload("uploads/k", "image/jpeg", 10),
                lambda: storage.presign_download("variants/k.jpg"),
            ):
                with pytest.raises(StorageError) as info:
                    sign()
                assert (info.value.code, info.value.transient) == ("storage_unavailable", True)
        finally:
            await storage.close()
    assert s3.seen == []  # nothing was sent unsigned


async def test_public_endpoint_is_used_for_presigned_urls(s3_endpoint: str, storage: Storage) -> None:
    port = urlsplit(s3_endpoint).port
    public = f"http://localhost:{port}"
    signer = Storage(s3_settings(s3_endpoint, storage.bucket, s3_public_endpoint_url=public))
    await signer.put("k", b"through the public name", "text/plain")
    await signer.close()
    url = signer.presign_download("k")
    assert urlsplit(url).netloc == f"localhost:{port}"
    grant = signer.presign_upload("uploads/x", "image/jpeg", max_bytes=10)
    assert urlsplit(grant.url).netloc == f"localhost:{port}"
    # Without it, URLs name the endpoint the services use.
    assert urlsplit(storage.presign_download("k")).netloc == urlsplit(s3_endpoint).netloc
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert await response.read() == b"through the public name"


def test_the_test_s3_keeps_connections_open(s3_endpoint: str) -> None:
    # As S3 and MinIO do (tests/s3server.py): a PUT's body, read or not by moto, must not spill
    # into the next request on the connection, and a chunked one still closes it.
    url = urlsplit(s3_endpoint)
    conn = HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        answers = []
        for method, path, body in [
            ("GET", "/", None),
            ("PUT", "/no-such-bucket-here/k", b"unread body"),
            ("GET", "/", None),
        ]:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            response.read()
            answers.append((method, response.status, response.getheader("Connection")))
            assert conn.sock is not None, answers  # still open after the answer
        assert [status for _, status, _ in answers][::2] == [200, 200]
        conn.request("PUT", "/no-such-bucket-here/k", body=iter([b"chunked"]), encode_chunked=True)
        response = conn.getresponse()
        response.read()
        assert response.getheader("Connection") == "close"
    finally:
        conn.close()


async def test_a_head_in_a_missing_bucket_is_not_a_missing_source(s3_endpoint: str) -> None:
    """A HEAD's 404 has no body: a wrong or deleted bucket refused every `POST /jobs` as
    `source_not_found` (a 422, the client's fault). It is the transient `storage_error` (a 503)."""
    missing = Storage(s3_settings(s3_endpoint, f"imgpipe-missing-{uuid.uuid4().hex[:12]}"))
    try:
        with pytest.raises(StorageError) as info:
            await missing.head("uploads/o/k")
    finally:
        await missing.close()
    assert not isinstance(info.value, ObjectNotFound)
    assert (info.value.code, info.value.transient) == ("storage_error", True)
    assert "no bucket" in info.value.message


async def test_a_missing_key_asks_for_the_bucket_once_a_minute(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = 0
    head_bucket = storage._head_bucket

    async def counted() -> None:
        nonlocal asked
        asked += 1
        await head_bucket()

    monkeypatch.setattr(storage, "_head_bucket", counted)
    for _ in range(3):
        with pytest.raises(ObjectNotFound):
            await storage.head(f"uploads/o/{uuid.uuid4().hex}")
    assert asked == 1
