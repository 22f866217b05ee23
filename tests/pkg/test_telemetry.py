"""JSON log lines: context ids on every line, and no stack traces in production."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from imgpipe.telemetry import job_id_var, request_id_var, setup_logging

_NOISY = ("aiormq", "aio_pika", "botocore", "boto3", "urllib3", "aiohttp.access", "pyvips")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in _NOISY}
    try:
        yield
    finally:
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
