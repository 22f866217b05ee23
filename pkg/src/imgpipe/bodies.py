"""HTTP response bodies read into one buffer, held once.

aiohttp's `read()` collects the chunks and joins them at the end, and a `bytearray` filled chunk by
chunk is copied again when made `bytes`: either way a body is in memory twice at the moment it
completes. For the sources a worker downloads (one while another renders, up to
`IMGPIPE_MAX_UPLOAD_BYTES` each) that is the size of a source on the worker's peak memory. Here the
chunks go straight into one `bytearray`, sized from `Content-Length` when the response gives one.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

__all__ = ["Admit", "BodyNotAdmitted", "BodyTooLarge", "read_body"]

#: Asked once a response's headers are in, with its `Content-Length` (None without one): how many
#: bytes its body may take now (None: up to the caller's limit). Whatever it answers for is the
#: asker's to account for; a body it has no room for is not read (`BodyNotAdmitted`).
Admit = Callable[[int | None], int | None]


class BodyTooLarge(Exception):
    """The body is longer than the caller's limit; `size` is what was seen of it (at least limit + 1)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"body of at least {size} bytes")
        self.size = size


class BodyNotAdmitted(Exception):
    """`admit` had no room for the body now; `size` is its length (0: not given, and there was no
    room at all; None: not given, and it ran past the room)."""

    def __init__(self, size: int | None) -> None:
        super().__init__(f"no room now for a body of {size if size is not None else 'unknown'} bytes")
        self.size = size


async def read_body(
    content: aiohttp.StreamReader, *, length: int | None, max_bytes: int, admit: Admit | None = None
) -> bytearray:
    """The whole body of a response as one `bytearray`.

    `length` is the response's `Content-Length` (None without one). A length over `max_bytes` is
    refused before anything is read, and without a length reading stops one chunk past `max_bytes`:
    both raise `BodyTooLarge`. Under the limit, `admit` (if given) is asked for room first: a length
    over its answer, or a body without one that runs past it, raises `BodyNotAdmitted`. A body that
    ends short of its length, or runs past it, raises `aiohttp.ClientPayloadError`.
    """
    if length is not None and length > max_bytes:
        raise BodyTooLarge(length)
    room = admit(length) if admit is not None else None
    if room == 0 and length != 0:
        raise BodyNotAdmitted(length or 0)
    if length is None:
        limit = max_bytes if room is None else min(room, max_bytes)
        grown = bytearray()
        async for chunk in content.iter_any():
            grown += chunk
            if len(grown) > limit:
                if limit < max_bytes:
                    raise BodyNotAdmitted(None)
                raise BodyTooLarge(len(grown))
        return grown
    if room is not None and length > room:
        raise BodyNotAdmitted(length)
    body = bytearray(length)
    filled = 0
    with memoryview(body) as view:
        async for chunk in content.iter_any():
            end = filled + len(chunk)
            if end > length:
                # aiohttp stops at Content-Length itself; this is a guard, not a path it takes.
                raise aiohttp.ClientPayloadError(f"body runs past its Content-Length of {length} bytes")
            view[filled:end] = chunk
            filled = end
    if filled != length:
        raise aiohttp.ClientPayloadError(f"body ended at {filled} of its {length} bytes")
    return body
