"""`Presigner` against botocore: the same URL as `generate_presigned_url` and the same upload form as
`generate_presigned_post`, for every layout we run on.

botocore's signer is the one S3 is known to accept, and moto checks neither signatures nor POST
policies, so each case signs the same request both ways in the same second and compares the results.
"""

from __future__ import annotations

import base64
import gc
import json
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.client import Config
from botocore.credentials import DeferredRefreshableCredentials, RefreshableCredentials
from botocore.exceptions import NoCredentialsError
from imgpipe import presign
from imgpipe.presign import Presigner

_OPERATIONS = {"GET": "get_object", "HEAD": "head_object", "PUT": "put_object"}
_PARAMS = {"content-type": "ContentType", "cache-control": "CacheControl"}  # header -> boto3 name


def _session(token: str | None = None) -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        aws_session_token=token,
    )


def _client(session: boto3.session.Session, **kwargs: Any) -> Any:
    config = Config(
        signature_version="s3v4",
        region_name=kwargs.pop("region", "us-east-1"),
        s3={"addressing_style": kwargs.pop("style", "auto")},
    )
    return session.client("s3", config=config, **kwargs)


def _both(
    client: Any,
    session: boto3.session.Session,
    bucket: str,
    method: str,
    key: str | None,
    headers: dict[str, str],
    presigner: Presigner | None = None,
) -> tuple[str, str]:
    """Ours (`presigner`'s, by default one made from `client`) and botocore's URL for the same
    request (`key` None: `HeadBucket`), made within one second (the signed date)."""
    presigner = presigner or Presigner(client, session.get_credentials(), bucket)
    operation = _OPERATIONS[method] if key is not None else "head_bucket"
    params = {"Bucket": bucket, **{_PARAMS[k.lower()]: v for k, v in headers.items()}}
    if key is not None:
        params["Key"] = key
    for _ in range(3):
        ours = presigner.url(method, key, expires_s=300, headers=headers)
        theirs = client.generate_presigned_url(operation, Params=params, ExpiresIn=300)
        if parse_qs(urlsplit(ours).query)["X-Amz-Date"] == parse_qs(urlsplit(theirs).query)["X-Amz-Date"]:
            return ours, theirs
        time.sleep(0.05)
    raise AssertionError("could not make both URLs within one second")


def _assert_same(ours: str, theirs: str) -> None:
    a, b = urlsplit(ours), urlsplit(theirs)
    # botocore signs the host in lower case and leaves it as written in the URL; ours is lower case
    # in both, so that a client which sends the name as it is written sends what was signed.
    assert (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc.lower(), b.path)
    assert parse_qs(a.query, strict_parsing=True) == parse_qs(b.query, strict_parsing=True)
    assert "X-Amz-Signature" in parse_qs(a.query)


_PUT_HEADERS = {"Content-Type": "image/webp", "Cache-Control": "public, max-age=31536000"}


#: (endpoint, addressing style, region): the layouts we run on.
_LAYOUTS = [
    ("http://127.0.0.1:9000", "path", "us-east-1"),  # moto, MinIO in compose
    ("http://minio:9000", "path", "eu-west-1"),
    ("https://s3.example.com:443", "path", "us-east-1"),  # a default port is not signed
    ("https://storage.example.com:8443", "path", "ap-south-1"),
    ("http://[::1]:9000", "path", "us-east-1"),  # an IPv6 address: signed in its brackets
    ("http://[fd00::5]", "path", "us-east-1"),
    ("http://MinIO.Internal:9000", "path", "us-east-1"),  # signed, and written, in lower case
    (None, "auto", "us-east-1"),  # AWS: virtual-hosted style
    (None, "auto", "eu-central-1"),
    (None, "path", "eu-west-2"),
]


