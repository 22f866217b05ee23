"""The sources' byte budget (`holds.Sources`): which body may be read, and when.

The consumer's use of it, on the real RabbitMQ, Redis and S3, is in `test_render_slots.py`; these
check the accounting itself, step by step.
"""

from __future__ import annotations

import asyncio

import pytest
from imgpipe_worker.holds import SourceHold, Sources

MB = 1024 * 1024


async def waits(hold: SourceHold) -> bool:
    """Whether `hold.room_for_it()` still waits once everything ready to run has run."""
    waiting = asyncio.create_task(hold.room_for_it())
    for _ in range(5):
        await asyncio.sleep(0)
    done = waiting.done()
    waiting.cancel()
    return not done


async def test_a_body_is_read_only_into_the_room_the_sources_held_leave() -> None:
    sources = Sources(16 * MB)
    rendering, ahead, behind = sources.hold(), sources.hold(), sources.hold()
    assert rendering.admit(30 * MB) is None  # the only source: any size
    rendering.downloaded(30 * MB)
    assert ahead.admit(1 * MB) == 0  # over the budget already: none beside it
    ahead.defer(1 * MB)
    assert await waits(ahead)
    rendering.rendering()
    rendering.job_done()  # the job is done with it, but its render, which holds the bytes, runs on
    assert await waits(ahead)
    rendering.render_ended()
    assert not await waits(ahead)
    assert sources.held_bytes == 0
    assert ahead.admit(10 * MB) is None
    assert behind.admit(7 * MB) == 6 * MB  # counted from its headers on: no room for 7 MB beside it
    behind.defer(7 * MB)
    assert sources.held_bytes == 10 * MB
    assert await waits(behind)
    ahead.downloaded(10 * MB)
    assert await waits(behind)
    ahead.job_done()
    ahead.job_done()  # once only
    assert not await waits(behind)
    assert behind.admit(7 * MB) is None and sources.held_bytes == 7 * MB


async def test_a_body_without_a_length_is_counted_at_the_room_it_is_given_until_it_is_read() -> None:
    sources = Sources(16 * MB)
    first, unsized, alone = sources.hold(), sources.hold(), sources.hold()
    assert first.admit(4 * MB) is None
    assert unsized.admit(None) == 12 * MB
    assert sources.held_bytes == 16 * MB  # all it may take, until it is read
    unsized.downloaded(2 * MB)
    assert sources.held_bytes == 6 * MB
    unsized.job_done()
    # One that runs past its room waits until it would be the only source held.
    assert alone.admit(None) == 12 * MB
    alone.defer(None)
    assert sources.held_bytes == 4 * MB
    assert await waits(alone)
    first.job_done()
    assert not await waits(alone)
    assert alone.admit(None) is None
    alone.downloaded(40 * MB)
    assert sources.held_bytes == 40 * MB


async def test_a_retried_request_counts_its_body_once() -> None:
    """A body cut off part of the way, which `Storage._transfer` tries again: the second try's
    admission replaces the first's."""
    sources = Sources(16 * MB)
    hold = sources.hold()
    assert hold.admit(5 * MB) is None
    assert hold.admit(5 * MB) is None
    assert sources.held_bytes == 5 * MB
    hold.downloaded(5 * MB)
    hold.job_done()
    assert sources.held_bytes == 0


@pytest.mark.parametrize("how", ["job done", "download failed"])
async def test_a_download_let_go_of_gives_its_room_back_at_once(how: str) -> None:
    """Its job was let go of before the download ended (gone, or its channel lost), or its body
    broke off while its job is still to be marked failed: the room is free at once, and whatever
    comes late of it counts for nothing."""
    sources = Sources(16 * MB)
    first, second = sources.hold(), sources.hold()
    assert first.admit(10 * MB) is None
    assert second.admit(10 * MB) == 6 * MB
    second.defer(10 * MB)
    if how == "job done":
        first.job_done()
        first.downloaded(30 * MB)  # a late result
        assert first.admit(1 * MB) == 0  # and a late admission
    else:
        first.drop()
    assert sources.held_bytes == 0
    assert not await waits(second)
    first.job_done()
    assert sources.held_bytes == 0


