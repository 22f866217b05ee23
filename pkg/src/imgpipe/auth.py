"""Bearer-token authentication: JWTs verified with an explicit algorithm list and a required `exp`.

The token's `sub` owns every job and upload it creates; its space-separated `scope` claim carries
`admin` for the admin routes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jwt

from imgpipe.settings import AuthSettings


class AuthError(Exception):
    """The request is not authenticated (401) or not allowed (403)."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Principal:
    """Who is calling: the subject that owns resources, and the scopes granted to it."""

    sub: str
    scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


class TokenVerifier:
    """Verifies bearer tokens against the configured key, algorithms, audience and issuer."""

    def __init__(self, settings: AuthSettings) -> None:
        self._key = settings.jwt_secret.get_secret_value()
        self._algorithms = list(settings.jwt_algorithms)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_s

    def verify(self, token: str) -> Principal:
        required = ["exp", "sub"]
        if self._audience:
            required.append("aud")
        if self._issuer:
            required.append("iss")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": required, "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError("invalid_token", f"the token is not valid: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise AuthError("invalid_token", "the token's sub must be a non-empty string")
        scope = claims.get("scope", "")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        return Principal(sub=sub, scopes=scopes)

    def issue(self, sub: str, *, scopes: str = "", ttl_s: int = 3600) -> str:
        """Mint a token with the configured key (development and tests; production uses an IdP)."""
        now = int(time.time())
        claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl_s}
        if scopes:
            claims["scope"] = scopes
        if self._audience:
            claims["aud"] = self._audience
        if self._issuer:
            claims["iss"] = self._issuer
        return jwt.encode(claims, self._key, algorithm=self._algorithms[0])


def bearer_token(authorization: str | None) -> str:
    """The token from an `Authorization: Bearer …` header value."""
    if not authorization:
        raise AuthError("missing_token", "an Authorization: Bearer token is required")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing_token", "the Authorization header must be 'Bearer <token>'")
    return token.strip()
