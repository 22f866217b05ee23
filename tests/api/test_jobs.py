"""`POST /jobs`: validation, ownership, URL policy, idempotency, and 202 only once the broker has it."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from imgpipe import resources
from imgpipe.broker import Topology
from imgpipe.store import JobStore, owner_id
from imgpipe_api import app as api_app
from imgpipe_api.app import QUOTAS, create_app
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.isolated import (
    BrokerProxy,
    fresh_namespace,
    image,
    isolated_stack,
    metric,
    queue_depth,
    raw_request,
    temporary_worker,
)
from tests.stack import AMQP_URL, Client, Stack, drop_namespace, local_http, token
from tests.worker.test_consumer import eventually

pytestmark = pytest.mark.e2e


async def _post_job(
    client: Client, body: Any, *, base: str | None = None, **headers: str
) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with client.http.post(
        f"{base or client.stack.api}/jobs", json=body, headers={**client.headers, **headers}
    ) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json(), response.headers


async def _accepted_total(client: Client) -> float:
    async with client.http.get(f"{client.stack.api}/metrics") as response:
        return metric(await response.text(), "imgpipe_jobs_accepted_total")


@pytest.fixture
async def alice_key(alice: Client) -> str:
    return await alice.upload(image())


async def test_accepted_job_shape_and_location(alice: Client, alice_key: str) -> None:
    status, body, headers = await _post_job(alice, {"source": {"key": alice_key}})
    assert status == 202, body
    assert body["status"] == "pending"
    assert {"id", "status", "created_at", "updated_at", "variants", "error"} <= set(body)
    assert body["variants"] == [] and body["error"] is None
    assert headers["Location"] == f"/jobs/{body['id']}"
    assert body["links"] == {"self": f"/jobs/{body['id']}", "events": f"/jobs/{body['id']}/events"}
    assert "Idempotent-Replayed" not in headers
    # It really is in Redis (the status service reads it there), and it gets done.
    polled_status, polled = await alice.get(body["id"])
    assert polled_status == 200 and polled["id"] == body["id"]
    assert (await alice.wait(body["id"]))["status"] == "succeeded"


async def test_default_variant_is_thumb(alice: Client) -> None:
    job = await alice.submit({"key": await alice.upload(image(800, 400))})
    done = await alice.wait(job["id"])
    assert [(v["name"], v["format"], v["width"], v["height"]) for v in done["variants"]] == [
        ("thumb", "jpeg", 200, 100)
    ]


async def test_presets_and_explicit_variants(alice: Client) -> None:
    variants = ["small", {"name": "tiny", "width": 40, "format": "png"}, {"name": "sq", "height": 30}]
    job = await alice.submit({"key": await alice.upload(image(800, 400))}, variants)
    done = await alice.wait(job["id"])
    assert done["status"] == "succeeded", done
    got = {v["name"]: (v["format"], v["width"], v["height"]) for v in done["variants"]}
    assert got == {"small": ("webp", 640, 320), "tiny": ("png", 40, 20), "sq": ("jpeg", 60, 30)}


VARIANT = {"name": "v", "width": 10}

BAD_VARIANTS = [
    pytest.param(["huge"], id="unknown-preset"),
    pytest.param([], id="empty-list"),
    pytest.param([{"name": "c", "width": 100, "fit": "cover"}], id="cover-without-height"),
    pytest.param([{"name": "w", "width": 0}], id="width-zero"),
    pytest.param([{"name": "w", "width": -1}], id="width-negative"),
    pytest.param([{"name": "w", "width": 8193}], id="width-over-max"),
    pytest.param([{"name": "w"}], id="no-box"),
    pytest.param([{"name": "w", "width": 10, "format": "gif"}], id="unknown-format"),
    pytest.param([{"name": "w", "width": 10, "fit": "stretch"}], id="unknown-fit"),
    pytest.param([{"name": "w", "width": 10, "quality": 0}], id="quality-zero"),
    pytest.param([{"name": "w", "width": 10, "quality": 101}], id="quality-over"),
    pytest.param([{"name": "Bad Name", "width": 10}], id="bad-name"),
    pytest.param([{"name": "../x", "width": 10}], id="path-name"),
    pytest.param([{"width": 10}], id="nameless"),
    pytest.param(["thumb", "thumb"], id="duplicate-presets"),
    pytest.param([{"name": "thumb", "width": 10}, "thumb"], id="duplicate-names"),
    pytest.param([{"name": f"v{i}", "width": 10} for i in range(17)], id="seventeen"),
    pytest.param([{**VARIANT, "crop": "center"}], id="extra-field"),
    pytest.param([{"name": "w", "width": True}], id="boolean-width"),  # was a 1-pixel variant
    pytest.param([{"name": "w", "width": "100"}], id="string-width"),
    pytest.param([{"name": "w", "width": 10, "quality": 80.0}], id="float-quality"),
    pytest.param("thumb", id="not-a-list"),
    pytest.param([42], id="number"),
]


@pytest.mark.parametrize("variants", BAD_VARIANTS)
async def test_invalid_variants(alice: Client, variants: Any) -> None:
    key = f"uploads/{owner_id('alice')}/whatever"
    status, body, _ = await _post_job(alice, {"source": {"key": key}, "variants": variants})
    assert (status, body["error"]["code"]) == (422, "invalid_request"), body


async def test_sixteen_variants_are_allowed(alice: Client, alice_key: str) -> None:
    variants = [{"name": f"v{i}", "width": 8 + i} for i in range(16)]
    status, body, _ = await _post_job(alice, {"source": {"key": alice_key}, "variants": variants})
    assert status == 202, body
    done = await alice.wait(body["id"])
    assert len(done["variants"]) == 16


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="empty"),
        pytest.param({"variants": ["thumb"]}, id="no-source"),
        pytest.param({"source": {}}, id="empty-source"),
        pytest.param({"source": {"key": ""}}, id="empty-key"),
        pytest.param({"source": {"key": "uploads/o/./x"}}, id="dot-segment"),
        pytest.param({"source": {"key": "uploads/o/../p/x"}}, id="dot-dot-segment"),
        pytest.param({"source": {"key": "../uploads/o/x"}}, id="leading-dot-dot"),
        pytest.param({"source": {"key": "uploads/o/x/."}}, id="trailing-dot"),
        pytest.param({"source": {"key": "uploads/o//x"}}, id="empty-segment"),
        pytest.param({"source": {"key": "uploads/o/x/"}}, id="trailing-slash"),
        # 1,010 characters, within `max_length`, but 2,010 bytes: S3 would answer 400 KeyTooLongError.
        pytest.param({"source": {"key": "uploads/o/" + "é" * 1000}}, id="key-over-1024-bytes"),
        pytest.param({"source": {"key": "k", "url": "http://example.com/a.jpg"}}, id="key-and-url"),
        pytest.param({"source": {"key": "k"}, "priority": 1}, id="extra-field"),
        pytest.param({"source": "uploads/x"}, id="source-string"),
        pytest.param([], id="array"),
    ],
)
async def test_invalid_body(alice: Client, body: Any) -> None:
    status, answer, _ = await _post_job(alice, body)
    assert (status, answer["error"]["code"]) == (422, "invalid_request"), answer


async def test_deeply_nested_body_is_invalid_request(alice: Client) -> None:
    body = b'{"source": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # within the 64 KiB body limit
    async with alice.http.post(
        f"{alice.stack.api}/jobs", data=body, headers={**alice.headers, "Content-Type": "application/json"}
    ) as response:
        assert response.status == 422
        assert (await response.json())["error"]["code"] == "invalid_request"


async def test_non_json_body(alice: Client) -> None:
    async with alice.http.post(
        f"{alice.stack.api}/jobs", data=b"source=x", headers={**alice.headers, "Content-Type": "text/plain"}
    ) as response:
        assert response.status == 415
        assert (await response.json())["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        pytest.param("gzip", gzip.compress(b'{"source": {"url": "https://example.com/a.jpg"}}'), id="gzip"),
        pytest.param("GZip", b"not gzip at all", id="gzip-that-does-not-inflate"),
        pytest.param("identity, gzip", b"{}", id="gzip-after-identity"),
    ],
)
async def test_a_compressed_body_is_refused_before_it_is_inflated(
    alice: Client, encoding: str, data: bytes
) -> None:
    """aiohttp would inflate it; one that did not inflate came out as a 500 with an ERROR line."""
    accepted = await _accepted_total(alice)
    headers = {**alice.headers, "Content-Type": "application/json", "Content-Encoding": encoding}
    async with alice.http.post(f"{alice.stack.api}/jobs", data=data, headers=headers) as response:
        assert response.status == 415, await response.text()
        assert (await response.json())["error"]["code"] == "unsupported_media_type"
        assert response.headers["Accept-Encoding"] == "identity"
    assert await _accepted_total(alice) == accepted
    # Saying so changes nothing.
    headers["Content-Encoding"] = "identity"
    data = b'{"source": {"url": "https://example.com/a.jpg"}}'
    async with alice.http.post(f"{alice.stack.api}/jobs", data=data, headers=headers) as response:
        assert response.status == 202, await response.text()


async def test_someone_elses_upload_is_forbidden(alice: Client, bob: Client, alice_key: str) -> None:
    status, body, _ = await _post_job(bob, {"source": {"key": alice_key}})
    assert (status, body["error"]["code"]) == (403, "source_forbidden")


@pytest.mark.parametrize(
    "key",
    [
        "variants/{alice}/job/thumb.jpg",
        "uploads/{alice}x/y",
        "uploads/{bob}",
        "somewhere/else",
    ],
)
async def test_keys_outside_own_upload_prefix_are_forbidden(bob: Client, key: str) -> None:
    key = key.format(alice=owner_id("alice"), bob=owner_id("bob"))
    status, body, _ = await _post_job(bob, {"source": {"key": key}})
    assert (status, body["error"]["code"]) == (403, "source_forbidden"), key


async def test_owned_key_that_does_not_exist(alice: Client) -> None:
    key = f"uploads/{owner_id('alice')}/{'0' * 32}"
    status, body, _ = await _post_job(alice, {"source": {"key": key}})
    assert (status, body["error"]["code"]) == (422, "source_not_found")


async def test_an_upload_being_deleted_as_an_orphan_is_source_not_found(
    alice: Client, alice_key: str, redis_client: aioredis.Redis
) -> None:
    store = JobStore(redis_client, alice.stack.env["IMGPIPE_NAMESPACE"], retention=timedelta(hours=1))
    await redis_client.set(store.deleting_mark(alice_key), "1", px=60_000)  # as the reconciler marks it
    try:
        status, body, _ = await _post_job(alice, {"source": {"key": alice_key}})
    finally:
        await redis_client.delete(store.deleting_mark(alice_key))
    assert (status, body["error"]["code"]) == (422, "source_not_found"), body
    assert "being deleted" in body["error"]["message"]
    status, _, _ = await _post_job(alice, {"source": {"key": alice_key}})
    assert status == 202


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://169.254.169.254/x", "url_forbidden"),
        ("http://10.0.0.1/a.jpg", "url_forbidden"),
        ("http://192.168.1.1/a.jpg", "url_forbidden"),
        ("http://[::ffff:169.254.169.254]/x", "url_forbidden"),
        ("http://localhost/a.jpg", "url_forbidden"),
        ("http://metadata.google.internal/x", "url_forbidden"),
        ("http://user:pw@example.com/a.jpg", "url_forbidden"),
        ("file:///etc/passwd", "url_forbidden"),
        ("ftp://example.com/a.jpg", "url_forbidden"),
        ("gopher://example.com/a", "url_forbidden"),
        ("http://256.1.1.1/a.jpg", "url_invalid"),
        ("http://exa mple.com/a.jpg", "url_invalid"),
        ("http://-1.8/a.jpg", "url_invalid"),  # was a 500: int() took the sign
        ("http://example.com/\ud800", "url_invalid"),  # was a 500: a lone surrogate
    ],
)
async def test_url_policy(alice: Client, url: str, code: str) -> None:
    status, body, _ = await _post_job(alice, {"source": {"url": url}})
    assert (status, body["error"]["code"]) == (422, code), body


@pytest.fixture
async def image_server() -> AsyncIterator[str]:
    """An image host on 127.0.0.1 (the session stack allows 127.0.0.0/8 for this)."""
    data = image(300, 200)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/a.jpg", serve)
    async with local_http(app) as base:
        yield f"{base}/a.jpg"


async def test_url_source_is_fetched(alice: Client, image_server: str) -> None:
    job = await alice.submit({"url": image_server}, [{"name": "s", "width": 30}])
    done = await alice.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert (done["variants"][0]["width"], done["variants"][0]["height"]) == (30, 20)


# Idempotency-Key.


async def test_same_key_same_body_is_one_job(alice: Client, alice_key: str) -> None:
    body = {"source": {"key": alice_key}, "variants": ["thumb"]}
    before = await _accepted_total(alice)
    first_status, first, first_headers = await _post_job(alice, body, **{"Idempotency-Key": "k-same"})
    second_status, second, second_headers = await _post_job(alice, body, **{"Idempotency-Key": "k-same"})
    assert (first_status, second_status) == (202, 202)
    assert first["id"] == second["id"]
    assert "Idempotent-Replayed" not in first_headers
    assert second_headers["Idempotent-Replayed"] == "true"
    assert second_headers["Location"] == f"/jobs/{first['id']}"
    # One job accepted (published), not two.
    assert await _accepted_total(alice) == before + 1
    done = await alice.wait(first["id"])
    # A replay after the job finished answers with its current state, still the same job.
    third_status, third, third_headers = await _post_job(alice, body, **{"Idempotency-Key": "k-same"})
    assert (third_status, third["id"], third["status"]) == (202, first["id"], done["status"])
    assert third_headers["Idempotent-Replayed"] == "true"
    assert await _accepted_total(alice) == before + 1


async def test_same_key_different_body_is_refused(alice: Client, alice_key: str) -> None:
    status, _, _ = await _post_job(alice, {"source": {"key": alice_key}}, **{"Idempotency-Key": "k-diff"})
    assert status == 202
    for other in (
        {"source": {"key": alice_key}, "variants": ["small"]},
        {"source": {"key": alice_key + "x"}},
    ):
        status, body, _ = await _post_job(alice, other, **{"Idempotency-Key": "k-diff"})
        assert (status, body["error"]["code"]) == (422, "idempotency_key_reused")


def test_a_field_a_later_release_adds_with_a_default_leaves_the_fingerprint_as_it_was() -> None:
    # During a rolling upgrade a client's retry may reach the other release's pod: with a new
    # defaulted field in the dump, the same body was `idempotency_key_reused` there.
    from imgpipe.auth import Principal
    from imgpipe.models import JobRequest, Variant

    class LaterVariant(Variant):
        strip_metadata: bool = True

    class LaterRequest(JobRequest):
        priority: int = 0
        variants: list[str | LaterVariant] = ["thumb"]  # type: ignore[assignment]

    alice = Principal(sub="alice")
    body = {"source": {"key": "uploads/a/b"}, "variants": ["thumb", {"name": "card", "width": 600}]}
    now, later = JobRequest.model_validate(body), LaterRequest.model_validate(body)
    assert later.model_dump_json() != now.model_dump_json()  # the new fields are in the dump
    assert api_app._fingerprints(alice, later)[1] == api_app._fingerprints(alice, now)[1]
    other = {**body, "variants": ["small"]}
    assert (
        api_app._fingerprints(alice, JobRequest.model_validate(other))[1]
        != api_app._fingerprints(alice, now)[1]
    )


async def test_a_retry_is_the_same_request_to_the_releases_before_and_after_this_one(
    alice: Client, alice_key: str, redis_client: aioredis.Redis
) -> None:
    # Releases before 2026-12-07 store and compare the fingerprint with defaults included; later
    # ones are to match it without defaults (a new defaulted field changes the other). A key holding
    # either is this request, and the claim keeps the first where an older release reads it: with
    # only the second, a retry reaching an older pod (or after a rollback) was `idempotency_key_reused`.
    from imgpipe.auth import Principal
    from imgpipe.models import JobRequest

    body = {"source": {"key": alice_key}, "variants": [{"name": "card", "width": 600}]}
    whole, asked = api_app._fingerprints(Principal(sub=alice.sub), JobRequest.model_validate(body))
    assert whole != asked  # the two ways differ for this body
    status, first, _ = await _post_job(alice, body, **{"Idempotency-Key": "k-releases"})
    assert status == 202
    store = JobStore(redis_client, alice.stack.env["IMGPIPE_NAMESPACE"], retention=timedelta(hours=1))
    claim = store._idem_key(alice.sub, "k-releases")
    held = json.loads(await redis_client.get(claim))
    assert held["fingerprint"] == whole  # what an older release compares its own with
    for written in (
        {"job_id": held["job_id"], "fingerprint": whole, "accepted": True},  # by an older release
        {"job_id": held["job_id"], "fingerprint": "0" * 64, "also": [asked], "accepted": True},  # a later one
    ):
        await redis_client.set(claim, json.dumps(written), keepttl=True)
        status, again, headers = await _post_job(alice, body, **{"Idempotency-Key": "k-releases"})
        assert (status, again["id"], headers.get("Idempotent-Replayed")) == (202, first["id"], "true")
    other = {**body, "variants": ["small"]}
    status, refused, _ = await _post_job(alice, other, **{"Idempotency-Key": "k-releases"})
    assert (status, refused["error"]["code"]) == (422, "idempotency_key_reused")


async def test_same_key_for_different_users_is_independent(alice: Client, bob: Client) -> None:
    jobs = []
    for client in (alice, bob):
        body = {"source": {"key": await client.upload(image())}}
        status, job, headers = await _post_job(client, body, **{"Idempotency-Key": "k-shared"})
        assert status == 202, job
        assert "Idempotent-Replayed" not in headers
        jobs.append(job["id"])
    assert jobs[0] != jobs[1]
    assert (await bob.get(jobs[0]))[0] == 404


async def test_key_of_a_refused_request_can_be_used_again(alice: Client, alice_key: str) -> None:
    missing = f"uploads/{owner_id('alice')}/{'1' * 32}"
    status, body, _ = await _post_job(alice, {"source": {"key": missing}}, **{"Idempotency-Key": "k-retry"})
    assert (status, body["error"]["code"]) == (422, "source_not_found")
    status, body, _ = await _post_job(alice, {"source": {"key": alice_key}}, **{"Idempotency-Key": "k-retry"})
    assert status == 202, body


async def test_concurrent_requests_with_one_key_make_one_job(alice: Client, alice_key: str) -> None:
    body = {"source": {"key": alice_key}}
    before = await _accepted_total(alice)
    answers = await asyncio.gather(
        *(_post_job(alice, body, **{"Idempotency-Key": "k-race"}) for _ in range(8))
    )
    ids = {answer["id"] for status, answer, _ in answers if status == 202}
    assert len(ids) == 1, answers
    # The rest are replays or "still in progress" (409), never a second job.
    assert {status for status, _, _ in answers} <= {202, 409}
    assert await _accepted_total(alice) == before + 1


async def test_accepted_jobs_report_the_rate_budget(alice: Client, alice_key: str) -> None:
    limit = alice.stack.env["IMGPIPE_RATE_JOBS_PER_MINUTE"]
    body = {"source": {"key": alice_key}}
    _, _, first = await _post_job(alice, body, **{"Idempotency-Key": "k-budget"})
    _, _, second = await _post_job(alice, body)
    assert first["RateLimit-Limit"] == second["RateLimit-Limit"] == limit
    # Each spent one (the budget refills fast at the suite's limit, so no exact count here).
    assert int(first["RateLimit-Remaining"]) < int(limit) and int(second["RateLimit-Remaining"]) < int(limit)
    # A replay spends nothing, so it reports nothing.
    _, _, replay = await _post_job(alice, body, **{"Idempotency-Key": "k-budget"})
    assert replay["Idempotent-Replayed"] == "true"
    assert "RateLimit-Remaining" not in replay


SUBMIT_STAGES = ("claim", "admit", "source", "record", "publish", "accept")


async def _submit_figures(client: Client) -> dict[str, tuple[float, float]]:
    """(count, sum) of each step's histogram, and of the api's own timing of its `POST /jobs` answers."""
    async with client.http.get(f"{client.stack.api}/metrics") as response:
        text = await response.text()
    figures = {
        stage: (
            metric(text, "imgpipe_api_submit_stage_seconds_count", stage=stage),
            metric(text, "imgpipe_api_submit_stage_seconds_sum", stage=stage),
        )
        for stage in SUBMIT_STAGES
    }
    request = {"service": "api", "method": "POST", "route": "/jobs"}
    figures["request"] = (
        metric(text, "imgpipe_http_request_duration_seconds_count", **request),
        metric(text, "imgpipe_http_request_duration_seconds_sum", **request),
    )
    return figures


async def _submit_deltas(client: Client, before: dict) -> dict[str, tuple[float, float]]:
    after = await _submit_figures(client)
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in before}


async def test_submit_stage_metrics_time_each_step_once(alice: Client, alice_key: str) -> None:
    body = {"source": {"key": alice_key}}
    before = await _submit_figures(alice)
    status, _, _ = await _post_job(alice, body, **{"Idempotency-Key": "k-stages"})
    assert status == 202
    delta = await _submit_deltas(alice, before)
    assert {k: count for k, (count, _) in delta.items()} == {**dict.fromkeys(SUBMIT_STAGES, 1), "request": 1}
    assert all(seconds > 0 for _, seconds in delta.values()), delta
    # The steps follow one another inside the request, so together they take no longer than it.
    assert sum(delta[stage][1] for stage in SUBMIT_STAGES) <= delta["request"][1], delta

    # A replay only claims its key; a request without a key neither claims nor accepts one.
    before = await _submit_figures(alice)
    assert (await _post_job(alice, body, **{"Idempotency-Key": "k-stages"}))[0] == 202
    assert (await _post_job(alice, body))[0] == 202
    counts = {k: count for k, (count, _) in (await _submit_deltas(alice, before)).items()}
    assert counts == {**dict.fromkeys(SUBMIT_STAGES, 1), "claim": 1, "accept": 0, "request": 2}


async def test_a_step_that_refuses_the_request_is_not_timed(alice: Client) -> None:
    missing = f"uploads/{owner_id('alice')}/{'1' * 32}"
    before = await _submit_figures(alice)
    status, answer, _ = await _post_job(alice, {"source": {"key": missing}})
    assert (status, answer["error"]["code"]) == (422, "source_not_found")
    counts = {k: count for k, (count, _) in (await _submit_deltas(alice, before)).items()}
    # Admitted, then refused at its source: nothing from that step on counts.
    assert counts == {**dict.fromkeys(SUBMIT_STAGES, 0), "admit": 1, "request": 1}


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(b"k" * 256, id="too-long"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param("ключ".encode(), id="not-ascii"),
        pytest.param(b"a\tb", id="tab"),
        pytest.param(b"first\r\nIdempotency-Key: second", id="two-headers"),  # which one is meant?
    ],
)
async def test_invalid_idempotency_keys(alice: Client, alice_key: str, key: bytes) -> None:
    head = [
        b"POST /jobs HTTP/1.1",
        b"Authorization: " + alice.headers["Authorization"].encode(),
        b"Content-Type: application/json",
        b"Idempotency-Key: " + key,
    ]
    body = json.dumps({"source": {"key": alice_key}}).encode()
    status, answer = await raw_request(alice.stack.api, head, body)
    assert (status, answer["error"]["code"]) == (400, "invalid_idempotency_key"), answer


# 202 only once the broker has the job: a namespace with no worker.


@pytest.fixture(scope="module")
def idle_stack(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with isolated_stack(
        base_env,
        tmp_path_factory.mktemp("idle-logs"),
        {"api": ("api", {}), "status": ("status", {})},
    ) as stack:
        yield stack


async def test_accepted_job_waits_durably_in_the_queue(
    http: aiohttp.ClientSession, idle_stack: Stack, tmp_path: Path
) -> None:
    client = Client(http, idle_stack, "alice")
    queue = Topology(idle_stack.env["IMGPIPE_NAMESPACE"]).jobs_queue
    key = await client.upload(image())
    before = await queue_depth(queue)
    job = await client.submit({"key": key}, **{"Idempotency-Key": "durable"})
    assert await queue_depth(queue) == before + 1
    replay = await client.submit({"key": key}, **{"Idempotency-Key": "durable"})
    assert replay["id"] == job["id"]
    assert await queue_depth(queue) == before + 1, "a replay publishes nothing"
    status, pending = await client.get(job["id"])
    assert (status, pending["status"]) == (200, "pending")

    async with temporary_worker(idle_stack, tmp_path):
        done = await client.wait(job["id"], within=30)
    assert done["status"] == "succeeded", done
    assert await queue_depth(queue) == 0


async def test_a_replay_waits_while_the_first_request_can_still_withdraw_its_job(
    http: aiohttp.ClientSession, base_env: dict[str, str], redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # An api whose broker stops answering: its publish times out, and it withdraws the job it recorded.
    # No worker: a job stays `pending`.
    proxy = BrokerProxy()
    await proxy.start()
    amqp = AMQP_URL.replace(":5672/", f":{proxy.port}/")
    own = Stack({**base_env, "IMGPIPE_NAMESPACE": fresh_namespace(), "IMGPIPE_AMQP_URL": amqp})
    try:
        own.services["api"] = await asyncio.to_thread(own.start, "api", tmp_path)
        client = Client(http, own, "alice")
        body = {"source": {"key": await client.upload(image())}}
        store = JobStore(redis_client, own.env["IMGPIPE_NAMESPACE"], retention=timedelta(hours=1))
        claim = store._idem_key("alice", "k-withdrawn")

        proxy.stall()
        first = asyncio.create_task(_post_job(client, body, **{"Idempotency-Key": "k-withdrawn"}))

        async def recorded() -> str | None:
            held = await redis_client.get(claim)
            job_id = json.loads(held)["job_id"] if held else None
            return job_id if job_id and await store.get(job_id) else None

        withdrawn = await eventually(recorded)
        # Its record is there, pending, but the broker has not confirmed it: no 202 for it yet.
        status, answer, headers = await _post_job(client, body, **{"Idempotency-Key": "k-withdrawn"})
        assert (status, answer["error"]["code"]) == (409, "idempotency_in_progress"), answer
        assert headers["Retry-After"] == "1"
        status, answer, _ = await first
        assert (status, answer["error"]["code"]) == (503, "broker_unavailable"), answer
        assert await store.get(withdrawn) is None
        assert await redis_client.get(claim) is None

        # The broker answers again: a retry with the key makes a new job, and its replay is at once.
        proxy.reset()

        async def accepted() -> tuple[int, dict, Any] | None:
            answer = await _post_job(client, body, **{"Idempotency-Key": "k-withdrawn"})
            return answer if answer[0] == 202 else None

        _, job, headers = await eventually(accepted, within=30)
        assert job["id"] != withdrawn
        assert "Idempotent-Replayed" not in headers
        status, replay, headers = await _post_job(client, body, **{"Idempotency-Key": "k-withdrawn"})
        assert (status, replay["id"], replay["status"]) == (202, job["id"], "pending")
        assert headers["Idempotent-Replayed"] == "true"
    finally:
        for service in own.services.values():
            await asyncio.to_thread(own.stop, service)
        await proxy.cut()
        await asyncio.to_thread(drop_namespace, own.env["IMGPIPE_NAMESPACE"])


@pytest.fixture
async def cancelling_api(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, web.Application, list[asyncio.Task]]]:
    """An api in-process in a namespace of its own, served as production serves it (a client that goes
    away cancels its handler), and the task of each request's handler."""
    namespace = fresh_namespace()
    monkeypatch.setenv("IMGPIPE_NAMESPACE", namespace)
    app = await create_app()
    handlers: list[asyncio.Task] = []

    @web.middleware
    async def remember(request: web.Request, handler: Any) -> web.StreamResponse:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        return await handler(request)

    app.middlewares.append(remember)
    try:
        async with local_http(app, handler_cancellation=True) as base:
            yield base, app, handlers
    finally:
        await asyncio.to_thread(drop_namespace, namespace)


