"""Settings from the environment: defaults, overrides, and errors that name the variable."""

from __future__ import annotations

import pytest
from imgpipe.auth import TokenVerifier
from imgpipe.settings import (
    DEV_SECRET,
    AmqpSettings,
    AuthSettings,
    CommonSettings,
    ConfigError,
    RedisSettings,
    S3Settings,
    UrlSourceSettings,
    load,
)
from pydantic import AliasChoices, Field

pytestmark = pytest.mark.usefixtures("clean_env")


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    common = load(CommonSettings)
    assert (common.env, common.namespace, common.log_level) == ("production", "imgpipe", "INFO")
    # Production unless told otherwise: a service started by hand without its configuration refuses
    # the development secret, which is in this repository, instead of trusting tokens signed with it.
    with pytest.raises(ConfigError, match="IMGPIPE_JWT_SECRET"):
        load(AuthSettings)
    monkeypatch.setenv("IMGPIPE_ENV", "local")
    amqp = load(AmqpSettings)
    assert amqp.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert amqp.max_attempts == 5
    assert amqp.retry_delays_s == (1, 5, 30, 120)
    redis = load(RedisSettings)
    assert redis.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert redis.job_retention_days == 7
    s3 = load(S3Settings)
    assert s3.aws_region == "us-east-1"
    assert s3.aws_access_key_id is None
    assert s3.s3_bucket == "imgpipe"
    auth = load(AuthSettings)
    assert auth.jwt_algorithms == ("HS256",)
    assert auth.jwt_leeway_s == 30


