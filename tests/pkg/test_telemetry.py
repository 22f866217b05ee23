"""JSON log lines: context ids on every line, no stack traces in production, and nothing secret."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from imgpipe.auth import TokenVerifier
from imgpipe.settings import AuthSettings
from imgpipe.telemetry import (
    NOISY_LOGGERS,
    REDACTED,
    SECRET_ENV_VARS,
    SECRET_URL_ENV_VARS,
    Redactor,
    clean_request_id,
    job_id_var,
    request_id_var,
    setup_logging,
)


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Only what a test sets itself counts as a configured secret.
    for name in (*SECRET_ENV_VARS, *SECRET_URL_ENV_VARS):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    # setup_logging also takes over these hooks; pytest watches through them.
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lvl in noisy.items():
            logging.getLogger(name).setLevel(lvl)


def _lines(err: str) -> list[dict]:
    lines = [line for line in err.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


def _fail() -> None:
    raise ValueError("the source is not an image")


def test_one_json_object_per_line_with_context(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker", env="local", level="INFO")
    log = logging.getLogger("imgpipe.test")
    request_token = request_id_var.set("req-123")
    job_token = job_id_var.set("job-456")
    try:
        log.info("rendering %s", "thumb")
        log.warning("multi\nline\nmessage")
    finally:
        job_id_var.reset(job_token)
        request_id_var.reset(request_token)
    log.info("outside", extra={"job_id": "explicit"})
    log.debug("below the level")

    first, second, third = _lines(capsys.readouterr().err)
    assert first["message"] == "rendering thumb"
    assert (first["level"], first["logger"], first["service"]) == ("INFO", "imgpipe.test", "worker")
    assert (first["request_id"], first["job_id"]) == ("req-123", "job-456")
    assert "ts" in first
    assert second["message"] == "multi\nline\nmessage"
    assert second["level"] == "WARNING"
    assert (third["request_id"], third["job_id"]) == (None, "explicit")


def test_setup_is_idempotent_and_quietens_libraries(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("api", env="local")
    setup_logging("api", env="local")
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("botocore").info("chatter")
    logging.getLogger("botocore").warning("worth seeing")
    [line] = _lines(capsys.readouterr().err)
    assert line["message"] == "worth seeing"


def test_production_logs_have_no_stack_trace(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker", env="production")
    try:
        _fail()
    except ValueError:
        logging.getLogger("imgpipe.test").exception("job failed")
    err = capsys.readouterr().err
    [line] = _lines(err)
    assert line["message"] == "job failed"
    assert line["error"] == "ValueError: the source is not an image"
    assert line["level"] == "ERROR"
    assert "Traceback" not in err
    assert __file__ not in err
    assert ".py" not in err
    assert "_fail" not in err
    assert "exc_info" not in line


def test_local_logs_have_the_stack_trace(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker", env="local")
    try:
        _fail()
    except ValueError:
        logging.getLogger("imgpipe.test").exception("job failed")
    [line] = _lines(capsys.readouterr().err)
    assert line["message"] == "job failed"
    assert "Traceback" in line["exc_info"]
    assert __file__ in line["exc_info"]
    assert "ValueError: the source is not an image" in line["exc_info"]


# Redaction: whatever a line says, and wherever it says it, secrets do not come out.

_SECRET = "k3y-" + "9f8e7d6c5b4a" * 4  # the shape of a real JWT secret: long and random
_SIGNATURE = "6e7c4ed973ece77c0c170519564c09f5248bdc6ce37a1ef669565ee7fb36b3a4"


def _s3() -> Any:
    """A client that only signs: presigning needs no endpoint to answer."""
    return boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def _token() -> str:
    return TokenVerifier(AuthSettings(env="test", jwt_secret=_SECRET)).issue("alice", scopes="", ttl_s=60)


def _logged(capsys: pytest.CaptureFixture[str], *args: object, **extra: object) -> tuple[str, list[dict]]:
    """What one INFO line comes out as: the raw text and the parsed lines."""
    logging.getLogger("imgpipe.test").info(*args, extra=extra or None)
    err = capsys.readouterr().err
    return err, _lines(err)


def test_bearer_tokens_and_jwts_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("api", env="production")
    token = _token()
    err, [line] = _logged(
        capsys, "auth header %r", f"Bearer {token}", headers={"Authorization": f"Bearer {token}"}, raw=token
    )
    assert token not in err
    for part in token.split("."):
        assert part not in err
    assert line["message"] == f"auth header 'Bearer {REDACTED}'"
    assert line["headers"] == {"Authorization": f"Bearer {REDACTED}"}
    assert line["raw"] == REDACTED
    # An opaque bearer token (not a JWT) goes too.
    err, [line] = _logged(capsys, "Authorization: bearer 0123456789abcdefXYZ_-.~+/")
    assert line["message"] == f"Authorization: bearer {REDACTED}"


@pytest.mark.parametrize(
    "line",
    [
        "Cred(user='u', password='hunter2hunter2', session_token='FwoGZXIvYXdz')",  # a repr
        "M(jwt_token='opaque-token-value-123')",
        'signature="abcdefabcdef"',
        "password = 'hunter2hunter2'",
        "token = opaque-token-value-123",
    ],
)
def test_quoted_and_spaced_assignments_are_scrubbed(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Dataclass and pydantic reprs write `key='value'`: how secrets most often reach an error text."""
    setup_logging("api", env="production")
    err, [logged] = _logged(capsys, line)
    for secret in ("hunter2hunter2", "FwoGZXIvYXdz", "opaque-token-value-123", "abcdefabcdef"):
        assert secret not in err
    assert REDACTED in logged["message"]


