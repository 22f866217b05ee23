"""Bearer-token authentication on every route that needs it, on the api and status processes."""

from __future__ import annotations

import time
import warnings

import aiohttp
import jwt
import pytest

from tests.isolated import image
from tests.stack import JWT_SECRET, Client, Stack, token

pytestmark = pytest.mark.e2e

# (service, method, path, body) of every authenticated route.
ROUTES = [
    ("api", "POST", "/uploads", {"content_type": "image/jpeg", "size": 10}),
    ("api", "POST", "/jobs", {"source": {"key": "uploads/x/y"}}),
    ("status", "GET", "/jobs/0123456789abcdef", None),
    ("status", "GET", "/jobs/0123456789abcdef/events", None),
]


def _jwt(claims: dict, key: str | None = JWT_SECRET, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HS512 with the (short for it) service secret, on purpose
        return jwt.encode(claims, key, algorithm=algorithm)


def _now() -> int:
    return int(time.time())


BAD_AUTHORIZATION = [
    pytest.param(None, "missing_token", id="absent"),
    pytest.param("", "missing_token", id="empty"),
    pytest.param("Basic YWxpY2U6cHc=", "missing_token", id="basic-scheme"),
    pytest.param("Bearer ", "missing_token", id="bearer-without-token"),
    pytest.param("Bearer not-a-jwt", "invalid_token", id="garbage"),
    pytest.param(
        "Bearer " + _jwt({"sub": "alice", "exp": _now() + 600}, key="another-secret-" + "y" * 32),
        "invalid_token",
        id="wrong-secret",
    ),
    pytest.param("Bearer " + token("alice", ttl_s=-120), "token_expired", id="expired"),
    pytest.param("Bearer " + _jwt({"sub": "alice"}), "invalid_token", id="no-exp"),
    pytest.param("Bearer " + _jwt({"exp": _now() + 600}), "invalid_token", id="no-sub"),
    pytest.param("Bearer " + _jwt({"sub": "", "exp": _now() + 600}), "invalid_token", id="empty-sub"),
    pytest.param("Bearer " + _jwt({"sub": 42, "exp": _now() + 600}), "invalid_token", id="non-string-sub"),
    pytest.param(
        "Bearer " + _jwt({"sub": "alice", "exp": _now() + 600}, algorithm="HS512"),
        "invalid_token",
        id="hs512",
    ),
    pytest.param(
        "Bearer " + _jwt({"sub": "alice", "exp": _now() + 600}, key=None, algorithm="none"),
        "invalid_token",
        id="alg-none",
    ),
]


@pytest.mark.parametrize(("service", "method", "path", "body"), ROUTES)
@pytest.mark.parametrize(("authorization", "code"), BAD_AUTHORIZATION)
async def test_rejected_tokens(
    http: aiohttp.ClientSession,
    stack: Stack,
    service: str,
    method: str,
    path: str,
    body: dict | None,
    authorization: str | None,
    code: str,
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    url = f"{stack.services[service].url}{path}"
    async with http.request(method, url, json=body, headers=headers) as response:
        assert response.status == 401
        assert response.content_type == "application/json"
        challenge = response.headers["WWW-Authenticate"]
        payload = await response.json()
    assert payload["error"]["code"] == code
    assert payload["error"]["message"]
    assert challenge.startswith("Bearer")
    if code == "missing_token":
        assert "error=" not in challenge  # RFC 6750 3.1: no error code without credentials
    else:
        assert 'error="invalid_token"' in challenge


async def test_expired_within_leeway_is_accepted(http: aiohttp.ClientSession, stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {token('alice', ttl_s=-5)}"}
    async with http.get(f"{stack.status}/jobs/0123456789abcdef", headers=headers) as response:
        assert response.status == 404  # authenticated; the job just does not exist


async def test_query_token_only_for_event_streams(alice: Client, stack: Stack) -> None:
    job = await alice.submit({"key": await alice.upload(image())})
    raw = alice.headers["Authorization"].split()[1]
    async with alice.http.get(f"{stack.status}/jobs/{job['id']}", params={"access_token": raw}) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "missing_token"
    async with alice.http.post(
        f"{stack.api}/uploads", params={"access_token": raw}, json={"content_type": "image/png", "size": 1}
    ) as response:
        assert response.status == 401
    async with alice.http.get(
        f"{stack.status}/jobs/{job['id']}/events", params={"access_token": "garbage"}
    ) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_token"


async def test_subject_owns_the_job_not_the_token(http: aiohttp.ClientSession, stack: Stack) -> None:
    """Two different tokens of one subject see the same jobs; the subject is what counts."""
    first = Client(http, stack, "carol")
    job = await first.submit({"key": await first.upload(image())})
    other_token = _jwt({"sub": "carol", "exp": _now() + 300, "scope": "read"})
    async with http.get(
        f"{stack.status}/jobs/{job['id']}", headers={"Authorization": f"Bearer {other_token}"}
    ) as response:
        assert response.status == 200
        assert (await response.json())["id"] == job["id"]
