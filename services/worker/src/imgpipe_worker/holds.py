"""What a job holds of a worker while it runs: a render slot, and its source's bytes.

Each is given back once, however the job ends. A render runs on in its thread after the job that
asked for it is cancelled (libvips calls cannot be interrupted), and it holds both the slot and the
source until then: so what a job holds goes back when the job is done with it *and* its render, if
it started one, has really ended.
"""

from __future__ import annotations

import asyncio

from imgpipe_worker import imaging

__all__ = [
    "OVERLAP_MAX_BYTES",
    "READ_AHEAD_IN_FLIGHT_WAIT_S",
    "READ_AHEAD_MAX_BYTES",
    "RenderSlot",
    "SourceHold",
    "Sources",
]

#: Outputs up to this size are uploaded while the next job renders in the slot; larger ones keep the
#: slot until they are in S3. The render's budget (`Limits.max_decode_bytes`) is what keeps a worker
#: at concurrency 1 under 300 MiB; the previous job's outputs held beside it are not in it. Those of
#: the presets take a few hundred kB, but a full-size PNG of a 24 MP photo takes about 60 MB: two
#: full-size PNG jobs of a 26 MP progressive JPEG peaked 98 MiB over one.
OVERLAP_MAX_BYTES = 4 * 1024 * 1024

#: A job ahead of the renders starts downloading its source only while the sources the worker holds
#: come to less than this. Nor are they in the render's budget: a 4800 px PNG of a 100 MP JPEG (a 29
#: MB source) took a worker at concurrency 1 from 289 MiB alone to 321-328 MiB with the next job's
#: source downloaded beside it. Photos of up to about 16 MB still download ahead of their render.
READ_AHEAD_MAX_BYTES = 16 * 1024 * 1024

#: A download in flight has no known size yet, so the job ahead waits for the downloads before it (or
#: jobs delivered together would all download at once), but no longer than this: a slow source
#: server must not hold up the jobs behind its own.
READ_AHEAD_IN_FLIGHT_WAIT_S = 1.0


class _Hold:
    """Something a job holds of the worker, given back once: when its render ends, unless it is
    kept beyond that (`_render_ended(keep=True)`), and otherwise when the job is done with it and
    no render of its runs (a render goes on after its job is cancelled, holding what it holds)."""

    def __init__(self) -> None:
        self._held = self._rendering = self._job_done = False

    def _render_ended(self, *, keep: bool) -> None:
        self._rendering = False
        if not keep or self._job_done:
            self._give_back()

    def job_done(self) -> None:
        """The job holds this no more (done with it, failed or cancelled)."""
        self._job_done = True
        if not self._rendering:
            self._give_back()

    def _give_back(self) -> None:
        if self._held:
            self._held = False
            self._release()

    def _release(self) -> None:
        raise NotImplementedError


class RenderSlot(_Hold):
    """One job's hold on a render slot: taken for its render, and given back once the render has
    ended; but when it made outputs over `OVERLAP_MAX_BYTES`, only once the job is done with them
    too (`job_done`: uploaded, failed or cancelled)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        super().__init__()
        self._slots = slots

    async def acquire(self) -> None:
        await self._slots.acquire()
        self._held = self._rendering = True

    def render_ended(self, render: asyncio.Future[list[imaging.Rendered]] | None) -> None:
        """The render is over (`render` is its future; None: it never started)."""
        large = (
            render is not None
            and not render.cancelled()
            and render.exception() is None
            and sum(len(r.data) for r in render.result()) > OVERLAP_MAX_BYTES
        )
        self._render_ended(keep=large)

    def _release(self) -> None:
        self._slots.release()


class Sources:
    """The sources a worker holds, and the read-ahead's byte budget.

    A worker takes one message more than its concurrency, so that the next job's source downloads
    while the renders run. A download starts at once while fewer jobs hold a source than there are
    render slots. Beyond that (ahead of the renders), only while the sources held come to less than
    `max_ahead_bytes`, once the downloads in flight are done or it has waited `in_flight_wait_s`
    for them; otherwise when a source is let go of.
    """

    def __init__(
        self, concurrency: int, max_ahead_bytes: int | None = None, in_flight_wait_s: float | None = None
    ) -> None:
        self._concurrency = concurrency
        self._max_ahead_bytes = READ_AHEAD_MAX_BYTES if max_ahead_bytes is None else max_ahead_bytes
        self._in_flight_wait_s = READ_AHEAD_IN_FLIGHT_WAIT_S if in_flight_wait_s is None else in_flight_wait_s
        self._holders = 0
        self._downloading = 0
        self._bytes = 0
        self._waiters: list[asyncio.Future[None]] = []

    def hold(self) -> SourceHold:
        """A new job's hold, to be admitted before its download starts."""
        return SourceHold(self)

    @property
    def held_bytes(self) -> int:
        """The bytes of the sources held now: downloaded, and not yet freed by their render."""
        return self._bytes

    def _may_start(self, waited_s: float) -> bool:
        if self._holders < self._concurrency:
            return True
        if self._bytes >= self._max_ahead_bytes:
            return False
        return not self._downloading or waited_s >= self._in_flight_wait_s

    async def _admit(self) -> None:
        loop = asyncio.get_running_loop()
        since = loop.time()
        while not self._may_start(loop.time() - since):
            waiter = loop.create_future()
            self._waiters.append(waiter)
            if self._bytes < self._max_ahead_bytes:  # only downloads in flight stop it: not for long
                await asyncio.wait([waiter], timeout=since + self._in_flight_wait_s - loop.time())
            else:
                await waiter
        self._holders += 1
        self._downloading += 1

    def _downloaded(self, size: int) -> None:
        self._downloading -= 1
        self._bytes += size
        self._wake()

    def _let_go(self, size: int, *, downloading: bool) -> None:
        self._holders -= 1
        self._downloading -= downloading
        self._bytes -= size
        self._wake()

    def _wake(self) -> None:
        # Every waiter checks again, in turn: the first one admitted changes what the next one sees.
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():  # a job cancelled while it waited
                waiter.set_result(None)


class SourceHold(_Hold):
    """One job's source: admitted before it downloads (`admit`), counted once it is in memory
    (`downloaded`), and let go of when its render ends (`render_ended`: the render is what frees
    the bytes), or when the job is done (`job_done`) without a render running (`rendering`)."""

    def __init__(self, sources: Sources) -> None:
        super().__init__()
        self._sources = sources
        self._size = 0
        self._downloading = False
        self.admitted = asyncio.Event()

    async def admit(self) -> None:
        await self._sources._admit()
        self._held = self._downloading = True
        if self._job_done:  # the job ended while this waited: it holds nothing
            self._give_back()
        self.admitted.set()

    def downloaded(self, size: int) -> None:
        if self._held and self._downloading:
            self._downloading = False
            self._size = size
            self._sources._downloaded(size)

    def rendering(self) -> None:
        self._rendering = True

    def render_ended(self, _: object = None) -> None:
        # The render took the bytes (`consumer._render_held`): they are freed with it.
        self._render_ended(keep=False)

    def _release(self) -> None:
        self._sources._let_go(self._size, downloading=self._downloading)
        self._downloading = False
