"""Status `GET /jobs/{id}`: the client's view of a job, and only of its own jobs."""

from __future__ import annotations

from datetime import datetime

import aiohttp
import pytest
from imgpipe.store import owner_id

from tests.isolated import image
from tests.stack import Client, Stack

pytestmark = pytest.mark.e2e

JOB_KEYS = {"id", "status", "created_at", "updated_at", "variants", "error"}
VARIANT_KEYS = {"name", "format", "width", "height", "bytes", "key", "url"}


async def test_succeeded_job_view(alice: Client) -> None:
    data = image(400, 300)
    job = await alice.submit(
        {"key": await alice.upload(data)}, ["thumb", {"name": "p", "width": 50, "format": "png"}]
    )
    done = await alice.wait(job["id"])
    async with alice.http.get(f"{alice.stack.status}/jobs/{job['id']}", headers=alice.headers) as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        view = await response.json()
    assert set(view) == JOB_KEYS
    assert view["id"] == job["id"]
    assert view["status"] == "succeeded"
    assert view["error"] is None
    assert view["created_at"] == job["created_at"]
    assert datetime.fromisoformat(view["updated_at"]) >= datetime.fromisoformat(view["created_at"])
    assert datetime.fromisoformat(view["created_at"]).tzinfo is not None
    by_name = {v["name"]: v for v in view["variants"]}
    assert set(by_name) == {"thumb", "p"}
    for variant in view["variants"]:
        assert set(variant) == VARIANT_KEYS
        assert variant["key"].startswith(f"variants/{owner_id('alice')}/{job['id']}/")
        body = await alice.download(variant["url"])
        assert len(body) == variant["bytes"]
    assert (by_name["thumb"]["format"], by_name["thumb"]["width"], by_name["thumb"]["height"]) == (
        "jpeg",
        200,
        150,
    )
    assert (by_name["p"]["format"], by_name["p"]["width"], by_name["p"]["height"]) == ("png", 50, 38)
    assert done["variants"][0]["name"] == view["variants"][0]["name"]


async def test_failed_job_view(alice: Client) -> None:
    job = await alice.submit({"key": await alice.upload(b"this is not an image at all" * 10)})
    done = await alice.wait(job["id"])
    assert set(done) == JOB_KEYS
    assert done["status"] == "failed"
    assert done["variants"] == []
    assert set(done["error"]) == {"code", "message"}
    assert done["error"]["code"] in {"corrupt_image", "unsupported_format"}


async def test_another_users_job_is_not_found(alice: Client, bob: Client) -> None:
    job = await alice.submit({"key": await alice.upload(image())})
    status, body = await bob.get(job["id"])
    assert (status, body["error"]["code"]) == (404, "job_not_found")
    status, _ = await alice.get(job["id"])
    assert status == 200


@pytest.mark.parametrize(
    "job_id",
    ["0" * 32, "does-not-exist", "x" * 65, "x" * 500, "a:b", "*", "job.id"],
)
async def test_unknown_job_is_not_found(http: aiohttp.ClientSession, stack: Stack, job_id: str) -> None:
    client = Client(http, stack, "alice")
    async with http.get(f"{stack.status}/jobs/{job_id}", headers=client.headers) as response:
        assert response.status == 404
        body = await response.json()
    assert body["error"]["code"] == "job_not_found"


async def test_not_found_is_the_same_for_missing_and_foreign(alice: Client, bob: Client) -> None:
    """Ids are not for probing: a foreign job and a missing one answer alike."""
    job = await alice.submit({"key": await alice.upload(image())})
    foreign = await bob.get(job["id"])
    missing = await bob.get("f" * 32)
    assert foreign == missing
