"""Configuration from the environment, one `BaseSettings` class per concern.

Every variable is documented in the README and `.env.example`. A bad value fails at start-up with
an error that names the exact variable (see `load`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from imgpipe.urlsafety import IPNetwork, parse_networks

#: Environments in which the development defaults are tolerated: http JWKS URLs, short HMAC keys,
#: the development token tool. The development JWT secret itself: in `local` only.
LOCAL_ENVIRONMENTS = frozenset({"local", "test"})
DEV_SECRET = "imgpipe-local-development-secret-change-me"  # refused outside local

#: Supported algorithms and the shortest key each may use.
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

Environment = Literal["local", "test", "staging", "production"]


def _config(prefix: str = "IMGPIPE_") -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, extra="ignore", frozen=True, populate_by_name=True)


class CommonSettings(BaseSettings):
    """What every service shares: where it runs and how it logs."""

    model_config = _config()

    env: Environment = "production"
    namespace: str = Field(default="imgpipe", pattern=r"^[a-z0-9][a-z0-9_.-]{0,47}$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _retry_delays(value: tuple[int, ...]) -> tuple[int, ...]:
    # Empty failed the first retry (nothing to wait), a negative one the queue's declare, both long
    # after start-up and without naming the variable.
    if not 1 <= len(value) <= 20 or not all(0 <= delay <= 86_400 for delay in value):
        raise ValueError("1 to 20 delays, each 0 to 86400 seconds")
    return value


#: `IMGPIPE_RETRY_DELAYS_S`: the back-off before each retry, in seconds; the last value repeats.
RetryDelays = Annotated[tuple[int, ...], AfterValidator(_retry_delays)]
#: `IMGPIPE_MAX_ATTEMPTS`: attempts (first delivery included) before a transiently failing job is
#: dead-lettered.
MaxAttempts = Annotated[int, Field(ge=1, le=50)]


def retry_delay(delays: tuple[int, ...], attempt: int) -> int:
    """The back-off before delivery number `attempt + 1`: the last configured delay repeats."""
    return delays[min(max(attempt, 1), len(delays)) - 1]


def _check_url(url: str, schemes: tuple[str, ...], shape: str) -> None:
    """Refuse a service URL its client would only refuse at the first call, or misread.

    Checked here so that the error names the variable (the clients' own errors, at the first
    connection, do not); the value is not repeated, as it may hold a password.
    """
    parts = urlsplit(url)
    if parts.scheme not in schemes or (parts.scheme != "unix" and not parts.hostname):
        raise ValueError(f"must be {shape}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError:
        raise ValueError(f"has a port that is not a number from 0 to 65535; must be {shape}") from None


class AmqpSettings(BaseSettings):
    model_config = _config()

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    max_attempts: MaxAttempts = 5
    retry_delays_s: RetryDelays = (1, 5, 30, 120)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        _check_url(
            value.get_secret_value(),
            ("amqp", "amqps"),
            "amqp://user:password@host[:port]/[vhost] or amqps://…",
        )
        return value


#: `.env.example` lists these empty; an empty value means the variable is not set.
_EMPTY_IS_UNSET = frozenset({"jwt_secret", "jwt_audience", "jwt_issuer", "jwt_jwks_url"})


class RedisSettings(BaseSettings):
    model_config = _config()

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    #: Connections per process; requests beyond it wait (up to 5 s) for a free one.
    redis_max_connections: int = Field(default=64, ge=2, le=10_000)
    #: How long a job record is kept after its last change.
    job_retention_days: int = Field(default=7, ge=1, le=3650)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        shape = "redis://[:password@]host[:port][/db], rediss://… or unix://…"
        url = value.get_secret_value()
        _check_url(url, ("redis", "rediss", "unix"), shape)
        # redis-py takes a database it cannot read as a number for database 0, silently: a typo
        # would put this deployment's keys beside another's.
        parts = urlsplit(url)
        if parts.scheme != "unix" and not re.fullmatch(r"/?(?:[0-9]{1,5})?", parts.path):
            raise ValueError(f"has a database that is not a number; must be {shape}")
        return value


class S3Settings(BaseSettings):
    model_config = _config()

    s3_endpoint_url: str | None = None
    #: Endpoint written into presigned URLs when clients reach S3 by another name than the services
    #: do (compose: services use http://minio:9000, browsers http://localhost:9000).
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "imgpipe"
    #: The bucket's region. `IMGPIPE_S3_REGION` first: on EKS, the pod identity webhook sets
    #: `AWS_REGION` to the cluster's region in each container's own `env`, which wins over the
    #: chart's ConfigMap, and a bucket elsewhere would be signed for the wrong region.
    aws_region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("IMGPIPE_S3_REGION", "AWS_REGION")
    )
    aws_access_key_id: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID")
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY")
    )
    #: With temporary keys (`ASIA…`: `aws sts assume-role`, a CI's OIDC role): boto3 reads it only
    #: when it finds the keys itself, and keys passed to it come without it.
    aws_session_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SESSION_TOKEN")
    )
    #: Path-style addressing (MinIO, moto); virtual-hosted style on AWS.
    s3_force_path_style: bool = False
    presign_ttl_s: int = Field(default=900, ge=60, le=7 * 24 * 3600)
    download_url_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)

    @field_validator("s3_endpoint_url", "s3_public_endpoint_url", mode="before")
    @classmethod
    def _endpoint(cls, value: object) -> object:
        if value == "":  # `.env.example` lists both empty: unset, i.e. AWS
            return None
        if isinstance(value, str):
            _check_url(value, ("http", "https"), "http(s)://host[:port], or empty for AWS")
            if "@" in urlsplit(value).netloc:
                # The keys are AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; a public endpoint's
                # user and password would be written into every link handed to a client.
                raise ValueError("must not hold a user or password: http(s)://host[:port]")
        return value


class AuthSettings(BaseSettings):
    """How bearer tokens are verified: HS* with a shared secret, or RS*/ES*/PS256 with an IdP's JWKS."""

    model_config = _config()

    env: Environment = "production"
    jwt_secret: SecretStr = SecretStr(DEV_SECRET)
    #: Defaults to ["HS256"], or ["RS256"] when IMGPIPE_JWT_JWKS_URL is set (see `_default_algorithms`).
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: int = Field(default=30, ge=0, le=300)
    #: The identity provider's JSON Web Key Set; when set, tokens are verified with its public keys
    #: (and IMGPIPE_JWT_SECRET is not used).
    jwt_jwks_url: str | None = None
    #: How long a fetched key set is used before it is fetched again.
    jwt_jwks_cache_s: int = Field(default=300, ge=1, le=86_400)
    #: Fewest seconds between two fetches forced by an unknown `kid` (or retried after a failure), so
    #: tokens with made-up key ids cannot make us hammer the identity provider.
    jwt_jwks_min_refresh_s: int = Field(default=10, ge=1, le=3600)
    jwt_jwks_timeout_s: float = Field(default=5.0, gt=0, le=60)
    #: The claim holding the scopes: `scope` (a space-separated string, RFC 8693) or e.g. `scp`.
    jwt_scope_claim: str = Field(default="scope", pattern=r"^[A-Za-z_][A-Za-z0-9_:.-]{0,63}$")

    @model_validator(mode="before")
    @classmethod
    def _default_algorithms(cls, data: object) -> object:
        # The default algorithm follows the key source: HS256 with a secret, RS256 (what Auth0,
        # Cognito and Keycloak sign with) with a JWKS. An empty variable means unset.
        if not isinstance(data, dict):
            return data
        # An empty audience or issuer demanded an empty claim of every token (each one a 401), not
        # none; an empty secret keyed HS256 with no key at all, so anyone could mint a local token.
        data = {k: v for k, v in data.items() if not (k in _EMPTY_IS_UNSET and v == "")}
        if not data.get("jwt_jwks_url"):
            return {k: v for k, v in data.items() if k != "jwt_jwks_url"}
        if "jwt_algorithms" not in data:
            return {**data, "jwt_algorithms": ("RS256",)}
        return data

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> AuthSettings:
        if any(alg.lower() == "none" for alg in self.jwt_algorithms):
            raise ValueError("IMGPIPE_JWT_ALGORITHMS may not contain 'none'")
        if not self.jwt_algorithms:
            raise ValueError("IMGPIPE_JWT_ALGORITHMS may not be empty")
        public_key_algorithms = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
        if self.jwt_jwks_url:
            shared = [alg for alg in self.jwt_algorithms if alg in _HMAC_KEY_BYTES]
            if shared:
                # HS/RS confusion by configuration: an HMAC algorithm beside public keys invites
                # tokens "signed" with a public key used as the shared secret.
                raise ValueError(
                    f"IMGPIPE_JWT_ALGORITHMS may not contain {shared} when IMGPIPE_JWT_JWKS_URL is set; "
                    f"use only {list(public_key_algorithms)}"
                )
            unknown = [alg for alg in self.jwt_algorithms if alg not in public_key_algorithms]
            if unknown:
                raise ValueError(
                    f"IMGPIPE_JWT_ALGORITHMS must be among {list(public_key_algorithms)} "
                    "when IMGPIPE_JWT_JWKS_URL is set"
                )
            if self.env not in LOCAL_ENVIRONMENTS and not self.jwt_issuer:
                # A key set signs for every client, and every tenant, of the identity provider; the
                # issuer is what ties a token to ours.
                raise ValueError(
                    f"IMGPIPE_JWT_ISSUER must be set (the identity provider's `iss`) when "
                    f"IMGPIPE_JWT_JWKS_URL is set and IMGPIPE_ENV={self.env}"
                )
            schemes = "https?" if self.env in LOCAL_ENVIRONMENTS else "https"
            if not re.match(rf"^{schemes}://[^/?#@\s]+(?:[/?][^\s]*)?$", self.jwt_jwks_url):
                raise ValueError(
                    f"IMGPIPE_JWT_JWKS_URL must be an {'http(s)' if schemes == 'https?' else 'https'}:// "
                    f"URL when IMGPIPE_ENV={self.env}"
                )
            return self
        unknown = [alg for alg in self.jwt_algorithms if alg not in _HMAC_KEY_BYTES]
        if unknown:
            raise ValueError(
                f"IMGPIPE_JWT_ALGORITHMS must be among {sorted(_HMAC_KEY_BYTES)}, keyed by "
                f"IMGPIPE_JWT_SECRET; {unknown} need public keys from IMGPIPE_JWT_JWKS_URL"
            )
        # RFC 7518 §3.2: an HMAC key at least as long as the hash.
        minimum = max(_HMAC_KEY_BYTES[alg] for alg in self.jwt_algorithms)
        secret = self.jwt_secret.get_secret_value()
        if secret == DEV_SECRET and self.env != "local":
            # In the repository, so anyone can mint any token with it, admin included: tolerated
            # only where the services say so at start (`local`). The test suite has its own.
            raise ValueError(
                f"IMGPIPE_JWT_SECRET must be set (the development secret is for IMGPIPE_ENV=local only) "
                f"when IMGPIPE_ENV={self.env}"
            )
        if self.env not in LOCAL_ENVIRONMENTS and len(secret.encode()) < minimum:
            raise ValueError(
                f"IMGPIPE_JWT_SECRET must be set to a random value of at least {minimum} bytes "
                f"when IMGPIPE_ENV={self.env}"
            )
        return self


