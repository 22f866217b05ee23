"""The run lock: at most one reconciliation at a time, scheduled, admin or command line.

`SET NX PX` with a random token; the holder renews it every third of its lifetime and releases it
only if it still holds it (compare-and-delete). A holder that crashes stops renewing, so the lock
frees itself after its lifetime; a holder that cannot renew (Redis unreachable, lock lost) is
cancelled rather than left running unguarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

log = logging.getLogger("imgpipe.reconciler")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LockBusy(Exception):
    """Another reconciliation holds the lock."""


class LockLost(Exception):
    """The lock could not be renewed, so the run was stopped."""


class RunLock:
    def __init__(self, client: aioredis.Redis, namespace: str, ttl_s: int) -> None:
        self.key = f"{namespace}:reconcile:lock"
        self.ttl_s = ttl_s
        self._redis = client
        self._ttl_ms = ttl_s * 1000
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold the lock for the block; raises `LockBusy` if taken, `LockLost` if lost midway."""
        token = secrets.token_hex(16)
        if not await self._redis.set(self.key, token, nx=True, px=self._ttl_ms):
            raise LockBusy(self.key)
        task = asyncio.current_task()
        assert task is not None
        lost = asyncio.Event()

        async def keep() -> None:
            while True:
                await asyncio.sleep(self._ttl_ms / 3000)
                try:
                    renewed = await self._renew(keys=[self.key], args=[token, self._ttl_ms])
                except Exception as exc:
                    log.warning("could not renew the reconcile lock: %s", type(exc).__name__)
                    renewed = 0
                if not renewed:
                    lost.set()
                    task.cancel()
                    return

        keeper = asyncio.create_task(keep())
        try:
            yield
        except asyncio.CancelledError:
            if lost.is_set():
                task.uncancel()
                raise LockLost(self.key) from None
            raise
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            with contextlib.suppress(Exception):
                await self._release(keys=[self.key], args=[token])
