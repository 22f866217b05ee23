"""The api section's durable floor (`bench/floor.py`) makes its three round trips for real.

A floor that skipped one of them (an unconfirmed publish, a HEAD never sent) would flatter every
figure measured against it; here each one is seen where it lands: the message in its quorum queue,
the record in Redis, and a source that S3 does not have refused.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from imgpipe.store import owner_id

from bench import floor
from tests.stack import AMQP_URL, BUCKET, s3_client


@pytest.fixture
async def floor_url(base_env: dict[str, str]) -> AsyncIterator[str]:
    server = TestServer(floor.create_app(base_env), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/jobs"))
    finally:
        await server.close()
        await floor.delete_queue(AMQP_URL, base_env["IMGPIPE_NAMESPACE"])


async def test_an_accepted_job_is_in_redis_and_in_its_quorum_queue(
    floor_url: str, base_env: dict[str, str], http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    key = f"uploads/{owner_id('floor')}/photo.jpg"
    s3_client(base_env["IMGPIPE_S3_ENDPOINT_URL"]).put_object(Bucket=BUCKET, Key=key, Body=b"\xff\xd8\xff")
    body = json.dumps({"source": {"key": key}, "variants": ["thumb"]}).encode()

    async with http.post(floor_url, data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 202, await response.text()
        job_id = (await response.json())["id"]

    namespace = base_env["IMGPIPE_NAMESPACE"]
    assert await redis_client.get(f"{namespace}:floor:{job_id}") == body
    assert 0 < await redis_client.ttl(f"{namespace}:floor:{job_id}") <= 600
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(floor.queue_name(namespace), passive=True)
        message = await queue.get(no_ack=True, timeout=5)
        assert message.message_id == job_id
        assert message.body == body
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        # A quorum queue, as the jobs queue is: declaring it as another type is refused.
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await (await connection.channel()).declare_queue(
                floor.queue_name(namespace), durable=True, arguments={"x-queue-type": "classic"}
            )


async def test_a_source_s3_does_not_have_is_refused_and_nothing_is_queued(
    floor_url: str, base_env: dict[str, str], http: aiohttp.ClientSession
) -> None:
    body = json.dumps({"source": {"key": f"uploads/{owner_id('floor')}/missing.jpg"}})
    async with http.post(floor_url, data=body) as response:
        assert response.status == 422
        assert (await response.json())["code"] == "source_not_found"
    async with http.post(floor_url, data=b"{") as response:
        assert response.status == 422
        assert (await response.json())["code"] == "invalid_request"

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(floor.queue_name(base_env["IMGPIPE_NAMESPACE"]), passive=True)
        assert queue.declaration_result.message_count == 0


async def test_a_url_source_is_queued_without_a_head(
    floor_url: str, base_env: dict[str, str], http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    # The worker is the one to fetch a URL: like the api, the floor takes it unseen (port 9 answers nothing).
    body = json.dumps({"source": {"url": "http://127.0.0.1:9/photo.jpg"}}).encode()
    async with http.post(floor_url, data=body) as response:
        assert response.status == 202, await response.text()
        job_id = (await response.json())["id"]
    assert await redis_client.get(f"{base_env['IMGPIPE_NAMESPACE']}:floor:{job_id}") == body
    async with http.post(floor_url, data=json.dumps({"source": {"url": 1}})) as response:
        assert response.status == 422
