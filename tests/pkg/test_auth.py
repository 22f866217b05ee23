"""Bearer tokens: only well-formed, correctly signed, unexpired tokens with a subject pass.

First with a shared secret (HS256), then against a JWKS served by a real aiohttp server on a free
port, with RSA and EC keys made by `cryptography`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from imgpipe.auth import (
    MAX_JWKS_BYTES,
    VERIFIED_TTL_S,
    AuthError,
    AuthUnavailable,
    Principal,
    TokenVerifier,
    bearer_token,
)
from imgpipe.settings import AuthSettings

from tests.stack import local_http

SECRET = "unit-test-secret-" + "s" * 64  # long enough for HS512 too


def _verifier(**settings: object) -> TokenVerifier:
    return TokenVerifier(AuthSettings(env="test", jwt_secret=SECRET, **settings))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _claims(**extra: object) -> dict:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 600, **extra}


def _token(claims: dict, key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


async def _rejected(verifier: TokenVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    assert info.value.status == 401
    return info.value


async def test_valid_token() -> None:
    principal = await _verifier().verify(_token(_claims(scope="read admin")))
    assert principal == Principal(sub="alice", scopes=frozenset({"read", "admin"}))
    assert principal.is_admin


async def test_token_without_scope_is_not_admin() -> None:
    principal = await _verifier().verify(_token(_claims()))
    assert principal == Principal(sub="alice")
    assert not principal.is_admin
    assert not (await _verifier().verify(_token(_claims(scope="administrator")))).is_admin
    assert not (await _verifier().verify(_token(_claims(scope=["admin"])))).is_admin


@pytest.mark.parametrize(
    ("scope", "admin"),
    [
        ("admin", True),
        ("read  admin ", True),
        ("read\u00a0admin", False),  # str.split() split on these too, and granted `admin`
        ("read\x1fadmin", False),
        ("read\tadmin", False),
        ("read\nadmin", False),
    ],
)
async def test_scopes_are_separated_by_spaces_only(scope: str, admin: bool) -> None:
    assert (await _verifier().verify(_token(_claims(scope=scope)))).is_admin is admin


async def test_issue_round_trips() -> None:
    verifier = _verifier(jwt_audience="imgpipe", jwt_issuer="https://idp.example")
    principal = await verifier.verify(verifier.issue("bob", scopes="admin"))
    assert principal == Principal("bob", frozenset({"admin"}))


async def test_expired_token() -> None:
    error = await _rejected(_verifier(), _token(_claims(exp=int(time.time()) - 3600)))
    assert error.code == "token_expired"


async def test_missing_exp_is_invalid() -> None:
    claims = _claims()
    del claims["exp"]
    error = await _rejected(_verifier(), _token(claims))
    assert error.code == "invalid_token"
    assert "exp" in error.message


@pytest.mark.parametrize("exp", [str(int(time.time()) + 600), f"{time.time() + 600}"])
async def test_an_exp_that_is_not_a_number_is_invalid(exp: str) -> None:
    """RFC 7519: a JSON number of seconds. pyjwt takes a string of an integer as well."""
    error = await _rejected(_verifier(), _token(_claims(exp=exp)))
    assert error.code == "invalid_token" and "exp" in error.message, error.message


async def test_an_exp_no_float_holds_is_the_far_future_not_a_500() -> None:
    """`float(exp)` of a signed `exp` of 10**400 raised OverflowError: an internal error for a valid token."""
    for exp in (10**400, 1e300):
        principal = await _verifier().verify(_token(_claims(exp=exp)))
        assert principal.sub and 1e12 <= principal.valid_until < 1e13, principal


@pytest.mark.parametrize("sub", [None, "", 42, "x" * 257, "\ud800x"])  # the last: no UTF-8 (a 500 after)
async def test_missing_or_bad_sub_is_invalid(sub: object) -> None:
    claims = _claims()
    if sub is None:
        del claims["sub"]
    else:
        claims["sub"] = sub
    assert (await _rejected(_verifier(), _token(claims))).code == "invalid_token"


async def test_alg_none_is_invalid() -> None:
    token = f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(_claims())}."
    assert (await _rejected(_verifier(), token)).code == "invalid_token"


async def test_alg_none_with_a_signature_is_invalid() -> None:
    header, payload = _segment({"alg": "none"}), _segment(_claims())
    signature = _b64(hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert (await _rejected(_verifier(), f"{header}.{payload}.{signature}")).code == "invalid_token"


async def test_other_secret_is_invalid() -> None:
    assert (
        await _rejected(_verifier(), _token(_claims(), key="another-secret-" + "y" * 64))
    ).code == "invalid_token"


async def test_tampered_payload_is_invalid() -> None:
    header, _, signature = _token(_claims(sub="alice")).split(".")
    forged = f"{header}.{_segment(_claims(sub='admin', scope='admin'))}.{signature}"
    assert (await _rejected(_verifier(), forged)).code == "invalid_token"


async def test_tampered_signature_is_invalid() -> None:
    token = _token(_claims())
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert (await _rejected(_verifier(), flipped)).code == "invalid_token"


async def test_algorithm_not_in_the_list_is_invalid() -> None:
    token = _token(_claims(), algorithm="HS512")
    assert (await _rejected(_verifier(), token)).code == "invalid_token"
    # ...and the same token passes where HS512 is allowed: the refusal was the algorithm list.
    assert (await _verifier(jwt_algorithms=("HS256", "HS512")).verify(token)).sub == "alice"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_rs256_token_is_invalid(rsa_key: rsa.RSAPrivateKey) -> None:
    assert (
        await _rejected(_verifier(), _token(_claims(), key=rsa_key, algorithm="RS256"))
    ).code == "invalid_token"


async def test_hs_rs_confusion_is_invalid(rsa_key: rsa.RSAPrivateKey) -> None:
    """An HS256 token keyed with a public key PEM (what a confused verifier would use) fails."""
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header, payload = _segment({"alg": "HS256", "typ": "JWT"}), _segment(_claims(scope="admin"))
    signature = _b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert (await _rejected(_verifier(), f"{header}.{payload}.{signature}")).code == "invalid_token"


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        ({"aud": "imgpipe", "iss": "https://idp.example"}, True),
        ({"aud": ["other", "imgpipe"], "iss": "https://idp.example"}, True),
        ({"aud": "other", "iss": "https://idp.example"}, False),
        ({"iss": "https://idp.example"}, False),
        ({"aud": "imgpipe", "iss": "https://evil.example"}, False),
        ({"aud": "imgpipe"}, False),
    ],
)
async def test_audience_and_issuer_enforced_when_configured(extra: dict, ok: bool) -> None:
    verifier = _verifier(jwt_audience="imgpipe", jwt_issuer="https://idp.example")
    token = _token(_claims(**extra))
    if ok:
        assert (await verifier.verify(token)).sub == "alice"
    else:
        assert (await _rejected(verifier, token)).code == "invalid_token"


async def test_a_token_for_an_audience_is_refused_when_none_is_configured() -> None:
    """RFC 7519 §4.1.3: a token that names an audience is for that audience. With none configured
    (Cognito's access tokens carry none), an ID token or another API's token was let in."""
    for aud in ("https://other-api.example", ["some-client-id"]):
        rejected = await _rejected(_verifier(), _token(_claims(aud=aud)))
        assert rejected.code == "invalid_token"
        assert "configured with none" in rejected.message
    # A token with no `aud` is what such a service takes; `iss` goes unchecked when unset.
    assert (await _verifier().verify(_token(_claims(iss="anyone")))).sub == "alice"


async def test_leeway() -> None:
    now = int(time.time())
    assert (await _verifier(jwt_leeway_s=30).verify(_token(_claims(exp=now - 10)))).sub == "alice"
    assert (
        await _rejected(_verifier(jwt_leeway_s=30), _token(_claims(exp=now - 60)))
    ).code == "token_expired"
    assert (await _rejected(_verifier(jwt_leeway_s=0), _token(_claims(exp=now - 10)))).code == "token_expired"


async def test_not_yet_valid_is_invalid() -> None:
    now = int(time.time())
    assert (await _rejected(_verifier(), _token(_claims(nbf=now + 600)))).code == "invalid_token"
    assert (await _verifier().verify(_token(_claims(nbf=now + 10)))).sub == "alice"  # within the leeway


async def test_a_verified_token_is_not_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = _verifier()
    decoded: list[str] = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda token, *a, **kw: decoded.append(token) or real(token, *a, **kw))
    token = _token(_claims(scope="admin"))
    for _ in range(5):
        assert (await verifier.verify(token)) == Principal("alice", frozenset({"admin"}))
    assert decoded == [token]
    # Another token, even one differing only in its signature, is checked on its own.
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    await _rejected(verifier, forged)
    await _rejected(verifier, forged)
    assert decoded == [token, forged, forged]  # a refusal is never remembered


async def test_a_remembered_token_still_expires() -> None:
    verifier = _verifier(jwt_leeway_s=0)
    exp = time.time() + 1.2
    token = _token(_claims(exp=exp))
    assert (await verifier.verify(token)).sub == "alice"
    await asyncio.sleep(exp - time.time() + 0.05)
    assert (await _rejected(verifier, token)).code == "token_expired"


async def test_remembered_tokens_are_checked_again_after_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    verifier = TokenVerifier(AuthSettings(env="test", jwt_secret=SECRET), clock=lambda: clock[0])
    decoded: list[str] = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda token, *a, **kw: decoded.append(token) or real(token, *a, **kw))
    token = _token(_claims())
    await verifier.verify(token)
    clock[0] += VERIFIED_TTL_S - 1
    await verifier.verify(token)
    assert len(decoded) == 1
    clock[0] += 1
    await verifier.verify(token)
    assert len(decoded) == 2


async def test_remembered_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("imgpipe.auth.VERIFIED_MAX", 8)
    verifier = _verifier()
    tokens = [_token(_claims(sub=f"user-{i}")) for i in range(20)]
    for token in tokens:
        await verifier.verify(token)
    assert len(verifier._verified) == 8
    assert list(verifier._verified) == tokens[-8:]  # the oldest went first


@pytest.mark.parametrize(
    # The last: undecodable header bytes, as aiohttp passes them on (surrogates).
    "garbage",
    ["", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9..x", "\udcff\udcfe.\udcfd", "t7c.e30.x"],
)
async def test_garbage_is_invalid(garbage: str) -> None:
    refused = await _rejected(_verifier(), garbage)
    assert refused.code == "invalid_token"
    # What a token must be, not what pyjwt's decoders made of this one ("'utf-8' codec can't ...").
    if garbage.isascii():
        assert "codec" not in refused.message and "segments" not in refused.message, refused.message


async def test_a_jwt_whose_header_pyjwt_refuses_is_told_why() -> None:
    # Three base64url parts and a JSON header: a JWT, not "not a JWT", whose `kid` is not a string.
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    token = f"{part({'alg': 'HS256', 'kid': 1})}.{part({'sub': 'alice', 'exp': int(time.time()) + 60})}.c2ln"
    refused = await _rejected(_verifier(), token)
    assert refused.code == "invalid_token"
    assert "not a JWT" not in refused.message and "Key ID" in refused.message, refused.message


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
    ],
)
def test_bearer_token(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpw", "abc.def.ghi"]
)
def test_bearer_token_refuses(header: str | None) -> None:
    with pytest.raises(AuthError) as info:
        bearer_token(header)
    assert (info.value.code, info.value.status) == ("missing_token", 401)


# JWKS: RS*/ES*/PS256 tokens verified with an identity provider's published keys.

AUDIENCE, ISSUER = "imgpipe", "https://idp.test/"


class Clock:
    """A monotonic clock the tests move by hand, so cache and refresh intervals need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Idp:
    """An identity provider's JWKS endpoint: the keys it publishes, how it misbehaves, its hits."""

    def __init__(self) -> None:
        self.jwks: list[dict[str, Any]] = []
        self.hits = 0
        self.status = 200
        self.body: bytes | None = None  # served instead of the key set
        self.delay_s = 0.0
        self.redirect = False
        self.url = ""
        self.requested = asyncio.Event()  # set on every hit

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.requested.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.redirect:
            raise web.HTTPFound("/elsewhere")
        if self.body is not None:
            return web.Response(body=self.body, status=self.status, content_type="application/json")
        return web.json_response({"keys": self.jwks}, status=self.status)

    async def elsewhere(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": self.jwks})


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    server = Idp()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    app.router.add_get("/elsewhere", server.elsewhere)
    async with local_http(app) as base:
        server.url = f"{base}/.well-known/jwks.json"
        yield server


@pytest.fixture
async def verifiers() -> AsyncIterator[Callable[..., TokenVerifier]]:
    """Make JWKS verifiers on a hand-moved clock (`verifier.clock`); all are closed afterwards."""
    made: list[TokenVerifier] = []

    def make(url: str, clock: Clock | None = None, **settings: Any) -> TokenVerifier:
        settings = {"jwt_audience": AUDIENCE, "jwt_issuer": ISSUER, "jwt_jwks_min_refresh_s": 10, **settings}
        verifier = TokenVerifier(
            AuthSettings(env="test", jwt_jwks_url=url, **settings), clock=clock or Clock()
        )
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.close()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ec384_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(private_key: Any, kid: str, alg: str | None = None, **extra: Any) -> dict[str, Any]:
    """The public JWK of `private_key`, as an IdP publishes it."""
    family = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(private_key, rsa.RSAPrivateKey)
        else jwt.algorithms.ECAlgorithm
    )
    jwk = family.to_jwk(private_key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig", **extra})
    if alg:
        jwk["alg"] = alg
    return jwk


def _idp_claims(**extra: Any) -> dict[str, Any]:
    return _claims(aud=AUDIENCE, iss=ISSUER, **extra)


def _signed(private_key: Any, kid: str | None, algorithm: str = "RS256", **claims: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    # A fresh token each call (its own jti): the verifier remembers tokens it has verified, and these
    # tests are about how it finds keys.
    claims = {"jti": uuid.uuid4().hex, **claims}
    return jwt.encode({**_idp_claims(), **claims}, private_key, algorithm=algorithm, headers=headers)


@pytest.fixture
def rsa_idp(idp: Idp, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Idp:
    """The provider publishing an RS256 key ("rsa-1") and an ES256 key ("ec-1")."""
    idp.jwks = [_jwk(rsa_key, "rsa-1", "RS256"), _jwk(ec_key, "ec-1", "ES256")]
    return idp


@pytest.mark.parametrize(
    ("algorithm", "key_name", "publish_alg"),
    [
        ("RS256", "rsa_key", "RS256"),
        ("RS512", "rsa_key", "RS512"),
        ("PS256", "rsa_key", None),  # a key without "alg": the token's algorithm, if the type fits
        ("ES256", "ec_key", "ES256"),
        ("ES384", "ec384_key", None),
    ],
)
async def test_jwks_valid_token(
    idp: Idp,
    verifiers: Callable[..., TokenVerifier],
    request: pytest.FixtureRequest,
    algorithm: str,
    key_name: str,
    publish_alg: str | None,
) -> None:
    key = request.getfixturevalue(key_name)
    idp.jwks = [_jwk(key, "k1", publish_alg)]
    verifier = verifiers(idp.url, jwt_algorithms=(algorithm,))
    principal = await verifier.verify(_signed(key, "k1", algorithm, scope="read admin"))
    assert principal == Principal("alice", frozenset({"read", "admin"}))
    assert idp.hits == 1
    # Cached: a second token costs no fetch.
    assert (await verifier.verify(_signed(key, "k1", algorithm))).sub == "alice"
    assert idp.hits == 1


async def test_jwks_default_algorithm_is_rs256(rsa_idp: Idp, verifiers: Callable[..., TokenVerifier]) -> None:
    assert AuthSettings(env="test", jwt_jwks_url=rsa_idp.url).jwt_algorithms == ("RS256",)


async def _refused(verifier: TokenVerifier, token: str, code: str = "invalid_token") -> AuthError:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    assert (info.value.status, info.value.code) == (401, code), info.value.message
    return info.value


async def test_jwks_alg_none_is_refused_without_a_fetch(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier]
) -> None:
    verifier = verifiers(rsa_idp.url)
    unsigned = f"{_segment({'alg': 'none', 'kid': 'rsa-1'})}.{_segment(_idp_claims(scope='admin'))}."
    await _refused(verifier, unsigned)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        await _refused(verifier, jwt.encode(_idp_claims(), None, algorithm="none", headers={"kid": "rsa-1"}))
    assert rsa_idp.hits == 0  # refused on the header alone


async def test_jwks_hs_rs_confusion_is_refused(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    """An HS256 token keyed with the provider's own public key (PEM and JWK forms) is refused."""
    verifier = verifiers(rsa_idp.url, jwt_algorithms=("RS256", "ES256"))
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _segment({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"})
    payload = _segment(_idp_claims(sub="mallory", scope="admin"))
    signature = _b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    await _refused(verifier, f"{header}.{payload}.{signature}")
    # Even past the allow-list, the key set would not lend an RSA key to HMAC.
    with pytest.raises(AuthError) as info:
        await verifier.jwks.key("rsa-1", "HS256")  # type: ignore[union-attr]
    assert info.value.code == "invalid_token"


async def test_jwks_key_type_must_fit_the_algorithm(
    idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey, ec_key: Any
) -> None:
    # Keys published without "alg": only their type says what they may verify.
    idp.jwks = [_jwk(rsa_key, "rsa-1"), _jwk(ec_key, "ec-1")]
    verifier = verifiers(idp.url, jwt_algorithms=("RS256", "ES256", "PS256"))
    assert (await verifier.verify(_signed(ec_key, "ec-1", "ES256"))).sub == "alice"
    # An ES256 header on the RSA key's kid, and an RS256 header on the EC key's kid.
    await _refused(verifier, _signed(ec_key, "rsa-1", "ES256"))
    await _refused(verifier, _signed(rsa_key, "ec-1", "RS256"))


async def test_jwks_key_published_for_one_algorithm_only(
    idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    idp.jwks = [_jwk(rsa_key, "rsa-1", "RS256")]
    verifier = verifiers(idp.url, jwt_algorithms=("RS256", "PS256"))
    error = await _refused(verifier, _signed(rsa_key, "rsa-1", "PS256"))
    assert "RS256" in error.message


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"exp": int(time.time()) - 3600}, "token_expired"),
        ({"nbf": int(time.time()) + 3600}, "invalid_token"),
        ({"iat": int(time.time()) + 3600}, "invalid_token"),
        ({"aud": "someone-else"}, "invalid_token"),
        ({"aud": None}, "invalid_token"),
        ({"iss": "https://evil.test/"}, "invalid_token"),
        ({"iss": None}, "invalid_token"),
        ({"exp": None}, "invalid_token"),
    ],
)
async def test_jwks_claims_are_enforced(
    rsa_idp: Idp,
    verifiers: Callable[..., TokenVerifier],
    rsa_key: rsa.RSAPrivateKey,
    claims: dict[str, Any],
    code: str,
) -> None:
    payload = {**_idp_claims(), **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    token = jwt.encode(payload, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    await _refused(verifiers(rsa_idp.url), token, code)


async def test_jwks_tampered_payload_is_refused(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifiers(rsa_idp.url)
    header, _, signature = _signed(rsa_key, "rsa-1").split(".")
    await _refused(verifier, f"{header}.{_segment(_idp_claims(sub='bob', scope='admin'))}.{signature}")


async def test_jwks_signature_by_another_key_is_refused(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], other_rsa_key: rsa.RSAPrivateKey
) -> None:
    await _refused(verifiers(rsa_idp.url), _signed(other_rsa_key, "rsa-1"))


async def test_jwks_token_without_kid_is_refused(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    error = await _refused(verifiers(rsa_idp.url), _signed(rsa_key, None))
    assert "kid" in error.message
    assert rsa_idp.hits == 0


async def test_jwks_short_rsa_key_is_refused(idp: Idp, verifiers: Callable[..., TokenVerifier]) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    idp.jwks = [_jwk(weak, "weak", "RS256")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyjwt warns about signing with it, on purpose here
        token = _signed(weak, "weak")
    await _refused(verifiers(idp.url), token)


async def test_unknown_kids_refresh_at_most_once_per_interval(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = verifiers(rsa_idp.url, clock, jwt_jwks_min_refresh_s=10)
    assert (await verifier.verify(_signed(rsa_key, "rsa-1"))).sub == "alice"
    assert rsa_idp.hits == 1
    # A spray of made-up kids right after the fetch: all refused, none fetches.
    for _ in range(20):
        await _refused(verifier, _signed(rsa_key, uuid.uuid4().hex))
    assert rsa_idp.hits == 1
    # Once the interval has passed, one unknown kid may fetch again, and only one.
    clock.now += 10
    await asyncio.gather(
        *(_refused(verifier, _signed(rsa_key, uuid.uuid4().hex)) for _ in range(20)), return_exceptions=False
    )
    assert rsa_idp.hits == 2
    clock.now += 9
    await _refused(verifier, _signed(rsa_key, "still-unknown"))
    assert rsa_idp.hits == 2
    # Known keys keep working throughout, without fetching.
    assert (await verifier.verify(_signed(rsa_key, "rsa-1"))).sub == "alice"
    assert rsa_idp.hits == 2


async def test_concurrent_first_use_fetches_once(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    rsa_idp.delay_s = 0.2  # the first fetch is still under way when the others arrive
    verifier = verifiers(rsa_idp.url)
    principals = await asyncio.gather(*(verifier.verify(_signed(rsa_key, "rsa-1")) for _ in range(10)))
    assert {p.sub for p in principals} == {"alice"}
    assert rsa_idp.hits == 1


async def test_key_rotation(
    rsa_idp: Idp,
    verifiers: Callable[..., TokenVerifier],
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    clock = Clock()
    verifier = verifiers(rsa_idp.url, clock, jwt_jwks_min_refresh_s=10, jwt_jwks_cache_s=300)
    assert (await verifier.verify(_signed(rsa_key, "rsa-1"))).sub == "alice"
    # The provider publishes a new key next to the old one and starts signing with it.
    rsa_idp.jwks = [*rsa_idp.jwks, _jwk(other_rsa_key, "rsa-2", "RS256")]
    clock.now += 10
    assert (await verifier.verify(_signed(other_rsa_key, "rsa-2"))).sub == "alice"
    assert rsa_idp.hits == 2
    # Then retires the old one: tokens signed with it fail once the cached set has expired.
    rsa_idp.jwks = [_jwk(other_rsa_key, "rsa-2", "RS256")]
    assert (await verifier.verify(_signed(rsa_key, "rsa-1"))).sub == "alice"  # still cached
    clock.now += 300
    await _refused(verifier, _signed(rsa_key, "rsa-1"))
    assert rsa_idp.hits == 3
    assert (await verifier.verify(_signed(other_rsa_key, "rsa-2"))).sub == "alice"


async def test_cached_keys_expire(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = verifiers(rsa_idp.url, clock, jwt_jwks_cache_s=60)
    await verifier.verify(_signed(rsa_key, "rsa-1"))
    clock.now += 59
    await verifier.verify(_signed(rsa_key, "rsa-1"))
    assert rsa_idp.hits == 1
    clock.now += 1
    await verifier.verify(_signed(rsa_key, "rsa-1"))
    assert rsa_idp.hits == 2


async def test_a_slow_refresh_does_not_hold_up_known_keys(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = verifiers(rsa_idp.url, clock, jwt_jwks_cache_s=60)
    await verifier.verify(_signed(rsa_key, "rsa-1"))
    rsa_idp.delay_s = 30  # the provider hangs on the next fetch
    clock.now += 60
    rsa_idp.requested.clear()
    refreshing = asyncio.create_task(verifier.verify(_signed(rsa_key, "rsa-1")))
    async with asyncio.timeout(10):
        await rsa_idp.requested.wait()  # the refresh is under way
    # Another request with the same (expired but known) key goes through at once.
    async with asyncio.timeout(10):
        assert (await verifier.verify(_signed(rsa_key, "rsa-1"))).sub == "alice"
    assert not refreshing.done()
    refreshing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await refreshing
    # The request that was fetching went away; its fetch goes on, and nobody fetches beside it.
    assert (await verifier.verify(_signed(rsa_key, "rsa-1"))).sub == "alice"
    assert rsa_idp.hits == 2


async def test_a_fetch_outlives_the_request_that_started_it(
    rsa_idp: Idp,
    verifiers: Callable[..., TokenVerifier],
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    """Clients hanging up mid-fetch (a disconnect cancels the handler) cannot make the service fetch
    once per request, and the keys the fetch brings back serve the requests after them."""
    clock = Clock()
    verifier = verifiers(rsa_idp.url, clock, jwt_jwks_min_refresh_s=10)
    await verifier.verify(_signed(rsa_key, "rsa-1"))
    rsa_idp.jwks = [*rsa_idp.jwks, _jwk(other_rsa_key, "rsa-2", "RS256")]
    rsa_idp.delay_s = 0.5
    clock.now += 10
    for kid in ("rsa-2", "made-up-1", "rsa-2", "made-up-2"):  # each gives up after 50 ms
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await verifier.verify(_signed(other_rsa_key, kid))
    assert rsa_idp.hits == 2
    fetch = verifier.jwks._fetching  # type: ignore[union-attr]
    assert fetch is not None
    await asyncio.wait([fetch], timeout=10)
    assert fetch.done() and verifier.jwks._fetching is None  # type: ignore[union-attr]
    # Nobody waited for the fetch's end, and its keys are in use: no fetch is allowed yet.
    assert (await verifier.verify(_signed(other_rsa_key, "rsa-2"))).sub == "alice"
    await _refused(verifier, _signed(other_rsa_key, "made-up-3"))
    assert rsa_idp.hits == 2


async def test_close_stops_a_fetch_under_way(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    rsa_idp.delay_s = 30
    verifier = verifiers(rsa_idp.url)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await verifier.verify(_signed(rsa_key, "rsa-1"))
    fetch = verifier.jwks._fetching  # type: ignore[union-attr]
    assert fetch is not None and not fetch.done()
    async with asyncio.timeout(5):
        await verifier.close()
    assert fetch.cancelled()


async def _unavailable(verifier: TokenVerifier, token: str) -> AuthUnavailable:
    with pytest.raises(AuthUnavailable) as info:
        async with asyncio.timeout(30):  # did not hang
            await verifier.verify(token)
    assert (info.value.status, info.value.code) == (503, "auth_unavailable")
    assert int(info.value.headers["Retry-After"]) >= 1
    return info.value


async def test_unreachable_jwks_is_a_503(
    verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    from tests.stack import free_port

    await _unavailable(verifiers(f"http://127.0.0.1:{free_port()}/jwks.json"), _signed(rsa_key, "rsa-1"))


@pytest.mark.parametrize(
    "trouble",
    [
        "status-500",
        "not-json",
        "no-keys-list",
        "no-usable-key",
        "alg-not-a-string",
        "too-large",
        "too-slow",
        "redirect",
    ],
)
async def test_broken_jwks_is_a_503_and_recovers(
    rsa_idp: Idp,
    verifiers: Callable[..., TokenVerifier],
    rsa_key: rsa.RSAPrivateKey,
    trouble: str,
) -> None:
    good = rsa_idp.jwks
    if trouble == "status-500":
        rsa_idp.status = 500
    elif trouble == "not-json":
        rsa_idp.body = b"<html>maintenance</html>"
    elif trouble == "no-keys-list":
        rsa_idp.body = b'{"keys": {"kid": "rsa-1"}}'
    elif trouble == "no-usable-key":
        rsa_idp.jwks = [
            {"kty": "RSA", "kid": "rsa-1", "n": "AQAB"},
            {"kty": "oct", "kid": "x", "k": "c2VjcmV0"},
        ]
    elif trouble == "alg-not-a-string":  # PyJWKSet raised TypeError on it: a 500, not a 503
        rsa_idp.jwks = [{**key, "alg": [key["alg"]]} for key in good]
    elif trouble == "too-large":
        padding = [
            {"kid": f"pad-{i}", "kty": "unknown", "x": "y" * 1000} for i in range(MAX_JWKS_BYTES // 1000)
        ]
        rsa_idp.jwks = [*good, *padding]
    elif trouble == "too-slow":
        rsa_idp.delay_s = 5
    elif trouble == "redirect":
        rsa_idp.redirect = True  # the target would serve the keys: redirects are not followed
    clock = Clock()
    verifier = verifiers(rsa_idp.url, clock, jwt_jwks_timeout_s=0.5 if trouble == "too-slow" else 5)
    await _unavailable(verifier, _signed(rsa_key, "rsa-1"))
    assert rsa_idp.hits == 1
    # Within the interval nobody asks again: still 503, at no cost to the provider.
    await _unavailable(verifier, _signed(rsa_key, "rsa-1"))
    assert rsa_idp.hits == 1
    rsa_idp.status, rsa_idp.body, rsa_idp.delay_s, rsa_idp.redirect, rsa_idp.jwks = 200, None, 0, False, good
    clock.now += 10
    assert (await verifier.verify(_signed(rsa_key, "rsa-1"))).sub == "alice"


async def test_known_keys_outlive_a_provider_outage(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = verifiers(rsa_idp.url, clock, jwt_jwks_cache_s=60)
    await verifier.verify(_signed(rsa_key, "rsa-1"))
    rsa_idp.status = 503
    clock.now += 60
    # The set has expired and cannot be fetched: its keys stay in use...
    assert (await verifier.verify(_signed(rsa_key, "rsa-1"))).sub == "alice"
    assert rsa_idp.hits == 2
    # ...but a kid we do not know may be a new key we could not fetch: 503, not 401.
    await _unavailable(verifier, _signed(rsa_key, "rsa-new"))


async def test_symmetric_keys_in_a_jwks_are_ignored(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier]
) -> None:
    rsa_idp.jwks = [*rsa_idp.jwks, {"kty": "oct", "kid": "shared", "k": _b64(b"k" * 32), "alg": "HS256"}]
    verifier = verifiers(rsa_idp.url)
    with pytest.raises(AuthError) as info:
        await verifier.jwks.key("shared", "HS256")  # type: ignore[union-attr]
    assert (info.value.status, info.value.code) == (401, "invalid_token")


async def test_encryption_keys_are_ignored(
    idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey, ec_key: Any
) -> None:
    idp.jwks = [_jwk(ec_key, "ec-1", "ES256"), _jwk(rsa_key, "enc-1", use="enc")]
    await _refused(verifiers(idp.url), _signed(rsa_key, "enc-1"))


async def test_scope_claim_is_configurable(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifiers(rsa_idp.url, jwt_scope_claim="scp")
    assert (await verifier.verify(_signed(rsa_key, "rsa-1", scp=["read", "admin"]))).is_admin
    assert (await verifier.verify(_signed(rsa_key, "rsa-1", scp="read admin"))).is_admin
    assert not (await verifier.verify(_signed(rsa_key, "rsa-1", scope="admin"))).is_admin
    assert not (await verifier.verify(_signed(rsa_key, "rsa-1", scp=["read admin"]))).is_admin


async def test_no_dev_tokens_with_a_jwks(rsa_idp: Idp, verifiers: Callable[..., TokenVerifier]) -> None:
    with pytest.raises(RuntimeError, match="IMGPIPE_JWT_JWKS_URL"):
        verifiers(rsa_idp.url).issue("alice")


async def test_close_releases_the_session(
    rsa_idp: Idp, verifiers: Callable[..., TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifiers(rsa_idp.url)
    await verifier.verify(_signed(rsa_key, "rsa-1"))
    session = verifier.jwks._session  # type: ignore[union-attr]
    assert session is not None and not session.closed
    await verifier.close()
    assert session.closed


@pytest.mark.parametrize(
    ("env", "secret", "warned"),
    [("local", None, True), ("test", SECRET, False), ("local", SECRET, False)],
    ids=["local-dev-secret", "test", "local-own-secret"],
)
def test_the_development_secret_is_announced_in_local(
    env: str, secret: str | None, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """With it anyone can make any token, admin included: accepted in local only, and a service
    started so says it, once, where its operator looks."""
    settings = AuthSettings(env=env) if secret is None else AuthSettings(env=env, jwt_secret=secret)
    with caplog.at_level("WARNING", logger="imgpipe.auth"):
        TokenVerifier(settings)
    said = [r.getMessage() for r in caplog.records if "development JWT secret" in r.getMessage()]
    assert len(said) == (1 if warned else 0), said
