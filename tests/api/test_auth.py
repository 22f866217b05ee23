"""Bearer-token authentication on every route that needs it, on the api and status processes.

The first part uses the session stack (HS256 with the shared secret); the second starts an api that
verifies RS256/ES256 tokens against a JWKS served by the test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from imgpipe.storage import owns_key
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from multidict import CIMultiDictProxy

from tests.isolated import image, isolated_stack, raw_request
from tests.stack import JWT_SECRET, Client, Stack, free_port, token

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


# Each Authorization is made when its test runs: a token minted at collection would expire in a long run.
BAD_AUTHORIZATION = [
    pytest.param(lambda: None, "missing_token", id="absent"),
    pytest.param(lambda: "", "missing_token", id="empty"),
    pytest.param(lambda: "Basic YWxpY2U6cHc=", "missing_token", id="basic-scheme"),
    pytest.param(lambda: "Bearer ", "missing_token", id="bearer-without-token"),
    pytest.param(lambda: "Bearer not-a-jwt", "invalid_token", id="garbage"),
    pytest.param(
        lambda: "Bearer " + _jwt({"sub": "alice", "exp": _now() + 600}, key="another-secret-" + "y" * 32),
        "invalid_token",
        id="wrong-secret",
    ),
    pytest.param(lambda: "Bearer " + token("alice", ttl_s=-120), "token_expired", id="expired"),
    pytest.param(lambda: "Bearer " + _jwt({"sub": "alice"}), "invalid_token", id="no-exp"),
    pytest.param(lambda: "Bearer " + _jwt({"exp": _now() + 600}), "invalid_token", id="no-sub"),
    pytest.param(lambda: "Bearer " + _jwt({"sub": "", "exp": _now() + 600}), "invalid_token", id="empty-sub"),
    pytest.param(
        lambda: "Bearer " + _jwt({"sub": 42, "exp": _now() + 600}), "invalid_token", id="non-string-sub"
    ),
    pytest.param(
        lambda: "Bearer " + _jwt({"sub": "alice", "exp": _now() + 600}, algorithm="HS512"),
        "invalid_token",
        id="hs512",
    ),
    pytest.param(
        lambda: "Bearer " + _jwt({"sub": "alice", "exp": _now() + 600}, key=None, algorithm="none"),
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
    authorization: Callable[[], str | None],
    code: str,
) -> None:
    sent = authorization()
    headers = {} if sent is None else {"Authorization": sent}
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


@pytest.mark.parametrize(
    "authorization",
    [
        # Bytes no UTF-8 decoder takes: aiohttp hands them on as surrogates, which pyjwt cannot encode.
        pytest.param(lambda: [b"Authorization: Bearer \xff\xfe.\xfd"], id="not-ascii"),
        # Two valid tokens of two users (minted when the test runs): no guess at which one is meant.
        pytest.param(
            lambda: [f"Authorization: Bearer {token(sub, 'admin')}".encode() for sub in ("alice", "bob")],
            id="two-headers",
        ),
    ],
)
@pytest.mark.parametrize(("service", "method", "path", "body"), ROUTES)
async def test_an_unusable_authorization_is_invalid(
    stack: Stack,
    service: str,
    method: str,
    path: str,
    body: dict | None,
    authorization: Callable[[], list[bytes]],
) -> None:
    head = [f"{method} {path} HTTP/1.1".encode(), *authorization(), b"Content-Type: application/json"]
    payload = b"" if body is None else json.dumps(body).encode()
    status, answer = await raw_request(stack.services[service].url, head, payload)
    assert (status, answer["error"]["code"]) == (401, "invalid_token"), answer


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


# JWKS: an api that verifies RS256/ES256 tokens with the keys of an identity provider the test runs.

AUDIENCE, ISSUER = "imgpipe-api", "https://idp.test/"
MIN_REFRESH_S = 2


class Idp:
    """A JWKS endpoint on a thread of its own (the api process fetches from it), counting its hits."""

    def __init__(self) -> None:
        self.jwks: list[dict[str, Any]] = []
        self.hits = 0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                idp.hits += 1
                body = json.dumps({"keys": idp.jwks}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    family = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    return {**family.to_jwk(private_key.public_key(), as_dict=True), "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def idp(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Iterator[Idp]:
    server = Idp()
    server.jwks = [_jwk(rsa_key, "rsa-1", "RS256"), _jwk(ec_key, "ec-1", "ES256")]
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def jwks_stack(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, idp: Idp
) -> Iterator[Stack]:
    """`api` verifies with the test's JWKS; `down` has a JWKS URL where nothing listens."""
    jwks = {
        "IMGPIPE_JWT_ALGORITHMS": '["RS256", "ES256"]',
        "IMGPIPE_JWT_AUDIENCE": AUDIENCE,
        "IMGPIPE_JWT_ISSUER": ISSUER,
        "IMGPIPE_JWT_JWKS_MIN_REFRESH_S": str(MIN_REFRESH_S),
    }
    services = {
        "api": ("api", {**jwks, "IMGPIPE_JWT_JWKS_URL": idp.url}),
        "down": ("api", {**jwks, "IMGPIPE_JWT_JWKS_URL": f"http://127.0.0.1:{free_port()}/jwks.json"}),
    }
    # base_env keeps IMGPIPE_JWT_SECRET: it must simply not be used once a JWKS is configured.
    with isolated_stack(base_env, tmp_path_factory.mktemp("jwks-logs"), services) as stack:
        yield stack