@pytest.mark.parametrize(("endpoint", "style", "region"), _LAYOUTS)
@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {}),
        ("HEAD", {}),
        ("PUT", _PUT_HEADERS),
        ("PUT", {}),
        ("PUT", {"Cache-Control": "  public,   max-age=60 "}),  # signed with its spaces folded
    ],
)
def test_same_url_as_botocore(
    endpoint: str | None, style: str, region: str, method: str, headers: dict[str, str]
) -> None:
    session = _session()
    client = _client(session, endpoint_url=endpoint, style=style, region=region)
    _assert_same(*_both(client, session, "imgpipe-media", method, "uploads/0a1b/9f8e7d", headers))


@pytest.mark.parametrize(
    "key",
    [
        "variants/o/j/thumb.jpg",
        "uploads/with space/and+plus=equals&amp",
        "uploads/ünïcödé/文字/émoji-🙂",
        "uploads/tilde~star*quote'paren()",
        "uploads//double//slash/./dot/../up",
        "uploads/percent%20already%2Fencoded?query#hash",
        "trailing/",
    ],
)
@pytest.mark.parametrize("style", ["path", "auto"])
def test_keys_are_quoted_as_botocore_quotes_them(key: str, style: str) -> None:
    session = _session()
    endpoint = "http://127.0.0.1:9000" if style == "path" else None
    client = _client(session, endpoint_url=endpoint, style=style)
    for method in ("GET", "PUT"):
        _assert_same(*_both(client, session, "imgpipe-media", method, key, {}))


def test_temporary_credentials_sign_their_token() -> None:
    # IRSA and instance roles give a session token; S3 refuses a URL without it, signed.
    session = _session(token="IQoJb3JpZ2luX2VjEPr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+/=")
    client = _client(session, endpoint_url="http://127.0.0.1:9000", style="path")
    ours, theirs = _both(client, session, "imgpipe-media", "PUT", "variants/a/b/c.png", _PUT_HEADERS)
    _assert_same(ours, theirs)
    assert parse_qs(urlsplit(ours).query)["X-Amz-Security-Token"] == [
        "IQoJb3JpZ2luX2VjEPr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+/="
    ]


def _metadata(access_key: str, minutes: int) -> dict[str, str]:
    expiry = datetime.now(UTC) + timedelta(minutes=minutes)
    return {
        "access_key": access_key,
        "secret_key": f"secret-of-{access_key}",
        "token": f"token-of-{access_key}",
        "expiry_time": expiry.isoformat(),
    }


def _access_key(url: str) -> str:
    return parse_qs(urlsplit(url).query)["X-Amz-Credential"][0].split("/")[0]


def _renewers(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name == "imgpipe-credentials"]


def _wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("not within 10 s")


def test_temporary_credentials_are_renewed_off_the_callers_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore renews temporary credentials (IRSA, an instance role) with a call to STS from inside
    # whatever reads them when they are due, for up to its 60 s timeouts. The caller here is the event
    # loop making a URL: it must go on signing with the copy it has while a thread renews them. The
    # thread renews on its own schedule, with no URL asked for: after an idle hour, the first URL
    # would otherwise be signed with a copy that has expired.
    monkeypatch.setattr(presign, "CREDENTIALS_RECHECK_S", 0.05)
    release = threading.Event()
    fetched_by: list[str] = []

    def fetch() -> dict[str, str]:
        fetched_by.append(threading.current_thread().name)
        if len(fetched_by) == 1:
            return _metadata("AKIDFIRST", minutes=12)  # due for renewal (under 15 minutes left)
        release.wait(10)
        return _metadata("AKIDRENEWED", minutes=60)

    credentials = RefreshableCredentials.create_from_metadata(_metadata("AKIDSTART", 12), fetch, "test")
    client = _client(_session(), endpoint_url="http://127.0.0.1:9000", style="path")
    before = set(threading.enumerate())
    presigner = Presigner(client, credentials, "b")  # reads them (and renews them: due) at start-up
    assert fetched_by == [threading.current_thread().name]
    _wait_for(lambda: len(fetched_by) == 2)  # the renewal has begun, unasked, and waits for STS
    assert fetched_by[1:] == ["imgpipe-credentials"]
    for _ in range(3):  # meanwhile URLs are made at once, with the copy
        assert _access_key(presigner.url("GET", "k", expires_s=60)) == "AKIDFIRST"
    release.set()
    _wait_for(lambda p=presigner: _access_key(p.url("GET", "k", expires_s=60)) == "AKIDRENEWED")
    url = presigner.url("GET", "k", expires_s=60)
    assert parse_qs(urlsplit(url).query)["X-Amz-Security-Token"] == ["token-of-AKIDRENEWED"]
    time.sleep(0.3)
    assert len(fetched_by) == 2  # one renewal at a time, and only when due
    # One nobody closes does not keep its thread.
    [renewer] = _renewers(before)
    del presigner
    gc.collect()
    renewer.join(5)
    assert not renewer.is_alive()


