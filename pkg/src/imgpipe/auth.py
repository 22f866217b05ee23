"""Bearer-token authentication: JWTs verified with an explicit algorithm list and a required `exp`.

Two key sources, never both: a shared secret for HS256/384/512 (simple setups, development tokens),
or an identity provider's JSON Web Key Set (Auth0, Cognito, Keycloak) for RS*/ES*/PS256, fetched
with aiohttp, cached, and refreshed when it expires or when a token names a key id we do not know
(at most once per `IMGPIPE_JWT_JWKS_MIN_REFRESH_S`). A token whose key cannot be fetched because the
provider is unreachable is a 503 `auth_unavailable`, not a 401: the caller did nothing wrong.

The token's `sub` owns every job and upload it creates; its scope claim (`scope`, a space-separated
string, by default) carries `admin` for the admin routes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from imgpipe.settings import DEV_SECRET, AuthSettings

if TYPE_CHECKING:
    # pyjwt (and with it `cryptography`: 9-14 MB of resident memory) is imported by the functions
    # that check or make tokens, on first use, not with this module: the worker and the
    # reconciler import this module through `imgpipe.web` and never check a token.
    import jwt

log = logging.getLogger(__name__)

#: A JWKS is a few keys (a few KiB); anything much bigger is not one.
MAX_JWKS_BYTES = 256 * 1024
#: How long a verified token is trusted without checking it again (never past its `exp`).
VERIFIED_TTL_S = 60.0
#: Most verified tokens remembered at once (a few hundred bytes each).
VERIFIED_MAX = 10_000
#: An `exp` past this (year 33658) is taken as this: no float holds some integers a token may carry.
_FAR_FUTURE_S = 10**12


class AuthError(Exception):
    """The request is not authenticated (401) or not allowed (403)."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.headers: dict[str, str] = {}


class AuthUnavailable(AuthError):
    """The token could not be checked: the identity provider's keys are out of reach (503)."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__("auth_unavailable", message, status=503)
        self.headers["Retry-After"] = str(max(1, retry_after_s))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the subject that owns resources, and the scopes granted to it."""

    sub: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    #: When (epoch seconds) the token it came with stops being accepted: its `exp` plus the leeway.
    #: A request is done long before; a stream opened with it ends then (the status service's SSE).
    valid_until: float = field(default=math.inf, compare=False)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


class JwksError(Exception):
    """The key set could not be fetched or holds no usable key."""


