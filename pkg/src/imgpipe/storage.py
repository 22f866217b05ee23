"""Object storage (S3, MinIO): presigned uploads and downloads, and the reads and writes of jobs.

boto3 is blocking, so its network calls run in a thread (`asyncio.to_thread`), never on the event
loop. The calls every job makes (`head` at submit, then `get` and `put`) and the readiness probe go
over presigned URLs with aiohttp instead, which costs half the CPU and no thread; `imgpipe.presign`
signs them with the session's credentials, inline (local computation). Only the reconciler's
listing, deletes and conditional write need a boto3 client, made on first use. Key layout:

    uploads/{owner_id}/{random}              presigned uploads; the owner is part of the key, so
                                             ownership is checked without a lookup
    variants/{owner_id}/{job_id}/{name}.ext  deterministic, so a redelivered job overwrites its own
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
import boto3
import yarl
from botocore.client import Config
from botocore.exceptions import BotoCoreError, ClientError

from imgpipe.bodies import Admit, BodyNotAdmitted, BodyTooLarge, read_body
from imgpipe.models import EXTENSIONS
from imgpipe.presign import Presigner
from imgpipe.settings import S3Settings
from imgpipe.store import owner_id

T = TypeVar("T")

log = logging.getLogger("imgpipe.storage")

UPLOAD_PREFIX = "uploads/"
VARIANT_PREFIX = "variants/"
#: Most keys S3 takes in one DeleteObjects request (and the size of one listing page).
BATCH = 1000


#: Characters XML 1.0 cannot carry, not even escaped (botocore escapes CR and LF itself).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class StorageError(Exception):
    """S3 did not do what was asked. `transient` says whether trying again may help."""

    def __init__(self, code: str, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient


class ObjectNotFound(StorageError):
    def __init__(self, key: str) -> None:
        super().__init__("source_not_found", f"no object {key!r}", transient=False)


class ObjectTooLarge(StorageError):
    def __init__(self, key: str, size: int, limit: int) -> None:
        super().__init__(
            "source_too_large", f"object {key!r} has {size} bytes, over the {limit} limit", transient=False
        )


@dataclass(frozen=True)
class ObjectInfo:
    """One object as listed: enough to decide about it without another request."""

    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class PresignedUpload:
    key: str
    url: str
    fields: dict[str, str]
    expires_at: float


def upload_key(sub: str) -> str:
    return f"{UPLOAD_PREFIX}{owner_id(sub)}/{secrets.token_hex(16)}"


def owns_key(sub: str, key: str) -> bool:
    return key.startswith(f"{UPLOAD_PREFIX}{owner_id(sub)}/") and ".." not in key


def variant_key(sub: str, job_id: str, name: str, fmt: str) -> str:
    return f"{VARIANT_PREFIX}{owner_id(sub)}/{job_id}/{name}.{EXTENSIONS[fmt]}"


def _session(settings: S3Settings) -> boto3.session.Session:
    """A boto3 session with the configured keys, or the default chain (IRSA, instance role) without."""
    key_id, secret, token = (
        value.get_secret_value() if value else None
        for value in (settings.aws_access_key_id, settings.aws_secret_access_key, settings.aws_session_token)
    )
    # A token goes with keys; alone, boto3 would take it as keys of none rather than use the chain.
    return boto3.session.Session(
        aws_access_key_id=key_id, aws_secret_access_key=secret, aws_session_token=token if key_id else None
    )


def _probe_session() -> boto3.session.Session:
    """A session only for finding the bucket's URLs (`Presigner.locate`): they do not depend on the
    credentials, so any will do, and none are fetched (from STS, an instance's metadata) for it."""
    return boto3.session.Session(aws_access_key_id="imgpipe-probe", aws_secret_access_key="imgpipe-probe")


def _client(session: boto3.session.Session, settings: S3Settings, endpoint: str | None, pool: int) -> Any:
    config = Config(
        region_name=settings.aws_region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if settings.s3_force_path_style else "virtual"},
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=pool,
    )
    # No keys passed here: the client then signs with the session's credentials, the same object
    # `Presigner` reads, so both see a refresh.
    return session.client("s3", endpoint_url=endpoint, config=config)