def test_links_work_no_longer_than_the_temporary_credentials_they_are_signed_with() -> None:
    """S3 refuses a link once its session token has expired, and botocore renews temporary
    credentials only 15 minutes before they expire: a 1-hour link signed with a copy that has
    20 minutes left said 3600 s and worked 20 minutes (an upload form failed before its `expires_at`)."""
    credentials = RefreshableCredentials.create_from_metadata(
        _metadata("AKIDSHORT", 20), lambda: _metadata("AKIDSHORT", 20), "test"
    )
    client = _client(_session(), endpoint_url="http://127.0.0.1:9000", style="path")
    presigner = Presigner(client, credentials, "b")
    try:
        said = int(parse_qs(urlsplit(presigner.url("GET", "k", expires_s=3600)).query)["X-Amz-Expires"][0])
        assert 20 * 60 - 5 <= said <= 20 * 60
        assert presigner.url("GET", "k", expires_s=60).count("X-Amz-Expires=60&") == 1  # shorter: as asked
        _, form = presigner.post("k", expires_s=3600)
        expiration = json.loads(base64.b64decode(form["policy"]))["expiration"]
        left = datetime.strptime(expiration, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) - datetime.now(UTC)
        assert timedelta(minutes=19) < left <= timedelta(minutes=20)
    finally:
        presigner.close()
    # Keys that do not expire sign for as long as asked.
    plain = Presigner(client, _session().get_credentials(), "b")
    assert plain.lifetime(7 * 24 * 3600) == 7 * 24 * 3600


def test_a_renewal_between_the_copy_and_its_expiry_is_read_again() -> None:
    """Another client of the same credentials (the reconciler's boto3 client) may renew them between
    the presigner's read of the copy and of its expiry: the old copy's links then said they worked
    for the new copy's hour. The copy is read again after the expiry."""

    class RenewedMeanwhile(RefreshableCredentials):
        renewed = False

        def get_frozen_credentials(self) -> Any:
            frozen = super().get_frozen_credentials()
            if not self.renewed:  # another thread renews them right after this read
                self.renewed = True
                self._set_from_data(_metadata("AKIDNEW", 60))
                self._publish_refresh()
            return frozen

    credentials = RenewedMeanwhile.create_from_metadata(
        _metadata("AKIDOLD", 20), lambda: _metadata("AKIDNEW", 60), "test"
    )
    client = _client(_session(), endpoint_url="http://127.0.0.1:9000", style="path")
    presigner = Presigner(client, credentials, "b")
    try:
        url = presigner.url("GET", "k", expires_s=3600)
        said = int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])
        assert (_access_key(url), said > 59 * 60) == ("AKIDNEW", True)  # the new copy and its hour
    finally:
        presigner.close()


def test_a_renewal_by_the_presigners_own_read_signs_for_the_new_expiry() -> None:
    # Credentials within botocore's 15 minutes are renewed by the read itself: the new copy, and
    # its hour, not the old copy's five minutes (nor 1 s, when they had run out during an outage).
    for minutes_left in (5, -1):
        credentials = RefreshableCredentials.create_from_metadata(
            _metadata("AKIDOLD", minutes_left), lambda: _metadata("AKIDNEW", 60), "test"
        )
        client = _client(_session(), endpoint_url="http://127.0.0.1:9000", style="path")
        presigner = Presigner(client, credentials, "b")
        try:
            url = presigner.url("GET", "k", expires_s=3600)
            said = int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])
            assert (_access_key(url), said > 59 * 60) == ("AKIDNEW", True), minutes_left
        finally:
            presigner.close()


