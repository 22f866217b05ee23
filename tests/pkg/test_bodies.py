"""Response bodies read into one buffer, from a raw HTTP server that sends exactly what each test says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from imgpipe.bodies import BodyNotAdmitted, BodyTooLarge, read_body


@asynccontextmanager
async def _serving(response: bytes) -> AsyncIterator[str]:
    """A server that answers every request with `response`, as is, then closes the connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()
        await server.wait_closed()


def _with_length(body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size + body


def _chunked(*chunks: bytes) -> bytes:
    coded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + coded + b"0\r\n\r\n"
    )


async def _read(
    response: bytes, max_bytes: int, length: Callable[[aiohttp.ClientResponse], int | None]
) -> bytearray:
    async with _serving(response) as url, aiohttp.ClientSession() as http, http.get(url) as got:
        return await read_body(got.content, length=length(got), max_bytes=max_bytes)


def _declared(response: aiohttp.ClientResponse) -> int | None:
    return response.content_length


async def test_a_body_of_known_length_is_read_whole_into_one_buffer_of_its_size() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: several reads of the socket
    got = await _read(_with_length(body), len(body), _declared)
    assert isinstance(got, bytearray)
    assert got == body
    assert len(got) == len(body)


async def test_a_body_without_a_length_is_read_up_to_the_limit() -> None:
    got = await _read(_chunked(b"abc", b"defg", b"h"), 8, _declared)
    assert got == b"abcdefgh"


async def test_a_body_without_a_length_stops_past_the_limit() -> None:
    with pytest.raises(BodyTooLarge) as too_large:
        await _read(_chunked(b"abc", b"defg", b"hi"), 8, _declared)
    assert too_large.value.size > 8


async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    with pytest.raises(BodyTooLarge) as too_large:
        await _read(_with_length(b"x" * 9), 8, _declared)
    assert too_large.value.size == 9


async def test_a_body_that_ends_short_of_its_length_is_a_payload_error() -> None:
    # The server says 100 bytes, sends 10 and closes: a truncated transfer, never a short image.
    with pytest.raises(aiohttp.ClientPayloadError):
        await _read(_with_length(b"x" * 10, length=100), 1000, _declared)


async def test_a_body_longer_than_the_length_given_is_a_payload_error() -> None:
    # A caller's length that undercounts what the stream holds (aiohttp stops at Content-Length
    # itself, so this is the guard for a length the caller got wrong).
    with pytest.raises(aiohttp.ClientPayloadError):
        await _read(_with_length(b"x" * 10), 1000, lambda _: 5)


class _Room:
    """An `Admit` that answers `room` and notes what it was asked."""

    def __init__(self, room: int | None) -> None:
        self.room = room
        self.asked: list[int | None] = []

    def __call__(self, length: int | None) -> int | None:
        self.asked.append(length)
        return self.room


async def _read_admitted(response: bytes, max_bytes: int, admit: _Room) -> bytearray:
    async with _serving(response) as url, aiohttp.ClientSession() as http, http.get(url) as got:
        return await read_body(got.content, length=got.content_length, max_bytes=max_bytes, admit=admit)


async def test_a_body_is_read_only_if_admit_has_room_for_its_length() -> None:
    room = _Room(8)
    assert await _read_admitted(_with_length(b"x" * 8), 100, room) == b"x" * 8
    with pytest.raises(BodyNotAdmitted) as refused:
        await _read_admitted(_with_length(b"x" * 9), 100, room)
    assert refused.value.size == 9
    assert room.asked == [8, 9]
    assert await _read_admitted(_with_length(b"x" * 9), 100, _Room(None)) == b"x" * 9  # None: any


async def test_a_body_over_the_limit_is_too_large_without_asking_for_room() -> None:
    room = _Room(None)
    with pytest.raises(BodyTooLarge):
        await _read_admitted(_with_length(b"x" * 9), 8, room)
    assert room.asked == []


async def test_a_body_without_a_length_stops_past_its_room() -> None:
    room = _Room(4)
    with pytest.raises(BodyNotAdmitted) as refused:
        await _read_admitted(_chunked(b"abc", b"defg"), 100, room)
    assert refused.value.size is None
    assert room.asked == [None]
    assert await _read_admitted(_chunked(b"abc", b"d"), 100, room) == b"abcd"
    with pytest.raises(BodyNotAdmitted) as refused:  # no room at all: not read, but some will do
        await _read_admitted(_chunked(b"abc"), 100, _Room(0))
    assert refused.value.size == 0
    # A room over the limit is the limit's: past it, the body is too large.
    with pytest.raises(BodyTooLarge):
        await _read_admitted(_chunked(b"abc", b"defg"), 5, _Room(50))
