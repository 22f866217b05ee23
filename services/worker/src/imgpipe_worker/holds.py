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
    """The sources a worker holds or is reading, and their byte budget.

    A job's download starts at once: a worker takes one message more than its concurrency, so that
    the next job's source downloads while the renders run. Its body is read only once the response's
    headers say how long it is, and only if it fits in what the other sources leave of `max_bytes`
    (a body being read counts from its headers on; one without a length, at all the room it was
    given), or if no other source is held at all. Otherwise the download is given up, and made again
    once there is room for it (`SourceHold.room_for_it`). Those waiting go in turn, and the room they
    need is kept for them (all of it for one that needs to be alone), so that a large source is not
    starved by small ones; a download after them takes only what is left.

    So the sources held come to at most `max_bytes`, but for one alone; and a source server slow to
    answer holds up no other job's download, as one whose headers have not come counts for nothing
    yet, or for the room kept for it if it waited its turn (one that sends its headers, then its body
    slowly, holds its room until it is done).
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._queue: list[SourceHold] = []  # waiting for room, in turn
        self._waiters: list[asyncio.Future[None]] = []

    def hold(self) -> SourceHold:
        """A new job's hold on a source, taken when its body is admitted (`SourceHold.admit`)."""
        return SourceHold(self)

    @property
    def held_bytes(self) -> int:
        """The bytes of the sources held now: admitted, and not yet freed by their render."""
        return self._bytes

    def _room(self, hold: SourceHold) -> int | None:
        """How many bytes `hold`'s source may take now: None, any (it would be the only one); 0,
        none. What the sources waiting before it need is kept for them: all of it for one that
        needs to be the only source."""
        ahead = self._queue[: self._queue.index(hold)] if hold in self._queue else self._queue
        if not ahead:
            return None if not self._bytes else max(0, self._max_bytes - self._bytes)
        if any(waiting.wanted is None for waiting in ahead):
            return 0
        return max(0, self._max_bytes - self._bytes - sum(waiting.wanted or 0 for waiting in ahead))

    def _take(self, size: int) -> None:
        self._bytes += size
        self._wake()

    def _leave_queue(self, hold: SourceHold) -> None:
        if hold in self._queue:
            self._queue.remove(hold)
            self._wake()

    async def _changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _wake(self) -> None:
        # Every waiter looks again; the first in turn whose source would fit tries its download.
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():  # a job cancelled while it waited
                waiter.set_result(None)


class SourceHold(_Hold):
    """One job's source: admitted when its response's headers are in (`admit`, a `bodies.Admit`),
    counted from then at its length (or, without one, at the room it was given) and at its size
    once read (`downloaded`), and let go of when its render ends (`render_ended`: the render is
    what frees the bytes), when its download fails (`drop`), or when the job is done (`job_done`)
    without a render running (`rendering`)."""

    def __init__(self, sources: Sources) -> None:
        super().__init__()
        self._sources = sources
        self._size = 0
        #: What the source needs to be tried again (`defer`): that many bytes of room (0: any), or
        #: None, to be the only source held (a body without a length ran past its room).
        self.wanted: int | None = 0

    def may_try(self) -> bool:
        """Whether a download may start now: no others wait for room before it, and some is left."""
        return self._sources._room(self) != 0

    def admit(self, length: int | None) -> int | None:
        """Room for a body of `length` bytes now (None: any), taken if the body fits it."""
        self._give_back()  # what an earlier try of the same download took (a body cut off, tried again)
        if self._job_done:  # a download let go of with its job: no room, nothing held
            return 0
        room = self._sources._room(self)
        if room == 0 or (length is not None and room is not None and length > room):
            return room
        # Without a length, the body may take all it is given: counted so until it is read.
        self._size = length if length is not None else room if room is not None else self._sources._max_bytes
        self._held = True
        self._sources._take(self._size)
        self._sources._leave_queue(self)
        return room

    def downloaded(self, size: int) -> None:
        """The body is read: `size` bytes, counted in place of what it was admitted at."""
        if self._held:
            self._sources._take(size - self._size)
            self._size = size

    def defer(self, size: int | None) -> None:
        """The download did not start (`may_try`) or its body had no room (`bodies.BodyNotAdmitted`:
        `size` is its length, 0 if it had none and there was no room at all, None if it ran past the
        room it was given without one): it counts for nothing, and waits its turn (`room_for_it`)."""
        self._give_back()
        self.wanted = size
        if not self._job_done and self not in self._sources._queue:
            self._sources._queue.append(self)

    def drop(self) -> None:
        """The download failed or was cancelled: what it took, and its turn, are given back now, not
        when the job has settled (writing its failure may take a while, behind a Redis outage)."""
        self._give_back()
        self._sources._leave_queue(self)

    async def room_for_it(self) -> None:
        """Wait until it is this source's turn and what it needs (`wanted`) is free."""
        while True:
            room = self._sources._room(self)
            if room is None or (self.wanted is not None and 0 < room and self.wanted <= room):
                return
            await self._sources._changed()

    def job_done(self) -> None:
        super().job_done()
        self._sources._leave_queue(self)  # a job that ends while it waits its turn

    def rendering(self) -> None:
        self._rendering = True

    def render_ended(self, _: object = None) -> None:
        # The render took the bytes (`consumer._render_held`): they are freed with it.
        self._render_ended(keep=False)

    def _release(self) -> None:
        self._sources._take(-self._size)
        self._size = 0