def test_credentials_that_fail_at_start_up_are_fetched_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # IRSA's credentials are fetched on first use: an STS error then must not kill the process (it would
    # restart in a loop while STS is down). URLs are refused as "no credentials" (a 503) until a
    # thread's next try gets them.
    monkeypatch.setattr(presign, "CREDENTIALS_RETRY_S", 0.05)
    monkeypatch.setattr(presign, "CREDENTIALS_RECHECK_S", 0.05)
    answers = iter([None, _metadata("AKIDLATE", minutes=60)])

    def fetch() -> dict[str, str]:
        answer = next(answers)
        if answer is None:
            raise ConnectionError("STS is down")
        return answer

    credentials = DeferredRefreshableCredentials(fetch, "assume-role-with-web-identity")
    client = _client(_session(), endpoint_url="http://127.0.0.1:9000", style="path")
    before = set(threading.enumerate())
    presigner = Presigner(client, credentials, "b")
    with pytest.raises(NoCredentialsError):
        presigner.url("GET", "k", expires_s=60)
    _wait_for(lambda: presigner._frozen is not None)
    assert _access_key(presigner.url("GET", "k", expires_s=60)) == "AKIDLATE"
    [renewer] = _renewers(before)
    presigner.close()
    renewer.join(5)
    assert not renewer.is_alive()


def test_signed_headers_change_the_signature() -> None:
    session = _session()
    client = _client(session, endpoint_url="http://127.0.0.1:9000", style="path")
    presigner = Presigner(client, session.get_credentials(), "b")
    for _ in range(3):
        urls = [
            presigner.url("PUT", "k", expires_s=60, headers={"Content-Type": t})
            for t in ("image/png", "image/jpeg")
        ]
        queries = [parse_qs(urlsplit(u).query) for u in urls]
        if queries[0]["X-Amz-Date"] == queries[1]["X-Amz-Date"]:
            break
    assert queries[0]["X-Amz-SignedHeaders"] == ["content-type;host"]
    assert queries[0]["X-Amz-Signature"] != queries[1]["X-Amz-Signature"]


def test_no_credentials_is_an_error() -> None:
    client = _client(_session(), endpoint_url="http://127.0.0.1:9000", style="path")
    with pytest.raises(NoCredentialsError):
        Presigner(client, None, "b").url("GET", "k", expires_s=60)


# Browser-form uploads (POST policy).

_UPLOAD_FIELDS = {"Content-Type": "image/jpeg"}
_UPLOAD_CONDITIONS = [{"Content-Type": "image/jpeg"}, ["content-length-range", 1, 26_214_400]]


def _policy(form: dict[str, str]) -> dict[str, Any]:
    return json.loads(base64.b64decode(form["policy"]))


def _both_posts(
    client: Any, session: boto3.session.Session, bucket: str, key: str, presigner: Presigner | None = None
) -> tuple[tuple[str, dict[str, str]], tuple[str, dict[str, str]]]:
    """Ours (`presigner`'s, by default one made from `client`) and botocore's form for the same
    upload, signed within one second."""
    presigner = presigner or Presigner(client, session.get_credentials(), bucket)
    for _ in range(3):
        ours = presigner.post(key, expires_s=600, fields=_UPLOAD_FIELDS, conditions=_UPLOAD_CONDITIONS)
        post = client.generate_presigned_post(
            bucket, key, Fields=dict(_UPLOAD_FIELDS), Conditions=list(_UPLOAD_CONDITIONS), ExpiresIn=600
        )
        theirs = (post["url"], post["fields"])
        same_second = ours[1]["x-amz-date"] == theirs[1]["x-amz-date"]
        if same_second and _policy(ours[1])["expiration"] == _policy(theirs[1])["expiration"]:
            return ours, theirs
        time.sleep(0.05)
    raise AssertionError("could not sign both forms within one second")


