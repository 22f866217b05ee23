"""Batched Redis calls against the real Redis: who gets which reply, errors, lost scripts, outages.

`Coalescer` is only worth having if concurrent calls really travel together, so the tests count the
pipelines it opens (a spy on the real client's `pipeline`, every command still goes to Redis).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from imgpipe import coalesce
from imgpipe.coalesce import Coalescer
from imgpipe.limits import Limits
from imgpipe.store import JobStore
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.stack import REDIS_URL, delete_keys, free_port

_ECHO_PLUS = "return {KEYS[1], tonumber(ARGV[1]) + 1}"


@pytest.fixture
async def prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    name = f"coalesce-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        await delete_keys(redis_client, f"{name}:*")


class _Counted:
    """How `client` was called: pipelines opened (with their sizes) and plain commands."""

    def __init__(self, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipelines: list[int] = []
        self.single = 0
        pipeline, execute = client.pipeline, client.execute_command

        def counting_pipeline(*args, **kwargs):
            pipe = pipeline(*args, **kwargs)
            run = pipe.execute

            async def counting_execute(*a, **k):
                self.pipelines.append(len(pipe.command_stack))
                return await run(*a, **k)

            pipe.execute = counting_execute
            return pipe

        async def counting_execute_command(*args, **kwargs):
            self.single += 1
            return await execute(*args, **kwargs)

        monkeypatch.setattr(client, "pipeline", counting_pipeline)
        monkeypatch.setattr(client, "execute_command", counting_execute_command)


async def test_concurrent_calls_go_as_one_pipeline_and_each_gets_its_own_reply(
    redis_client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        await redis_client.set(f"{prefix}:{i}", f"value-{i}")
    coalescer = Coalescer(redis_client)
    counted = _Counted(redis_client, monkeypatch)

    replies = await asyncio.gather(*(coalescer.command("GET", f"{prefix}:{i}") for i in range(20)))

    assert replies == [f"value-{i}".encode() for i in range(20)]
    assert counted.pipelines == [20]
    assert counted.single == 0


async def test_a_crowd_goes_out_in_batches_of_a_bounded_size(
    redis_client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each caller waits for its whole batch: an unbounded one grows with the crowd, up to the
    client's socket timeout, which fails all of it."""
    monkeypatch.setattr(coalesce, "MAX_BATCH", 8)
    coalescer = Coalescer(redis_client)
    counted = _Counted(redis_client, monkeypatch)

    replies = await asyncio.gather(*(coalescer.command("INCR", f"{prefix}:n") for _ in range(20)))

    assert sorted(replies) == list(range(1, 21))
    assert counted.pipelines == [8, 8, 4]


