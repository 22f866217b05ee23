"""The least a durable `POST /jobs` of this design does: the api section's second baseline.

The bare handler shows what aiohttp costs; `POST /jobs` also makes three round trips that a job must
not be accepted without (the source's HEAD on S3, the record in Redis, the publish to the quorum
queue with its confirm). This handler makes those three with the same clients the services use
(aiohttp with a presigned URL, redis-py, aio-pika with publisher confirms), one after the other as
the api does, and nothing else: no token, no validation but that there is a source, no limits, no
Idempotency-Key, no status to publish, no logs or metrics. A URL source, as in the api, has no HEAD.
Each call is made plainly, one request's at a time: the api batches the Redis calls of concurrent
requests (`imgpipe.coalesce`), which a service could do here too, so the floor is not a bound.
Its rate is what such a service reaches on the same machine when it does nothing more, so
`POST /jobs` against it says how much of the distance to the bare handler is imgpipe's own work, and
the floor against the bare handler how much is the design's round trips.

`python -m bench.floor PORT` serves it on 127.0.0.1 with the services' environment
(`IMGPIPE_NAMESPACE`, `IMGPIPE_AMQP_URL`, `IMGPIPE_REDIS_URL`, the S3 settings): it publishes to the
quorum queue `<namespace>.floor`, which it declares, and writes `<namespace>:floor:<id>` keys
(`drop_namespace` removes those; the queue is for whoever started it to delete: `delete_queue`).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import boto3
import redis.asyncio as aioredis
import yarl
from aiohttp import web
from botocore.config import Config
from imgpipe.presign import Presigner

_RECORD_TTL_S = 600

PRESIGNER = web.AppKey("presigner", Presigner)
HTTP = web.AppKey("http", aiohttp.ClientSession)
REDIS = web.AppKey("redis", aioredis.Redis)
EXCHANGE = web.AppKey("exchange", aio_pika.abc.AbstractExchange)


def queue_name(namespace: str) -> str:
    return f"{namespace}.floor"


async def delete_queue(amqp_url: str, namespace: str) -> None:
    """Delete the floor's queue of `namespace` (there or not: RabbitMQ deletes a missing queue without
    an error)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await (await connection.channel()).queue_delete(queue_name(namespace))


def create_app(env: dict[str, str]) -> web.Application:
    namespace = env["IMGPIPE_NAMESPACE"]
    queue = queue_name(namespace)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        session = boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]
        )
        s3 = session.client(
            "s3",
            endpoint_url=env["IMGPIPE_S3_ENDPOINT_URL"],
            config=Config(
                region_name=env.get("AWS_REGION", "us-east-1"),
                signature_version="s3v4",
                s3={"addressing_style": "path"},
            ),
        )
        app[PRESIGNER] = Presigner(s3, session.get_credentials(), env["IMGPIPE_S3_BUCKET"])
        app[HTTP] = aiohttp.ClientSession()
        app[REDIS] = aioredis.Redis.from_url(env["IMGPIPE_REDIS_URL"])
        connection = await aio_pika.connect(env["IMGPIPE_AMQP_URL"])
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        app[EXCHANGE] = channel.default_exchange
        yield
        await connection.close()
        await app[REDIS].aclose()
        await app[HTTP].close()

    async def create_job(request: web.Request) -> web.Response:
        app = request.app
        raw = await request.read()
        try:
            source = json.loads(raw)["source"]
            key = source.get("key")
            if not isinstance(key or source.get("url"), str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"code": "invalid_request"}, status=422)
        if key is not None:  # an upload is looked at; a URL source is the worker's to fetch
            url = yarl.URL(app[PRESIGNER].url("HEAD", key, expires_s=300), encoded=True)
            async with app[HTTP].head(url) as head:
                if head.status != 200:
                    return web.json_response({"code": "source_not_found"}, status=422)
        job_id = uuid.uuid4().hex
        await app[REDIS].set(f"{namespace}:floor:{job_id}", raw, ex=_RECORD_TTL_S)
        await app[EXCHANGE].publish(  # returns once the broker has confirmed it
            aio_pika.Message(raw, message_id=job_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue,
        )
        return web.json_response({"id": job_id, "status": "pending"}, status=202)

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.cleanup_ctx.append(resources)
    app.router.add_post("/jobs", create_job)
    app.router.add_get("/readyz", ready)
    return app


if __name__ == "__main__":
    web.run_app(
        create_app(dict(os.environ)), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None
    )