class LimitSettings(BaseSettings):
    """Bounds on what clients may send; the worker enforces the same byte limit on sources."""

    model_config = _config()

    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=100_000_000, ge=1)
    max_frames: int = Field(default=256, ge=1)
    #: Per-user budgets, shared by every api replica through Redis (see `imgpipe.limits`); 0 = none.
    #: A budget refills steadily: all of it may be spent at once, then one more per period/N.
    rate_jobs_per_minute: int = Field(default=120, ge=0, le=1_000_000)
    rate_uploads_per_hour: int = Field(default=1000, ge=0, le=10_000_000)
    #: Jobs a user may have pending or processing at once; 0 = no limit.
    max_active_jobs: int = Field(default=100, ge=0, le=1_000_000)


S = TypeVar("S", bound=BaseSettings)


class ConfigError(RuntimeError):
    """Configuration that cannot work; the message names the variables."""


def load(cls: type[S]) -> S:
    """Instantiate a settings class, turning validation errors into one readable `ConfigError`."""
    prefix = cls.model_config.get("env_prefix", "")

    def variable(field: str) -> str:
        aliases = {
            str(choice)
            for info in cls.model_fields.values()
            if isinstance(info.validation_alias, AliasChoices)
            for choice in info.validation_alias.choices
        }
        if field in aliases:  # pydantic reports an aliased field under the alias it was read from
            return field
        info = cls.model_fields.get(field)
        alias = info.validation_alias if info else None
        if isinstance(alias, AliasChoices):
            return str(alias.choices[0])
        return f"{prefix}{field}".upper() if field else cls.__name__

    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            problems.append(f"{variable(field)}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    except SettingsError as exc:
        # A complex field (tuple, list) whose value is not JSON fails before validation.
        match = re.search(r'field "([^"]+)"', str(exc))
        field = match.group(1) if match else ""
        raise ConfigError(f"invalid configuration: {variable(field)}: not valid JSON") from None


def _parse_ports(value: str) -> frozenset[int] | None:
    if value.strip() == "*":
        return None
    ports = set()
    for item in value.split(","):
        item = item.strip()
        if not item.isascii() or not item.isdigit() or not 0 < int(item) <= 65535:
            raise ValueError(f"{item!r} is not a port (1-65535); list ports with commas, or `*` for any")
        ports.add(int(item))
    return frozenset(ports)


class UrlSourceSettings(BaseSettings):
    """Which URL sources the worker may fetch (everything public by default; never private ranges)."""

    model_config = _config()

    #: Comma-separated host names (or `*.example.com`); empty means any public host.
    url_allowed_hosts: str = ""
    #: Comma-separated CIDRs exempted from the private-address block (an internal image host).
    url_allowed_networks: str = ""
    #: Comma-separated ports a URL may name (or imply by its scheme); `*` for any.
    url_allowed_ports: str = "80,443"
    url_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    url_connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    url_total_timeout_s: float = Field(default=20.0, gt=0, le=300)

    @field_validator("url_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        parse_networks(value)  # a mistake stops the service at start, not each URL job
        return value

    @field_validator("url_allowed_ports")
    @classmethod
    def _ports_parse(cls, value: str) -> str:
        _parse_ports(value)
        return value

    def ports(self) -> frozenset[int] | None:
        """The allowed ports (None: any)."""
        return _parse_ports(self.url_allowed_ports)

    def hosts(self) -> tuple[str, ...] | None:
        hosts = tuple(h.strip().lower() for h in self.url_allowed_hosts.split(",") if h.strip())
        return hosts or None

    def networks(self) -> tuple[IPNetwork, ...]:
        """The exempted networks, parsed (the validator above has already refused a bad list)."""
        return tuple(parse_networks(self.url_allowed_networks))