def test_secrets_are_not_shown_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_AMQP_URL", "amqp://user:hunter2@mq:5672/")
    assert "hunter2" not in repr(load(AmqpSettings))


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "staging")
    monkeypatch.setenv("IMGPIPE_JWT_SECRET", "s" * 48)  # HS384 is among the algorithms: 48 bytes
    monkeypatch.setenv("IMGPIPE_NAMESPACE", "tenant-a.prod")
    monkeypatch.setenv("IMGPIPE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("IMGPIPE_AMQP_URL", "amqp://u:p@mq:5672/vh")
    monkeypatch.setenv("IMGPIPE_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("IMGPIPE_RETRY_DELAYS_S", "[2, 4]")
    monkeypatch.setenv("IMGPIPE_REDIS_URL", "redis://cache:6380/3")
    monkeypatch.setenv("IMGPIPE_JOB_RETENTION_DAYS", "30")
    monkeypatch.setenv("IMGPIPE_S3_BUCKET", "pics")
    monkeypatch.setenv("IMGPIPE_S3_FORCE_PATH_STYLE", "true")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shh")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdz")
    monkeypatch.setenv("IMGPIPE_JWT_ALGORITHMS", '["HS256", "HS384"]')
    monkeypatch.setenv("IMGPIPE_JWT_AUDIENCE", "imgpipe-api")

    common = load(CommonSettings)
    assert (common.env, common.namespace, common.log_level) == ("staging", "tenant-a.prod", "DEBUG")
    amqp = load(AmqpSettings)
    assert amqp.amqp_url.get_secret_value() == "amqp://u:p@mq:5672/vh"
    assert (amqp.max_attempts, amqp.retry_delays_s) == (7, (2, 4))
    redis = load(RedisSettings)
    assert redis.redis_url.get_secret_value() == "redis://cache:6380/3"
    assert redis.job_retention_days == 30
    s3 = load(S3Settings)
    assert (s3.s3_bucket, s3.s3_force_path_style, s3.aws_region) == ("pics", True, "eu-west-3")
    assert s3.aws_access_key_id is not None and s3.aws_access_key_id.get_secret_value() == "AKIAEXAMPLE"
    assert s3.aws_secret_access_key is not None and s3.aws_secret_access_key.get_secret_value() == "shh"
    assert s3.aws_session_token is not None and s3.aws_session_token.get_secret_value() == "FwoGZXIvYXdz"
    auth = load(AuthSettings)
    assert auth.jwt_algorithms == ("HS256", "HS384")
    assert auth.jwt_audience == "imgpipe-api"


@pytest.mark.parametrize(
    ("cls", "variable", "value"),
    [
        (CommonSettings, "IMGPIPE_NAMESPACE", "Has Spaces"),
        (CommonSettings, "IMGPIPE_NAMESPACE", "a:b"),
        (CommonSettings, "IMGPIPE_ENV", "prod"),
        (CommonSettings, "IMGPIPE_LOG_LEVEL", "LOUD"),
        (AmqpSettings, "IMGPIPE_MAX_ATTEMPTS", "0"),
        (AmqpSettings, "IMGPIPE_MAX_ATTEMPTS", "many"),
        (AmqpSettings, "IMGPIPE_RETRY_DELAYS_S", "soon"),
        (AmqpSettings, "IMGPIPE_RETRY_DELAYS_S", "[]"),  # the first retry failed on it
        (AmqpSettings, "IMGPIPE_RETRY_DELAYS_S", "[1, -5]"),  # the queue's declare failed on it
        (RedisSettings, "IMGPIPE_JOB_RETENTION_DAYS", "0"),
        (RedisSettings, "IMGPIPE_REDIS_URL", "redis//:pw@127.0.0.1:6379/15"),  # a missing colon
        (RedisSettings, "IMGPIPE_REDIS_URL", "http://127.0.0.1:6379/0"),
        (RedisSettings, "IMGPIPE_REDIS_MAX_CONNECTIONS", "1"),
        (RedisSettings, "IMGPIPE_REDIS_URL", "redis://:pw@127.0.0.1:99999/0"),  # a ValueError at first use
        (RedisSettings, "IMGPIPE_REDIS_URL", "redis://:pw@127.0.0.1:6379/1x"),  # redis-py used db 0
        (AmqpSettings, "IMGPIPE_AMQP_URL", "http://guest:pw@127.0.0.1:5672/"),  # retried forever
        (AmqpSettings, "IMGPIPE_AMQP_URL", "amqp://guest:pw@127.0.0.1:56720000/"),
        (AmqpSettings, "IMGPIPE_AMQP_URL", "127.0.0.1:5672"),
        (S3Settings, "IMGPIPE_S3_ENDPOINT_URL", "minio:9000"),  # botocore's "Invalid endpoint"
        (S3Settings, "IMGPIPE_S3_ENDPOINT_URL", "http://minio:90000"),
        (S3Settings, "IMGPIPE_S3_PUBLIC_ENDPOINT_URL", "localhost:9000"),
        (S3Settings, "IMGPIPE_S3_PUBLIC_ENDPOINT_URL", "https://user:pw@s3.example"),  # in every link
        (S3Settings, "IMGPIPE_S3_ENDPOINT_URL", "http://minio:pw@minio:9000"),
        (S3Settings, "IMGPIPE_PRESIGN_TTL_S", "5"),
        (S3Settings, "IMGPIPE_S3_FORCE_PATH_STYLE", "maybe"),
        (AuthSettings, "IMGPIPE_JWT_LEEWAY_S", "-1"),
        (AuthSettings, "IMGPIPE_JWT_JWKS_CACHE_S", "0"),
        (AuthSettings, "IMGPIPE_JWT_JWKS_MIN_REFRESH_S", "0"),
        (AuthSettings, "IMGPIPE_JWT_JWKS_TIMEOUT_S", "0"),
        (AuthSettings, "IMGPIPE_JWT_SCOPE_CLAIM", "two words"),
        (UrlSourceSettings, "IMGPIPE_URL_ALLOWED_NETWORKS", "10.1.2.3/8"),
        (UrlSourceSettings, "IMGPIPE_URL_ALLOWED_NETWORKS", "127.0.0.0/8, intranet"),
        (UrlSourceSettings, "IMGPIPE_URL_ALLOWED_PORTS", "80,https"),
        (UrlSourceSettings, "IMGPIPE_URL_ALLOWED_PORTS", "0"),
        (UrlSourceSettings, "IMGPIPE_URL_ALLOWED_PORTS", "65536"),
        (UrlSourceSettings, "IMGPIPE_URL_ALLOWED_PORTS", ""),
    ],
)
def test_load_names_the_bad_variable(
    monkeypatch: pytest.MonkeyPatch, cls: type, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load(cls)
    message = str(info.value)
    assert message.startswith(f"invalid configuration: {variable}: "), message
    assert "validation error" not in message  # one readable line, not pydantic's dump
    assert ":pw@" not in message  # a URL's password is not repeated


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMGPIPE_AMQP_URL", "amqps://u:p@mq.example:5671/vh?heartbeat=30"),
        ("IMGPIPE_REDIS_URL", "rediss://:p@cache.example:6380/15?ssl_cert_reqs=required"),
        ("IMGPIPE_REDIS_URL", "redis://cache"),
        ("IMGPIPE_REDIS_URL", "unix:///run/redis.sock?db=2"),
        ("IMGPIPE_S3_ENDPOINT_URL", "http://minio:9000"),
        ("IMGPIPE_S3_PUBLIC_ENDPOINT_URL", "https://s3.example/prefix"),
    ],
)
def test_service_urls_of_every_shape_accepted(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    for cls in (AmqpSettings, RedisSettings, S3Settings):
        load(cls)


def test_empty_s3_endpoints_mean_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    # `.env.example` lists both empty; botocore refused "" as an endpoint when the client was made.
    monkeypatch.setenv("IMGPIPE_S3_ENDPOINT_URL", "")
    monkeypatch.setenv("IMGPIPE_S3_PUBLIC_ENDPOINT_URL", "")
    settings = load(S3Settings)
    assert (settings.s3_endpoint_url, settings.s3_public_endpoint_url) == (None, None)


def test_load_names_every_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_MAX_ATTEMPTS", "0")
    monkeypatch.setenv("IMGPIPE_RETRY_DELAYS_S", '["x"]')
    with pytest.raises(ConfigError) as info:
        load(AmqpSettings)
    assert "IMGPIPE_MAX_ATTEMPTS: " in str(info.value)
    assert "IMGPIPE_RETRY_DELAYS_S: " in str(info.value)


def test_the_bucket_region_is_read_from_imgpipe_s3_region_before_aws_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On EKS the pod identity webhook puts the cluster's region into AWS_REGION, in the container's
    own env, which wins over the chart's ConfigMap: the chart's setting has a name of its own."""
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert load(S3Settings).aws_region == "us-west-2"  # alone (compose, a shell), still read
    monkeypatch.setenv("IMGPIPE_S3_REGION", "eu-central-1")
    assert load(S3Settings).aws_region == "eu-central-1"


def test_load_names_an_aliased_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field read from AWS_REGION is reported as AWS_REGION, not as IMGPIPE_AWS_REGION."""

    class Regional(S3Settings):
        aws_region: str = Field(
            default="us-east-1", pattern=r"^[a-z]{2}-[a-z]+-\d$", validation_alias=AliasChoices("AWS_REGION")
        )

    monkeypatch.setenv("AWS_REGION", "not a region")
    with pytest.raises(ConfigError) as info:
        load(Regional)
    assert str(info.value).startswith("invalid configuration: AWS_REGION: ")


@pytest.mark.parametrize("secret", [None, "", DEV_SECRET, "short-but-not-default", "x" * 31])
@pytest.mark.parametrize("env", ["production", "staging"])
def test_weak_jwt_secret_refused_outside_local(
    monkeypatch: pytest.MonkeyPatch, env: str, secret: str | None
) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", env)
    if secret is not None:
        monkeypatch.setenv("IMGPIPE_JWT_SECRET", secret)
    with pytest.raises(ConfigError) as info:
        load(AuthSettings)
    message = str(info.value)
    assert "IMGPIPE_JWT_SECRET" in message
    assert "IMGPIPE_ENV=" + env in message
    if secret:
        assert secret not in message


def test_strong_jwt_secret_accepted_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "production")
    monkeypatch.setenv("IMGPIPE_JWT_SECRET", "s" * 32)
    settings = load(AuthSettings)
    assert settings.env == "production"
    assert settings.jwt_secret.get_secret_value() == "s" * 32


