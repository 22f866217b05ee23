"""Hostile input, end to end: the worker survives anything a client can upload or point it at.

One isolated stack (api, status, and a worker at concurrency 1, with the default URL policy) takes
every file of the shared corpus and a set of inputs crafted here (decompression and animation bombs,
lying headers, truncated and header-only files, text under image labels, polyglots, SVG with external
entities, libvips' other formats) through the real api: presigned upload, then `POST /jobs`. Each one
must end with the outcome its table entry names: a specific job error code, a success whose variants
carry none of the hidden payload, or a specific 4xx at upload or submit. Every job must be settled on
its first delivery (no retry loop), the worker must still be the same process at the end, and its peak
RSS (VmHWM) must stay under `WORKER_PEAK_RSS_BOUND_MB`, the bound README's "Untrusted input" documents.

The crafted inputs are made in memory with pyvips, zlib and struct, in well under a second.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pyvips
import redis.asyncio as aioredis
from imgpipe.urlsafety import is_forbidden_ip

from tests.isolated import isolated_stack, metric
from tests.stack import REDIS_URL, TESTDATA, Client, Stack, presigned_form

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]  # its corpus waits up to 180 s

#: Peak RSS (VmHWM) the worker may reach, at concurrency 1, while it works through every case below
#: (measured: 155-168 MB; README, "Untrusted input"). Without the decode budget the GIF bomb alone would
#: take it past 500 MB.
WORKER_PEAK_RSS_BOUND_MB = 256

#: What every job asks for: two variants, so the shared-decode path is exercised too.
VARIANTS: list[Any] = ["thumb", {"name": "p", "width": 96, "format": "png"}]

#: A marker hidden in polyglots and metadata: it must never reach an output.
PAYLOAD = b"<script>alert('imgpipe-hostile')</script>"


@dataclass(frozen=True)
class Case:
    """One input and what must become of it.

    `expect` is "succeeded" or the job's error code. `refused` is (status, code) when the api or S3
    must refuse it before a job exists (`stage` says which request: "grant", "upload" or "submit").
    """

    name: str
    data: bytes
    content_type: str = "image/jpeg"
    expect: str = "succeeded"
    refused: tuple[int, str] | None = None
    stage: str = ""


# ------------------------------------------------------------------------------------------ crafting


def _card(width: int = 64, height: int = 48) -> pyvips.Image:
    xy = pyvips.Image.xyz(width, height)
    red = xy[0] * (255 / max(1, width - 1))
    green = xy[1] * (255 / max(1, height - 1))
    return red.bandjoin([green, green * 0 + 96]).cast("uchar").copy(interpretation="srgb")


def _frames(count: int, size: int) -> pyvips.Image:
    """An animation strip of `count` frames, alternating black and white so no encoder merges them."""
    strip = (((pyvips.Image.xyz(size, size * count)[1] / size).floor() % 2) * 255).cast("uchar")
    strip = strip.bandjoin([strip, strip]).copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", size)
    return strip


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png(
    width: int,
    height: int,
    idat: bytes,
    *,
    extra: bytes = b"",
    interlace: int = 0,
    depth: int = 8,
    colour: int = 2,
) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _deflated_zeros(count: int) -> bytes:
    """A zlib stream that inflates to `count` (at least 1 MiB) zero bytes, ~1000 times smaller.

    Compressed once per MiB with a full flush, so every MiB after the first compresses to the same bytes,
    which are repeated rather than recomputed; the Adler-32 of n zeros is n mod 65521 in the high half.
    """
    block = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(count, len(block))
    tail = packer.compress(bytes(rest)) + packer.flush()
    adler = ((count % 65521) << 16) | 1
    return b"\x78\xda" + first + again * (blocks - 1) + tail + struct.pack(">I", adler)


def _gif(width: int, height: int, frames: int, frame_size: tuple[int, int] | None = None) -> bytes:
    """A GIF whose screen is `width` x `height`, with `frames` frames of a few bytes of LZW each."""
    fw, fh = frame_size or (width, height)
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff")
    for _ in range(frames):
        out += b"\x21\xf9\x04\x00\x00\x00\x00\x00"  # graphic control: no disposal, no delay
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, fw, fh, 0)
        out += b"\x02\x02\x4c\x01\x00"  # min code size 2; clear, one pixel, end of information
    return bytes(out + b"\x3b")


def _webp_canvas(width: int, height: int, frames: int = 0) -> bytes:
    """A WebP with a VP8X canvas of `width` x `height`; with `frames`, an animation of 1x1 frames."""
    still = _card(1, 1).webpsave_buffer(lossless=True, keep=0)
    size = struct.unpack("<I", still[16:20])[0]
    vp8l = still[12 : 20 + size + (size & 1)]
    flags = 0x02 if frames else 0
    body = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0])
    body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    if frames:
        body += b"ANIM" + struct.pack("<I", 6) + bytes(6)
        frame = bytes(12) + (100).to_bytes(3, "little") + b"\0" + vp8l
        body += (b"ANMF" + struct.pack("<I", len(frame)) + frame + b"\0" * (len(frame) & 1)) * frames
    else:
        body += vp8l
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _webp_claiming(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header claims `width` x `height`, followed by a few bytes of nothing."""
    bits = (width - 1) | (height - 1) << 14  # alpha hint 0, version 0
    chunk = b"\x2f" + struct.pack("<I", bits) + bytes(11)
    body = b"VP8L" + struct.pack("<I", len(chunk)) + chunk
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _jpeg_claiming(width: int, height: int, *, progressive: bool = False) -> bytes:
    data = bytearray(_card(16, 16).jpegsave_buffer(interlace=progressive, subsample_mode="off"))
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)  # marker, length, precision, then height, width
    return bytes(data)


