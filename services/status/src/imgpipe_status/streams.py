"""How many event streams one status process holds open, per user and in all.

Each stream holds a socket, a file descriptor and some memory for as long as its job runs, and a
client opens one with a single cheap request. Without a bound, one user's runaway loop (or a
leaked token) could take every descriptor of a replica, and every other user's streams with it.
The bounds are per process: with the streams spread over replicas, a user's share grows with them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from imgpipe.telemetry import SSE_REFUSED
from imgpipe.web import ApiError

#: `Retry-After` for a refused stream: a stream ends when its job does, usually within seconds.
RETRY_AFTER_S = 5


class Streams:
    """The open streams of this process, counted by their token's `sub` (0 = no limit)."""

    def __init__(self, *, per_user: int, total: int) -> None:
        self.per_user = per_user
        self.total = total
        self._open = 0
        self._by_user: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return self._open

    def of(self, sub: str) -> int:
        return self._by_user[sub]

    @contextlib.contextmanager
    def slot(self, sub: str) -> Iterator[None]:
        """Hold one stream's place while it is open; refused with a 4xx/5xx `ApiError` when full.

        The user's own limit is checked first: a user at it is told so (429) even when the process
        is full too, since waiting for another replica would not help them.
        """
        if self.per_user and self._by_user[sub] >= self.per_user:
            SSE_REFUSED.labels(reason="user").inc()
            raise ApiError(
                429,
                "too_many_streams",
                f"this user already has {self.per_user} event streams open here; close some, or poll",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if self.total and self._open >= self.total:
            SSE_REFUSED.labels(reason="process").inc()
            raise ApiError(
                503,
                "streams_at_capacity",
                "this status replica holds all the event streams it may; retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._open += 1
        self._by_user[sub] += 1
        try:
            yield
        finally:
            self._open -= 1
            left = self._by_user[sub] - 1
            if left:
                self._by_user[sub] = left
            else:
                del self._by_user[sub]  # users come and go: keep only those with streams open
