"""Bearer tokens: only well-formed, correctly signed, unexpired HS256 tokens with a subject pass."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from imgpipe.auth import AuthError, Principal, TokenVerifier, bearer_token
from imgpipe.settings import AuthSettings

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


def _rejected(verifier: TokenVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert info.value.status == 401
    return info.value


def test_valid_token() -> None:
    principal = _verifier().verify(_token(_claims(scope="read admin")))
    assert principal == Principal(sub="alice", scopes=frozenset({"read", "admin"}))
    assert principal.is_admin


def test_token_without_scope_is_not_admin() -> None:
    principal = _verifier().verify(_token(_claims()))
    assert principal == Principal(sub="alice")
    assert not principal.is_admin
    assert not _verifier().verify(_token(_claims(scope="administrator"))).is_admin
    assert not _verifier().verify(_token(_claims(scope=["admin"]))).is_admin


def test_issue_round_trips() -> None:
    verifier = _verifier(jwt_audience="imgpipe", jwt_issuer="https://idp.example")
    principal = verifier.verify(verifier.issue("bob", scopes="admin"))
    assert principal == Principal("bob", frozenset({"admin"}))


def test_expired_token() -> None:
    error = _rejected(_verifier(), _token(_claims(exp=int(time.time()) - 3600)))
    assert error.code == "token_expired"


def test_missing_exp_is_invalid() -> None:
    claims = _claims()
    del claims["exp"]
    error = _rejected(_verifier(), _token(claims))
    assert error.code == "invalid_token"
    assert "exp" in error.message


@pytest.mark.parametrize("sub", [None, "", 42, "x" * 257])
def test_missing_or_bad_sub_is_invalid(sub: object) -> None:
    claims = _claims()
    if sub is None:
        del claims["sub"]
    else:
        claims["sub"] = sub
    assert _rejected(_verifier(), _token(claims)).code == "invalid_token"


def test_alg_none_is_invalid() -> None:
    token = f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(_claims())}."
    assert _rejected(_verifier(), token).code == "invalid_token"


def test_alg_none_with_a_signature_is_invalid() -> None:
    header, payload = _segment({"alg": "none"}), _segment(_claims())
    signature = _b64(hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert _rejected(_verifier(), f"{header}.{payload}.{signature}").code == "invalid_token"


def test_other_secret_is_invalid() -> None:
    assert _rejected(_verifier(), _token(_claims(), key="another-secret-" + "y" * 64)).code == "invalid_token"


def test_tampered_payload_is_invalid() -> None:
    header, _, signature = _token(_claims(sub="alice")).split(".")
    forged = f"{header}.{_segment(_claims(sub='admin', scope='admin'))}.{signature}"
    assert _rejected(_verifier(), forged).code == "invalid_token"


def test_tampered_signature_is_invalid() -> None:
    token = _token(_claims())
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert _rejected(_verifier(), flipped).code == "invalid_token"


def test_algorithm_not_in_the_list_is_invalid() -> None:
    token = _token(_claims(), algorithm="HS512")
    assert _rejected(_verifier(), token).code == "invalid_token"
    # ...and the same token passes where HS512 is allowed: the refusal was the algorithm list.
    assert _verifier(jwt_algorithms=("HS256", "HS512")).verify(token).sub == "alice"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rs256_token_is_invalid(rsa_key: rsa.RSAPrivateKey) -> None:
    assert _rejected(_verifier(), _token(_claims(), key=rsa_key, algorithm="RS256")).code == "invalid_token"


def test_hs_rs_confusion_is_invalid(rsa_key: rsa.RSAPrivateKey) -> None:
    """An HS256 token keyed with a public key PEM (what a confused verifier would use) fails."""
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header, payload = _segment({"alg": "HS256", "typ": "JWT"}), _segment(_claims(scope="admin"))
    signature = _b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert _rejected(_verifier(), f"{header}.{payload}.{signature}").code == "invalid_token"


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
def test_audience_and_issuer_enforced_when_configured(extra: dict, ok: bool) -> None:
    verifier = _verifier(jwt_audience="imgpipe", jwt_issuer="https://idp.example")
    token = _token(_claims(**extra))
    if ok:
        assert verifier.verify(token).sub == "alice"
    else:
        assert _rejected(verifier, token).code == "invalid_token"


def test_audience_ignored_when_not_configured() -> None:
    assert _verifier().verify(_token(_claims(aud="anything", iss="anyone"))).sub == "alice"


def test_leeway() -> None:
    now = int(time.time())
    assert _verifier(jwt_leeway_s=30).verify(_token(_claims(exp=now - 10))).sub == "alice"
    assert _rejected(_verifier(jwt_leeway_s=30), _token(_claims(exp=now - 60))).code == "token_expired"
    assert _rejected(_verifier(jwt_leeway_s=0), _token(_claims(exp=now - 10))).code == "token_expired"


def test_not_yet_valid_is_invalid() -> None:
    now = int(time.time())
    assert _rejected(_verifier(), _token(_claims(nbf=now + 600))).code == "invalid_token"
    assert _verifier().verify(_token(_claims(nbf=now + 10))).sub == "alice"  # within the leeway


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9..x"])
def test_garbage_is_invalid(garbage: str) -> None:
    assert _rejected(_verifier(), garbage).code == "invalid_token"


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