async def test_calls_made_while_a_batch_is_out_go_together_after_it(
    redis_client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    coalescer = Coalescer(redis_client)
    counted = _Counted(redis_client, monkeypatch)

    # Out alone at once (nothing waits for company), and held at Redis for 0.3 s.
    first = asyncio.ensure_future(coalescer.command("BLPOP", f"{prefix}:empty", "0.3"))
    later = []
    for _ in range(5):  # one at a time, in turns of the loop of their own, while the first is out
        await asyncio.sleep(0.01)
        later.append(asyncio.ensure_future(coalescer.command("INCR", f"{prefix}:n")))

    assert await first is None
    assert sorted(await asyncio.gather(*later)) == [1, 2, 3, 4, 5]
    assert (counted.single, counted.pipelines) == (1, [5])


async def test_the_store_and_the_limits_on_one_coalescer_send_their_calls_together(
    redis_client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `POST /uploads` makes under load: budget hits and grants of concurrent requests. The api
    # gives its limits the store's coalescer, so they travel in one pipeline, not in two at once.
    store = JobStore(redis_client, prefix, retention=timedelta(hours=1))
    limits = Limits(redis_client, prefix, ttl_s=3600, calls=store.calls)
    expires_at = time.time() + 600
    # Once each first, so that both scripts are in Redis and none of the calls below reloads one.
    await limits.hit("uploads", "user-0", limit=5, period_s=60)
    await store.record_grant(f"uploads/{prefix}/0", expires_at, content_type="image/png", size=10)
    counted = _Counted(redis_client, monkeypatch)

    await asyncio.gather(
        *(limits.hit("uploads", f"user-{i}", limit=5, period_s=60) for i in range(10)),
        *(
            store.record_grant(f"uploads/{prefix}/{i}", expires_at, content_type="image/png", size=10 + i)
            for i in range(10)
        ),
    )

    assert (counted.single, counted.pipelines) == (0, [20])
    grants = await asyncio.gather(*(store.grant(f"uploads/{prefix}/{i}") for i in range(10)))
    assert [(g.content_type, g.size) for g in grants] == [("image/png", 10 + i) for i in range(10)]


async def test_a_command_error_reaches_its_caller_only(redis_client: aioredis.Redis, prefix: str) -> None:
    await redis_client.set(f"{prefix}:string", "x")
    await redis_client.hset(f"{prefix}:hash", mapping={"a": "1"})
    coalescer = Coalescer(redis_client)

    good, bad, also_good = await asyncio.gather(
        coalescer.command("HMGET", f"{prefix}:hash", "a", "b"),
        coalescer.command("HMGET", f"{prefix}:string", "a"),  # WRONGTYPE
        coalescer.command("GET", f"{prefix}:string"),
        return_exceptions=True,
    )

    assert good == [b"1", None]
    assert isinstance(bad, ResponseError) and "WRONGTYPE" in str(bad)
    assert also_good == b"x"


@pytest.mark.parametrize("unsendable", [None, "\ud800"], ids=["none", "lone-surrogate"])
async def test_an_argument_that_cannot_be_sent_fails_its_own_call_only(
    redis_client: aioredis.Redis, prefix: str, unsendable: object
) -> None:
    """redis-py finds such an argument while it packs the pipeline, and raised it for the whole
    batch: a `GET` beside a `SET` of None failed with the `SET`'s `DataError`."""
    await redis_client.set(f"{prefix}:there", "x")
    coalescer = Coalescer(redis_client)

    bad, got, counted = await asyncio.gather(
        coalescer.command("SET", f"{prefix}:bad", unsendable),
        coalescer.command("GET", f"{prefix}:there"),
        coalescer.command("INCR", f"{prefix}:n"),
        return_exceptions=True,
    )

    assert isinstance(bad, DataError | UnicodeEncodeError), bad
    assert (got, counted) == (b"x", 1)
    assert await redis_client.get(f"{prefix}:n") == b"1"  # sent once, not again by the fallback


async def test_a_plain_evalsha_answered_noscript_gets_that_answer(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    """Only `script()` calls are loaded again; a `command("EVALSHA", ...)` of a script Redis does not
    have stopped the batch's task on an assertion, and its caller waited for ever."""
    coalescer = Coalescer(redis_client)
    async with asyncio.timeout(10):
        missing, got = await asyncio.gather(
            coalescer.command("EVALSHA", "0" * 40, 0),
            coalescer.command("GET", f"{prefix}:absent"),
            return_exceptions=True,
        )
    assert isinstance(missing, NoScriptError), missing
    assert got is None


async def test_a_redis_that_does_not_answer_fails_the_calls_queued_behind_the_batch_too() -> None:
    """Against a server that takes connections and never answers, each batch waited out the socket
    timeout, and the calls queued behind it then went out to wait it out again: a crowd got its
    errors in turns (5, 10, 15 s with the services' 5 s), the next batch on a new connection (the
    timed-out one is dropped). They fail with the batch now, unsent."""
    connections = 0
    arrived = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.read(65536):
            arrived.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # As the services' client (`resources.redis_client`) but for the timeout: no retry of a timeout.
    client = aioredis.Redis(
        port=port, socket_timeout=0.5, retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    )
    coalescer = Coalescer(client)
    try:
        async with asyncio.timeout(10):
            first = asyncio.ensure_future(coalescer.command("ECHO", "first"))
            await arrived.wait()  # the batch is out (its connection's handshake first), unanswered
            behind = [asyncio.ensure_future(coalescer.command("ECHO", f"behind-{i}")) for i in range(3)]
            outcomes = await asyncio.gather(first, *behind, return_exceptions=True)
        assert all(isinstance(o, RedisTimeoutError) for o in outcomes), outcomes
        assert connections == 1  # the calls behind were not sent: no second batch, no new connection
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("callers", [1, 8])
async def test_scripts_are_loaded_again_when_redis_has_lost_them(
    redis_client: aioredis.Redis, prefix: str, callers: int
) -> None:
    script = redis_client.register_script(_ECHO_PLUS)
    coalescer = Coalescer(redis_client)
    assert await coalescer.script(script, [f"{prefix}:k"], [1]) == [f"{prefix}:k".encode(), 2]

    await redis_client.script_flush()  # what a Redis restart does to the script cache
    replies = await asyncio.gather(
        *(coalescer.script(script, [f"{prefix}:{i}"], [i]) for i in range(callers)),
        coalescer.command("GET", f"{prefix}:absent"),  # a batch-mate that is no script
    )

    assert replies == [*([f"{prefix}:{i}".encode(), i + 1] for i in range(callers)), None]


async def test_a_lost_script_that_cannot_be_loaded_fails_its_own_callers_only(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    """Replies were handed out only once the lost scripts had been loaded and run again: a reload
    that failed gave its error to the whole batch, to callers whose commands had run (a `SET` told
    it failed after it was written), and to scripts that loaded fine."""
    unique = uuid.uuid4().hex  # scripts Redis has never seen: their EVALSHA is answered NOSCRIPT
    broken = redis_client.register_script(f"-- {unique}\nreturn {{")  # does not compile
    fine = redis_client.register_script(f"-- {unique}\n{_ECHO_PLUS}")
    coalescer = Coalescer(redis_client)

    written, refused, echoed = await asyncio.gather(
        coalescer.command("SET", f"{prefix}:written", "yes"),
        coalescer.script(broken, [f"{prefix}:b"], [1]),
        coalescer.script(fine, [f"{prefix}:f"], [41]),
        return_exceptions=True,
    )

    assert written is True and await redis_client.get(f"{prefix}:written") == b"yes"
    assert isinstance(refused, ResponseError) and "compil" in str(refused).lower(), refused
    assert echoed == [f"{prefix}:f".encode(), 42]


async def test_a_cancelled_caller_leaves_the_others_their_replies(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    coalescer = Coalescer(redis_client)
    calls = [asyncio.ensure_future(coalescer.command("INCR", f"{prefix}:n")) for _ in range(4)]
    await asyncio.sleep(0)
    calls[1].cancel()

    done = await asyncio.gather(*calls, return_exceptions=True)

    assert isinstance(done[1], asyncio.CancelledError)
    assert sorted(done[i] for i in (0, 2, 3)) == [1, 3, 4]  # in batch order: the second INCR made 2
    # The cancelled caller's command went out with the batch all the same.
    assert int(await redis_client.get(f"{prefix}:n")) == 4


async def test_an_unreachable_redis_fails_every_call_at_once_and_then_the_next() -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    coalescer = Coalescer(client)
    try:
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(
                *(coalescer.command("PING") for _ in range(5)), return_exceptions=True
            )
            assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes
            # Nothing is left holding the queue: the next call fails on its own, it does not hang.
            with pytest.raises(RedisConnectionError):
                await coalescer.command("PING")
    finally:
        await client.aclose()


def test_a_call_left_behind_by_a_closed_loop_does_not_hold_up_the_next_loop() -> None:
    client = aioredis.from_url(REDIS_URL)
    coalescer = Coalescer(client)
    old = asyncio.new_event_loop()

    def queue_and_stop() -> None:
        coalescer._queue(("PING",), None)  # queued; its flush would run on the next turn
        old.stop()  # which never comes

    old.call_soon(queue_and_stop)
    old.run_forever()
    old.close()

    async def ping() -> object:
        try:
            async with asyncio.timeout(10):
                return await coalescer.command("PING")
        finally:
            await client.aclose()

    assert asyncio.run(ping()) is True