def _idp_token(private_key: Any, kid: str | None = "rsa-1", algorithm: str = "RS256", **claims: Any) -> str:
    payload = {"sub": "alice", "aud": AUDIENCE, "iss": ISSUER, "iat": _now(), "exp": _now() + 600, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, private_key, algorithm=algorithm, headers={"kid": kid} if kid else None)


async def _upload(http: aiohttp.ClientSession, base: str, token: str) -> tuple[int, dict, CIMultiDictProxy]:
    async with http.post(
        f"{base}/uploads",
        json={"content_type": "image/jpeg", "size": 10},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        return response.status, await response.json(), response.headers


@pytest.mark.parametrize(("algorithm", "kid"), [("RS256", "rsa-1"), ("ES256", "ec-1")])
async def test_jwks_tokens_are_accepted(
    http: aiohttp.ClientSession,
    jwks_stack: Stack,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    algorithm: str,
    kid: str,
) -> None:
    key = rsa_key if algorithm == "RS256" else ec_key
    status, body, _ = await _upload(http, jwks_stack.api, _idp_token(key, kid, algorithm))
    assert status == 201, body
    assert owns_key("alice", body["key"])  # the token's sub owns the upload


def _hmac_token(key: bytes, **claims: Any) -> str:
    header = _segment({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"})
    payload = _segment({"sub": "mallory", "aud": AUDIENCE, "iss": ISSUER, "exp": _now() + 600, **claims})
    signature = _b64(hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def _segment(obj: dict) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


JWKS_REFUSALS = [
    "alg-none",
    "hs256-with-the-public-key",
    "hs256-with-the-service-secret",
    "expired",
    "not-yet-valid",
    "issued-in-the-future",
    "wrong-audience",
    "wrong-issuer",
    "tampered-payload",
    "signed-by-another-key",
    "unknown-kid",
    "no-kid",
    "es256-header-on-the-rsa-key",
]


@pytest.mark.parametrize("case", JWKS_REFUSALS)
async def test_jwks_refusals(
    http: aiohttp.ClientSession,
    jwks_stack: Stack,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    case: str,
) -> None:
    code = "invalid_token"
    if case == "alg-none":
        token = (
            f"{_segment({'alg': 'none', 'kid': 'rsa-1'})}.{_segment({'sub': 'alice', 'exp': _now() + 600})}."
        )
    elif case == "hs256-with-the-public-key":
        pem = rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        token = _hmac_token(pem, scope="admin")
    elif case == "hs256-with-the-service-secret":
        token = _hmac_token(JWT_SECRET.encode())
    elif case == "expired":
        token, code = _idp_token(rsa_key, exp=_now() - 3600), "token_expired"
    elif case == "not-yet-valid":
        token = _idp_token(rsa_key, nbf=_now() + 3600)
    elif case == "issued-in-the-future":
        token = _idp_token(rsa_key, iat=_now() + 3600)
    elif case == "wrong-audience":
        token = _idp_token(rsa_key, aud="another-api")
    elif case == "wrong-issuer":
        token = _idp_token(rsa_key, iss="https://evil.test/")
    elif case == "tampered-payload":
        header, _, signature = _idp_token(rsa_key).split(".")
        forged = {"sub": "bob", "aud": AUDIENCE, "iss": ISSUER, "exp": _now() + 600, "scope": "admin"}
        token = f"{header}.{_segment(forged)}.{signature}"
    elif case == "signed-by-another-key":
        token = _idp_token(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    elif case == "unknown-kid":
        token = _idp_token(rsa_key, kid=f"unknown-{uuid.uuid4().hex}")
    elif case == "no-kid":
        token = _idp_token(rsa_key, kid=None)
    else:
        token = _idp_token(ec_key, kid="rsa-1", algorithm="ES256")
    status, body, headers = await _upload(http, jwks_stack.api, token)
    assert status == 401, body
    assert body["error"]["code"] == code
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_unknown_kids_cannot_make_the_api_hammer_the_idp(
    http: aiohttp.ClientSession, jwks_stack: Stack, idp: Idp, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Warm up: the key set is fetched (or already cached).
    assert (await _upload(http, jwks_stack.api, _idp_token(rsa_key)))[0] == 201
    before, started = idp.hits, time.monotonic()
    for _ in range(20):
        status, body, _ = await _upload(http, jwks_stack.api, _idp_token(rsa_key, kid=uuid.uuid4().hex))
        assert (status, body["error"]["code"]) == (401, "invalid_token")
    elapsed = time.monotonic() - started
    # At most one fetch per interval, however many made-up kids arrive (20 without the limit).
    assert idp.hits - before <= 1 + int(elapsed / MIN_REFRESH_S)


async def test_key_rotation_is_picked_up(
    http: aiohttp.ClientSession, jwks_stack: Stack, idp: Idp, rsa_key: rsa.RSAPrivateKey
) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = f"rotated-{uuid.uuid4().hex[:8]}"
    idp.jwks = [*idp.jwks, _jwk(new_key, kid, "RS256")]
    await asyncio.sleep(MIN_REFRESH_S + 0.5)  # any refresh an earlier test caused is an interval ago
    before = idp.hits
    status, body, _ = await _upload(http, jwks_stack.api, _idp_token(new_key, kid=kid))
    assert status == 201, body
    assert idp.hits == before + 1  # the unknown kid made the api fetch the set again
    # The old key still works next to the new one.
    assert (await _upload(http, jwks_stack.api, _idp_token(rsa_key)))[0] == 201


async def test_unreachable_jwks_is_a_503(
    http: aiohttp.ClientSession, jwks_stack: Stack, rsa_key: rsa.RSAPrivateKey
) -> None:
    async with asyncio.timeout(60):  # did not hang
        status, body, headers = await _upload(http, jwks_stack.services["down"].url, _idp_token(rsa_key))
    assert status == 503, body
    assert body["error"]["code"] == "auth_unavailable"
    assert int(headers["Retry-After"]) >= 1
    # A request without a token is still a 401: nothing needed the keys.
    async with http.post(f"{jwks_stack.services['down'].url}/uploads", json={}) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("scope", "status", "code"),
    [
        ("read admin", 404, "run_not_found"),  # allowed in; the run just does not exist
        ("read", 403, "forbidden"),
        ("administrator", 403, "forbidden"),
        (None, 403, "forbidden"),
    ],
)
async def test_admin_routes_need_the_admin_scope(
    http: aiohttp.ClientSession,
    jwks_stack: Stack,
    rsa_key: rsa.RSAPrivateKey,
    scope: str | None,
    status: int,
    code: str,
) -> None:
    url = f"{jwks_stack.api}/admin/reconcile/{uuid.uuid4().hex}"
    headers = {"Authorization": f"Bearer {_idp_token(rsa_key, scope=scope)}"}
    async with http.get(url, headers=headers) as response:
        assert response.status == status
        assert (await response.json())["error"]["code"] == code
    async with http.get(url) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