def test_default_jwt_secret_tolerated_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "local")
    assert load(AuthSettings).jwt_secret.get_secret_value() == DEV_SECRET


@pytest.mark.parametrize("secret", [None, DEV_SECRET])
def test_default_jwt_secret_refused_in_test(monkeypatch: pytest.MonkeyPatch, secret: str | None) -> None:
    """`test` tolerates what `local` does but this: a deployment called `test` (the chart allows the
    name) whose secret was left out took the development one, which is in the repository, silently."""
    monkeypatch.setenv("IMGPIPE_ENV", "test")
    if secret is not None:
        monkeypatch.setenv("IMGPIPE_JWT_SECRET", secret)
    with pytest.raises(ConfigError, match=r"IMGPIPE_JWT_SECRET must be set .* when IMGPIPE_ENV=test"):
        load(AuthSettings)
    monkeypatch.setenv("IMGPIPE_JWT_SECRET", "short")  # what test keeps: no length rule
    assert load(AuthSettings).jwt_secret.get_secret_value() == "short"


def test_an_empty_jwt_secret_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # `.env.example` lists IMGPIPE_JWT_SECRET empty: copied as is, it must not key HS256 with no key
    # (where any token could be forged), but mean the development default, as if it were not there.
    monkeypatch.setenv("IMGPIPE_ENV", "local")
    monkeypatch.setenv("IMGPIPE_JWT_SECRET", "")
    assert load(AuthSettings).jwt_secret.get_secret_value() == DEV_SECRET