def test_query_tokens_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("status", env="production")
    err, [line] = _logged(
        capsys, "GET %s", "/jobs/42/events?access_token=opaque-value-1&token=opaque-value-2&lang=en"
    )
    assert "opaque-value" not in err
    assert line["message"] == f"GET /jobs/42/events?access_token={REDACTED}&token={REDACTED}&lang=en"


def test_presigned_url_signature_and_credential_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("status", env="production")
    url = _s3().generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "variants/a/b/thumb.jpg"})
    query = parse_qs(urlsplit(url).query)
    [signature], [credential] = query["X-Amz-Signature"], query["X-Amz-Credential"]
    err, [line] = _logged(capsys, "download link %s", url, url=url)
    assert signature not in err
    assert "AKIAIOSFODNN7EXAMPLE" not in err
    # The rest stays, so the line is still useful: which object, which algorithm, when it expires.
    for kept in (
        "http://127.0.0.1:9/b/variants/a/b/thumb.jpg?",
        "X-Amz-Algorithm=AWS4-HMAC-SHA256",
        "X-Amz-Expires=",
    ):
        assert kept in line["message"]
        assert kept in line["url"]
    assert f"X-Amz-Signature={REDACTED}" in line["url"]
    assert f"X-Amz-Credential={REDACTED}" in line["url"]
    assert credential.split("/")[0] == "AKIAIOSFODNN7EXAMPLE"


def test_presigned_post_fields_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("api", env="production")
    grant = _s3().generate_presigned_post(
        "b", "uploads/a/x", Fields={"Content-Type": "image/jpeg"}, Conditions=[{"Content-Type": "image/jpeg"}]
    )
    fields = grant["fields"]
    secret_values = (fields["policy"], fields["x-amz-signature"], fields["x-amz-credential"])
    # As a dict in `extra` (JSON), as a repr in the message, and as JSON inside the message.
    err, lines = _logged(capsys, "grant %r / %s", fields, json.dumps(fields), grant=grant)
    for value in secret_values:
        assert value not in err
    [line] = lines
    assert line["grant"]["fields"]["policy"] == REDACTED
    assert line["grant"]["fields"]["x-amz-signature"] == REDACTED
    assert line["grant"]["fields"]["x-amz-credential"] == REDACTED
    assert line["grant"]["fields"]["key"] == "uploads/a/x"
    assert line["grant"]["fields"]["Content-Type"] == "image/jpeg"
    assert f"'policy': '{REDACTED}'" in line["message"]
    assert f'"x-amz-signature": "{REDACTED}"' in line["message"]
    # Form-encoded, as a body would be.
    err, [line] = _logged(
        capsys, "body policy=%s&x-amz-signature=%s", fields["policy"], fields["x-amz-signature"]
    )
    assert line["message"] == f"body policy={REDACTED}&x-amz-signature={REDACTED}"


