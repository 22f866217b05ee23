"""`POST /uploads`: presigned POST grants, checked against the moto S3 server they point at.

moto (5.x) does not evaluate POST policies: it stores whatever the form carries, whatever its
size or Content-Type, and does not check the signature either. So what S3 would enforce is
asserted on the signed policy document itself (`test_policy_document_binds_the_grant`), and
`test_s3_enforces_the_policy` skips while the endpoint is one that does not enforce it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import redis.asyncio as aioredis
from imgpipe.store import owner_id
from imgpipe_api.app import create_app
from imgpipe_api.openapi import document as api_document

from tests.isolated import fresh_namespace, image
from tests.stack import BUCKET, Client, Stack, drop_namespace, local_http, presigned_form, s3_client, token

pytestmark = pytest.mark.e2e

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # the default IMGPIPE_MAX_UPLOAD_BYTES; the session does not set it


def _s3(endpoint: str):
    return s3_client(endpoint)


async def _grant(client: Client, content_type: str, size: int) -> dict:
    async with client.http.post(
        f"{client.stack.api}/uploads",
        json={"content_type": content_type, "size": size},
        headers=client.headers,
    ) as response:
        assert response.status == 201, await response.text()
        return await response.json()


async def _post_form(
    http: aiohttp.ClientSession, grant: dict, data: bytes, content_type: str, **overrides: str
) -> aiohttp.ClientResponse:
    form = presigned_form({**grant["fields"], **overrides}, data, content_type)
    async with http.post(grant["url"], data=form) as response:
        await response.read()
        return response


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "image/webp", "image/avif"])
async def test_grant_shape(alice: Client, content_type: str) -> None:
    before = datetime.now(UTC)
    grant = await _grant(alice, content_type, 1234)
    assert set(grant) == {"key", "method", "url", "fields", "expires_at"}
    assert grant["method"] == "POST"
    assert grant["key"].startswith(f"uploads/{owner_id('alice')}/")
    assert grant["fields"]["key"] == grant["key"]
    assert grant["fields"]["Content-Type"] == content_type
    assert grant["url"].endswith(f"/{BUCKET}")
    expires = datetime.fromisoformat(grant["expires_at"])
    assert expires.tzinfo is not None
    assert before + timedelta(seconds=60) < expires <= datetime.now(UTC) + timedelta(days=7)


async def test_every_grant_has_its_own_key(alice: Client, bob: Client) -> None:
    keys = {(await _grant(c, "image/png", 10))["key"] for c in (alice, alice, bob)}
    assert len(keys) == 3
    assert sum(k.startswith(f"uploads/{owner_id('bob')}/") for k in keys) == 1


async def test_presigned_form_uploads_to_s3(alice: Client, s3_endpoint: str) -> None:
    data = image(fmt=".png")
    grant = await _grant(alice, "image/png", len(data))
    response = await _post_form(alice.http, grant, data, "image/png")
    assert response.status in (200, 201, 204)
    s3 = _s3(s3_endpoint)
    head = s3.head_object(Bucket=BUCKET, Key=grant["key"])
    assert head["ContentLength"] == len(data)
    assert s3.get_object(Bucket=BUCKET, Key=grant["key"])["Body"].read() == data


async def test_uploaded_key_is_a_job_source(alice: Client) -> None:
    key = await alice.upload(image())
    job = await alice.submit({"key": key})
    assert (await alice.wait(job["id"]))["status"] == "succeeded"


def _signing_key(secret: str, date: str, region: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (date, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


async def test_policy_document_binds_the_grant(alice: Client) -> None:
    grant = await _grant(alice, "image/webp", 4321)
    fields = grant["fields"]
    policy = json.loads(base64.b64decode(fields["policy"]))
    conditions = policy["conditions"]
    assert {"bucket": BUCKET} in conditions
    assert {"key": grant["key"]} in conditions
    assert {"Content-Type": "image/webp"} in conditions
    assert ["content-length-range", 1, 4321] in conditions
    # Nothing that would loosen it: no prefix match on the key or the type.
    assert not [c for c in conditions if isinstance(c, list) and c[0] == "starts-with"]
    expiration = datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00"))
    assert abs((expiration - datetime.fromisoformat(grant["expires_at"])).total_seconds()) < 5
    # The signature is over exactly this policy, with the service's credentials (SigV4).
    access_key, date, region, service, _ = fields["x-amz-credential"].split("/")
    assert (access_key, region, service) == ("testing", "us-east-1", "s3")
    assert fields["x-amz-algorithm"] == "AWS4-HMAC-SHA256"
    expected = hmac.new(
        _signing_key("testing", date, region), fields["policy"].encode(), hashlib.sha256
    ).hexdigest()
    assert fields["x-amz-signature"] == expected


@pytest.mark.parametrize("violation", ["larger-than-declared", "other-content-type"])
async def test_s3_enforces_the_policy(alice: Client, s3_endpoint: str, violation: str) -> None:
    data = image()
    declared = len(data) - 10 if violation == "larger-than-declared" else len(data)
    grant = await _grant(alice, "image/jpeg", declared)
    overrides = {"Content-Type": "text/html"} if violation == "other-content-type" else {}
    response = await _post_form(
        alice.http, grant, data, overrides.get("Content-Type", "image/jpeg"), **overrides
    )
    if response.status < 300:
        # Seen: moto accepts the form regardless; the policy document test covers the grant.
        _s3(s3_endpoint).delete_object(Bucket=BUCKET, Key=grant["key"])
        pytest.skip(f"{s3_endpoint} does not enforce POST policy conditions ({violation} was stored)")
    assert response.status in (400, 403)


async def test_declared_size_at_the_limit_is_granted(alice: Client) -> None:
    grant = await _grant(alice, "image/jpeg", MAX_UPLOAD_BYTES)
    policy = json.loads(base64.b64decode(grant["fields"]["policy"]))
    assert ["content-length-range", 1, MAX_UPLOAD_BYTES] in policy["conditions"]


async def _post(
    stack: Stack, client: Client, *, json_body: object = None, data: bytes | None = None, **headers: str
) -> tuple[int, dict]:
    kwargs: dict = {"headers": {**client.headers, **headers}}
    if data is not None:
        kwargs["data"] = data
    else:
        kwargs["json"] = json_body
    async with client.http.post(f"{stack.api}/uploads", **kwargs) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


@pytest.mark.parametrize(
    "content_type",
    ["image/svg+xml", "text/html", "application/pdf", "image/jpeg; charset=x", "image/*", ""],
)
async def test_unsupported_content_type(stack: Stack, alice: Client, content_type: str) -> None:
    status, body = await _post(stack, alice, json_body={"content_type": content_type, "size": 10})
    assert (status, body["error"]["code"]) == (415, "unsupported_content_type")


async def test_upload_too_large(stack: Stack, alice: Client) -> None:
    status, body = await _post(
        stack, alice, json_body={"content_type": "image/jpeg", "size": MAX_UPLOAD_BYTES + 1}
    )
    assert (status, body["error"]["code"]) == (413, "upload_too_large")
    assert str(MAX_UPLOAD_BYTES) in body["error"]["message"]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({}, id="empty"),
        pytest.param({"content_type": "image/jpeg"}, id="no-size"),
        pytest.param({"size": 10}, id="no-content-type"),
        pytest.param({"content_type": "image/jpeg", "size": 0}, id="size-zero"),
        pytest.param({"content_type": "image/jpeg", "size": -5}, id="size-negative"),
        pytest.param({"content_type": "image/jpeg", "size": 1.5}, id="size-fraction"),
        pytest.param({"content_type": "image/jpeg", "size": "ten"}, id="size-text"),
        pytest.param({"content_type": "image/jpeg", "size": True}, id="size-boolean"),
        pytest.param({"content_type": "image/jpeg", "size": "10"}, id="size-numeric-string"),
        pytest.param({"content_type": "image/jpeg", "size": None}, id="size-null"),
        pytest.param({"content_type": 5, "size": 10}, id="content-type-number"),
        pytest.param({"content_type": "image/" + "x" * 200, "size": 10}, id="content-type-long"),
        pytest.param({"content_type": "image/jpeg", "size": 10, "acl": "public-read"}, id="extra-field"),
        pytest.param([], id="array"),
        pytest.param("image/jpeg", id="string"),
    ],
)
async def test_invalid_body(stack: Stack, alice: Client, payload: object) -> None:
    status, body = await _post(stack, alice, json_body=payload)
    assert (status, body["error"]["code"]) == (422, "invalid_request"), body
    assert body["error"]["message"]


async def test_malformed_json(stack: Stack, alice: Client) -> None:
    status, body = await _post(
        stack, alice, data=b'{"content_type": ', **{"Content-Type": "application/json"}
    )
    assert (status, body["error"]["code"]) == (422, "invalid_request")


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"content_type=image/jpeg&size=10", "application/x-www-form-urlencoded"),
        (b'{"content_type": "image/jpeg", "size": 10}', "text/plain"),
        (b'{"content_type": "image/jpeg", "size": 10}', "application/octet-stream"),
    ],
)
async def test_non_json_body(stack: Stack, alice: Client, data: bytes, content_type: str) -> None:
    status, body = await _post(stack, alice, data=data, **{"Content-Type": content_type})
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")


async def test_oversized_request_body(stack: Stack, alice: Client) -> None:
    padding = "x" * (128 * 1024)
    status, body = await _post(
        stack, alice, json_body={"content_type": "image/jpeg", "size": 10, "pad": padding}
    )
    assert (status, body["error"]["code"]) == (413, "request_too_large")


async def test_content_type_is_case_insensitive(alice: Client) -> None:
    async with alice.http.post(
        f"{alice.stack.api}/uploads", json={"content_type": "IMAGE/JPEG", "size": 10}, headers=alice.headers
    ) as response:
        assert response.status == 201, await response.text()
        assert (await response.json())["fields"]["Content-Type"] == "image/jpeg"


# What `POST /jobs` checks against the grant. S3 enforces the policy on the upload itself; moto does
# not, so these go through the api's own check of the stored object (HEAD) against the recorded grant.


async def _submit(client: Client, key: str) -> tuple[int, dict]:
    async with client.http.post(
        f"{client.stack.api}/jobs", json={"source": {"key": key}}, headers=client.headers
    ) as response:
        return response.status, await response.json()


async def test_the_grant_is_recorded(alice: Client, redis_client: aioredis.Redis, namespace: str) -> None:
    grant = await _grant(alice, "image/webp", 777)
    stored = await redis_client.hgetall(f"{namespace}:grant:{grant['key']}")
    assert (stored[b"content_type"], stored[b"size"]) == (b"image/webp", b"777")
    expires = datetime.fromisoformat(grant["expires_at"]).timestamp()
    assert float(stored[b"expires_at"]) == pytest.approx(expires, abs=1)
    # Kept past the grant's expiry (a job may be submitted later), but not for ever.
    assert (
        0
        < await redis_client.ttl(f"{namespace}:grant:{grant['key']}") - (expires - time.time())
        <= 8 * 24 * 3600
    )


@pytest.mark.parametrize(("expired_s_ago", "accepted"), [(3600, False), (60, False), (2, True)])
async def test_upload_written_after_its_grant_expired(
    alice: Client, redis_client: aioredis.Redis, namespace: str, expired_s_ago: int, accepted: bool
) -> None:
    data = image()
    grant = await _grant(alice, "image/jpeg", len(data))
    # The TTL is at least 60 s (IMGPIPE_PRESIGN_TTL_S), and moto accepts an expired form anyway; so
    # the grant is made to have expired before the upload by moving its recorded expiry back, which
    # is exactly what the api compares the object's LastModified with.
    await redis_client.hset(
        f"{namespace}:grant:{grant['key']}", "expires_at", repr(time.time() - expired_s_ago)
    )
    response = await _post_form(alice.http, grant, data, "image/jpeg")
    assert response.status in (200, 201, 204)
    status, body = await _submit(alice, grant["key"])
    if accepted:  # a few seconds are clock skew between S3 and the api, not an expired grant
        assert status == 202, body
    else:
        assert (status, body["error"]["code"]) == (422, "upload_expired"), body


async def test_other_content_type_than_granted_is_refused(alice: Client, s3_endpoint: str) -> None:
    data = image(fmt=".png")
    grant = await _grant(alice, "image/jpeg", len(data))
    response = await _post_form(alice.http, grant, data, "image/png", **{"Content-Type": "image/png"})
    if response.status >= 300:
        pytest.skip(f"{s3_endpoint} enforces the policy: the upload itself was refused")
    assert _s3(s3_endpoint).head_object(Bucket=BUCKET, Key=grant["key"])["ContentType"] == "image/png"
    status, body = await _submit(alice, grant["key"])
    assert (status, body["error"]["code"]) == (422, "source_type_mismatch"), body
    assert "image/jpeg" in body["error"]["message"]


async def test_larger_than_declared_is_refused(alice: Client, s3_endpoint: str) -> None:
    data = image()
    grant = await _grant(alice, "image/jpeg", len(data) - 1)
    response = await _post_form(alice.http, grant, data, "image/jpeg")
    if response.status >= 300:
        pytest.skip(f"{s3_endpoint} enforces the policy: the upload itself was refused")
    status, body = await _submit(alice, grant["key"])
    assert (status, body["error"]["code"]) == (413, "source_too_large"), body
    assert str(len(data) - 1) in body["error"]["message"]


async def test_exactly_the_declared_size_and_type_is_accepted(alice: Client) -> None:
    data = image()
    grant = await _grant(alice, "image/jpeg", len(data))
    assert (await _post_form(alice.http, grant, data, "image/jpeg")).status in (200, 201, 204)
    status, body = await _submit(alice, grant["key"])
    assert status == 202, body


async def test_an_object_without_a_grant_is_checked_only_for_owner_and_size(
    alice: Client, s3_endpoint: str
) -> None:
    # Put there with S3 credentials (an operator, a backfill, the benchmarks): there is no grant to
    # compare with, so the prefix and IMGPIPE_MAX_UPLOAD_BYTES are what vouch for it.
    key = f"uploads/{owner_id('alice')}/placed-by-an-operator"
    _s3(s3_endpoint).put_object(Bucket=BUCKET, Key=key, Body=image(), ContentType="application/octet-stream")
    status, body = await _submit(alice, key)
    assert status == 202, body
    assert (await alice.wait(body["id"]))["status"] == "succeeded"


async def test_without_credentials_an_upload_is_503_and_spends_none_of_the_budget(
    env: dict[str, str],
    no_aws_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    """With nothing to sign with (STS not answering yet), `POST /uploads` is the documented 503; the
    client's retries meanwhile must not use up its uploads for the hour."""
    namespace = fresh_namespace()
    monkeypatch.setenv("IMGPIPE_NAMESPACE", namespace)
    monkeypatch.setenv("IMGPIPE_RATE_UPLOADS_PER_HOUR", "1")
    documented = api_document()["paths"]["/uploads"]["post"]["responses"]["503"]["x-error-codes"]
    request = {
        "json": {"content_type": "image/png", "size": 10},
        "headers": {"Authorization": f"Bearer {token('alice')}"},
    }
    try:
        async with local_http(await create_app()) as base:
            for _ in range(3):
                async with http.post(f"{base}/uploads", **request) as response:
                    assert response.status == 503
                    code = (await response.json())["error"]["code"]
                    assert code == "storage_unavailable" and code in documented
        # Credentials again (a replica whose STS answers): the hour's one upload is still there.
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, env[name])
        async with local_http(await create_app()) as base:
            statuses = []
            for _ in range(2):
                async with http.post(f"{base}/uploads", **request) as response:
                    statuses.append(response.status)
            assert statuses == [201, 429]
    finally:
        await asyncio.to_thread(drop_namespace, namespace)