async def test_a_slow_server_holds_up_no_other_download() -> None:
    """A download whose headers have not come counts for nothing: the one behind it is read, and
    the slow one, once its headers come, is read beside it only if there is room."""
    sources = Sources(16 * MB)
    slow, fast = sources.hold(), sources.hold()
    assert fast.admit(12 * MB) is None  # the slow one is still waiting for its headers
    fast.downloaded(12 * MB)
    assert slow.admit(8 * MB) == 4 * MB
    slow.defer(8 * MB)
    fast.rendering()
    assert await waits(slow)
    fast.render_ended()
    assert not await waits(slow)


async def test_those_waiting_for_room_go_in_turn() -> None:
    """A large source waiting for room is not starved by small ones that would fit beside the
    sources held: the room it needs is kept for it, and they take only what is left (without a
    request while there is none: `may_try`)."""
    sources = Sources(32 * MB)
    first, large = sources.hold(), sources.hold()
    assert first.admit(10 * MB) is None
    assert large.admit(25 * MB) == 22 * MB
    large.defer(25 * MB)
    small = sources.hold()
    assert not small.may_try()  # 10 MB would fit beside the first, but not beside the large one too
    small.defer(0)
    assert small.admit(10 * MB) == 0  # and so its headers would have said, had it asked
    assert await waits(large) and await waits(small)
    first.job_done()
    assert not await waits(large)
    assert not await waits(small)  # 7 MB are left beside what the large one needs: it may try
    assert small.admit(10 * MB) == 7 * MB
    small.defer(10 * MB)
    assert await waits(small)
    assert large.admit(25 * MB) is None  # the large one's turn came first
    assert await waits(small)
    large.job_done()
    assert not await waits(small)
    assert small.admit(10 * MB) is None and sources.held_bytes == 10 * MB


async def test_one_that_needs_to_be_the_only_source_keeps_all_the_room() -> None:
    """A body without a length that ran past its room waits to be alone; nothing starts beside
    the sources held meanwhile. One that found no room at all only waits for some."""
    sources = Sources(16 * MB)
    holding, alone, fresh = sources.hold(), sources.hold(), sources.hold()
    assert holding.admit(4 * MB) is None
    alone.defer(None)
    assert not fresh.may_try()
    fresh.defer(0)
    holding.job_done()
    assert not await waits(alone)
    assert fresh.admit(1 * MB) == 0  # still behind the one that needs to be alone
    assert alone.admit(None) is None
    alone.downloaded(3 * MB)
    assert not await waits(fresh)
    assert fresh.admit(1 * MB) == 13 * MB


async def test_a_failed_download_gives_its_turn_up() -> None:
    """The first in turn, tried again, fails (a 5xx, its budget out): the one behind it must not
    wait for its job to be marked failed."""
    sources = Sources(16 * MB)
    holding, first, behind = sources.hold(), sources.hold(), sources.hold()
    assert holding.admit(10 * MB) is None
    first.defer(12 * MB)
    behind.defer(10 * MB)
    holding.job_done()
    assert not await waits(first)
    first.drop()
    assert not await waits(behind)
    assert behind.admit(10 * MB) is None


async def test_a_job_done_does_not_wait_its_turn() -> None:
    """A download let go of with its job, whose headers came late: no room, and no place in turn
    that nobody would give up."""
    sources = Sources(16 * MB)
    gone, other = sources.hold(), sources.hold()
    gone.job_done()
    assert gone.admit(1 * MB) == 0
    gone.defer(1 * MB)
    assert other.admit(20 * MB) is None


async def test_a_job_that_ends_while_it_waits_for_room_gives_up_its_turn() -> None:
    sources = Sources(16 * MB)
    holding, gone, behind = sources.hold(), sources.hold(), sources.hold()
    assert holding.admit(10 * MB) is None
    gone.defer(20 * MB)
    behind.defer(0)
    assert await waits(behind)
    gone.job_done()  # cancelled, or its channel lost
    assert not await waits(behind)
    assert behind.admit(4 * MB) == 6 * MB
