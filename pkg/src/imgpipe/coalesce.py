"""Redis calls made at the same moment by concurrent requests, sent together as one pipeline.

Under load, the api runs dozens of `POST /jobs` at once, and each makes the same few Redis calls
(its grant's read, its record's script). Most of a call's CPU in redis-py is not the command but
the walk around it: taking a pooled connection, the retry wrapper, one write and one read wake-up.
`Coalescer` keeps one batch out at Redis at a time: the calls made while it is out wait for it, and
then go out together as one pipeline (no MULTI), so that walk is made once for all of them (in
process, 44-55 µs a command in batches of 32 against 168-282 µs a command alone). There is no
timer: a call made while nothing is out goes at the end of the current turn of the event loop, with
whatever else that turn adds, so at light load no call waits for another. A slow command would hold
up every call behind it: only quick ones (single-key reads, the store's scripts) go through here. A
batch carries at most `MAX_BATCH` calls; a larger crowd goes out in several, one after the other.

Nothing changes for the commands themselves: each is atomic on its own as before (a script runs
whole), and each caller gets its own reply or its own error. A connection failure fails every call
of the batch with the same error, as it would have failed each of them alone; a timeout (a Redis
that takes connections and does not answer) fails the calls queued behind the batch too, at once
and unsent: sent next, they would wait out a timeout of their own, and a crowd was answered in
turns of the socket timeout. The price: a call queued just before a Redis that was only slow
answers again fails with the batch. A script Redis has lost is loaded again and run again, and only
its own callers hear of it if that fails; an argument that cannot be sent (no bytes for it) fails
its own call only. One call alone, the usual case at light load, goes out as a plain call, which
costs less than a pipeline of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_Call = tuple[tuple[Any, ...], "AsyncScript | None", asyncio.Future]

# What redis-py raises for an argument it cannot turn into bytes (None, a lone surrogate): while it
# packs the commands, before any of them is sent. Not Redis' answer, so the batch is not lost.
_UNSENDABLE = (DataError, UnicodeEncodeError)

#: The most calls one pipeline carries; the rest go in the next. Every caller of a batch waits for
#: all of it: 100,000 calls at once made one pipeline of 2.9 s, close to the client's socket
#: timeout (which would have failed every one of them), where batches of this size take ~20 ms each.
MAX_BATCH = 1000


class Coalescer:
    """Sends the calls made through it to Redis in batches, one batch out at a time (see the module)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Call] = []
        # The batch out at Redis, if any: held so it is not garbage-collected while it waits.
        self._out: asyncio.Task | None = None

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client the batches go out on."""
        return self._client

    async def command(self, *args: Any) -> Any:
        """Run one Redis command (`"HMGET", key, field, ...`): its reply, parsed as redis-py parses it."""
        return await self._queue(args, None)

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a registered Lua script by its SHA, loading it first if Redis has lost it (a restart)."""
        return await self._queue(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    def _queue(self, args: tuple[Any, ...], script: AsyncScript | None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new event loop (an application started again, a test): whatever the old one had
            # pending or out can never complete, and must not hold this call back.
            self._loop, self._pending, self._out = loop, [], None
        future = loop.create_future()
        if not self._pending and self._out is None:
            # At the end of this turn of the loop, so that the other requests ready now join in.
            loop.call_soon(self._flush)
        # Otherwise a batch is out, and `_sent` sends this call with the others when it is back.
        self._pending.append((args, script, future))
        return future

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        self._out = asyncio.get_running_loop().create_task(self._send(batch))
        self._out.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        if task is not self._out:
            return  # a batch of an event loop given up since (see `_queue`)
        self._out = None
        self._flush()

    async def _send(self, batch: list[_Call]) -> None:
        replies = await self._attempt(batch)
        if replies is None:
            return
        # A plain `command("EVALSHA", ...)` answered NOSCRIPT has that for its reply: there is no script
        # to load again.
        lost_at = {i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError) and batch[i][1]}
        # Every other call has its reply now, whatever happens to the lost scripts' second run: a
        # caller whose command ran is never told it failed.
        _settle(
            (call, reply)
            for i, (call, reply) in enumerate(zip(batch, replies, strict=True))
            if i not in lost_at
        )
        lost = [batch[i] for i in sorted(lost_at)]
        if not lost:
            return
        # Redis restarted (or its script cache was flushed) since the scripts were loaded. A script
        # that cannot be loaded fails its own callers only.
        again: list[_Call] = []
        for script, calls in _by_script(lost):
            try:
                await self._client.script_load(script.script)
            except ResponseError as exc:
                _settle((call, exc) for call in calls)
                continue
            except (Exception, asyncio.CancelledError) as exc:
                self._failed(lost, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            again += calls
        if again and (replies := await self._attempt(again)) is not None:
            _settle(zip(again, replies, strict=True))

    async def _attempt(self, batch: list[_Call]) -> list[Any] | None:
        """`_run(batch)`; None when it failed as a whole, its callers told (a connection failure)."""
        try:
            return await self._run(batch)
        except (Exception, asyncio.CancelledError) as exc:
            self._failed(batch, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None

    def _failed(self, batch: list[_Call], exc: BaseException) -> None:
        """`batch` failed as a whole with `exc`: its callers are told, and after a timeout those
        queued behind it too (see the module)."""
        _fail(batch, exc)
        if isinstance(exc, RedisTimeoutError | TimeoutError):
            waiting, self._pending = self._pending, []
            _fail(waiting, exc)

    async def _run(self, batch: list[_Call]) -> list[Any]:
        """The replies to `batch`, in order; a command's own error is its reply, not raised."""
        if len(batch) == 1:
            return [await self._one(batch[0][0])]
        pipe = self._client.pipeline(transaction=False)
        for args, _, _ in batch:
            pipe.execute_command(*args)
        try:
            return await pipe.execute(raise_on_error=False)
        except _UNSENDABLE:
            # One call's argument stopped the packing, before anything went out: each call alone
            # now, so that only its own caller hears of it. A failure on the way (the connection)
            # is the reply of the calls not sent yet; those sent keep theirs.
            replies: list[Any] = []
            for args, _, _ in batch:
                try:
                    replies.append(await self._one(args))
                except Exception as exc:
                    replies += [exc] * (len(batch) - len(replies))
                    break
            return replies

    async def _one(self, args: tuple[Any, ...]) -> Any:
        """The reply to one command; its own error (Redis', or an argument it cannot send) as its reply."""
        try:
            return await self._client.execute_command(*args)
        except (ResponseError, *_UNSENDABLE) as exc:
            return exc


def _settle(outcomes: Iterable[tuple[_Call, Any]]) -> None:
    """Give each call its reply, or its own error."""
    for (*_, future), reply in outcomes:
        if future.done():  # its caller went away (cancelled); the command ran all the same
            continue
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)


def _fail(batch: list[_Call], exc: BaseException) -> None:
    """Fail the calls of `batch` still waiting with `exc` (cancel them, when it is a cancellation)."""
    for *_, future in batch:
        if future.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(exc)


def _by_script(calls: list[_Call]) -> list[tuple[AsyncScript, list[_Call]]]:
    """The calls grouped by their script, in order of first appearance."""
    groups: dict[int, tuple[AsyncScript, list[_Call]]] = {}
    for call in calls:
        script = call[1]
        assert script is not None  # only script calls are answered NOSCRIPT
        groups.setdefault(id(script), (script, []))[1].append(call)
    return list(groups.values())