def test_signature_headers_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker", env="production")
    headers = {
        "Authorization": (
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/s3/aws4_request, "
            f"SignedHeaders=host;x-amz-date, Signature={_SIGNATURE}"
        ).encode(),
        "X-Amz-Security-Token": b"FwoGZXIvYXdzEBYaDHVzZXNzaW9uLXRva2Vu",
    }
    err, [line] = _logged(capsys, "Sending http request: headers=%s", headers)
    for leaked in (_SIGNATURE, "AKIAIOSFODNN7EXAMPLE", "FwoGZXIvYXdzEBYaDHVzZXNzaW9uLXRva2Vu"):
        assert leaked not in err
    assert "SignedHeaders=host;x-amz-date" in line["message"]
    # botocore at DEBUG prints the signature on a line of its own.
    err, [line] = _logged(capsys, "Signature:\n%s", _SIGNATURE)
    assert _SIGNATURE not in err
    assert line["message"] == f"Signature:\n{REDACTED}"


@pytest.mark.parametrize(
    ("url", "scrubbed"),
    [
        ("amqp://imgpipe:s3cr3t-pw@rabbit:5672/", f"amqp://imgpipe:{REDACTED}@rabbit:5672/"),
        ("redis://:s3cr3t-pw@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
        ("rediss://default:s3cr3t-pw@cache:6380", f"rediss://default:{REDACTED}@cache:6380"),
        ("https://u:s3cr3t-pw@example.com/a.jpg", f"https://u:{REDACTED}@example.com/a.jpg"),
    ],
)
def test_url_passwords_are_scrubbed(capsys: pytest.CaptureFixture[str], url: str, scrubbed: str) -> None:
    setup_logging("worker", env="production")
    err, [line] = _logged(capsys, "connecting to %s", url)
    assert "s3cr3t-pw" not in err
    assert line["message"] == f"connecting to {scrubbed}"


def test_configured_secrets_are_scrubbed_wherever_they_appear(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    aws_secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"
    amqp_password = "amqp-p%40ssword"  # percent-encoded in the URL: `amqp-p@ssword` is the password
    monkeypatch.setenv("IMGPIPE_JWT_SECRET", _SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("IMGPIPE_AMQP_URL", f"amqp://imgpipe:{amqp_password}@rabbit:5672/")
    setup_logging("api", env="production", secrets=['explicit "quoted" \\ secret'])
    log = logging.getLogger("imgpipe.test")
    log.info("jwt key is %s", _SECRET)
    log.info("settings", extra={"settings": {"aws": aws_secret, "nested": [f"x{aws_secret}y"]}})
    log.info("the broker said: wrong password amqp-p@ssword")
    log.info('value: explicit "quoted" \\ secret.')
    try:
        raise RuntimeError(f"could not sign with {_SECRET}")
    except RuntimeError:
        log.exception("signing failed")
    err = capsys.readouterr().err
    lines = _lines(err)
    for secret in (_SECRET, aws_secret, "amqp-p@ssword", "quoted"):
        assert secret not in err
    assert lines[0]["message"] == f"jwt key is {REDACTED}"
    assert lines[1]["settings"] == {"aws": REDACTED, "nested": [f"x{REDACTED}y"]}
    assert lines[2]["message"] == f"the broker said: wrong password {REDACTED}"
    assert lines[3]["message"] == f"value: {REDACTED}."
    assert lines[4]["error"] == f"RuntimeError: could not sign with {REDACTED}"


def test_exception_text_is_scrubbed_with_traces_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker", env="local")
    token = _token()
    try:
        raise ValueError(f"rejected Bearer {token}")
    except ValueError:
        logging.getLogger("imgpipe.test").exception("auth failed")
    err = capsys.readouterr().err
    [line] = _lines(err)
    assert token not in err
    assert "Traceback" in line["exc_info"]
    assert f"ValueError: rejected Bearer {REDACTED}" in line["exc_info"]


def test_short_secrets_are_not_scrubbed_as_words(capsys: pytest.CaptureFixture[str]) -> None:
    # A 5-character password would blank out every "guest" in every line; the URL rule still applies.
    setup_logging("worker", env="production", secrets=["guest"])
    _err, [line] = _logged(capsys, "guest user connected via amqp://guest:guest@rabbit/")
    assert line["message"] == f"guest user connected via amqp://guest:{REDACTED}@rabbit/"


@pytest.mark.parametrize(
    "message",
    [
        "job accepted",
        "rendering thumb for job 0123456789abcdef: 640x480 jpeg, 12345 bytes",
        "source key=uploads/0a1b2c/3d4e5f size=4096 content_type=image/jpeg",
        "fetched https://images.example.com/cat.jpg?width=200&fit=cover in 0.12 s",
        "connecting to amqp://rabbit:5672/ and redis://cache:6379/0",
        "invalid token: Signature verification failed",
        "token: Signature has expired",
        'WWW-Authenticate: Bearer error="invalid_token"',
        "missing bearer token",
        "the policy allows at most 5 attempts; tokens are verified with HS256",
        "retrying in 5 s (attempt 2/5)",
        'quotes "inside" and a back\\slash and a newline\nand unicode é ✓',
    ],
)
def test_ordinary_lines_are_untouched(capsys: pytest.CaptureFixture[str], message: str) -> None:
    setup_logging("worker", env="production", secrets=[_SECRET])
    err, [line] = _logged(capsys, "%s", message, path="/jobs/42", attempt=2)
    assert line["message"] == message
    assert (line["path"], line["attempt"]) == ("/jobs/42", 2)
    assert REDACTED not in err


def test_lines_without_a_trigger_skip_the_pattern() -> None:
    # Most lines mention nothing secret-shaped, and cost one lower() and a few substring checks.
    redact = Redactor([_SECRET])
    line = '{"message": "job succeeded", "job_id": "0123", "service": "worker"}'
    assert redact(line) is line
    assert redact(line.replace("succeeded", _SECRET)) == line.replace("succeeded", REDACTED)


def test_botocore_at_debug_leaks_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("api", env="production", level="DEBUG")
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.WARNING
    # Even if someone turns botocore's DEBUG back on, its signing chatter comes out scrubbed.
    logging.getLogger("botocore").setLevel(logging.DEBUG)
    s3 = _s3()
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    grant = s3.generate_presigned_post("b", "k", Fields={"Content-Type": "image/png"})
    err = capsys.readouterr().err
    lines = _lines(err)
    assert any(line["logger"] == "botocore.auth" for line in lines)  # it did talk
    [signature] = parse_qs(urlsplit(url).query)["X-Amz-Signature"]
    for leaked in (signature, grant["fields"]["x-amz-signature"], grant["fields"]["policy"]):
        assert leaked not in err
    assert "AKIAIOSFODNN7EXAMPLE" not in err
    assert "wJalrXUtnFEMI" not in err


def test_debug_keeps_libraries_at_warning(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker", env="production", level="DEBUG")
    for name in NOISY_LOGGERS:
        least = logging.ERROR if name == "pyvips" else logging.WARNING
        assert logging.getLogger(name).getEffectiveLevel() == least, name
    logging.getLogger("imgpipe.test").debug("ours")
    logging.getLogger("aio_pika").info("theirs")
    [line] = _lines(capsys.readouterr().err)
    assert line["message"] == "ours"


_UNCAUGHT_SCRIPT = """
import sys, threading, warnings
from imgpipe.telemetry import setup_logging
setup_logging("api", env=sys.argv[1])
warnings.warn("a deprecated call")
def fail():
    raise RuntimeError("in a thread")
thread = threading.Thread(target=fail, name="renderer")
thread.start()
thread.join()
class Finalised:
    def __del__(self):
        raise OSError("in a finalizer")
Finalised()  # Python cannot raise this one: it goes to sys.unraisablehook
raise ValueError("IMGPIPE_JWT_SECRET is too short")
"""


@pytest.mark.parametrize("env", ["production", "local"])
def test_uncaught_exceptions_and_warnings_are_json_lines(env: str) -> None:
    # In a child process: what escapes every handler reaches the hooks only at the top level.
    done = subprocess.run(
        [sys.executable, "-c", _UNCAUGHT_SCRIPT, env], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    lines = _lines(done.stderr)  # fails on any line that is not JSON
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("py.warnings", "WARNING"),
        ("imgpipe.uncaught", "ERROR"),
        ("imgpipe.uncaught", "ERROR"),
        ("imgpipe.uncaught", "CRITICAL"),
    ]
    assert "a deprecated call" in lines[0]["message"]
    assert lines[1]["message"] == "uncaught exception in thread renderer"
    assert lines[2]["message"].startswith("exception ignored in ")
    if env == "production":
        assert lines[1]["error"] == "RuntimeError: in a thread"
        assert lines[2]["error"] == "OSError: in a finalizer"
        assert lines[3]["error"] == "ValueError: IMGPIPE_JWT_SECRET is too short"
        assert "Traceback" not in done.stderr
    else:
        assert "Traceback" in lines[3]["exc_info"] and "too short" in lines[3]["exc_info"]


@pytest.mark.parametrize("service", ["imgpipe_api", "imgpipe_status", "imgpipe_worker", "imgpipe_reconciler"])
def test_a_refused_common_setting_is_a_json_line_without_a_trace(service: str) -> None:
    """`IMGPIPE_ENV` itself is wrong: logging is set up before it is read, as for no trace."""
    env = {**os.environ, "IMGPIPE_ENV": "prod"}  # neither a known environment nor local
    done = subprocess.run(
        [sys.executable, "-m", service, "--port", "1"], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode != 0
    lines = _lines(done.stderr)  # fails on any line that is not JSON
    assert "Traceback" not in done.stderr
    assert any("IMGPIPE_ENV" in line.get("error", "") for line in lines), lines


def test_a_refused_common_setting_without_an_environment_is_a_production_line() -> None:
    # `IMGPIPE_ENV` unset is production, for the lines logged before the settings are read too.
    env = {k: v for k, v in os.environ.items() if k != "IMGPIPE_ENV"} | {"IMGPIPE_LOG_LEVEL": "LOUD"}
    done = subprocess.run(
        [sys.executable, "-m", "imgpipe_api", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode != 0
    lines = _lines(done.stderr)
    assert "Traceback" not in done.stderr
    assert any("IMGPIPE_LOG_LEVEL" in line.get("error", "") for line in lines), lines


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("abc-123", True),
        (b"job.42:retry_1", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("abc\n", False),  # `$` matched before a final newline: a line break into every log line
        ("a\nb", False),
        ("é", False),
        ('a"}{b', False),
        ("", False),
        (None, False),
    ],
)
def test_only_a_plain_bounded_request_id_is_kept(value: object, kept: bool) -> None:
    expected = (value.decode() if isinstance(value, bytes) else value) if kept else None
    assert clean_request_id(value) == expected