def _between_scans(progressive: bytes) -> bytes:
    """A progressive JPEG with three stray bytes before its second scan."""
    second = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    return progressive[:second] + b"\x01\x02\x03" + progressive[second:]


def _avif_claiming(width: int, height: int) -> bytes:
    data = bytearray(_card(64, 48).heifsave_buffer(compression="av1", effort=0))
    ispe = data.index(b"ispe")
    struct.pack_into(">II", data, ispe + 8, width, height)  # after the type: version and flags, then w, h
    return bytes(data)


def _tiff(width: int, height: int, *, strip_bytes: int, pages: int = 1, loop: bool = False) -> bytes:
    """A little-endian TIFF, 8-bit grey, one deflate strip per page claiming `strip_bytes` bytes."""
    data = bytearray(b"II*\x00" + struct.pack("<I", 8))
    strip = zlib.compress(b"\0" * 64)
    tags = 9
    ifd_size = 2 + tags * 12 + 4
    for page in range(pages):
        start = len(data)
        offset = start + ifd_size
        entries = [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 1, 8),
            (259, 3, 1, 8),  # deflate
            (262, 3, 1, 1),  # min-is-black
            (273, 4, 1, offset),
            (277, 3, 1, 1),
            (278, 4, 1, height),  # one strip for the whole page
            (279, 4, 1, strip_bytes),
        ]
        data += struct.pack("<H", tags)
        for tag, kind, count, value in entries:
            data += struct.pack("<HHII", tag, kind, count, value)
        following = start + ifd_size + len(strip)
        next_ifd = 8 if loop else (following if page < pages - 1 else 0)
        data += struct.pack("<I", next_ifd) + strip
    return bytes(data)


def _vips_native() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.v"
        _card(8, 8).write_to_file(str(path))
        return path.read_bytes()


