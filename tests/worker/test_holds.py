"""The read-ahead's byte budget (`holds.Sources`): who may start a download, and when.

The consumer's use of it, on the real RabbitMQ, Redis and S3, is in `test_render_slots.py`; these
check the accounting itself, step by step.
"""

from __future__ import annotations

import asyncio

import pytest
from imgpipe_worker.holds import SourceHold, Sources

MB = 1024 * 1024


async def admitted(hold: SourceHold) -> bool:
    """Whether `hold` is admitted once everything ready to run has run."""
    for _ in range(5):
        await asyncio.sleep(0)
    return hold.admitted.is_set()


async def test_a_download_ahead_of_the_renders_waits_for_the_downloads_in_flight_and_the_bytes() -> None:
    sources = Sources(concurrency=1, max_ahead_bytes=16 * MB)
    first, second, third = sources.hold(), sources.hold(), sources.hold()
    tasks = [asyncio.create_task(hold.admit()) for hold in (first, second, third)]
    # One a render slot: admitted at once. The others are ahead of the renders, and the first
    # download has no size yet.
    assert await admitted(first) and not await admitted(second)
    first.downloaded(20 * MB)  # over the budget: the job ahead still waits
    assert not await admitted(second)
    first.rendering()
    first.job_done()  # the job is done with it, but its render, which holds the bytes, runs on
    assert not await admitted(second)
    first.render_ended()
    assert await admitted(second) and not await admitted(third)
    second.downloaded(2 * MB)  # under the budget: one more may download ahead
    assert await admitted(third)
    assert sources.held_bytes == 2 * MB
    third.downloaded(3 * MB)
    for hold in (second, third):
        hold.job_done()
        hold.job_done()  # once only
    assert sources.held_bytes == 0
    await asyncio.gather(*tasks)
    # All let go of: the next job is a render slot's again, whatever was held before.
    fresh = sources.hold()
    await fresh.admit()
    assert fresh.admitted.is_set()


async def test_a_job_let_go_of_mid_download_counts_for_nothing() -> None:
    sources = Sources(concurrency=1, max_ahead_bytes=16 * MB)
    first, second = sources.hold(), sources.hold()
    await first.admit()
    waiting = asyncio.create_task(second.admit())
    assert not await admitted(second)
    first.job_done()  # dropped before its download ended (the job was gone, or its channel lost)
    first.downloaded(30 * MB)  # a late result: not counted
    assert await admitted(second)
    await waiting
    assert sources.held_bytes == 0


async def test_a_job_cancelled_while_it_waits_leaves_no_trace() -> None:
    sources = Sources(concurrency=1, max_ahead_bytes=16 * MB)
    first, cancelled, third = sources.hold(), sources.hold(), sources.hold()
    await first.admit()
    waiting = [asyncio.create_task(hold.admit()) for hold in (cancelled, third)]
    await asyncio.sleep(0)
    waiting[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    cancelled.job_done()  # never admitted: nothing to give back
    first.downloaded(1 * MB)
    assert await admitted(third)
    await waiting[1]
    third.job_done()
    first.job_done()
    assert sources.held_bytes == 0


async def test_every_render_slot_downloads_at_once() -> None:
    sources = Sources(concurrency=3, max_ahead_bytes=1)
    holds = [sources.hold() for _ in range(4)]
    for hold in holds[:3]:
        await hold.admit()  # none waits, whatever the budget
    ahead = asyncio.create_task(holds[3].admit())
    assert not await admitted(holds[3])
    holds[0].job_done()
    await ahead


async def test_a_slow_download_holds_up_the_job_ahead_for_a_moment_only() -> None:
    """A source server that takes its time (or never answers) must not hold up the jobs behind it:
    a download in flight stops the read-ahead for `in_flight_wait_s` at most."""
    sources = Sources(concurrency=1, max_ahead_bytes=16 * MB, in_flight_wait_s=0.2)
    slow, behind = sources.hold(), sources.hold()
    await slow.admit()  # and never gets its bytes
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(behind.admit(), timeout=5)
    assert 0.2 <= loop.time() - started < 2
    # But a source held over the budget stops it for as long as it is held.
    slow.downloaded(20 * MB)
    third = sources.hold()
    waiting = asyncio.create_task(third.admit())
    await asyncio.sleep(0.4)
    assert not third.admitted.is_set()
    slow.job_done()
    behind.downloaded(1 * MB)
    await asyncio.wait_for(waiting, timeout=5)


async def test_a_job_that_ends_while_its_download_waits_holds_nothing_once_admitted() -> None:
    """The job was let go of (its channel lost) while its download waited to be admitted; the
    download, admitted later, must not count its bytes for a job that is gone: they would stop every
    later download ahead of the renders, for good."""
    sources = Sources(concurrency=1, max_ahead_bytes=16 * MB)
    rendering, gone = sources.hold(), sources.hold()
    await rendering.admit()
    rendering.downloaded(20 * MB)
    rendering.rendering()
    waiting = asyncio.create_task(gone.admit())
    assert not await admitted(gone)
    gone.job_done()
    rendering.render_ended()
    await waiting
    gone.downloaded(20 * MB)
    assert sources.held_bytes == 0
    fresh = sources.hold()
    await asyncio.wait_for(fresh.admit(), timeout=1)