class JwksKeys:
    """The public keys of a JWKS URL by `kid`: fetched lazily, cached, refreshed with a rate limit.

    Every fetch (on expiry, on an unknown `kid`, after a failure) waits at least `min_refresh_s`
    after the previous attempt, and concurrent callers share one fetch. A fetch runs in a task of
    its own, to its end even when the request that started it goes away (a client's disconnect
    cancels its handler): it counts as the attempt it is, so clients hanging up mid-fetch cannot
    make the service fetch again and again, and the keys it brings back serve the requests after.
    When a refresh fails the keys already known stay in use, so a short provider outage does not
    log everybody out.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_s: float,
        min_refresh_s: float,
        timeout_s: float,
        max_bytes: int = MAX_JWKS_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._cache_s = cache_s
        self._min_refresh_s = min_refresh_s
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._fetching: asyncio.Task[None] | None = None  # the fetch under way
        self._jwks: dict[str, dict[str, Any]] | None = None  # kid → the JWK as published
        self._parsed: dict[tuple[str, str], jwt.PyJWK] = {}  # (kid, alg) → key, for this key set
        self._fetched_at = 0.0
        self._attempted_at: float | None = None
        self._failing = False

    async def key(self, kid: str, algorithm: str) -> jwt.PyJWK:
        """The key `kid`, bound to `algorithm`; `AuthError` (401) or `AuthUnavailable` (503)."""
        stale_but_known = self._jwks is not None and kid in self._jwks
        if self._wanted(kid) and not (stale_but_known and self._fetching is not None):
            # A request arriving while a fetch is under way waits for its result instead of judging
            # the token against the old (or no) key set. A key we already hold does not wait for
            # somebody else's refresh: a slow provider must not slow every request.
            fetch = self._fetching
            if fetch is None and self._may_fetch():
                fetch = self._start_refresh(kid)
            if fetch is not None:
                await asyncio.shield(fetch)  # cancelled, this request stops waiting; the fetch goes on
        if self._jwks is None:
            raise self._unavailable()
        jwk = self._jwks.get(kid)
        if jwk is None:
            if self._failing:  # it may well be a new key we could not fetch
                raise self._unavailable()
            raise AuthError("invalid_token", "the token's key id (kid) is not in the key set")
        return self._bind(kid, jwk, algorithm)

    async def close(self) -> None:
        """Stop a fetch under way and close the HTTP session (opened on the first fetch)."""
        if self._fetching is not None:
            self._fetching.cancel()
            await asyncio.gather(self._fetching, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _wanted(self, kid: str) -> bool:
        """Whether the key set should be fetched: never fetched, expired, or without `kid`."""
        return (
            self._jwks is None or self._clock() - self._fetched_at >= self._cache_s or kid not in self._jwks
        )

    def _may_fetch(self) -> bool:
        return self._attempted_at is None or self._clock() - self._attempted_at >= self._min_refresh_s

    def _unavailable(self) -> AuthUnavailable:
        return AuthUnavailable(
            "the identity provider's keys cannot be fetched; retry later",
            retry_after_s=int(self._min_refresh_s + 0.999),
        )

    def _bind(self, kid: str, jwk: dict[str, Any], algorithm: str) -> jwt.PyJWK:
        import jwt  # on first use: see the note on the import at the top

        # The header's algorithm must be the one the key is published for (when it says), and must
        # fit the key's type: PyJWK refuses e.g. an EC key for RS256, or an RSA key for HS256.
        if jwk.get("alg") not in (None, algorithm):
            raise AuthError("invalid_token", f"the token's key is for {jwk['alg']}, not {algorithm}")
        key = self._parsed.get((kid, algorithm))
        if key is None:
            try:
                key = jwt.PyJWK(jwk, algorithm)
            except jwt.PyJWTError:
                raise AuthError("invalid_token", f"the token's key cannot be used with {algorithm}") from None
            self._parsed[(kid, algorithm)] = key
        return key

    def _start_refresh(self, kid: str) -> asyncio.Task[None]:
        """Start the one fetch, in a task of its own (see the class's docstring)."""
        if self._jwks is None:
            reason = "first use"
        elif kid in self._jwks:
            reason = "expired"
        else:
            reason = "unknown kid"
        self._attempted_at = self._clock()
        fetch = self._fetching = asyncio.ensure_future(self._refresh(reason))
        fetch.add_done_callback(self._fetched)
        return fetch

    def _fetched(self, fetch: asyncio.Task[None]) -> None:
        self._fetching = None
        if not fetch.cancelled() and fetch.exception() is not None:
            # Raised past `_refresh`'s own handling: a bug. The waiters get it; without any, it is logged.
            log.error("jwks refresh failed", exc_info=fetch.exception())

    async def _refresh(self, reason: str) -> None:
        """One fetch; on failure the keys already known are kept."""
        try:
            jwks = await self._fetch()
        except JwksError as exc:
            self._failing = True
            log.warning(
                "jwks fetch failed: %s",
                exc,
                extra={"jwks_url": self.url, "reason": reason, "keys_kept": len(self._jwks or {})},
            )
            return
        self._jwks, self._parsed = jwks, {}
        self._fetched_at = self._clock()
        self._failing = False
        log.info("jwks fetched", extra={"jwks_url": self.url, "reason": reason, "keys": len(jwks)})

    async def _fetch(self) -> dict[str, dict[str, Any]]:
        import jwt  # on first use: see the note on the import at the top

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                headers={"Accept": "application/json"},
            )
        try:
            async with asyncio.timeout(self._timeout_s):
                # No redirects: the configured https URL is the one we trust, not where it points.
                async with self._session.get(self.url, allow_redirects=False) as response:
                    if response.status != 200:
                        raise JwksError(f"HTTP {response.status}")
                    if (response.content_length or 0) > self._max_bytes:
                        raise JwksError(f"response over {self._max_bytes} bytes")
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(16 * 1024):
                        body += chunk
                        if len(body) > self._max_bytes:
                            raise JwksError(f"response over {self._max_bytes} bytes")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksError(f"{type(exc).__name__}: {exc}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise JwksError("the response is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise JwksError("the response has no 'keys' list")
        # Only signing keys with a kid, and only public-key types: a symmetric ("oct") key in a
        # JWKS would reopen the HS/RS confusion this module exists to prevent.
        candidates = [
            jwk
            for jwk in document["keys"]
            if isinstance(jwk, dict)
            and jwk.get("kty") in ("RSA", "EC")
            and jwk.get("use", "sig") == "sig"
            and isinstance(jwk.get("kid"), str)
            and jwk["kid"]
            # PyJWKSet looks the algorithm up in a dict: a list there raised TypeError (a 500).
            and isinstance(jwk.get("alg", ""), str)
        ]
        try:
            # PyJWKSet parses each key and drops those it cannot use.
            usable = jwt.PyJWKSet(candidates)  # type: ignore[arg-type]
        except jwt.PyJWTError as exc:
            raise JwksError(f"no usable key: {exc}") from None
        kids = {key.key_id for key in usable}
        jwks: dict[str, dict[str, Any]] = {}
        for jwk in candidates:
            if jwk["kid"] in kids:
                jwks.setdefault(jwk["kid"], jwk)  # the first of duplicate kids wins
        return jwks


class TokenVerifier:
    """Verifies bearer tokens against the configured keys, algorithms, audience and issuer.

    `verify` is a coroutine (a JWKS may have to be fetched); call `close` when the app stops.
    """

    def __init__(self, settings: AuthSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        import jwt  # on first use: see the note on the import at the top

        self._key = settings.jwt_secret.get_secret_value()
        self._algorithms = list(settings.jwt_algorithms)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_s
        self._scope_claim = settings.jwt_scope_claim
        self.jwks: JwksKeys | None = None
        # The secret as a ready key per HS* algorithm: handed a plain string, pyjwt re-checks on
        # every call that it is not a PEM or SSH key (a fifth of a token check's CPU).
        self._hmac_keys: dict[str, jwt.PyJWK] = {}
        # token -> (principal, its exp, when it was checked on `clock`)
        self._verified: dict[str, tuple[Principal, float, float]] = {}
        self._clock = clock
        if not settings.jwt_jwks_url:
            if self._key == DEV_SECRET and settings.env == "local":
                # Accepted in local only, and said so: anyone can mint any token with it, admin included.
                log.warning(
                    "IMGPIPE_ENV=local and the development JWT secret: anyone can make tokens for "
                    "this service; never expose it (the images default to IMGPIPE_ENV=production, "
                    "which refuses that secret)"
                )
            secret = base64.urlsafe_b64encode(self._key.encode()).rstrip(b"=").decode()
            self._hmac_keys = {alg: jwt.PyJWK({"kty": "oct", "k": secret}, alg) for alg in self._algorithms}
        if settings.jwt_jwks_url:
            self.jwks = JwksKeys(
                settings.jwt_jwks_url,
                cache_s=settings.jwt_jwks_cache_s,
                min_refresh_s=settings.jwt_jwks_min_refresh_s,
                timeout_s=settings.jwt_jwks_timeout_s,
                clock=clock,
            )

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; `AuthError` (401) or `AuthUnavailable` (503) otherwise.

        A token that verified is remembered (by its exact text, signature included) until its `exp`
        or for `VERIFIED_TTL_S`, whichever is sooner: clients send the same token with every
        request, and checking its signature again each time was a seventh of `POST /jobs`' CPU. The
        short bound keeps a key withdrawn from the JWKS from being honoured for more than a minute
        after the key set is fetched again (on first use once `jwt_jwks_cache_s` has passed).
        """
        known = self._verified.get(token)
        if known is not None:
            principal, exp, checked_at = known
            # `exp` is wall-clock time (as in the token); the bound runs on the verifier's clock.
            if time.time() < exp and self._clock() - checked_at < VERIFIED_TTL_S:
                return principal
            del self._verified[token]
        principal, exp = await self._verify(token)
        if len(self._verified) >= VERIFIED_MAX:
            # Oldest first (dicts keep insertion order): a flood of distinct tokens cannot grow it.
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, exp, self._clock())
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        import jwt  # on first use: see the note on the import at the top

        # A JWT is ASCII; a header's other bytes reach us as surrogates, which pyjwt cannot encode.
        if not token.isascii():
            raise AuthError("invalid_token", "the token is not valid: it is not ASCII")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            # pyjwt's reason quotes its decoders ("'utf-8' codec can't decode byte 0xb7 in position
            # 0"): what a client needs to know is what a token must look like.
            raise AuthError(
                "invalid_token", "the token is not a JWT: three base64url parts, the first a JSON header"
            ) from None
        except jwt.PyJWTError as exc:
            # A JWT, with a header pyjwt refuses ("Key ID header parameter must be a string").
            raise AuthError("invalid_token", f"the token is not valid: {exc}") from None
        algorithm = header.get("alg")
        # Checked before any key is looked up: `none`, HS* under a JWKS, anything not configured.
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise AuthError("invalid_token", f"the token's algorithm is not one of {self._algorithms}")
        if self.jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise AuthError("invalid_token", "the token has no key id (kid)")
            key = await self.jwks.key(kid, algorithm)
        else:
            key = self._hmac_keys[algorithm]
        claims = self._decode(token, key, algorithm)
        sub = claims.get("sub")
        # A JSON string may hold a lone surrogate (`"\ud800"`), which no UTF-8 key or hash can take.
        if not isinstance(sub, str) or not sub or len(sub) > 256 or not _is_unicode(sub):
            raise AuthError("invalid_token", "the token's sub must be 1 to 256 characters of Unicode text")
        # `exp` is required and pyjwt has checked it is in the future; but it takes a numeric string
        # too, and an integer no float holds (RFC 7519: a JSON number of seconds).
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float) or exp != exp:  # NaN
            raise AuthError("invalid_token", "the token's exp must be a number of seconds")
        exp = float(min(exp, _FAR_FUTURE_S))
        scopes = self._scopes(claims.get(self._scope_claim))
        return Principal(sub=sub, scopes=scopes, valid_until=exp + self._leeway), exp

    def _decode(self, token: str, key: jwt.PyJWK, algorithm: str) -> dict[str, Any]:
        import jwt  # on first use: see the note on the import at the top

        required = ["exp", "sub"]
        if self._audience:
            required.append("aud")
        if self._issuer:
            required.append("iss")
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": required,
                    # `aud` is checked even with no audience configured: a token that names one is
                    # for someone else then (another API of the tenant, an ID token's client), and
                    # RFC 7519 §4.1.3 has it refused.
                    # Short RSA keys from a key set are refused, not just warned about.
                    "enforce_minimum_key_length": self.jwks is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the token has expired") from None
        except jwt.InvalidAudienceError as exc:
            if self._audience is None:
                message = "the token is for an audience (`aud`), and this service is configured with none"
                raise AuthError("invalid_token", message) from None
            raise AuthError("invalid_token", f"the token is not valid: {exc}") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid_token", f"the token is not valid: {exc}") from None

    def _scopes(self, value: object) -> frozenset[str]:
        if isinstance(value, str):
            # Scopes are separated by spaces (RFC 6749 §3.3), and by nothing else: `str.split()`
            # would also split "read\u00a0admin" or "read\x1fadmin", and grant `admin`.
            return frozenset(scope for scope in value.split(" ") if scope)
        # `scope` is a space-separated string (RFC 8693 §4.2); other claims (Okta's `scp`) may be lists.
        if self._scope_claim != "scope" and isinstance(value, list):
            return frozenset(item for item in value if isinstance(item, str) and item and " " not in item)
        return frozenset()

    def issue(self, sub: str, *, scopes: str = "", ttl_s: int = 3600) -> str:
        """Mint a token with the configured secret (development and tests; production uses an IdP)."""
        import jwt  # on first use: see the note on the import at the top

        if self.jwks is not None:
            raise RuntimeError("tokens come from the identity provider when IMGPIPE_JWT_JWKS_URL is set")
        now = int(time.time())
        claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl_s}
        if scopes:
            claims[self._scope_claim] = scopes
        if self._audience:
            claims["aud"] = self._audience
        if self._issuer:
            claims["iss"] = self._issuer
        return jwt.encode(claims, self._key, algorithm=self._algorithms[0])

    async def close(self) -> None:
        """Release the JWKS client session, if one was opened."""
        if self.jwks is not None:
            await self.jwks.close()


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def bearer_token(authorization: str | None) -> str:
    """The token from an `Authorization: Bearer …` header value."""
    if not authorization:
        raise AuthError("missing_token", "an Authorization: Bearer token is required")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing_token", "the Authorization header must be 'Bearer <token>'")
    return token.strip()