def _zip(payload: bytes) -> bytes:
    # A stored (uncompressed) one-file ZIP: local header, data, central directory, end record.
    name = b"a.html"
    crc = zlib.crc32(payload)
    local = struct.pack(
        "<4s5H3I2H", b"PK\x03\x04", 10, 0, 0, 0, 0, crc, len(payload), len(payload), len(name), 0
    )
    central = struct.pack(
        "<4s6H3I5H2I",
        b"PK\x01\x02",
        20,
        10,
        0,
        0,
        0,
        0,
        crc,
        len(payload),
        len(payload),
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    end = struct.pack(
        "<4s4H2IH",
        b"PK\x05\x06",
        0,
        0,
        1,
        1,
        len(central) + len(name),
        len(local) + len(name) + len(payload),
        0,
    )
    return local + name + payload + central + name + end


SVG_XXE = b"""<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY xxe SYSTEM "file:///etc/passwd"><!ENTITY remote SYSTEM "http://169.254.169.254/">]>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="64" height="64">
  <text>&xxe;&remote;</text>
  <image xlink:href="http://169.254.169.254/latest/meta-data/" width="64" height="64"/>
  <image href="file:///etc/passwd" width="64" height="64"/>
</svg>
"""


def crafted() -> list[Case]:
    """Every crafted case, with its expected outcome."""
    jpeg = _card(256, 192).jpegsave_buffer()
    progressive = _card(256, 192).jpegsave_buffer(interlace=True)
    png = _card(64, 48).pngsave_buffer()
    gif = _card(64, 48).gifsave_buffer()
    webp = _card(64, 48).webpsave_buffer()
    tiff = _card(64, 48).tiffsave_buffer()
    avif = _card(64, 48).heifsave_buffer(compression="av1", effort=0)
    header_only_jpeg = jpeg[: jpeg.index(b"\xff\xda")]  # everything up to the first scan
    comment = b"\x21\xfe" + bytes([len(PAYLOAD)]) + PAYLOAD + b"\x00"
    text = b"Just some text, definitely not an image.\n" * 4
    html = b"<!doctype html><html><body><script>fetch('http://169.254.169.254/')</script></body></html>"
    return [
        # Decompression bombs: huge dimensions, tiny data.
        Case(
            "png-bomb-65000x65000",
            _png(65000, 65000, zlib.compress(bytes(1024))),
            "image/png",
            "image_too_large",
        ),
        # Interlaced PNG is decoded whole: 9000x9000 RGBA at 16 bits would take 618 MiB.
        Case(
            "png-bomb-interlaced-rgba16",
            _png(9000, 9000, zlib.compress(bytes(1024)), interlace=1, depth=16, colour=6),
            "image/png",
            "image_too_large",
        ),
        # Under the decode budget, but its data is missing: refused as corrupt, not decoded as grey.
        Case(
            "png-interlaced-no-data",
            _png(6500, 6500, zlib.compress(bytes(1024)), interlace=1),
            "image/png",
            "corrupt_image",
        ),
        # A real one under the pixel limit: 300 MB of pixels in ~300 KB. It streams, so it is fine.
        Case(
            "png-zeros-10000x10000", _png(10000, 10000, _deflated_zeros(10000 * (1 + 3 * 10000))), "image/png"
        ),
        # Streams too, but at 1,000,000 px wide its rows alone would take a worker to about 1 GB.
        Case(
            "png-wide-1000000x100",
            _png(1_000_000, 100, _deflated_zeros(100 * (1 + 3 * 1_000_000))),
            "image/png",
            "image_too_large",
        ),
        # A row of 4096 x 4096 tiles, 24,400 px wide, is read whole: about 400 MB from 350 kB.
        Case(
            "tiff-tiled-wide",
            (pyvips.Image.black(24400, 4096, bands=3) + 100)
            .cast("uchar")
            .tiffsave_buffer(compression="deflate", tile=True, tile_width=4096, tile_height=4096),
            "image/tiff",
            "image_too_large",
        ),
        Case(
            "png-ztxt-bomb",
            _png(
                8,
                8,
                zlib.compress(bytes(8 * 25)),
                extra=_png_chunk(b"zTXt", b"c\0\0" + _deflated_zeros(256 << 20)),
            ),
            "image/png",
            "corrupt_image",  # inflates to over 16 MiB: refused before libpng inflates it
        ),
        Case(
            "png-iccp-bomb",
            _png(
                8,
                8,
                zlib.compress(bytes(8 * 25)),
                extra=_png_chunk(b"iCCP", b"icc\0\0" + _deflated_zeros(256 << 20)),
            ),
            "image/png",
            "corrupt_image",  # inflates to over 16 MiB: refused before libpng inflates it
        ),
        Case("gif-bomb-65535x65535", _gif(65535, 65535, 1), "image/gif", "image_too_large"),
        Case("gif-bomb-10000x10000", _gif(10000, 10000, 1), "image/gif", "image_too_large"),
        Case("gif-many-large-frames", _gif(9000, 9000, 200), "image/gif", "image_too_large"),
        Case("gif-too-many-frames", _gif(64, 64, 5000), "image/gif", "too_many_frames"),
        Case("webp-vp8l-16383x16383", _webp_claiming(16383, 16383), "image/webp", "image_too_large"),
        Case("webp-vp8x-canvas-mismatch", _webp_canvas(16384, 16384), "image/webp", "corrupt_image"),
        Case(
            "webp-animated-canvas-9000x9000",
            _webp_canvas(9000, 9000, frames=50),
            "image/webp",
            "image_too_large",
        ),
        Case(
            "webp-too-many-frames",
            _frames(300, 4).webpsave_buffer(lossless=True),
            "image/webp",
            "too_many_frames",
        ),
        Case("gif-animation-300-frames", _frames(300, 4).gifsave_buffer(), "image/gif", "too_many_frames"),
        Case("jpeg-sof-65000x65000", _jpeg_claiming(65000, 65000), "image/jpeg", "image_too_large"),
        # Progressive: libjpeg keeps every coefficient, 6 bytes a pixel at 4:4:4 (~572 MiB here, ~744
        # with the variants' work).
        Case(
            "jpeg-progressive-10000x10000",
            _jpeg_claiming(10000, 10000, progressive=True),
            "image/jpeg",
            "image_too_large",
        ),
        # libheif decodes whole images at ~16 bytes a pixel: 9000x9000 would take over 1.2 GiB.
        Case("avif-ispe-9000x9000", _avif_claiming(9000, 9000), "image/avif", "image_too_large"),
        Case("jpeg-sof-zero-size", _jpeg_claiming(0, 0), "image/jpeg", "corrupt_image"),
        Case("tiff-65000x65000", _tiff(65000, 65000, strip_bytes=64), "image/tiff", "image_too_large"),
        Case(
            "tiff-huge-strip-claim", _tiff(9000, 9000, strip_bytes=0x7FFFFFF0), "image/tiff", "corrupt_image"
        ),
        Case("tiff-300-pages", _tiff(8, 8, strip_bytes=16, pages=300), "image/tiff", "too_many_frames"),
        # An IFD chain that loops back on itself: libtiff notices, and the first page is a fine image.
        Case("tiff-ifd-loop", _tiff(8, 8, strip_bytes=16, pages=2, loop=True), "image/tiff"),
        Case("tiff-strip-past-end", _tiff(256, 256, strip_bytes=4096), "image/tiff", "corrupt_image"),
        # Truncated and header-only files.
        Case("jpeg-truncated-half", jpeg[: len(jpeg) // 2], "image/jpeg", "corrupt_image"),
        # Bytes between a progressive file's scans: libjpeg warns, skips them and loses nothing.
        Case("jpeg-progressive-bytes-between-scans", _between_scans(progressive), "image/jpeg"),
        Case("jpeg-header-only", header_only_jpeg, "image/jpeg", "corrupt_image"),
        Case("jpeg-soi-only", b"\xff\xd8\xff", "image/jpeg", "corrupt_image"),
        Case("png-truncated-half", png[: len(png) // 2], "image/png", "corrupt_image"),
        Case("png-signature-ihdr-only", png[:33], "image/png", "corrupt_image"),
        Case("gif-truncated-half", gif[: len(gif) // 2], "image/gif", "corrupt_image"),
        Case("gif-header-only", gif[:13], "image/gif", "corrupt_image"),
        Case("webp-truncated-half", webp[: len(webp) // 2], "image/webp", "corrupt_image"),
        Case("webp-riff-header-only", webp[:16], "image/webp", "corrupt_image"),
        Case("tiff-truncated-half", tiff[: len(tiff) // 2], "image/tiff", "corrupt_image"),
        Case("tiff-header-only", tiff[:8], "image/tiff", "corrupt_image"),
        Case("avif-truncated-half", avif[: len(avif) // 2], "image/avif", "corrupt_image"),
        Case("avif-ftyp-only", avif[:32], "image/avif", "corrupt_image"),
        Case("one-byte", b"\xff", "image/jpeg", "unsupported_format"),
        # Zero bytes: no grant is given for them. S3 also refuses an empty upload on a grant (its policy's
        # content-length-range starts at 1); moto does not enforce that, so here the worker's own check
        # shows.
        Case("zero-bytes-grant", b"", "image/jpeg", refused=(422, "invalid_request"), stage="grant"),
        Case("zero-bytes-upload", b"", "image/jpeg", "empty_source"),
        # Text and markup under image labels.
        Case("text-as-jpeg", text, "image/jpeg", "unsupported_format"),
        Case("html-as-jpeg", html, "image/jpeg", "unsupported_format"),
        Case("html-as-png", html, "image/png", "unsupported_format"),
        # Polyglots: a valid image with something else inside or after it decodes, and the output is a
        # fresh encode without the payload; the other way round (a file that only starts like an
        # image, or an image inside another format) fails.
        Case("jpeg+zip", jpeg + _zip(PAYLOAD), "image/jpeg"),
        Case("png+trailing-html", png + PAYLOAD, "image/png"),
        Case("gif+comment-js", gif[:-1] + comment + b";" + PAYLOAD, "image/gif"),
        Case("gifar-js-header", b"GIF89a/*" + PAYLOAD + b"*/", "image/gif", "corrupt_image"),
        Case("html-with-embedded-png", html + png, "image/png", "unsupported_format"),
        Case("zip-with-jpeg-inside", _zip(jpeg), "image/jpeg", "unsupported_format"),
        Case("png-signature-then-jpeg", b"\x89PNG\r\n\x1a\n" + jpeg, "image/png", "corrupt_image"),
        Case("jpeg-magic-then-png", b"\xff\xd8\xff" + png, "image/jpeg", "corrupt_image"),
        # SVG: refused as a content type, and under an image label its bytes are not an image.
        Case("svg-xxe", SVG_XXE, "image/svg+xml", refused=(415, "unsupported_content_type"), stage="grant"),
        Case("svg-xxe-as-png", SVG_XXE, "image/png", "unsupported_format"),
        # Formats libvips itself could load, none of which we accept.
        Case("vips-native", _vips_native(), "image/tiff", "unsupported_format"),
        Case(
            "pdf",
            b"%PDF-1.7\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
            "image/jpeg",
            "unsupported_format",
        ),
        Case("fits", b"SIMPLE  =                    T".ljust(2880, b" "), "image/jpeg", "unsupported_format"),
        Case("matrix", b"2 2\n1 2\n3 4\n", "image/jpeg", "unsupported_format"),
        Case("csv", b"1,2,3\n4,5,6\n", "image/jpeg", "unsupported_format"),
        Case("ppm", b"P6\n2 2\n255\n" + bytes(12), "image/jpeg", "unsupported_format"),
        Case("pfm", b"PF\n2 2\n-1.0\n" + bytes(48), "image/jpeg", "unsupported_format"),
        Case("bmp", b"BM" + bytes(60), "image/jpeg", "unsupported_format"),
        Case(
            "radiance",
            b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 2 +X 2\n" + bytes(16),
            "image/jpeg",
            "unsupported_format",
        ),
        Case("jpeg-xl", b"\xff\x0a" + bytes(30), "image/jpeg", "unsupported_format"),
        Case("jpeg-2000", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(30), "image/jpeg", "unsupported_format"),
        Case("openexr", b"\x76\x2f\x31\x01" + bytes(30), "image/jpeg", "unsupported_format"),
        Case(
            "mp4-ftyp",
            b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isomavc1" + bytes(30),
            "image/heic",
            "unsupported_format",
        ),
        # Valid, if unusual, images.
        Case("one-pixel", _card(1, 1).pngsave_buffer(), "image/png"),
        Case("extreme-aspect-20000x1", pyvips.Image.black(20000, 1).pngsave_buffer(), "image/png"),
        Case("avif", avif, "image/avif"),
        Case("tiff", tiff, "image/tiff"),
    ]


def corpus() -> list[Case]:
    """Every file of the shared test data, with what must become of it.

    EXIF samples and valid PngSuite files succeed; PngSuite's corrupt `x*` files fail as corrupt when
    they still carry the PNG signature and as unsupported when the signature itself is broken; anything
    that is not an image (LICENSE, README) is uploaded under an image label and must be unsupported.
    """
    cases = []
    for path in sorted(p for p in TESTDATA.rglob("*") if p.is_file()):
        data = path.read_bytes()
        name = str(path.relative_to(TESTDATA))
        if path.suffix == ".jpg":
            cases.append(Case(name, data, "image/jpeg"))
        elif path.suffix != ".png":
            cases.append(Case(name, data, "image/jpeg", "unsupported_format"))
        elif not path.name.startswith("x"):
            cases.append(Case(name, data, "image/png"))
        elif data.startswith(b"\x89PNG\r\n\x1a\n"):
            cases.append(Case(name, data, "image/png", "corrupt_image"))
        else:
            cases.append(Case(name, data, "image/png", "unsupported_format"))
    return cases


# ------------------------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def hostile_stack(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """api + status + one worker at concurrency 1, with the default URL policy (nothing exempted).

    `api_allow` is a second api whose URL sources are limited to an allow-list, which the worker
    shares (it lists this machine's own name, which resolves to a local address). The per-user rate
    limits are off: this test submits a few hundred jobs as one user on purpose.
    """
    logdir = tmp_path_factory.mktemp("hostile-logs")
    unlimited = {
        "IMGPIPE_RATE_JOBS_PER_MINUTE": "0",
        "IMGPIPE_RATE_UPLOADS_PER_HOUR": "0",
        "IMGPIPE_MAX_ACTIVE_JOBS": "0",
    }
    # The URL policy as deployed: no exempt networks, and ports 80 and 443 only.
    env = {
        k: v
        for k, v in base_env.items()
        if k not in ("IMGPIPE_URL_ALLOWED_NETWORKS", "IMGPIPE_URL_ALLOWED_PORTS")
    }
    allowed = {"IMGPIPE_URL_ALLOWED_HOSTS": f"images.example.com,*.cdn.example.net,{socket.gethostname()}"}
    services = {
        "api": ("api", unlimited),
        "api_allow": ("api", {**unlimited, **allowed}),
        "status": ("status", {}),
        "worker": ("worker", {"IMGPIPE_WORKER_CONCURRENCY": "1", **allowed}),
    }
    with isolated_stack(env, logdir, services) as stack:
        yield stack


@pytest.fixture
def mallory(http: aiohttp.ClientSession, hostile_stack: Stack) -> Client:
    return Client(http, hostile_stack, "mallory")


async def _error_code(response: aiohttp.ClientResponse) -> str:
    text = await response.text()
    try:
        return json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        # S3 answers in XML: <Error><Code>EntityTooSmall</Code>...
        start = text.find("<Code>")
        return text[start + 6 : text.find("</Code>")] if start != -1 else text[:200]


async def _upload_and_submit(client: Client, case: Case) -> tuple[str, Any]:
    """("job", job id), or (stage, (status, code)) when a request before the job refused the case."""
    declared = max(1, len(case.data))
    async with client.http.post(
        f"{client.stack.api}/uploads",
        json={
            "content_type": case.content_type,
            "size": len(case.data) if case.stage == "grant" else declared,
        },
        headers=client.headers,
    ) as response:
        if response.status != 201:
            return "grant", (response.status, await _error_code(response))
        grant = await response.json()
    form = presigned_form(grant["fields"], case.data, case.content_type)
    async with client.http.post(grant["url"], data=form) as response:
        if response.status not in (200, 201, 204):
            return "upload", (response.status, await _error_code(response))
    async with client.http.post(
        f"{client.stack.api}/jobs",
        json={"source": {"key": grant["key"]}, "variants": VARIANTS},
        headers=client.headers,
    ) as response:
        if response.status != 202:
            return "submit", (response.status, await _error_code(response))
        return "job", (await response.json())["id"]


def _worker_log(stack: Stack) -> list[dict[str, Any]]:
    lines = []
    for raw in stack.services["worker"].log.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue  # anything a library printed outside the JSON logger
    return lines


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


# ------------------------------------------------------------------------------------------ the corpus


async def test_every_hostile_input_ends_cleanly(mallory: Client, hostile_stack: Stack) -> None:
    worker = hostile_stack.services["worker"]
    pid = worker.proc.pid
    cases = corpus() + crafted()
    assert len({c.name for c in cases}) == len(cases)
    assert len(cases) > 250

    gate = asyncio.Semaphore(8)

    async def send(case: Case) -> tuple[str, Any]:
        async with gate:
            return await _upload_and_submit(mallory, case)

    sent = dict(zip((c.name for c in cases), await asyncio.gather(*(send(c) for c in cases)), strict=True))
    problems: list[str] = []
    jobs: dict[str, str] = {}
    for case in cases:
        stage, detail = sent[case.name]
        if case.refused is not None:
            if (stage, detail) != (case.stage, case.refused):
                problems.append(
                    f"{case.name}: expected {case.stage} refused with {case.refused}, got {stage} {detail}"
                )
        elif stage != "job":
            problems.append(f"{case.name}: refused at {stage} with {detail}, expected a job")
        else:
            jobs[case.name] = detail

    # The worker takes them one at a time, roughly in order: waiting in order polls little.
    results: dict[str, dict] = {}
    async with asyncio.timeout(180):
        for name, job_id in jobs.items():
            results[name] = await mallory.wait(job_id, within=180)

    by_name = {c.name: c for c in cases}
    for name, result in results.items():
        case = by_name[name]
        got = result["status"] if result["status"] == "succeeded" else (result["error"] or {}).get("code")
        if got != case.expect:
            problems.append(f"{name}: expected {case.expect}, got {got} ({result['error']})")
        elif got == "succeeded":
            assert {v["name"] for v in result["variants"]} == {"thumb", "p"}, name
            if PAYLOAD in case.data:
                for variant in result["variants"]:
                    if PAYLOAD in await mallory.download(variant["url"]):
                        problems.append(f"{name}: the hidden payload reached variant {variant['name']}")
    assert not problems, "\n".join(problems)

    # Each job was settled on its first delivery: one terminal log line each, at attempt 1, no retries.
    log = _worker_log(hostile_stack)
    settled: dict[str, list[int]] = {}
    for line in log:
        if line.get("message") in ("job succeeded", "job failed"):
            settled.setdefault(line.get("job_id"), []).append(line.get("attempt"))
    assert {job_id: settled.get(job_id) for job_id in jobs.values()} == {
        job_id: [1] for job_id in jobs.values()
    }
    assert not [line for line in log if line.get("message") == "transient failure, retrying"]
    async with mallory.http.get(f"{worker.url}/metrics") as response:
        metrics = await response.text()
    assert metric(metrics, "imgpipe_jobs_retried_total") == 0
    assert metric(metrics, "imgpipe_jobs_dead_lettered_total") == 0

    # The same worker process did all of it, within its memory bound.
    assert worker.proc.poll() is None, worker.tail()
    assert worker.proc.pid == pid
    peak = _peak_rss_mb(pid)
    print(f"\nworker peak RSS (VmHWM) after {len(jobs)} jobs: {peak:.1f} MB")
    assert peak < WORKER_PEAK_RSS_BOUND_MB, f"worker peak RSS {peak:.1f} MB"


# --------------------------------------------------------------------------------------------- URL sources

#: URL sources the api must refuse at `POST /jobs`, each with its code.
SSRF_URLS = [
    # loopback, in every spelling
    ("http://127.0.0.1/a.jpg", "url_forbidden"),
    ("http://127.1/a.jpg", "url_forbidden"),
    ("http://2130706433/a.jpg", "url_forbidden"),
    ("http://0177.0.0.1/a.jpg", "url_forbidden"),
    ("http://0x7f.1/a.jpg", "url_forbidden"),
    ("http://0x7f000001/a.jpg", "url_forbidden"),
    ("http://[::1]/a.jpg", "url_forbidden"),
    ("http://[::ffff:127.0.0.1]/a.jpg", "url_forbidden"),
    ("http://[::ffff:7f00:1]/a.jpg", "url_forbidden"),
    ("http://localhost:8000/a.jpg", "url_forbidden"),
    ("http://0.0.0.0/a.jpg", "url_forbidden"),
    ("http://0/a.jpg", "url_forbidden"),
    # private ranges
    ("http://10.0.0.1/a.jpg", "url_forbidden"),
    ("http://167772161/a.jpg", "url_forbidden"),
    ("http://172.16.0.1/a.jpg", "url_forbidden"),
    ("http://172.31.255.254/a.jpg", "url_forbidden"),
    ("http://192.168.1.1/a.jpg", "url_forbidden"),
    ("http://100.64.0.1/a.jpg", "url_forbidden"),
    ("http://[fd00::1]/a.jpg", "url_forbidden"),
    ("http://[::ffff:10.0.0.1]/a.jpg", "url_forbidden"),
    # link-local and cloud metadata
    ("http://169.254.169.254/latest/meta-data/", "url_forbidden"),
    ("http://2852039166/latest/meta-data/", "url_forbidden"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "url_forbidden"),
    ("http://[fe80::1]/a.jpg", "url_forbidden"),
    ("http://[fe80::]/a.jpg", "url_forbidden"),
    ("http://metadata.google.internal/computeMetadata/v1/", "url_forbidden"),
    # other schemes, credentials
    ("file:///etc/passwd", "url_forbidden"),
    ("ftp://example.com/a.jpg", "url_forbidden"),
    ("gopher://example.com:70/_GET", "url_forbidden"),
    ("data:image/png;base64,iVBORw0KGgo=", "url_forbidden"),
    ("http://user:pass@example.com/a.jpg", "url_forbidden"),
    # a public host's ports other than 80 and 443
    ("http://example.com:8080/a.jpg", "url_forbidden"),
    ("https://example.com:22/a.jpg", "url_forbidden"),
    ("http://93.184.216.34:6379/a.jpg", "url_forbidden"),
    # malformed
    ("http://256.0.0.1/a.jpg", "url_invalid"),
    ("http://[::1/a.jpg", "url_invalid"),
    ("http://1.2.3.4.5/a.jpg", "url_invalid"),
    ("http://example.com:99999/a.jpg", "url_invalid"),
]


async def _job_keys(stack: Stack) -> int:
    client = aioredis.from_url(REDIS_URL)
    try:
        return len(
            [key async for key in client.scan_iter(f"{stack.env['IMGPIPE_NAMESPACE']}:job:*", count=1000)]
        )
    finally:
        await client.aclose()


async def _post_url_job(client: Client, url: str, api: str) -> tuple[int, str]:
    async with client.http.post(
        f"{api}/jobs", json={"source": {"url": url}}, headers=client.headers
    ) as response:
        return response.status, await _error_code(response)


async def test_ssrf_urls_are_refused_at_submit(mallory: Client, hostile_stack: Stack) -> None:
    # This api runs with the default policy; the session stack exempts 127.0.0.0/8 for its own tests.
    before = await _job_keys(hostile_stack)
    answers = {url: await _post_url_job(mallory, url, hostile_stack.api) for url, _ in SSRF_URLS}
    assert answers == {url: (422, code) for url, code in SSRF_URLS}
    assert await _job_keys(hostile_stack) == before


async def test_url_allow_list_is_enforced_at_submit(mallory: Client, hostile_stack: Stack) -> None:
    api = hostile_stack.services["api_allow"].url
    before = await _job_keys(hostile_stack)
    for url in (
        "https://example.com/a.jpg",
        "https://cdn.example.net/a.jpg",  # the wildcard covers subdomains, not the apex
        "https://images.example.com.evil.org/a.jpg",
        "https://93.184.216.34/a.jpg",
    ):
        assert await _post_url_job(mallory, url, api) == (422, "url_forbidden"), url
    # The allow-list does not exempt anything from the address policy either.
    assert await _post_url_job(mallory, "http://127.1/a.jpg", api) == (422, "url_forbidden")
    assert await _job_keys(hostile_stack) == before


async def test_name_resolving_to_a_private_address_fails_the_job(
    mallory: Client, hostile_stack: Stack
) -> None:
    # The api does not resolve names (the answer could change before the worker connects); the worker
    # resolves once, checks every address and connects only to those. This host's own name resolves
    # to a loopback or private address (from /etc/hosts), and is not on any list of forbidden names.
    host = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, 80, proto=socket.IPPROTO_TCP)}
    except socket.gaierror:
        pytest.skip(f"this machine's name {host!r} does not resolve")
    assert all(is_forbidden_ip(ip_address(a.split("%")[0])) for a in addresses), addresses
    url = f"http://{host}/a.jpg"
    if "." not in host:  # a container's or VM's name, of one label: not a public name at all
        assert await _post_url_job(mallory, url, hostile_stack.api) == (422, "url_forbidden")
    # Allow-listed, the name is looked up as written (/etc/hosts included) and its address refused,
    # without the address in the job's message.
    api = hostile_stack.services["api_allow"].url
    async with mallory.http.post(
        f"{api}/jobs", json={"source": {"url": url}}, headers=mallory.headers
    ) as response:
        assert response.status == 202, await response.text()
        job = await response.json()
    done = await mallory.wait(job["id"])  # refused before a connection is tried
    assert done["status"] == "failed"
    assert done["error"] == {
        "code": "url_forbidden",
        "message": f"{host} resolves to an address that is not public",
    }