def _transient(exc: Exception) -> bool:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
        return status >= 500 or status in (408, 429)
    return True  # BotoCoreError: connection trouble, timeouts


#: Lifetime of the presigned URLs `head`, `get` and `put` use themselves (made just before each request).
_TRANSFER_URL_TTL_S = 300
_TRANSFER_ATTEMPTS = 3
_TRANSFER_BACKOFF_S = 0.1
# Variant keys are per job: they never change, so a browser may keep one. Only the browser: the
# images are the users' own, reached by signed links, and no shared cache (a proxy, a CDN) keeps them.
_VARIANT_CACHE_CONTROL = "private, max-age=31536000, immutable"
#: How long `head` (the api's check of a job's source, inside `POST /jobs`) may take in all, retries
#: included: an S3 that takes connections and never answers held a request 90 s (three reads of 30 s),
#: past the gateway's own timeout, with the job's Idempotency-Key and quota slot held meanwhile.
_HEAD_DEADLINE_S = 10.0
#: How long `head` trusts that the bucket exists, once it has asked (see `_bucket_exists`).
_BUCKET_SEEN_S = 60.0
_NO_BUCKET = b"<Code>NoSuchBucket</Code>"  # in the body of a 404 for the bucket, not the object


class _Retry(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _check(response: aiohttp.ClientResponse, verb: str, key: str) -> None:
    """Map an S3 answer that is not a success to our errors (`_Retry` for those worth retrying)."""
    status = response.status
    if status in (200, 204):
        return
    if status == 404 and verb in ("GET", "HEAD"):
        raise ObjectNotFound(key)
    if status >= 500 or status in (408, 429):
        raise _Retry(status)
    # 403 (a policy, credentials, a clock skewed past the signature) and other 4xx: trying again at
    # once will not help, so the transfer does not. But it is the deployment's fault, not the image's:
    # transient, so a job goes through its back-off to the dead-letter queue, to be replayed once the
    # deployment is fixed, and the api answers 503 storage_unavailable.
    raise StorageError("storage_error", f"S3 {verb} {key!r}: HTTP {status}", transient=True)


def _no_credentials(exc: BotoCoreError) -> StorageError:
    # A deployment without credentials (none configured, none found in the default chain): transient,
    # like a refused signature, so that the api answers 503 and a job waits in the dead-letter queue.
    return StorageError("storage_unavailable", f"S3: no credentials: {type(exc).__name__}", transient=True)


class Storage:
    """The bucket, as the services use it."""

    def __init__(self, settings: S3Settings, *, pool: int = 16) -> None:
        self.bucket = settings.s3_bucket
        self._settings = settings
        self._boto3 = _session(settings)
        credentials = self._boto3.get_credentials()
        # The presigners learn the bucket's URLs from clients of a session of their own, which then
        # go with all they loaded: a boto3 client holds S3's whole service model and endpoint rules
        # (about 11 MiB of Python objects; without them a worker's idle RSS is 5 MiB lower), and the
        # api, the status service and the worker make no call that needs one.
        probe = _probe_session()
        self._presigner = Presigner(
            _client(probe, settings, settings.s3_endpoint_url, 1), credentials, self.bucket
        )
        # Presigned URLs must name the endpoint clients can reach, which may differ from ours.
        public = settings.s3_public_endpoint_url
        self._public_presigner = (
            Presigner(_client(probe, settings, public, 1), credentials, self.bucket)
            if public
            else self._presigner
        )
        self._presigner.locate()
        self._public_presigner.locate()
        # The probe session and its clients hold one another in cycles: without a full collection,
        # rare in a long-lived process, what they loaded would stay (about 30 ms, once).
        del probe
        gc.collect()
        self._s3_client: Any = None
        self._s3_lock = threading.Lock()
        self._upload_ttl = settings.presign_ttl_s
        self._download_ttl = settings.download_url_ttl_s
        self._pool = pool
        self._http: aiohttp.ClientSession | None = None
        self._ping: asyncio.Future[Any] | None = None
        self._bucket_seen = -math.inf  # when `_bucket_exists` last found the bucket (monotonic)

    def _s3(self) -> Any:
        """The boto3 client, made on first use. Called in a worker thread: making one loads S3's
        model (tens of milliseconds), and a session is not safe to make clients from in two threads
        at once, hence the lock."""
        with self._s3_lock:
            if self._s3_client is None:
                self._s3_client = _client(
                    self._boto3, self._settings, self._settings.s3_endpoint_url, self._pool
                )
            return self._s3_client

    async def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(lambda: getattr(self._s3(), method)(Bucket=self.bucket, **kwargs))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound") and "Key" in kwargs:
                raise ObjectNotFound(kwargs["Key"]) from None
            raise StorageError(
                "storage_error", f"S3 {method}: {code or exc}", transient=_transient(exc)
            ) from exc
        except BotoCoreError as exc:
            raise StorageError("storage_unavailable", f"S3 {method}: {exc}", transient=True) from exc

    def presign_upload(self, key: str, content_type: str, max_bytes: int) -> PresignedUpload:
        """A POST form bound to this key, this content type and at most `max_bytes`."""
        ttl = self._public_presigner.lifetime(self._upload_ttl)  # what the form will say, and do
        try:
            url, fields = self._public_presigner.post(
                key,
                expires_s=ttl,
                fields={"Content-Type": content_type},
                conditions=[{"Content-Type": content_type}, ["content-length-range", 1, max_bytes]],
            )
        except BotoCoreError as exc:
            raise _no_credentials(exc) from exc
        return PresignedUpload(key, url, fields, time.time() + ttl)

    def presign_download(self, key: str) -> str:
        """A time-limited GET link for clients (a variant in `GET /jobs/{id}` and every SSE event)."""
        try:
            return self._public_presigner.url("GET", key, expires_s=self._download_ttl)
        except BotoCoreError as exc:
            raise _no_credentials(exc) from exc

    async def head(self, key: str) -> dict[str, Any]:
        """The object's `ContentLength`, `ContentType` and `LastModified` (named as boto3 names them).

        Over a presigned URL like `get`: `POST /jobs` makes one per job, and through boto3 it was
        the largest CPU cost of the api's request.
        """

        async def send(http: aiohttp.ClientSession) -> dict[str, Any]:
            async with http.head(self._transfer_url("HEAD", key), allow_redirects=False) as response:
                _check(response, "HEAD", key)
                try:
                    return {
                        "ContentLength": int(response.headers["Content-Length"]),
                        "ContentType": response.headers.get("Content-Type", ""),
                        "LastModified": parsedate_to_datetime(response.headers["Last-Modified"]),
                    }
                except (KeyError, ValueError, TypeError):
                    raise StorageError(
                        "storage_error", f"S3 HEAD {key!r}: no usable size or date", transient=False
                    ) from None

        async def look() -> dict[str, Any]:
            try:
                return await self._transfer("HEAD", key, send)
            except ObjectNotFound:
                # A HEAD's 404 has no body to tell a missing bucket from a missing key, and a wrong
                # or deleted bucket then refused every job as `source_not_found` (a 422, the client's
                # fault). The bucket is asked; its answer is trusted for a minute.
                await self._bucket_exists()
                raise

        try:
            async with asyncio.timeout(_HEAD_DEADLINE_S):
                return await look()
        except TimeoutError:
            raise StorageError(
                "storage_unavailable", f"S3 HEAD {key!r}: no answer in {_HEAD_DEADLINE_S:g}s", transient=True
            ) from None

    async def _bucket_exists(self) -> None:
        """Raise the transient `storage_error` of `_head_bucket` unless the bucket answered within
        the last `_BUCKET_SEEN_S` (so a client's missing keys cost S3 one more request a minute)."""
        if time.monotonic() - self._bucket_seen < _BUCKET_SEEN_S:
            return
        await self._head_bucket()
        self._bucket_seen = time.monotonic()

    async def _head_bucket(self) -> None:
        what = f"bucket {self.bucket}"

        async def send(http: aiohttp.ClientSession) -> None:
            async with http.head(self._transfer_url("HEAD", None), allow_redirects=False) as response:
                if response.status == 404:
                    raise StorageError("storage_error", f"S3: no {what}", transient=True)
                _check(response, "HEAD", what)

        await self._transfer("HEAD", what, send)

    def _session(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (an aiohttp session belongs to one loop).
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
                auto_decompress=False,  # the bytes exactly as stored
            )
        return self._http

    def _transfer_url(self, method: str, key: str | None, headers: dict[str, str] | None = None) -> yarl.URL:
        url = self._presigner.url(method, key, expires_s=_TRANSFER_URL_TTL_S, headers=headers)
        # Sent exactly as signed: yarl would otherwise decode what it thinks needs no escape, such as
        # the `(`, `:` or `=` of a key, and S3 checks the signature against the path it receives.
        return yarl.URL(url, encoded=True)

    async def _transfer(
        self, verb: str, key: str, send: Callable[[aiohttp.ClientSession], Awaitable[T]]
    ) -> T:
        """Run one object transfer, retrying what S3 asks to be retried (like boto3's standard mode).

        `send` raises `_Retry` for an answer worth another try; after the last try it is a
        transient `StorageError`, as is a connection failure or timeout.
        """
        for attempt in range(_TRANSFER_ATTEMPTS):
            if attempt:
                await asyncio.sleep(_TRANSFER_BACKOFF_S * 2**attempt * random.random())
            try:
                return await send(self._session())
            except _Retry as exc:
                failure = StorageError(
                    "storage_error", f"S3 {verb} {key!r}: HTTP {exc.status}", transient=True
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The exception's text may hold the request's URL, signature and session token
                # included, and this message ends up in the job record and the dead letter's reason.
                failure = StorageError(
                    "storage_unavailable", f"S3 {verb} {key!r}: {type(exc).__name__}", transient=True
                )
            except BotoCoreError as exc:  # no credentials to sign with: not a retry away
                raise _no_credentials(exc) from exc
        raise failure

    async def get(self, key: str, *, max_bytes: int, admit: Admit | None = None) -> bytearray:
        """The object's bytes; refuses one over `max_bytes` before reading its body, and, with
        `admit`, one it has no room for now (`BodyNotAdmitted`: see `imgpipe.bodies`).

        The bytes move over a presigned URL with aiohttp, on the event loop: boto3 would cost a
        thread hop and about twice the CPU per transfer, and the worker makes two per job. The URL
        is signed with the boto3 session's own credentials (`imgpipe.presign`), so keys, IRSA and
        instance roles work exactly as for every other call. One request: the size comes from the
        GET's own `Content-Length` (no HEAD first). A `bytearray`, the body held once
        (`imgpipe.bodies`).
        """

        async def send(http: aiohttp.ClientSession) -> bytearray:
            async with http.get(self._transfer_url("GET", key), allow_redirects=False) as response:
                if response.status == 404 and _NO_BUCKET in await response.content.read(4096):
                    # Not the object: the bucket (a wrong name, a deleted bucket). The deployment's
                    # fault, to be fixed and the jobs replayed, not `source_not_found` for good.
                    raise StorageError("storage_error", f"S3: no bucket {self.bucket}", transient=True)
                _check(response, "GET", key)
                try:
                    return await read_body(
                        response.content, length=response.content_length, max_bytes=max_bytes, admit=admit
                    )
                except BodyTooLarge as exc:
                    raise ObjectTooLarge(key, exc.size, max_bytes) from None
                except BodyNotAdmitted:
                    response.close()  # not back to the pool with the body unread
                    raise

        return await self._transfer("GET", key, send)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key` (over a presigned URL, as `get` does)."""
        headers = {"Content-Type": content_type, "Cache-Control": _VARIANT_CACHE_CONTROL}

        async def send(http: aiohttp.ClientSession) -> None:
            url = self._transfer_url("PUT", key, headers)  # signed: the PUT must send exactly these
            async with http.put(url, data=data, headers=headers, allow_redirects=False) as response:
                _check(response, "PUT", key)
                await response.read()

        await self._transfer("PUT", key, send)

    async def put_if_absent(self, key: str, data: bytes, content_type: str) -> bool:
        """Store `data` under `key` unless an object is there already: whether it was stored.

        A conditional PUT (`If-None-Match: *`), so of two callers racing for one key exactly one
        stores it: the other is told 412, or (AWS, both in flight at once) 409, and gets False. A store
        that does not implement the condition (501) gets a plain PUT.
        """
        try:
            await self._call("put_object", Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
        except StorageError as exc:
            cause = exc.__cause__
            code = cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if code != "NotImplemented":
                raise
            await self._call("put_object", Key=key, Body=data, ContentType=content_type)
        return True

    async def close(self) -> None:
        """Close the connections `head`, `get` and `put` opened, and stop renewing credentials."""
        self._presigner.close()
        self._public_presigner.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def iter_pages(
        self, prefix: str = "", *, page_size: int = BATCH
    ) -> AsyncIterator[list[ObjectInfo]]:
        """The bucket's objects under `prefix`, one listing page at a time.

        Only one page is held at once, so memory stays flat however many objects there are; each
        page is fetched in a thread.
        """

        def listing() -> Iterator[dict[str, Any]]:
            return iter(
                self._s3()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
            )

        pages = await asyncio.to_thread(listing)
        while True:
            try:
                page = await asyncio.to_thread(next, pages, None)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                raise StorageError(
                    "storage_error", f"S3 list_objects_v2: {code}", transient=_transient(exc)
                ) from exc
            except BotoCoreError as exc:
                raise StorageError(
                    "storage_unavailable", f"S3 list_objects_v2: {exc}", transient=True
                ) from exc
            if page is None:
                return
            yield [
                ObjectInfo(item["Key"], int(item.get("Size", 0)), item["LastModified"])
                for item in page.get("Contents", ())
            ]

    async def delete_many(self, keys: Sequence[str]) -> list[str]:
        """Delete `keys` in DeleteObjects batches of 1000; returns the keys S3 confirmed deleted.

        A key S3 refuses (per-key errors in the answer) is left out of the result rather than
        failing the batch, so the caller counts only what is really gone.
        """
        deleted: list[str] = []
        # A key with a character XML 1.0 cannot carry (a control character: S3 takes any UTF-8)
        # made the whole batch's request malformed, so no key of the page was ever deleted. Such
        # keys go one by one, the key in the URL.
        odd: list[str] = []
        plain: list[str] = []
        for key in keys:
            (odd if _NOT_XML.search(key) else plain).append(key)
        for key in odd:
            try:
                await self._call("delete_object", Key=key)
            except StorageError as exc:
                if exc.transient:
                    raise
                log.warning("S3 refused to delete a key: %s", exc.message)
            else:
                deleted.append(key)
        for start in range(0, len(plain), BATCH):
            batch = plain[start : start + BATCH]
            answer = await self._call(
                "delete_objects", Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            # Quiet mode lists only the failures; everything else in the batch was deleted.
            failed = {err["Key"] for err in answer.get("Errors", ())}
            deleted.extend(k for k in batch if k not in failed)
        return deleted

    async def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (local development and tests)."""
        try:
            await self._call("head_bucket")
        except StorageError:
            await self._call("create_bucket")

    async def ping(self) -> None:
        """Whether the bucket answers (`HeadBucket`, over a presigned URL like `head`), for readiness.

        One at a time: a probe's timeout ends its wait, not the request, which goes on for up to its
        timeouts and retries; while S3 hangs, every probe would add one more. A probe joins the call
        in flight instead.
        """
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._head_bucket())
            # Its outcome is taken here too: a call every probe gave up on must not log as unretrieved.
            self._ping.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.shield(self._ping)