@pytest.mark.parametrize("step", ["claim_idempotency", "create"])
async def test_a_client_that_goes_away_mid_request_leaves_one_whole_job(
    cancelling_api: tuple[str, web.Application, list[asyncio.Task]],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    """The client gives up after the request's key claim, or its record, is written: the request goes
    on to its end, and a retry with the key gets that job, not a second one beside a stray claim or
    a `pending` record nothing publishes."""
    base, app, handlers = cancelling_api
    store = app[resources.STORE]
    reached, release = asyncio.Event(), asyncio.Event()
    done_in_redis = getattr(store, step)

    async def slow_reply(*args: Any, **kwargs: Any) -> Any:
        result = await done_in_redis(*args, **kwargs)  # written; the reply is slow to come back
        reached.set()
        await release.wait()
        return result

    monkeypatch.setattr(store, step, slow_reply)
    body = {"source": {"url": "https://example.com/photo.jpg"}}
    headers = {"Authorization": f"Bearer {token('alice')}", "Idempotency-Key": f"gone-{step}"}
    async with aiohttp.ClientSession() as impatient:
        first = asyncio.create_task(impatient.post(f"{base}/jobs", json=body, headers=headers))
        await asyncio.wait_for(reached.wait(), 10)
        first.cancel()
    await eventually(lambda: handlers[0].done())  # the server saw the client go, and cancelled it
    release.set()

    async def accepted() -> tuple[dict, Any] | None:
        async with http.post(f"{base}/jobs", json=body, headers=headers) as response:
            return (await response.json(), response.headers) if response.status == 202 else None

    job, answer_headers = await eventually(accepted)
    assert answer_headers.get("Idempotent-Replayed") == "true"  # the first request's job
    assert await queue_depth(Topology(store.namespace).jobs_queue) == 1
    assert [key async for key in redis_client.scan_iter(store.job_pattern)] == [
        store.job_key(job["id"]).encode()
    ]


async def test_a_job_whose_withdrawal_fails_keeps_its_key_and_its_slot(
    cancelling_api: tuple[str, web.Application, list[asyncio.Task]],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The publish fails, and so does the withdrawal of the record (and its tries again, for as long
    as Redis stays away): the record stays `pending`, and the reconciler will publish it. So it is
    not withdrawn after all: a retry with its key gets it (409, then the job) rather than a second
    job beside it, and it keeps counting against the quota."""
    base, app, _ = cancelling_api
    store, publisher = app[resources.STORE], app[resources.PUBLISHER]

    async def broker_down(*_: Any) -> None:
        raise ConnectionError("the broker went away")

    async def redis_down(*_: Any) -> None:
        raise ConnectionError("and Redis, a moment later")

    monkeypatch.setattr(publisher, "publish_job", broker_down)
    monkeypatch.setattr(store, "withdraw", redis_down)
    body = {"source": {"url": "https://example.com/photo.jpg"}}
    headers = {"Authorization": f"Bearer {token('alice')}", "Idempotency-Key": "withdrawal-fails"}
    async with http.post(f"{base}/jobs", json=body, headers=headers) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "broker_unavailable"
    [key] = [key async for key in redis_client.scan_iter(store.job_pattern)]
    job_id = key.decode().rsplit(":", 1)[1]
    claim = await redis_client.get(store._idem_key("alice", "withdrawal-fails"))
    assert json.loads(claim)["job_id"] == job_id
    assert await redis_client.zrange(app[QUOTAS].active_key("alice"), 0, -1) == [job_id.encode()]
    async with http.post(f"{base}/jobs", json=body, headers=headers) as response:
        assert response.status == 409  # its job, still within the window a withdrawal could take


@pytest.mark.parametrize("failing", ["create", "publish"])
async def test_a_withdrawal_that_found_redis_away_is_made_once_it_is_back(
    cancelling_api: tuple[str, web.Application, list[asyncio.Task]],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """Redis goes away in the middle of a submission (a failover), so the job's withdrawal fails too.
    The key answered 409 to every retry its 503 asked for, for the claim's ten minutes, even when
    the record was never written (`create` failing). The withdrawal is tried again until Redis
    answers: then the job is gone, its key and slot are free, and the retry is a job of its own."""
    base, app, _ = cancelling_api
    store, publisher = app[resources.STORE], app[resources.PUBLISHER]
    monkeypatch.setattr(api_app, "_WITHDRAW_PAUSES_S", (0.2,))
    redis_back = asyncio.Event()
    real_withdraw = store.withdraw

    async def withdraw(*args: Any, **kwargs: Any) -> bool:
        if not redis_back.is_set():
            raise RedisTimeoutError("Timeout reading from socket")
        return await real_withdraw(*args, **kwargs)

    async def away(*_: Any, **__: Any) -> None:
        raise RedisTimeoutError("Timeout reading from socket")  # never written

    async def broker_down(*_: Any) -> None:
        raise ConnectionError("the broker went away")

    back = [(store, "create", store.create), (publisher, "publish_job", publisher.publish_job)]
    monkeypatch.setattr(store, "withdraw", withdraw)
    if failing == "create":
        monkeypatch.setattr(store, "create", away)
    else:
        monkeypatch.setattr(publisher, "publish_job", broker_down)
    key = f"redis-away-{failing}"
    body = {"source": {"url": "https://example.com/photo.jpg"}}
    headers = {"Authorization": f"Bearer {token('alice')}", "Idempotency-Key": key}
    status, answer = await _post(http, f"{base}/jobs", body, headers)
    assert status == 503, answer
    first = json.loads(await redis_client.get(store._idem_key("alice", key)))["job_id"]
    assert (await _post(http, f"{base}/jobs", body, headers))[0] == 409  # not withdrawn yet

    for target, name, real in back:  # Redis and the broker are back
        monkeypatch.setattr(target, name, real)
    redis_back.set()

    async def freed() -> bool:
        slots = await redis_client.zrange(app[QUOTAS].active_key("alice"), 0, -1)
        return await redis_client.get(store._idem_key("alice", key)) is None and first.encode() not in slots

    await eventually(freed)
    assert await store.get(first) is None
    status, job = await _post(http, f"{base}/jobs", body, headers)
    assert (status, job["status"]) == (202, "pending") and job["id"] != first


async def test_a_replay_answered_past_the_window_keeps_the_job_from_its_withdrawal(
    cancelling_api: tuple[str, web.Application, list[asyncio.Task]],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first request outlasts the window a withdrawal is waited for (Redis slow to answer, then a
    publish timing out): a replay past it answers 202 for the job, so the first request's withdrawal
    must not take that job away. It stays `pending`, with its key and its slot, for the reconciler."""
    base, app, _ = cancelling_api
    store, publisher = app[resources.STORE], app[resources.PUBLISHER]
    monkeypatch.setattr(api_app, "_WITHDRAWAL_WINDOW_S", 0.2)
    replayed = asyncio.Event()

    async def broker_down_after_the_replay(*_: Any) -> None:
        await asyncio.wait_for(replayed.wait(), 10)
        raise ConnectionError("the broker went away")

    monkeypatch.setattr(publisher, "publish_job", broker_down_after_the_replay)
    body = {"source": {"url": "https://example.com/photo.jpg"}}
    headers = {"Authorization": f"Bearer {token('alice')}", "Idempotency-Key": "slow-first"}
    first = asyncio.create_task(_post(http, f"{base}/jobs", body, headers))
    claim = store._idem_key("alice", "slow-first")

    async def recorded() -> bool:
        held = await redis_client.get(claim)
        return bool(held) and await store.get(json.loads(held)["job_id"]) is not None

    await eventually(recorded)  # the first request is at its publish

    async def answered() -> dict | None:
        status, answer = await _post(http, f"{base}/jobs", body, headers)
        return answer if status == 202 else None

    job = await eventually(answered)  # 409 until the window is past, then the job
    replayed.set()
    status, answer = await first
    assert (status, answer["error"]["code"]) == (503, "broker_unavailable")
    record = await store.get(job["id"])
    assert record is not None and record.status.value == "pending"  # the reconciler publishes it
    assert json.loads(await redis_client.get(claim))["job_id"] == job["id"]
    assert await redis_client.zrange(app[QUOTAS].active_key("alice"), 0, -1) == [job["id"].encode()]
    assert (await _post(http, f"{base}/jobs", body, headers))[1]["id"] == job["id"]


async def test_a_record_written_before_its_reply_was_lost_is_withdrawn(
    cancelling_api: tuple[str, web.Application, list[asyncio.Task]],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis writes the record, and its reply is lost (a timeout): the request answers 503, so the
    record must go with the slot and the key, or a retry with the key would make a second job beside
    one the reconciler publishes."""
    base, app, _ = cancelling_api
    store = app[resources.STORE]
    restore = _reply_lost(monkeypatch, store, "create")
    body = {"source": {"url": "https://example.com/photo.jpg"}}
    headers = {"Authorization": f"Bearer {token('alice')}", "Idempotency-Key": "lost-reply"}
    status, answer = await _post(http, f"{base}/jobs", body, headers)
    assert (status, answer["error"]["code"]) == (503, "store_unavailable")
    assert [key async for key in redis_client.scan_iter(store.job_pattern)] == []
    assert await redis_client.get(store._idem_key("alice", "lost-reply")) is None
    assert await redis_client.zcard(app[QUOTAS].active_key("alice")) == 0

    restore()
    status, job = await _post(http, f"{base}/jobs", body, headers)
    assert status == 202
    assert [key async for key in redis_client.scan_iter(store.job_pattern)] == [
        store.job_key(job["id"]).encode()
    ]


async def test_a_claim_made_before_its_reply_was_lost_is_let_go(
    cancelling_api: tuple[str, web.Application, list[asyncio.Task]],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis makes the Idempotency-Key's claim and its reply is lost: the request answers 503, and the
    retry it asks for was answered 409 idempotency_in_progress for ten minutes, with nothing in progress.
    The claim is let go beside the answer, not before it: after a timeout, that is another timeout."""
    base, app, _ = cancelling_api
    store = app[resources.STORE]
    restore = _reply_lost(monkeypatch, store, "claim_idempotency")
    body = {"source": {"url": "https://example.com/photo.jpg"}}
    headers = {"Authorization": f"Bearer {token('alice')}", "Idempotency-Key": "lost-claim"}
    # The release goes on after the answer: held back here until the 503 is in.
    real_release, answered = store.release_idempotency, asyncio.Event()

    async def release_after_the_answer(*args: Any, **kwargs: Any) -> Any:
        await answered.wait()
        return await real_release(*args, **kwargs)

    monkeypatch.setattr(store, "release_idempotency", release_after_the_answer)
    async with asyncio.timeout(10):  # awaited before answering, the release held the 503 back
        status, answer = await _post(http, f"{base}/jobs", body, headers)
    assert (status, answer["error"]["code"]) == (503, "store_unavailable")
    answered.set()

    async def let_go() -> bool:
        return await redis_client.get(store._idem_key("alice", "lost-claim")) is None

    await eventually(let_go)
    restore()
    status, job = await _post(http, f"{base}/jobs", body, headers)
    assert (status, job["status"]) == (202, "pending")


async def test_a_claim_let_go_while_the_api_stops_is_let_go_before_it_stops() -> None:
    """A submission failing as the api stops leaves its claim's release running beside it; the
    cleanup cancelled it with the withdrawals, before it reached Redis, and the key stayed claimed."""
    app = web.Application()
    cleanup = api_app._submissions(app)
    await cleanup.__anext__()
    released = asyncio.Event()

    async def release() -> None:  # `_release_claim`: one Redis round trip
        await asyncio.sleep(0.05)
        released.set()

    async def failing_submission() -> None:
        await asyncio.sleep(0.01)
        api_app._in_background(app, api_app.RELEASES, release())
        raise RedisTimeoutError("the claim's reply was lost")

    submission = asyncio.ensure_future(failing_submission())
    app[api_app.SUBMISSIONS].add(submission)
    submission.add_done_callback(app[api_app.SUBMISSIONS].discard)
    with pytest.raises(StopAsyncIteration):
        await cleanup.__anext__()
    assert released.is_set()
    assert isinstance(submission.exception(), RedisTimeoutError)


def _reply_lost(monkeypatch: pytest.MonkeyPatch, store: Any, method: str) -> Callable[[], None]:
    """Make `store.<method>` reach Redis and then lose its reply (a timeout); returns the undo."""
    real = getattr(store, method)

    async def reply_lost(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise RedisTimeoutError("Timeout reading from socket")

    monkeypatch.setattr(store, method, reply_lost)
    return lambda: monkeypatch.setattr(store, method, real)


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict, headers: dict[str, str]
) -> tuple[int, dict]:
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_submission_that_fails_after_its_client_went_away_is_logged(
    cancelling_api: tuple[str, web.Application, list[asyncio.Task]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No handler is left to answer (or log) an unexpected failure: the submission logs it itself."""
    base, app, handlers = cancelling_api
    store = app[resources.STORE]
    reached, release = asyncio.Event(), asyncio.Event()

    async def breaks(*_: Any, **__: Any) -> None:
        reached.set()
        await release.wait()
        raise RuntimeError("a bug, say")

    monkeypatch.setattr(store, "create", breaks)
    records: list[logging.LogRecord] = []
    collect = logging.Handler()
    collect.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("imgpipe.api").addHandler(collect)
    try:
        async with aiohttp.ClientSession() as impatient:
            first = asyncio.create_task(
                impatient.post(
                    f"{base}/jobs",
                    json={"source": {"url": "https://example.com/photo.jpg"}},
                    headers={"Authorization": f"Bearer {token('alice')}"},
                )
            )
            await asyncio.wait_for(reached.wait(), 10)
            first.cancel()
        await eventually(lambda: handlers[0].done())
        release.set()
        [line] = await eventually(lambda: [r for r in records if r.msg.startswith("job submission failed")])
    finally:
        logging.getLogger("imgpipe.api").removeHandler(collect)
    assert line.levelno == logging.ERROR and line.exc_info and line.exc_info[0] is RuntimeError
    assert line.job_id  # type: ignore[attr-defined]