@pytest.mark.parametrize(("endpoint", "style", "region"), _LAYOUTS)
def test_same_upload_form_as_botocore(endpoint: str | None, style: str, region: str) -> None:
    session = _session()
    client = _client(session, endpoint_url=endpoint, style=style, region=region)
    ours, theirs = _both_posts(client, session, "imgpipe-media", "uploads/0a1b/9f8e7d")
    assert ours == theirs
    assert list(ours[1]) == list(theirs[1])  # the fields in the same order too
    assert ["content-length-range", 1, 26_214_400] in _policy(ours[1])["conditions"]


@pytest.mark.parametrize(
    "key", ["uploads/with space/and+plus=equals&amp", "uploads/ünïcödé/文字/émoji-🙂", "trailing/"]
)
@pytest.mark.parametrize("style", ["path", "auto"])
def test_upload_forms_name_any_key_as_botocore_does(key: str, style: str) -> None:
    session = _session()
    endpoint = "http://127.0.0.1:9000" if style == "path" else None
    client = _client(session, endpoint_url=endpoint, style=style)
    ours, theirs = _both_posts(client, session, "imgpipe-media", key)
    assert ours == theirs


def test_upload_forms_of_temporary_credentials_carry_their_token() -> None:
    token = "IQoJb3JpZ2luX2VjEPr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+/="
    session = _session(token=token)
    client = _client(session, endpoint_url="http://127.0.0.1:9000", style="path")
    ours, theirs = _both_posts(client, session, "imgpipe-media", "uploads/a/b")
    assert ours == theirs
    assert ours[1]["x-amz-security-token"] == token
    assert {"x-amz-security-token": token} in _policy(ours[1])["conditions"]


@pytest.mark.parametrize(("endpoint", "style", "region"), _LAYOUTS)
def test_the_bucket_itself_as_botocore_presigns_head_bucket(
    endpoint: str | None, style: str, region: str
) -> None:
    # The readiness probe: "/{bucket}" path-style (no slash after it), "/" virtual-hosted.
    session = _session()
    client = _client(session, endpoint_url=endpoint, style=style, region=region)
    ours, theirs = _both(client, session, "imgpipe-media", "HEAD", None, {})
    _assert_same(ours, theirs)


@pytest.mark.parametrize(("endpoint", "style", "region"), _LAYOUTS)
def test_the_bucket_is_learnt_from_a_probe_client_that_is_then_let_go(
    endpoint: str | None, style: str, region: str
) -> None:
    # `Storage` locates the bucket with a client of made-up credentials, so that the client, and
    # S3's model it holds, can go: the URLs and forms signed afterwards must still be botocore's own.
    session = _session(token="IQoJb3JpZ2luX2VjEPr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+/=")
    client = _client(session, endpoint_url=endpoint, style=style, region=region)
    probe_session = boto3.session.Session(aws_access_key_id="probe", aws_secret_access_key="probe")
    probe = _client(probe_session, endpoint_url=endpoint, style=style, region=region)
    gone = weakref.ref(probe)
    presigner = Presigner(probe, session.get_credentials(), "imgpipe-media")
    presigner.locate()
    del probe, probe_session
    gc.collect()
    assert gone() is None
    key = "uploads/with space/ünï+=&"
    _assert_same(*_both(client, session, "imgpipe-media", "GET", key, {}, presigner))
    headers = {"Content-Type": "image/webp", "Cache-Control": "public, max-age=31536000"}
    _assert_same(*_both(client, session, "imgpipe-media", "PUT", key, headers, presigner))
    ours, theirs = _both_posts(client, session, "imgpipe-media", key, presigner)
    assert ours == theirs


def test_an_upload_form_without_credentials_is_an_error() -> None:
    client = _client(_session(), endpoint_url="http://127.0.0.1:9000", style="path")
    with pytest.raises(NoCredentialsError):
        Presigner(client, None, "b").post("k", expires_s=60)