@pytest.mark.parametrize("algorithms", ['["none"]', '["HS256", "none"]', '["NONE"]', '["None"]'])
def test_none_algorithm_refused(monkeypatch: pytest.MonkeyPatch, algorithms: str) -> None:
    monkeypatch.setenv("IMGPIPE_JWT_ALGORITHMS", algorithms)
    with pytest.raises(ConfigError, match="IMGPIPE_JWT_ALGORITHMS"):
        load(AuthSettings)


@pytest.mark.parametrize("algorithms", ['["RS256"]', '["HS256", "ES256"]', "[]"])
def test_algorithms_without_a_shared_secret_refused(monkeypatch: pytest.MonkeyPatch, algorithms: str) -> None:
    # RS/ES need a public key, not IMGPIPE_JWT_SECRET: verifying them with it could only ever fail.
    monkeypatch.setenv("IMGPIPE_JWT_ALGORITHMS", algorithms)
    with pytest.raises(ConfigError, match="IMGPIPE_JWT_ALGORITHMS"):
        load(AuthSettings)


@pytest.mark.parametrize(("algorithm", "minimum"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_secret_must_be_as_long_as_the_hash(
    monkeypatch: pytest.MonkeyPatch, algorithm: str, minimum: int
) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "production")
    monkeypatch.setenv("IMGPIPE_JWT_ALGORITHMS", f'["{algorithm}"]')
    monkeypatch.setenv("IMGPIPE_JWT_SECRET", "k" * (minimum - 1))
    with pytest.raises(ConfigError, match=f"IMGPIPE_JWT_SECRET.*at least {minimum} bytes"):
        load(AuthSettings)
    monkeypatch.setenv("IMGPIPE_JWT_SECRET", "k" * minimum)
    assert load(AuthSettings).jwt_algorithms == (algorithm,)


JWKS = "https://idp.example/.well-known/jwks.json"
ISSUER = "https://idp.example/"


@pytest.mark.parametrize("env", ["local", "production"])
def test_jwks_defaults_to_rs256_without_a_secret(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    # No IMGPIPE_JWT_SECRET in production: with a JWKS the shared secret is not used at all.
    monkeypatch.setenv("IMGPIPE_ENV", env)
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", JWKS)
    monkeypatch.setenv("IMGPIPE_JWT_ISSUER", ISSUER)
    settings = load(AuthSettings)
    assert settings.jwt_jwks_url == JWKS
    assert settings.jwt_algorithms == ("RS256",)
    assert (settings.jwt_jwks_cache_s, settings.jwt_jwks_min_refresh_s) == (300, 10)
    assert settings.jwt_scope_claim == "scope"


def test_jwks_accepts_public_key_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", JWKS)
    monkeypatch.setenv("IMGPIPE_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("IMGPIPE_JWT_ALGORITHMS", '["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]')
    assert len(load(AuthSettings).jwt_algorithms) == 6


@pytest.mark.parametrize("algorithms", ['["RS256", "HS256"]', '["HS256"]', '["HS512"]'])
def test_hmac_with_a_jwks_refused(monkeypatch: pytest.MonkeyPatch, algorithms: str) -> None:
    """HS/RS confusion by configuration: a shared-secret algorithm next to public keys."""
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", JWKS)
    monkeypatch.setenv("IMGPIPE_JWT_ALGORITHMS", algorithms)
    with pytest.raises(ConfigError) as info:
        load(AuthSettings)
    assert "IMGPIPE_JWT_ALGORITHMS" in str(info.value)
    assert "IMGPIPE_JWT_JWKS_URL" in str(info.value)


@pytest.mark.parametrize("algorithms", ['["ES512"]', '["EdDSA"]', '["none"]', "[]"])
def test_unsupported_algorithms_with_a_jwks_refused(monkeypatch: pytest.MonkeyPatch, algorithms: str) -> None:
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", JWKS)
    monkeypatch.setenv("IMGPIPE_JWT_ALGORITHMS", algorithms)
    with pytest.raises(ConfigError, match="IMGPIPE_JWT_ALGORITHMS"):
        load(AuthSettings)


@pytest.mark.parametrize("env", ["staging", "production"])
def test_jwks_must_be_https_outside_local(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", env)
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", "http://idp.example/jwks.json")
    monkeypatch.setenv("IMGPIPE_JWT_ISSUER", ISSUER)
    with pytest.raises(
        ConfigError, match=f"IMGPIPE_JWT_JWKS_URL must be an https:// URL when IMGPIPE_ENV={env}"
    ):
        load(AuthSettings)


@pytest.mark.parametrize("env", ["staging", "production"])
@pytest.mark.parametrize("issuer", [None, ""])
def test_jwks_needs_an_issuer_outside_local(
    monkeypatch: pytest.MonkeyPatch, env: str, issuer: str | None
) -> None:
    """A key set signs for every client and tenant of the identity provider: without an issuer to
    check, a token it issued for anything else (no `aud`, say a Cognito access token of another app
    client) was accepted."""
    monkeypatch.setenv("IMGPIPE_ENV", env)
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", JWKS)
    if issuer is not None:
        monkeypatch.setenv("IMGPIPE_JWT_ISSUER", issuer)
    with pytest.raises(ConfigError, match=f"IMGPIPE_JWT_ISSUER must be set .* IMGPIPE_ENV={env}"):
        load(AuthSettings)
    monkeypatch.setenv("IMGPIPE_ENV", "local")
    assert load(AuthSettings).jwt_issuer is None


@pytest.mark.parametrize("env", ["local", "test"])
def test_jwks_may_be_http_locally(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", env)
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", "http://127.0.0.1:8080/jwks.json")
    assert load(AuthSettings).jwt_jwks_url == "http://127.0.0.1:8080/jwks.json"


@pytest.mark.parametrize(
    "url",
    ["ftp://idp.example/jwks.json", "idp.example/jwks.json", "https://", "https://user:pw@idp.example/"],
)
def test_jwks_url_must_be_a_url(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "test")
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", url)
    with pytest.raises(ConfigError, match="IMGPIPE_JWT_JWKS_URL"):
        load(AuthSettings)


def test_empty_jwks_url_means_the_shared_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "local")  # the development secret
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", "")
    settings = load(AuthSettings)
    assert settings.jwt_jwks_url is None
    assert settings.jwt_algorithms == ("HS256",)


async def test_empty_audience_and_issuer_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """As `.env.example` writes them: an empty value demanded an empty claim, a 401 for every token."""
    monkeypatch.setenv("IMGPIPE_ENV", "local")  # the development secret
    monkeypatch.setenv("IMGPIPE_JWT_AUDIENCE", "")
    monkeypatch.setenv("IMGPIPE_JWT_ISSUER", "")
    settings = load(AuthSettings)
    assert (settings.jwt_audience, settings.jwt_issuer) == (None, None)
    verifier = TokenVerifier(settings)
    assert (await verifier.verify(verifier.issue("alice"))).sub == "alice"


def test_default_secret_still_refused_without_a_jwks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_ENV", "production")
    monkeypatch.setenv("IMGPIPE_JWT_JWKS_URL", "")
    with pytest.raises(ConfigError, match="IMGPIPE_JWT_SECRET"):
        load(AuthSettings)


def test_url_ports_are_80_and_443_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(UrlSourceSettings).ports() == {80, 443}
    monkeypatch.setenv("IMGPIPE_URL_ALLOWED_PORTS", " 443, 8443 ")
    assert load(UrlSourceSettings).ports() == {443, 8443}
    monkeypatch.setenv("IMGPIPE_URL_ALLOWED_PORTS", "*")
    assert load(UrlSourceSettings).ports() is None


def test_url_networks_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_URL_ALLOWED_NETWORKS", "127.0.0.0/8, ::1")
    assert [str(n) for n in load(UrlSourceSettings).networks()] == ["127.0.0.0/8", "::1/128"]
    monkeypatch.delenv("IMGPIPE_URL_ALLOWED_NETWORKS")
    assert load(UrlSourceSettings).networks() == ()
