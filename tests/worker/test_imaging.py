"""Tests for the worker's image core (`imgpipe_worker.imaging`).

Real-world corpora (EXIF orientation samples, PngSuite) are read from outside the repo, from
`$IMGPIPE_TESTDATA` (default `<repo>/../shared/testdata`); hostile inputs are crafted here, in memory.
"""

from __future__ import annotations

import array
import ctypes
import itertools
import math
import os
import struct
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import pyvips
from imgpipe.models import PRESETS, Variant
from imgpipe_worker import imaging
from imgpipe_worker.imaging import ImageError, Limits, Rendered, SourceInfo, probe, render, sniff

from tests.stack import TESTDATA

EXIF_DIR = TESTDATA / "exif-orientation"
PNGSUITE_DIR = TESTDATA / "pngsuite"

# The `testdata` fixture fails (never skips) when the corpus is missing: a silent skip would hide it.
needs_exif = needs_pngsuite = pytest.mark.usefixtures("testdata")

LIMITS = Limits()
# Mean absolute difference (0-255 scale) below which two renders count as "the same picture". Measured:
# the same photo with any EXIF transform correctly undone differs by < 1; a wrong mirror or rotation of
# these images differs by 37-84 (checked in the orientation test itself).
SAME_PICTURE = 8.0

META_FIELDS = ("exif-data", "icc-profile-data", "xmp-data", "iptc-data", "orientation")


@pytest.fixture(autouse=True, scope="module")
def _configured() -> None:
    imaging.configure_libvips()


# ---------------------------------------------------------------------------------------------- helpers


def variant(**kwargs: object) -> Variant:
    return Variant(**{"name": "v", **kwargs})


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


def mad(a: pyvips.Image, b: pyvips.Image) -> float:
    assert (a.width, a.height, a.bands) == (b.width, b.height, b.bands)
    return (a.cast("float") - b).abs().avg()


def one(data: bytes, limits: Limits = LIMITS, **kwargs: object) -> Rendered:
    [out] = render(data, [variant(**kwargs)], limits)
    return out


def gradient(width: int, height: int) -> pyvips.Image:
    """A colourful sRGB test card: red ramps left to right, green top to bottom, blue constant."""
    xy = pyvips.Image.xyz(width, height)
    red = xy[0] * (255 / max(1, width - 1))
    green = xy[1] * (255 / max(1, height - 1))
    return red.bandjoin([green, green * 0 + 96]).cast("uchar").copy(interpretation="srgb")


def solid(width: int, height: int, pixel: list[int]) -> pyvips.Image:
    """A uchar image filled with one pixel value (3 values: sRGB, 4: sRGB + alpha)."""
    return pyvips.Image.black(width, height).new_from_image(pixel).copy(interpretation="srgb")


def png_chunk(ctype: bytes, body: bytes, crc: int | None = None) -> bytes:
    if crc is None:
        crc = zlib.crc32(ctype + body)
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc)


def crafted_png(width: int, height: int) -> bytes:
    """A structurally valid PNG (correct CRCs) whose IHDR claims `width` x `height`, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def suite_bytes(name: str) -> bytes:
    return (PNGSUITE_DIR / f"{name}.png").read_bytes()


def valid_suite() -> list[str]:
    if not PNGSUITE_DIR.is_dir():
        return []
    return sorted(p.stem for p in PNGSUITE_DIR.glob("*.png") if not p.name.startswith("x"))


def corrupt_suite() -> list[str]:
    if not PNGSUITE_DIR.is_dir():
        return []
    return sorted(p.stem for p in PNGSUITE_DIR.glob("x*.png"))


# ----------------------------------------------------------------------------------- configuration


def _blob_v(tmp_path: Path) -> bytes:
    # libvips' native format can only be written to a file; the bytes are then fed back from memory.
    path = tmp_path / "img.v"
    pyvips.Image.black(4, 4).write_to_file(str(path))
    return path.read_bytes()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
PPM = b"P6\n2 2\n255\n" + bytes(12)
CSV = b"1,2,3\n4,5,6\n"
MATRIX = b"2 2\n1 2\n3 4\n"


def test_configure_is_idempotent_and_allowed_loaders_exist() -> None:
    imaging.configure_libvips()
    imaging.configure_libvips(concurrency=2, cache=False)
    imaging.configure_libvips()
    for name in imaging.ALLOWED_LOADERS:
        assert pyvips.type_from_name(name) != 0, name
    assert pyvips.cache_get_max() == 0
    assert one(gradient(40, 30).jpegsave_buffer(), width=20).width == 20


def test_foreign_loaders_are_blocked_even_when_called_directly(tmp_path: Path) -> None:
    vfile = _blob_v(tmp_path)
    # These loaders exist in this libvips build, so refusing them below is the block, not their absence.
    for name in ("svgload_buffer", "vipsload_source", "matrixload_source", "csvload_source"):
        assert pyvips.type_find("VipsOperation", name) != 0, name

    for data in (SVG, PPM, CSV, MATRIX, vfile):
        with pytest.raises(ImageError) as info:
            render(data, [variant(width=8)], LIMITS)
        assert info.value.code == "unsupported_format"
        # Bypassing sniff(): libvips itself must refuse, from a buffer and from a source.
        with pytest.raises(pyvips.Error):
            pyvips.Image.new_from_buffer(data, "")
        with pytest.raises(pyvips.Error):
            pyvips.Image.thumbnail_buffer(data, 8)
        with pytest.raises(pyvips.Error):
            pyvips.Image.new_from_source(pyvips.Source.new_from_memory(data), "")

    with pytest.raises(pyvips.Error):
        pyvips.Operation.call("svgload_buffer", SVG)
    for name, data in (("vipsload_source", vfile), ("matrixload_source", MATRIX), ("csvload_source", CSV)):
        with pytest.raises(pyvips.Error):
            pyvips.Operation.call(name, pyvips.Source.new_from_memory(data))
    # ... while an allowed loader still works when called the same way.
    assert pyvips.Operation.call("jpegload_buffer", gradient(8, 8).jpegsave_buffer()).width == 8


def test_file_flavours_of_the_allowed_decoders_stay_blocked(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(gradient(8, 8).jpegsave_buffer())
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_file(str(path))
    with pytest.raises(pyvips.Error):
        pyvips.Image.thumbnail(str(path), 4)
    # ... while the same bytes from memory, as a source, decode.
    assert pyvips.Image.new_from_source(pyvips.Source.new_from_memory(path.read_bytes()), "").width == 8


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
    ] + [(name, ctypes.c_size_t) for name in ("fordblks", "keepcost")]


def _malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out (heap and mmap), C code's included."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc's mallinfo2")
def test_the_shrinking_decode_refers_to_the_source_instead_of_copying_it() -> None:
    # pyvips copies a bytes argument of an operation (thumbnail_buffer's) into memory of libvips' own:
    # the source would be held twice through the whole render, 29 MB more for a 100 MP JPEG.
    data = pyvips.Image.gaussnoise(2000, 2000).cast("uchar").jpegsave_buffer(Q=95)
    header = imaging._header(data, "jpeg")
    before = _malloc_in_use()
    image = imaging._from_buffer(data, 100, header=header)
    held = _malloc_in_use() - before
    assert image.width == 100
    assert held < len(data) / 2, f"{held} bytes allocated for a {len(data)}-byte source"


@pytest.mark.parametrize(
    "save",
    [
        lambda image: image.jpegsave_buffer(),
        lambda image: image.jpegsave_buffer(interlace=True),  # multi-scan: its own decode at 1/8
        lambda image: image.pngsave_buffer(),
        lambda image: image.webpsave_buffer(),
        lambda image: image.gifsave_buffer(),
        lambda image: image.tiffsave_buffer(),
        lambda image: image.heifsave_buffer(compression="av1", effort=0),
    ],
    ids=["jpeg", "progressive-jpeg", "png", "webp", "gif", "tiff", "avif"],
)
def test_a_bytearray_source_renders_as_its_bytes_do(save: Callable[[pyvips.Image], bytes]) -> None:
    # The worker's downloads are bytearrays (`imgpipe.bodies`), which pyvips takes for a source
    # from memory but not for a buffer argument.
    data = save(gradient(640, 480))
    variants = [variant(width=32), variant(width=300, format="png")]
    assert render(bytearray(data), variants, LIMITS) == render(data, variants, LIMITS)


# ------------------------------------------------------------------------------------------------ sniff


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "png"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"GIF89a\x01\x00", "gif"),
        (b"GIF87a\x01\x00", "gif"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1", "heif"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heif"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mif1mp42", "heif"),  # HEIF via a compatible brand
    ],
)
def test_sniff_by_magic_bytes(head: bytes, expected: str) -> None:
    assert sniff(head + b"\x00" * 32) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"<!doctype html><html><body>hi</body></html>",
        b"hello world",
        SVG,
        PPM,
        b"BM" + b"\x00" * 60,  # BMP
        b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isomavc1",  # MP4
        b"\x89PNG\r\n",  # a signature that stops short
        b"%PDF-1.7\n",
    ],
)
def test_sniff_refuses_everything_else(data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        sniff(data)
    assert info.value.code == "unsupported_format"


def test_format_comes_from_bytes_not_label() -> None:
    png = gradient(20, 10).pngsave_buffer()
    assert probe(png, LIMITS) == SourceInfo(format="png", width=20, height=10, frames=1)
    assert sniff(gradient(4, 4).webpsave_buffer()) == "webp"
    assert sniff(gradient(4, 4).tiffsave_buffer()) == "tiff"
    assert sniff(gradient(4, 4).gifsave_buffer()) == "gif"
    assert sniff(gradient(16, 16).heifsave_buffer(compression="av1", effort=0)) == "heif"


# ------------------------------------------------------------------------------------------ orientation


def _render_small(path: Path) -> pyvips.Image:
    out = one(path.read_bytes(), width=96, height=96, format="png")
    return decode(out.data)


@needs_exif
@pytest.mark.parametrize("kind", ["Landscape", "Portrait"])
def test_every_exif_orientation_comes_out_upright(kind: str) -> None:
    reference = _render_small(EXIF_DIR / f"{kind}_1.jpg")
    # The threshold must be able to tell a wrong transform from a right one on this very picture.
    for wrong in (reference.fliphor(), reference.flipver(), reference.rot180()):
        assert mad(reference, wrong) > 3 * SAME_PICTURE
    for n in range(9):
        image = _render_small(EXIF_DIR / f"{kind}_{n}.jpg")
        if kind == "Landscape":
            assert image.width > image.height, n
        else:
            assert image.height > image.width, n
        assert mad(image, reference) < SAME_PICTURE, n


@needs_exif
def test_probe_reports_stored_size_before_orientation() -> None:
    info = probe((EXIF_DIR / "Landscape_6.jpg").read_bytes(), LIMITS)
    assert info == SourceInfo(format="jpeg", width=1200, height=1800, frames=1)


# --------------------------------------------------------------------------------------------- PngSuite


@needs_pngsuite
@pytest.mark.parametrize("name", valid_suite())
def test_valid_pngsuite_renders(name: str) -> None:
    data = suite_bytes(name)
    specs = [
        Variant(name="j", width=24, height=24, format="jpeg"),
        Variant(name="p", width=24, height=24, format="png"),
        Variant(name="w", width=24, height=24, format="webp"),
    ]
    for outputs in (render(data, specs, LIMITS), [render(data, [spec], LIMITS)[0] for spec in specs]):
        jpeg, png, webp = (decode(out.data) for out in outputs)
        assert (jpeg.bands, jpeg.format, jpeg.interpretation) == (3, "uchar", "srgb")
        assert png.format == "uchar" and png.bands in (1, 2, 3, 4)
        assert webp.bands in (3, 4)
        for out, image in zip(outputs, (jpeg, png, webp), strict=True):
            assert (out.width, out.height) == (image.width, image.height)
            assert max(image.width, image.height) <= 24


@needs_pngsuite
@pytest.mark.parametrize("name", corrupt_suite())
def test_corrupt_pngsuite_raises_image_error(name: str) -> None:
    data = suite_bytes(name)
    with pytest.raises(ImageError) as info:
        render(data, [variant(width=16)], LIMITS)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        # A real PNG signature with broken contents (bad CRC, bad bit depth/colour type, missing IDAT).
        assert info.value.code == "corrupt_image"
        assert "PNG" in info.value.message
        assert_plain(info.value.message)
    else:
        # A mangled signature is simply not a PNG any more.
        assert info.value.code == "unsupported_format"


def assert_plain(message: str) -> None:
    """A failed job's message speaks of the image, not of libvips' machinery."""
    assert "Vips" not in message and "unable to call" not in message and "b'" not in message, message


@pytest.mark.parametrize(
    ("save", "expected"),
    [
        ("jpegsave_buffer", "cannot decode the JPEG: premature end of JPEG image"),
        ("jpegsave_buffer", "cannot read the JPEG header: premature end of JPEG image"),
        ("pngsave_buffer", "PNG chunk IDAT runs past the end of the data"),
        ("webpsave_buffer", "cannot read the WebP header: unable to parse image"),
    ],
    ids=["jpeg-pixels", "jpeg-header", "png", "webp"],
)
def test_truncated_sources_are_named_in_plain_words(save: str, expected: str) -> None:
    data = getattr(gradient(300, 200), save)()
    cut = 300 if expected.startswith("cannot read the JPEG header") else len(data) * 2 // 3
    with pytest.raises(ImageError) as info:
        render(data[:cut], [variant(width=16)], LIMITS)
    assert (info.value.code, info.value.message) == ("corrupt_image", expected)


@needs_pngsuite
def test_suite_has_the_corrupt_files_we_rely_on() -> None:
    # libpng checks CRCs only at fail_on="error" (`_PNG_FAIL_ON`): these two keep it covered.
    assert {"xcsn0g01", "xhdn0g08"} <= set(corrupt_suite())


def _with_chunks(png: bytes, *chunks: bytes) -> bytes:
    return png[:33] + b"".join(chunks) + png[33:]  # after the signature and IHDR


def _ztxt(text: bytes) -> bytes:
    return png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(text, 9))


def _itxt(text: bytes, *, compressed: bool) -> bytes:
    body = zlib.compress(text, 9) if compressed else text
    return png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00" + bytes([compressed, 0]) + b"en\x00\x00" + body)


def test_png_text_that_inflates_to_megabytes_is_refused_before_libpng_reads_it() -> None:
    """libpng inflates zTXt, compressed iTXt and iCCP chunks while it reads the header and again as
    it decodes, in calls no deadline reaches: a 48 kB zTXt of zeros is 50 MB of text, 0.1 s each
    time, and 1,020 of them fit a 50 MB source."""
    png = gradient(64, 64).pngsave_buffer()
    megabytes = b"\0" * (6 * 1024 * 1024)
    for bomb in (
        _with_chunks(png, *[_ztxt(megabytes)] * 3),
        _with_chunks(png, *[_itxt(megabytes, compressed=True)] * 3),
        _with_chunks(png, _ztxt(megabytes), _itxt(megabytes, compressed=True), _ztxt(megabytes)),
    ):
        assert len(bomb) < 100_000
        with pytest.raises(ImageError) as info:
            probe(bomb, LIMITS)
        assert (info.value.code, info.value.message) == (
            "corrupt_image",
            "PNG text and profile chunks inflate to over 16 MiB",
        )
    # Streams made to fail late (a bad checksum after megabytes of zeros): libpng gives up on the
    # first, and the check must not inflate every one of them uncounted (1,000 such chunks held it
    # 16.6 s, then passed). The step that fails is charged whole.
    failing = zlib.compress(b"\0" * (900 * 1024))
    failing = failing[:-1] + bytes([failing[-1] ^ 1])
    many = _with_chunks(png, *[png_chunk(b"zTXt", b"Comment\x00\x00" + failing)] * 1000)
    with pytest.raises(ImageError) as info:
        probe(many, LIMITS)  # counted as 0 each, they passed
    assert info.value.message == "PNG text and profile chunks inflate to over 16 MiB"
    # A profile counts too.
    profile = png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(megabytes, 9))
    with pytest.raises(ImageError):
        probe(_with_chunks(png, *[profile] * 3), LIMITS)
    # What real files carry passes: text of kilobytes, and text that is not compressed at all.
    xmp = b"<x:xmpmeta>" + b"a" * 20_000 + b"</x:xmpmeta>"
    fine = _with_chunks(
        png,
        _ztxt(xmp),
        _itxt(xmp, compressed=True),
        _itxt(xmp * 100, compressed=False),
        png_chunk(b"zTXt", b"Comment\x00\x00" + failing),  # one damaged stream, which libpng drops
    )
    assert one(fine, width=16).width == 16
    # Text of just under 16 MiB in all passes: the limit is on the sum, and no tighter.
    under = _with_chunks(png, *[_ztxt(b"\0" * (8 * 1024 * 1024 - 1))] * 2)
    assert probe(under, LIMITS).width == 64


def test_bad_crc_in_ancillary_png_chunk_is_tolerated() -> None:
    png = gradient(8, 8).pngsave_buffer()
    # Insert a tEXt chunk with a wrong CRC right after IHDR (8-byte signature + 25-byte IHDR chunk).
    bad = png[:33] + png_chunk(b"tEXt", b"Comment\x00hi", crc=0) + png[33:]
    assert one(bad, width=8, format="png").width == 8
    bad_idat = bytearray(png)
    idat = png.index(b"IDAT")
    bad_idat[idat + 4] ^= 0xFF  # damage the compressed data, keeping the stored CRC
    with pytest.raises(ImageError) as info:
        one(bytes(bad_idat), width=8)
    assert info.value.code == "corrupt_image"


def _bad_last_idat_crc(png: bytes) -> bytes:
    idat = png.rindex(b"IDAT")
    (length,) = struct.unpack_from(">I", png, idat - 4)
    crc = idat + 4 + length
    return png[:crc] + bytes(b ^ 0xFF for b in png[crc : crc + 4]) + png[crc + 4 :]


@pytest.mark.parametrize(
    ("widths", "shared_max_pixels"),
    [
        ((8,), None),  # one variant, cut from the probed header
        ((8, 16), None),  # several, from one shared intermediate
        ((8, 16), 100),  # an intermediate too large to hold: each variant decoded on its own
    ],
)
def test_bad_crc_in_image_data_is_refused_on_every_decoding_path(
    widths: tuple[int, ...], shared_max_pixels: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data decompresses fine; only the stored CRC of the last IDAT is wrong. libpng checks it
    # only when told to (`_PNG_FAIL_ON`): each path that opens the PNG must tell it.
    if shared_max_pixels is not None:
        monkeypatch.setattr(imaging, "_SHARED_INTERMEDIATE_MAX_PIXELS", shared_max_pixels)
    png = pyvips.Image.black(100, 100).add(90).cast("uchar").pngsave_buffer()
    variants = [variant(width=w) for w in widths]
    assert len(render(png, variants, LIMITS)) == len(widths)
    with pytest.raises(ImageError) as info:
        render(_bad_last_idat_crc(png), variants, LIMITS)
    assert info.value.code == "corrupt_image"


# ------------------------------------------------------------------------------------------- bit depth


@needs_pngsuite
@pytest.mark.parametrize(
    ("wide", "narrow"),
    # 16-bit files and their 8-bit twins: the same picture (checked by eye and by pixel statistics).
    [("basn2c16", "z00n2c08"), ("tbbn2c16", "tbrn2c08"), ("tbwn0g16", "tbbn0g04")],
)
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_16_bit_input_matches_its_8_bit_twin(wide: str, narrow: str, fmt: str) -> None:
    a = one(suite_bytes(wide), width=32, format=fmt)
    b = one(suite_bytes(narrow), width=32, format=fmt)
    ia, ib = decode(a.data), decode(b.data)
    assert ia.format == "uchar"
    # tbbn0g04 is quantised to 16 grey levels (~2.5 apart on average from its 16-bit twin) and JPEG adds
    # noise; clipping or a wrong shift instead of a scale would be off by ~100.
    assert mad(ia, ib) < 5


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    grey8 = gradient(64, 16)[0].copy(interpretation="b-w")
    grey16 = (grey8.cast("ushort") * 257).cast("ushort").copy(interpretation="grey16")
    a = decode(one(grey16.pngsave_buffer(bitdepth=16), width=64, format="png").data)
    b = decode(one(grey8.pngsave_buffer(), width=64, format="png").data)
    assert a.format == "uchar"
    assert mad(a, b) < 1
    # Clipping would have made almost everything white.
    assert 100 < a.avg() < 155


# -------------------------------------------------------------------------------------------- colour


@pytest.mark.parametrize("with_profile", [False, True])
def test_cmyk_jpeg_becomes_srgb(with_profile: bool) -> None:
    rgb = solid(64, 48, [200, 40, 10])
    cmyk = rgb.colourspace("cmyk")
    keep = pyvips.enums.ForeignKeep.ICC if with_profile else pyvips.enums.ForeignKeep.NONE
    data = cmyk.jpegsave_buffer(keep=keep)
    source = decode(data)
    assert (source.interpretation, source.bands) == ("cmyk", 4)
    assert bool(source.get_typeof("icc-profile-data")) == with_profile
    for fmt in ("jpeg", "png", "webp"):
        out = decode(one(data, width=32, format=fmt).data)
        assert (out.interpretation, out.bands, out.format) == ("srgb", 3, "uchar")
        red, green, blue = out.getpoint(16, 12)
        assert red > 150 and green < 100 and blue < 100  # still orange-red, not inverted or grey


def _profile_of_elements(elements: int) -> bytes:
    """An ICC v4 display profile whose D2Bx and A2Bx tags hold a chain of `elements` 3x3 matrices
    (multi-process elements, `mpet`), every one of them pointing at the same 60 bytes."""
    matrix = b"matf" + bytes(4) + struct.pack(">HH12f", 3, 3, *(0.9, 0.05, 0.05) * 3, 0.0, 0.0, 0.0)
    table = struct.pack(">II", 16 + 8 * elements, len(matrix)) * elements
    chain = b"mpet" + bytes(4) + struct.pack(">HHI", 3, 3, elements) + table + matrix
    tags = (b"D2B0", b"D2B1", b"A2B0", b"A2B1")
    first = 128 + 4 + 12 * len(tags)
    header = struct.pack(
        ">I4sI4s4s4s12s4s",
        first + len(chain),
        b"test",
        0x04300000,
        b"mntr",
        b"RGB ",
        b"XYZ ",
        bytes(12),
        b"acsp",
    )
    header += bytes(24) + struct.pack(">I3i", 0, 63190, 65536, 54061) + bytes(48)  # D50 illuminant
    assert len(header) == 128
    directory = struct.pack(">I", len(tags)) + b"".join(
        struct.pack(">4sII", t, first, len(chain)) for t in tags
    )
    return header + directory + chain


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_a_profile_of_multi_process_elements_is_refused_before_little_cms_reads_it(fmt: str) -> None:
    """little-cms builds such a transform while `thumbnail` sets up, in one call no deadline reaches,
    and its elements may all share the same bytes: a 2 kB profile of 32,000 held a render thread for
    34 s. No photo carries one; it is refused from its tag table, before anything reads it."""
    image = solid(64, 48, [200, 100, 50]).copy()
    image.set_type(pyvips.GValue.blob_type, "icc-profile-data", _profile_of_elements(200))
    data = image.jpegsave_buffer(keep="icc") if fmt == "jpeg" else image.pngsave_buffer(keep="icc")
    assert decode(data).get_typeof("icc-profile-data")
    for check in (lambda: probe(data, LIMITS), lambda: one(data, width=32)):
        with pytest.raises(ImageError) as refused:
            check()
        assert refused.value.code == "unsupported_format", refused.value
        assert "ICC profile" in refused.value.message


def test_libvips_out_of_memory_is_the_workers_trouble_not_a_bad_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory ran short under a job its budget let through (other jobs, a tight container): the job
    was failed for good as `corrupt_image`, though a retry elsewhere decodes it. It is now an
    error the worker retries (`MemoryError`, as Python's own)."""

    def short_of_memory(*args: object, **kwargs: object) -> pyvips.Image:
        raise pyvips.Error("unable to call thumbnail_source", "vips_tracked: out of memory --- size == 96MB")

    monkeypatch.setattr(imaging, "_from_buffer", short_of_memory)
    with pytest.raises(MemoryError):
        one(solid(64, 48, [1, 2, 3]).jpegsave_buffer(), width=32)


def test_alpha_is_flattened_onto_white_for_jpeg_and_kept_elsewhere() -> None:
    rgba = solid(32, 32, [10, 20, 30, 0])
    data = rgba.pngsave_buffer()
    jpeg = decode(one(data, width=32, format="jpeg").data)
    assert jpeg.bands == 3 and jpeg.min() >= 250
    for fmt in ("png", "webp"):
        out = decode(one(data, width=32, format=fmt).data)
        assert out.bands == 4 and out[3].max() == 0, fmt


def test_greyscale_png_stays_valid() -> None:
    grey = gradient(40, 20)[1].copy(interpretation="b-w")
    out = decode(one(grey.pngsave_buffer(), width=40, format="png").data)
    assert out.format == "uchar" and out.bands in (1, 3)
    assert mad(out[0], grey) < 1


# ---------------------------------------------------------------------------------------------- geometry


def _red_on_transparent_black(width: int, height: int) -> bytes:
    """A PNG of 20 px squares, opaque red and transparent black in turn: every square is an edge."""
    xy = pyvips.Image.xyz(width, height)
    alpha = (((xy[0] // 20 + xy[1] // 20) % 2) * 255).cast("uchar")
    red = pyvips.Image.black(width, height).new_from_image([255, 0, 0]).cast("uchar") * (alpha / 255)
    return red.cast("uchar").bandjoin(alpha).copy(interpretation="srgb").pngsave_buffer()


def _reddest_edge(made: Rendered) -> float:
    """The least red of the output's pixels that are more than faintly there: 255 if the resize
    weighed colours by their alpha, darker where transparent black bled in."""
    out = decode(made.data)
    assert out.bands == 4
    return (out[3] >= 32).ifthenelse(out[0], 255).min()


@pytest.mark.parametrize(
    ("size", "variants"),
    [
        # One variant: 400 x 2050 into a 2048 box keeps its width; libvips premultiplies only when
        # both sides change (the edges came out 34 of 255 red).
        ((400, 2050), [variant(width=2048, height=2048, format="png")]),
        # Several: the shared intermediate's sides round up, the variant's to the nearest, so the
        # largest keeps one side (14 of 255).
        (
            (1000, 1001),
            [variant(width=500, height=300, fit="cover", format="png"), variant(name="b", width=100)],
        ),
        ((1000, 1001), [variant(width=500, format="png"), variant(name="b", width=100)]),
    ],
)
def test_alpha_edges_are_resized_premultiplied_when_one_side_keeps_its_size(
    size: tuple[int, int], variants: list[Variant]
) -> None:
    made = render(_red_on_transparent_black(*size), variants, LIMITS)[0]
    assert _reddest_edge(made) >= 240, (made.width, made.height)


@pytest.mark.parametrize(
    ("size", "orientation", "variants"),
    [
        # libwebp scales while decoding to 1066 x 453: the height is the target's, so `thumbnail`
        # resized the width alone, unpremultiplied (38 of 255 red).
        ((1155, 491), 1, [variant(width=1065, format="png")]),
        ((1087, 457), 1, [variant(width=646, height=160, fit="cover", format="png")]),
        # Stored 135 x 1385, upright 1385 x 135: the side that lands on its target is the stored height.
        ((135, 1385), 5, [variant(width=1301, format="png")]),
        # The shared intermediate of several variants is decoded the same way (58 of 255).
        ((1155, 491), 1, [variant(width=1065, format="png"), variant(name="b", width=100)]),
    ],
)
def test_alpha_edges_of_a_webp_scaled_while_decoding_are_premultiplied(
    size: tuple[int, int], orientation: int, variants: list[Variant]
) -> None:
    image = pyvips.Image.new_from_buffer(_red_on_transparent_black(*size), "")
    image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    webp = image.webpsave_buffer(lossless=True, keep="exif")
    made = render(webp, variants, LIMITS)[0]
    upright = size[::-1] if orientation >= 5 else size
    assert (made.width, made.height) == imaging._output_size(variants[0], *upright)
    assert _reddest_edge(made) >= 240, (made.width, made.height)


def test_cover_gives_exact_box_and_inside_never_exceeds() -> None:
    data = gradient(600, 400).jpegsave_buffer()
    cover = one(data, width=100, height=100, fit="cover")
    assert (cover.width, cover.height) == (100, 100)
    assert (decode(cover.data).width, decode(cover.data).height) == (100, 100)
    inside = one(data, width=100, height=100)
    assert (inside.width, inside.height) == (100, 67)
    assert one(data, width=150).width == 150 and one(data, width=150).height == 100
    assert (one(data, height=50).width, one(data, height=50).height) == (75, 50)
    tall = one(data, width=300, height=20, fit="cover")
    assert (tall.width, tall.height) == (300, 20)


def test_cover_crops_the_centre() -> None:
    # Left third red, middle white, right third blue; a centre crop of a square is mostly white.
    red = solid(100, 100, [255, 0, 0])
    white = solid(100, 100, [255, 255, 255])
    blue = solid(100, 100, [0, 0, 255])
    card = red.join(white, "horizontal").join(blue, "horizontal").copy(interpretation="srgb")
    out = decode(one(card.pngsave_buffer(), width=50, height=50, fit="cover", format="png").data)
    assert (out.width, out.height) == (50, 50)
    # Resampling softens the outermost columns a little; the rest is pure white, and no side is red/blue.
    assert out.crop(2, 0, 46, 50).min() >= 250
    assert out.min() > 200


def test_never_upscales() -> None:
    data = gradient(100, 50).jpegsave_buffer()
    assert (one(data, width=400).width, one(data, width=400).height) == (100, 50)
    assert (one(data, width=400, height=400).width, one(data, width=400, height=400).height) == (100, 50)
    cover = one(data, width=80, height=80, fit="cover")
    assert (cover.width, cover.height) == (80, 50)  # cropped to the box, not scaled up to fill it
    big = one(data, width=400, height=400, fit="cover")
    assert (big.width, big.height) == (100, 50)


@needs_exif
def test_multi_variant_matches_single_variant() -> None:
    data = (EXIF_DIR / "Portrait_6.jpg").read_bytes()
    specs = [
        Variant(name="a", width=300, height=300, format="png"),
        Variant(name="b", width=120, height=80, fit="cover", format="png"),
        Variant(name="c", height=64, format="png"),
        Variant(name="d", width=2000, height=2000, fit="cover", format="png"),  # bigger than the source
        Variant(name="e", width=90, format="webp"),
    ]
    together = render(data, specs, LIMITS)
    assert [r.name for r in together] == ["a", "b", "c", "d", "e"]
    for spec, multi in zip(specs, together, strict=True):
        [single] = render(data, [spec], LIMITS)
        assert (multi.width, multi.height) == (single.width, single.height), spec.name
        assert mad(decode(multi.data), decode(single.data)) < 3, spec.name
    assert (together[1].width, together[1].height) == (120, 80)
    assert (together[3].width, together[3].height) == (1200, 1800)
    assert together[2].height == 64 and together[2].width < 64


@pytest.mark.parametrize(
    ("width", "height", "variant", "larger", "size"),
    [
        # 812.6 x 119, 86 x 150.6, 181.5 x 145: from an intermediate of rounded sides (made for the
        # larger variant beside it), the free side came out 812, 150 and 182.
        (1797, 263, Variant(name="v", height=119, format="png"), 1473, (813, 119)),
        (273, 478, Variant(name="v", width=86, format="png"), 263, (86, 151)),
        (1154, 922, Variant(name="v", height=145, format="png"), 406, (181, 145)),
    ],
)
def test_variants_made_together_are_sized_from_the_source(
    width: int, height: int, variant: Variant, larger: int, size: tuple[int, int]
) -> None:
    data = gradient(width, height).jpegsave_buffer()
    made, _ = render(data, [variant, Variant(name="larger", width=larger, format="png")], LIMITS)
    assert (made.width, made.height) == size == imaging._output_size(variant, width, height)


@pytest.mark.parametrize(
    ("width", "height", "box"), [(7, 5000, 1), (13, 4000, 3), (100, 6000, 5), (5000, 9, 2)]
)
def test_a_strip_rendered_alone_keeps_its_aspect_ratio(width: int, height: int, box: int) -> None:
    # libjpeg's shrink-on-load rounds the sides it decodes up (7 px at 1/4 is 2), and libvips' own
    # thumbnail then sized the free side from that: 1 x 833 for 1 x 714, 17% too tall.
    data = gradient(width, height).jpegsave_buffer(Q=95)
    tall = height > width
    inside = variant(width=box, format="png") if tall else variant(height=box, format="png")
    made = one(data, width=inside.width, height=inside.height, format="png")
    assert (made.width, made.height) == imaging._output_size(inside, width, height)


def test_a_strip_cropped_alone_is_not_stretched() -> None:
    # "cover" kept the right box but stretched what it kept as much as "inside" (above) was off:
    # the green ramp (255 over the source's 5000 rows) climbed 17% too slowly down the output.
    data = gradient(7, 5000).jpegsave_buffer(Q=95)
    made = decode(one(data, width=1, height=100, fit="cover", format="png").data)
    assert (made.width, made.height) == (1, 100)
    green = [made(0, row)[1] for row in (10, 90)]
    per_row = (green[1] - green[0]) / 80
    assert per_row == pytest.approx(255 / 4999 * 7, rel=0.03)  # the scale is 1/7: 7 source rows a row


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = imaging._from_buffer

    def spy(*args: object, **kwargs: object) -> pyvips.Image:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(imaging, "_from_buffer", spy)
    return calls


def test_several_variants_share_one_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    data = gradient(400, 300).jpegsave_buffer()
    specs = [Variant(name=n, width=w, format="png") for n, w in (("a", 200), ("b", 100), ("c", 50))]
    assert [r.width for r in render(data, specs, LIMITS)] == [200, 100, 50]
    assert len(calls) == 1


def test_the_largest_of_several_variants_is_the_intermediate_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # The intermediate was sized by libvips within a box rounded up: 500 x 501 from 1000 x 1001 at
    # half, for a largest variant of 500 x 500, which was then resampled again to lose a row.
    resized: list[tuple[int, int]] = []
    real = imaging._Sizing.from_image

    def spy(self: imaging._Sizing, image: pyvips.Image) -> pyvips.Image:
        if (image.width, image.height) != (self.width, self.height):
            resized.append((self.width, self.height))
        return real(self, image)

    monkeypatch.setattr(imaging._Sizing, "from_image", spy)
    data = gradient(1000, 1001).pngsave_buffer()
    specs = [
        Variant(name="large", width=500, height=300, fit="cover", format="png"),
        Variant(name="b", width=100),
    ]
    large, small = render(data, specs, LIMITS)
    assert (large.width, large.height, small.width, small.height) == (500, 300, 100, 100)
    assert resized == [(100, 100)]


def test_large_multi_variant_decodes_per_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the shared-intermediate budget the variants are decoded one by one (streaming, bounded memory).
    monkeypatch.setattr(imaging, "_SHARED_INTERMEDIATE_MAX_PIXELS", 100 * 100)
    calls = _count_decodes(monkeypatch)
    data = gradient(400, 300).jpegsave_buffer()
    specs = [Variant(name="a", width=400, format="jpeg"), Variant(name="b", width=10, format="png")]
    a, b = render(data, specs, LIMITS)
    assert (a.width, a.height, b.width) == (400, 300, 10) and b.height in (7, 8)
    assert len(calls) == 2


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "gif", "tiff", "heif"])
def test_every_accepted_input_format_renders(fmt: str) -> None:
    card = gradient(120, 80)
    data = {
        "jpeg": card.jpegsave_buffer,
        "png": card.pngsave_buffer,
        "webp": card.webpsave_buffer,
        "gif": card.gifsave_buffer,
        "tiff": card.tiffsave_buffer,
        "heif": lambda: card.heifsave_buffer(compression="av1", effort=0, Q=90),
    }[fmt]()
    assert probe(data, LIMITS) == SourceInfo(format=fmt, width=120, height=80, frames=1)
    out = decode(one(data, width=60, format="png").data)
    assert (out.width, out.height) == (60, 40)
    assert mad(out, gradient(60, 40)) < 12  # GIF's 256-colour palette is the coarsest


def test_metadata_is_stripped() -> None:
    src = gradient(64, 48).copy()
    src.set_type(pyvips.GValue.gint_type, "orientation", 1)
    src.set_type(pyvips.GValue.gstr_type, "exif-ifd0-ImageDescription", "secret location")
    data = src.jpegsave_buffer(keep=pyvips.enums.ForeignKeep.ALL, profile="srgb")
    source = decode(data)
    assert source.get_typeof("exif-data") and source.get_typeof("icc-profile-data")
    for fmt in ("jpeg", "png", "webp", "avif"):
        out = one(data, width=32, format=fmt)
        fields = set(decode(out.data).get_fields())
        assert not fields & set(META_FIELDS), (fmt, fields & set(META_FIELDS))
        assert b"secret location" not in out.data


@pytest.mark.parametrize("fmt", ["webp", "avif", "png", "jpeg"])
def test_outputs_decode_with_right_size_and_type(fmt: str) -> None:
    data = gradient(320, 200).pngsave_buffer()
    out = one(data, width=160, height=160, format=fmt, quality=70)
    image = decode(out.data)
    loader = {"jpeg": "jpegload", "png": "pngload", "webp": "webpload", "avif": "heifload"}[fmt]
    assert image.get("vips-loader").startswith(loader)
    assert (image.width, image.height) == (out.width, out.height) == (160, 100)
    assert out.format == fmt
    assert out.content_type == {"jpeg": "image/jpeg", "png": "image/png"}.get(fmt, f"image/{fmt}")
    assert mad(image, gradient(160, 100)) < 6  # and it is still the same picture


def test_animated_gif_gives_first_frame() -> None:
    frames = [solid(8, 8, [v, v, v]) for v in (255, 0, 128)]
    strip = frames[0].join(frames[1], "vertical").join(frames[2], "vertical").copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", 8)
    data = strip.gifsave_buffer()
    assert probe(data, LIMITS).frames == 3
    out = decode(one(data, width=8, format="png").data)
    assert (out.width, out.height) == (8, 8) and out.min() >= 250


# -------------------------------------------------------------------------------------------- hostile


def test_png_header_bomb_is_refused_fast() -> None:
    data = crafted_png(65000, 65000)
    start = time.monotonic()
    with pytest.raises(ImageError) as info:
        probe(data, LIMITS)
    assert info.value.code == "image_too_large"
    with pytest.raises(ImageError) as info:
        render(data, [variant(width=100)], LIMITS)
    assert info.value.code == "image_too_large"
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    ("ctype", "count"),
    [
        pytest.param(b"tEXt", 1025, id="text-chunks"),  # empty: libpng warns about each, twice
        pytest.param(b"IDAT", 100_001, id="image-data-chunks"),
    ],
)
def test_png_chunk_floods_are_refused(ctype: bytes, count: int) -> None:
    png = gradient(16, 16).pngsave_buffer()
    # After IHDR (8-byte signature + 25-byte chunk); the file stays one libvips would decode.
    flood = png[:33] + png_chunk(ctype, b"") * count + png[33:]
    for call in (lambda: probe(flood, LIMITS), lambda: render(flood, [variant(width=8)], LIMITS)):
        with pytest.raises(ImageError) as info:
            call()
        assert info.value.code == "corrupt_image"
        assert "chunks" in info.value.message
    # Under the limits, the same chunks make a PNG like any other.
    fewer = png[:33] + png_chunk(b"tEXt", b"") * 1000 + png_chunk(b"IDAT", b"") * 1000 + png[33:]
    assert probe(fewer, LIMITS).format == "png"


def test_a_long_apng_is_not_a_chunk_flood() -> None:
    """Every frame of an animated PNG is two chunks (fcTL, then fdAT); only the default image (IDAT)
    is rendered, as libvips reads it. 1,500 frames were refused as `corrupt_image`, 300 rendered."""
    raw = b"".join(b"\x00" + b"\x80\x40\x20" * 4 for _ in range(4))  # 4 x 4 RGB, filter 0
    data = zlib.compress(raw)
    frames = 1500
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))]
    chunks.append(png_chunk(b"acTL", struct.pack(">II", frames, 0)))
    sequence = itertools.count()
    for frame in range(frames):
        control = struct.pack(">IIIIIHHBB", next(sequence), 4, 4, 0, 0, 1, 10, 0, 0)
        chunks.append(png_chunk(b"fcTL", control))
        if frame == 0:
            chunks.append(png_chunk(b"IDAT", data))
        else:
            chunks.append(png_chunk(b"fdAT", struct.pack(">I", next(sequence)) + data))
    apng = b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + png_chunk(b"IEND", b"")
    assert probe(apng, LIMITS).format == "png"
    (out,) = render(apng, [variant(width=2, format="png")], LIMITS)
    assert decode(out.data).getpoint(0, 0)[:3] == [128, 64, 32]


def test_jpeg_header_bomb_is_refused_fast() -> None:
    data = bytearray(gradient(16, 16).jpegsave_buffer(interlace=False))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65000, 65000)  # marker(2) length(2) precision(1) height width
    start = time.monotonic()
    with pytest.raises(ImageError) as info:
        render(bytes(data), [variant(width=100)], LIMITS)
    assert info.value.code == "image_too_large"
    assert time.monotonic() - start < 1.0


def test_pixel_limit_is_configurable() -> None:
    data = gradient(100, 100).pngsave_buffer()
    assert probe(data, Limits(max_pixels=10_000)).width == 100
    with pytest.raises(ImageError) as info:
        probe(data, Limits(max_pixels=9_999))
    assert info.value.code == "image_too_large"


@pytest.mark.parametrize(("count", "limit"), [(5, 4), (300, 256)])
def test_too_many_frames(count: int, limit: int) -> None:
    # Frames alternate black and white: similar neighbouring frames get merged by the GIF writer.
    strip = (((pyvips.Image.xyz(2, 2 * count)[1] / 2).floor() % 2) * 255).cast("uchar")
    strip.set_type(pyvips.GValue.gint_type, "page-height", 2)
    data = strip.gifsave_buffer()
    with pytest.raises(ImageError) as info:
        render(data, [variant(width=2)], Limits(max_frames=limit))
    assert info.value.code == "too_many_frames"
    assert probe(data, Limits(max_frames=count)).frames == count


def test_empty_source() -> None:
    for call in (lambda: probe(b"", LIMITS), lambda: render(b"", [variant(width=2)], LIMITS)):
        with pytest.raises(ImageError) as info:
            call()
        assert info.value.code == "empty_source"


@pytest.mark.parametrize("data", [b"<html><body>not an image</body></html>", b"just text", SVG, PPM])
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        render(data, [variant(width=10)], LIMITS)
    assert info.value.code == "unsupported_format"


def test_source_too_large() -> None:
    data = gradient(64, 64).jpegsave_buffer()
    with pytest.raises(ImageError) as info:
        render(data, [variant(width=10)], Limits(max_bytes=len(data) - 1))
    assert info.value.code == "source_too_large"
    assert probe(data, Limits(max_bytes=len(data))).format == "jpeg"


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_jpeg_is_corrupt(keep: float) -> None:
    noise = pyvips.Image.gaussnoise(256, 256, mean=128, sigma=60).cast("uchar")
    data = noise.bandjoin([noise, noise]).copy(interpretation="srgb").jpegsave_buffer()
    with pytest.raises(ImageError) as info:
        render(data[: int(len(data) * keep)], [variant(width=64)], LIMITS)
    assert info.value.code == "corrupt_image"


def _noisy_jpeg(width: int, height: int, **save: object) -> bytes:
    noise = pyvips.Image.gaussnoise(width, height, mean=128, sigma=60, seed=7).cast("uchar")
    return noise.bandjoin([noise, noise]).copy(interpretation="srgb").jpegsave_buffer(**save)


def _sos_end_of_band(data: bytes, value: int) -> bytes:
    """`data` with its first scan's Se byte (the last coefficient it codes) set to `value`."""
    sos = data.index(b"\xff\xda")
    components = data[sos + 4]
    edited = bytearray(data)
    edited[sos + 5 + 2 * components + 1] = value
    return bytes(edited)


def _between_scans(progressive: bytes) -> bytes:
    """`progressive` with three stray bytes before its second scan."""
    second = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    return progressive[:second] + b"\x01\x02\x03" + progressive[second:]


_SEQUENTIAL = _noisy_jpeg(512, 384)
_PROGRESSIVE = _noisy_jpeg(1024, 768, interlace=True)


@pytest.mark.parametrize(
    ("clean", "warned", "warning"),
    [
        # A sequential file must code coefficients 0-63; libjpeg warns of anything else and ignores it.
        (_SEQUENTIAL, _sos_end_of_band(_SEQUENTIAL, 62), "Invalid SOS parameters"),
        # Bytes between two scans, before the second's marker: skipped, with a warning.
        (_PROGRESSIVE, _between_scans(_PROGRESSIVE), "extraneous bytes"),
    ],
    ids=["sos-parameters", "extraneous-bytes"],
)
@pytest.mark.parametrize(
    "variants",
    # One variant; four (decoded once into an intermediate); a thumbnail small enough for the
    # progressive file's DC scans alone (`progressive.dc_only`).
    [[variant(width=64)], [variant(name=f"v{w}", width=w) for w in (32, 64, 128, 256)], [variant(width=48)]],
    ids=["1", "4", "dc"],
)
def test_jpeg_warnings_that_lose_no_pixels_are_tolerated(
    clean: bytes, warned: bytes, warning: str, variants: list[Variant]
) -> None:
    # Real cameras and editors write such files. libjpeg warns of them (and `fail_on=warning`, sharp's
    # default, refuses them), but the picture is whole: it renders to the clean file's pixels.
    with pytest.raises(pyvips.Error, match=warning):
        pyvips.Image.new_from_buffer(warned, "", fail_on="warning").copy_memory()
    for got, want in zip(render(warned, variants, LIMITS), render(clean, variants, LIMITS), strict=True):
        assert (got.width, got.height) == (want.width, want.height)
        assert mad(decode(got.data), decode(want.data)) == 0


def test_garbage_after_magic_is_corrupt() -> None:
    for magic in (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x10\x00\x00\x00WEBPVP8 "):
        with pytest.raises(ImageError) as info:
            render(magic + os.urandom(200), [variant(width=10)], LIMITS)
        assert info.value.code in ("corrupt_image", "unsupported_format"), magic


@pytest.fixture(scope="module")
def big_png() -> bytes:
    # 64 Mpx of black compresses to ~600 KB and is made in milliseconds, but a full-size render of it
    # (decode + PNG encode of 64 Mpx) takes seconds: plenty of work to interrupt.
    return pyvips.Image.black(8000, 8000).pngsave_buffer(compression=1)


@pytest.mark.parametrize("timeout_s", [0.001, 0.05])
def test_timeout(big_png: bytes, timeout_s: float) -> None:
    spec = [Variant(name="full", width=8000, format="png")]
    start = time.monotonic()
    with pytest.raises(ImageError) as info:
        # A budget that lets this 64 MP PNG through: the deadline is what must stop it.
        render(big_png, spec, Limits(timeout_s=timeout_s, max_decode_bytes=1 << 40))
    assert info.value.code == "processing_timeout"
    assert time.monotonic() - start < timeout_s + 0.5


def test_deadline_really_kills_libvips(big_png: bytes) -> None:
    # The machinery itself: the eval handler must stop a running libvips computation part-way.
    deadline = imaging._Deadline(0.02)
    image = pyvips.Image.thumbnail_buffer(big_png, 8000)
    deadline.watch(image)
    start = time.monotonic()
    with pytest.raises(pyvips.Error, match="killed"):
        # Every row filter tried: about 0.3 s of work. A plain save of the black image took 19-22 ms
        # on a fast machine, and once ended before the deadline's 20 ms did.
        image.pngsave_buffer(compression=6, filter="all")
    assert deadline.fired
    assert time.monotonic() - start < 0.5


def test_image_error_shape() -> None:
    err = ImageError("corrupt_image", "bad bytes")
    assert (err.code, err.message) == ("corrupt_image", "bad bytes")
    assert isinstance(err, Exception)


# ---------------------------------------------------------------------------------------- decode budget


def _gif_screen(width: int, height: int) -> bytes:
    """A 40-byte GIF whose one frame covers a `width` x `height` screen with a single pixel of LZW data."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return head + frame + b"\x3b"


def _claiming_jpeg(
    width: int, height: int, *, progressive: bool, subsample: str = "off", orientation: int = 1
) -> bytes:
    image = gradient(16, 16).copy()
    if orientation != 1:
        image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    data = bytearray(image.jpegsave_buffer(interlace=progressive, subsample_mode=subsample))
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize(
    ("sampling", "chroma_blocks"),
    [(0x22, 250 * 188), (0x21, 250 * 375), (0x12, 500 * 188), (0x11, 500 * 375)],
    ids=["4:2:0", "4:2:2", "4:4:0", "4:4:4"],
)
def test_a_progressive_jpeg_is_estimated_from_its_own_sampling_factors(
    sampling: int, chroma_blocks: int
) -> None:
    """libvips names 4:2:2 and 4:4:0 "4:2:0", and the coefficients were counted from that name: a 12 MP
    4:2:2 progressive photo (Pillow, noise) held 71 MiB making `large` and was estimated at 65; it is
    76 now (4:2:0: 52 held, 65 estimated). The frame header's sampling factors say how many blocks each
    component has: luma 500 x 375 here, in whole MCUs; each chroma component `chroma_blocks`."""
    data = bytearray(_claiming_jpeg(4000, 3000, progressive=True))
    sof = data.index(b"\xff\xc2")
    assert data[sof + 9] == 3 and data[sof + 11] == 0x11  # three components, luma's factors first
    data[sof + 11] = sampling
    header = decode(bytes(data))
    assert header.get("jpeg-chroma-subsample") == ("4:4:4" if sampling == 0x11 else "4:2:0")
    luma_blocks = (500 * 376) if sampling in (0x22, 0x12) else 500 * 375
    coefficients = (luma_blocks + 2 * chroma_blocks) * 64
    assert imaging.decode_bytes("jpeg", header, bytes(data)) == math.ceil(coefficients * 2 * 1.3)


def _avif_claiming(width: int, height: int) -> bytes:
    data = bytearray(gradient(64, 48).heifsave_buffer(compression="av1", effort=0))
    ispe = data.index(b"ispe")
    struct.pack_into(">II", data, ispe + 8, width, height)
    return bytes(data)


def _webp_claiming(width: int, height: int, *, lossless: bool) -> bytes:
    """A small WebP whose header says `width` x `height` (its pixels are never decoded)."""
    data = bytearray(gradient(64, 48).webpsave_buffer(lossless=lossless, keep="none"))  # simple format
    assert data[12:16] == (b"VP8L" if lossless else b"VP8 ")
    if lossless:  # VP8L: after its 0x2f signature, 14 bits of width - 1, then 14 of height - 1
        bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
        struct.pack_into("<I", data, 21, bits | (width - 1) | (height - 1) << 14)
    else:  # VP8: after the frame's 9d 01 2a start code, 14-bit width and height
        start = data.index(b"\x9d\x01\x2a") + 3
        struct.pack_into("<HH", data, start, width, height)
    return bytes(data)


def _box(kind: bytes, body: bytes, *, version: int | None = None) -> bytes:
    if version is not None:  # a "full box": version and flags first
        body = struct.pack(">I", version << 24) + body
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _coded_av1(width: int, height: int, shade: int = 0) -> tuple[bytes, bytes]:
    """A flat `width` x `height` AV1 image of grey level `shade` (black by default) as libheif codes
    it: its properties (av1C, ispe, pixi: the boxes, in that order) and its bitstream."""
    flat = (pyvips.Image.black(width, height, bands=3) + shade).cast("uchar").copy(interpretation="srgb")
    made = flat.heifsave_buffer(compression="av1", effort=0, keep="none")

    def child(kind: bytes) -> bytes:
        at = made.index(kind) - 4
        return made[at : at + struct.unpack_from(">I", made, at)[0]]

    return b"".join(child(kind) for kind in (b"av1C", b"ispe", b"pixi")), child(b"mdat")[8:]


def _avif_with_thumbnail(
    primary: tuple[int, int], thumbnail: tuple[int, int], *, also_claims: tuple[int, int] | None = None
) -> bytes:
    """An AVIF of a black `primary` image and, as its thumbnail item (`thmb`), a white `thumbnail`
    one; with `also_claims`, the thumbnail has a second `ispe` property, of that size, after its
    real one."""
    (props1, data1), (props2, data2) = _coded_av1(*primary), _coded_av1(*thumbnail, shade=255)
    # Properties 1-3 are the primary's (av1C essential), 4-6 (and 7) the thumbnail's.
    ipma = struct.pack(">IHB3B", 2, 1, 3, 0x81, 2, 3)
    if also_claims is None:
        ipma += struct.pack(">HB3B", 2, 3, 0x84, 5, 6)
    else:
        props2 += _box(b"ispe", struct.pack(">II", *also_claims), version=0)
        ipma += struct.pack(">HB4B", 2, 4, 0x84, 5, 6, 7)
    infe = b"".join(_box(b"infe", struct.pack(">HH", i, 0) + b"av01\0", version=2) for i in (1, 2))

    def meta(offset: int) -> bytes:
        extents = struct.pack(">HHHII", 1, 0, 1, offset, len(data1))
        extents += struct.pack(">HHHII", 2, 0, 1, offset + len(data1), len(data2))
        return _box(
            b"meta",
            _box(b"hdlr", b"\0" * 4 + b"pict" + b"\0" * 13, version=0)
            + _box(b"pitm", struct.pack(">H", 1), version=0)
            + _box(b"iloc", bytes([0x44, 0]) + struct.pack(">H", 2) + extents, version=0)
            + _box(b"iinf", struct.pack(">H", 2) + infe, version=0)
            + _box(b"iprp", _box(b"ipco", props1 + props2) + _box(b"ipma", ipma, version=0))
            + _box(b"iref", _box(b"thmb", struct.pack(">HHH", 2, 1, 1)), version=0),
            version=0,
        )

    ftyp = _box(b"ftyp", b"avif\0\0\0\0mif1avifmiaf")
    offset = len(ftyp) + len(meta(0)) + 8
    return ftyp + meta(offset) + _box(b"mdat", data1 + data2)


def test_an_avifs_embedded_thumbnail_larger_than_it_is_not_decoded() -> None:
    # libvips' thumbnail decodes a HEIF's thumbnail item instead of its primary image whenever that is
    # large enough for the target, whatever its size (a 64 x 64 photo with a 10,000 x 10,000 thumbnail
    # took a worker 1.5 GB): the probe checks the primary only, so that is what gets decoded. The two
    # are told apart by their shades: the primary is black, the thumbnail white.
    def shade(made: imaging.Rendered) -> float:
        return decode(made.data).avg()

    bomb = _avif_with_thumbnail((64, 48), (5000, 4000))
    assert imaging._heif_thumbnail_sizes(bomb) == [(5000, 4000)]
    [small, same] = render(bomb, [variant(width=40), variant(name="b", width=64)], LIMITS)
    assert [(small.width, small.height), (same.width, same.height)] == [(40, 30), (64, 48)]
    assert shade(small) < 10 and shade(same) < 10
    [single] = render(bomb, [variant(width=40)], LIMITS)
    assert (single.width, single.height) == (40, 30) and shade(single) < 10
    # A second, small size after the real one does not get the thumbnail past the check: libvips
    # picked the thumbnail by that size and libheif decoded all 5000 x 4000 of it before refusing it
    # as "bad image dimensions". Sizes that disagree trust no thumbnail at all.
    disguised = _avif_with_thumbnail((64, 48), (5000, 4000), also_claims=(50, 40))
    assert imaging._heif_thumbnail_sizes(disguised) is None
    [single] = render(disguised, [variant(width=40)], LIMITS)
    assert (single.width, single.height) == (40, 30) and shade(single) < 10
    # A thumbnail of a usual size is what it is for: a small variant comes from it.
    photo = _avif_with_thumbnail((640, 480), (160, 120))
    assert imaging._heif_thumbnail_sizes(photo) == [(160, 120)]
    [thumb] = render(photo, [variant(width=40)], LIMITS)
    assert (thumb.width, thumb.height) == (40, 30) and shade(thumb) > 245
    # Boxes that cannot be read trust no thumbnail; a file with none has nothing to check.
    assert imaging._heif_thumbnail_sizes(photo[:40]) is None
    assert imaging._heif_thumbnail_sizes(gradient(64, 48).heifsave_buffer(compression="av1", effort=0)) == []


def _avif_with_primaries(image: pyvips.Image, primaries: int, transfer: int | None = None) -> bytes:
    """`image` as a lossless AVIF whose `nclx` colour box says `primaries` (and `transfer`)."""
    data = bytearray(image.heifsave_buffer(compression="av1", lossless=True, effort=0, keep="none"))
    at = data.index(b"colrnclx") + 8
    data[at : at + 2] = primaries.to_bytes(2, "big")
    if transfer is not None:
        data[at + 2 : at + 4] = transfer.to_bytes(2, "big")
    return bytes(data)


def test_an_avif_in_display_p3_by_code_points_comes_out_in_srgb() -> None:
    # libvips reads colour spaces from ICC profiles alone; an AVIF (an Android camera's, an encoder's)
    # may give Display P3 as nclx code points instead, and its colours came out as if they were sRGB's.
    patches = [[200, 30, 30], [30, 200, 30], [30, 30, 200], [128, 128, 128]]
    card = pyvips.Image.arrayjoin([solid(32, 32, p) for p in patches], across=4)
    p3 = _avif_with_primaries(card, 12)
    out = decode(one(p3, width=128, format="png").data)
    want = card.icc_transform("srgb", input_profile="p3", intent="relative")
    assert mad(out, want) < 1.5
    assert mad(out, card) > 5  # what the file's values are: the test tells the two apart
    together = render(
        p3, [variant(width=128, format="png"), variant(name="b", width=64, format="png")], LIMITS
    )
    assert mad(decode(together[0].data), want) < 1.5
    # BT.709 primaries are sRGB's, and HDR transfers (PQ here) are no profile's: both as decoded.
    for as_is in (_avif_with_primaries(card, 1), _avif_with_primaries(card, 12, transfer=16)):
        assert mad(decode(one(as_is, width=128, format="png").data), card) < 1.5
    # Read from the primary image's own properties; boxes that cannot be read are none.
    assert imaging._heif_display_p3(p3) and not imaging._heif_display_p3(p3[:60])
    # A grid with no colour box of its own has its first tile's (libheif's rule).
    for primaries, p3_tiles in ((12, True), (1, False)):
        nclx = _box(b"colr", b"nclx" + struct.pack(">HHHB", primaries, 13, 6, 0x80))
        grid = _avif_derived((64, 64), grid=(1, 2, 128, 64), tile_colour=nclx)
        assert imaging._heif_display_p3(grid) is p3_tiles
        assert one(grid, width=64, format="png").width == 64


def _avif_derived(
    coded: tuple[int, int],
    *,
    grid: tuple[int, int, int, int] | None = None,
    crop: tuple[int, int] | None = None,
    essential: bytes | None = None,
    claims: tuple[int, int] | None = None,
    tile_colour: bytes | None = None,
) -> bytes:
    """An AVIF whose primary image is not what it codes: with `grid` (rows, columns, output width,
    height), a grid of that output whose every tile is the one `coded` image; with `crop`, the
    `coded` image cut to that size by a clean aperture (`clap`); with `essential`, the `coded`
    image with that property box, marked essential. `claims`: the grid's `ispe`, if not its output;
    `tile_colour`: a `colr` box of the tile's (the grid has none)."""
    props, pixels = _coded_av1(*coded)  # properties 1-3: the coded image
    if crop is not None:
        essential = _box(b"clap", struct.pack(">IIIIiIiI", crop[0], 1, crop[1], 1, 0, 1, 0, 1))
    if essential is not None:  # property 4, essential, on the one item
        props += essential
        items = [(1, 0, pixels)]
        ipma = struct.pack(">IHB4B", 1, 1, 4, 0x81, 2, 3, 0x84)
        iref = b""
    else:
        assert grid is not None
        rows, columns, width, height = grid
        props += _box(b"ispe", struct.pack(">II", *(claims or (width, height))), version=0)  # 4: the grid's
        descriptor = struct.pack(">BBBBHH", 0, 0, rows - 1, columns - 1, width, height)
        items = [(1, 1, descriptor), (2, 0, pixels)]  # the grid in `idat` (construction method 1)
        ipma = struct.pack(">IHBBHB3B", 2, 1, 1, 0x04, 2, 3, 0x81, 2, 3)
        if tile_colour is not None:  # property 5, the tile's fourth
            props += tile_colour
            ipma = struct.pack(">IHBBHB4B", 2, 1, 1, 0x04, 2, 4, 0x81, 2, 3, 5)
        iref = _box(
            b"iref",
            _box(b"dimg", struct.pack(">HH", 1, rows * columns) + struct.pack(">H", 2) * (rows * columns)),
            version=0,
        )
    kinds = {1: b"av01" if essential is not None else b"grid", 2: b"av01"}
    infe = b"".join(
        _box(b"infe", struct.pack(">HH", i, 0) + kinds[i] + b"\0", version=2) for i, _, _ in items
    )
    idat = b"".join(body for _, method, body in items if method == 1)

    def meta(offset: int) -> bytes:
        extents = b""
        for item, method, body in items:
            at = 0 if method == 1 else offset
            extents += struct.pack(">HHHHII", item, method, 0, 1, at, len(body))
        return _box(
            b"meta",
            _box(b"hdlr", b"\0" * 4 + b"pict" + b"\0" * 13, version=0)
            + _box(b"pitm", struct.pack(">H", 1), version=0)
            + _box(b"iloc", bytes([0x44, 0]) + struct.pack(">H", len(items)) + extents, version=1)
            + _box(b"iinf", struct.pack(">H", len(items)) + infe, version=0)
            + iref
            + _box(b"iprp", _box(b"ipco", props) + _box(b"ipma", ipma, version=0))
            + (_box(b"idat", idat) if idat else b""),
            version=0,
        )

    ftyp = _box(b"ftyp", b"avif\0\0\0\0mif1avifmiaf")
    offset = len(ftyp) + len(meta(0)) + 8
    return ftyp + meta(offset) + _box(b"mdat", pixels)


def test_what_a_heif_codes_is_held_to_the_limits_not_what_its_header_says() -> None:
    """libheif reports a grid's output, or the size a clean aperture crops to, and decodes every
    tile, or the whole coded image, in one call no deadline reaches: a 1.3 kB file whose header
    said 16 x 16 decoded 16 tiles of 8192 x 8192 (17 s, 1 GB)."""
    # Made as a phone makes them, a grid of tiles that cover its output decodes as before.
    tiled = _avif_derived((64, 64), grid=(2, 2, 128, 128))
    assert imaging._heif_coded_pixels(tiled) == (4 * 64 * 64, 128 * 128)  # the tiles; the canvas
    assert one(tiled, width=32, format="png").width == 32
    # The same tile 100 times behind a 16 x 16 output: the sum is held to max_pixels.
    repeated = _avif_derived((64, 64), grid=(10, 10, 16, 16))
    assert probe(repeated, LIMITS).width == 16
    with pytest.raises(ImageError) as info:
        probe(repeated, Limits(max_pixels=100 * 64 * 64 - 1))
    assert (info.value.code, info.value.message) == (
        "image_too_large",
        "this 16x16 image is coded as 409600 pixels, over 409599",
    )
    # A grid whose `ispe` says 16 x 16 and whose own data a canvas of 1024 x 1024: libheif fills the
    # canvas before it compares the two (a 5 x 4 grid of 2048 x 2048 tiles said 64 x 64: 513 MB).
    understated = _avif_derived((64, 64), grid=(2, 2, 1024, 1024), claims=(16, 16))
    assert imaging._heif_coded_pixels(understated) == (4 * 64 * 64, 1024 * 1024)
    with pytest.raises(ImageError) as info:
        probe(understated, Limits(max_decode_bytes=16 * 1024 * 1024))
    assert info.value.message.startswith("decoding this 16x16 heif would need about 16 MiB")
    # A 2048 x 2048 image cropped to 16 x 16: the coded image is held to the decode budget.
    cropped = _avif_derived((2048, 2048), crop=(16, 16))
    assert probe(cropped, LIMITS).width == 16
    with pytest.raises(ImageError) as info:
        probe(cropped, Limits(max_decode_bytes=32 * 1024 * 1024))
    assert info.value.code == "image_too_large"
    assert info.value.message.startswith("decoding this 16x16 heif would need about 66 MiB")


def test_a_jpegs_markers_before_its_image_data_are_counted() -> None:
    """libjpeg keeps every APPn segment it reads, with about 100 bytes of its own each: 12 million
    empty APP1 segments (48 MB) held 1.2 GB while the header was read, 2.3 GB in a render."""
    jpeg = gradient(32, 32).jpegsave_buffer()
    own = imaging.progressive.header_markers(jpeg, 1024)  # APP0, the tables, the frame
    assert 3 <= own <= 30
    empty_app1 = b"\xff\xe1\x00\x02"
    most = jpeg[:2] + empty_app1 * (1024 - own) + jpeg[2:]
    assert imaging.progressive.header_markers(most, 1024) == 1024
    assert probe(most, LIMITS).width == 32
    with pytest.raises(ImageError) as info:
        probe(jpeg[:2] + empty_app1 * (1025 - own) + jpeg[2:], LIMITS)
    assert (info.value.code, info.value.message) == (
        "corrupt_image",
        "over 1024 markers before the image data",
    )


def test_gif_frames_are_counted_before_libnsgif_reads_them() -> None:
    """libnsgif keeps a record of each frame while libvips reads the header: 4.1 million frames
    without image data (49 MB) held 373 MiB before their count could be checked."""
    frames = ((pyvips.Image.xyz(4, 4 * 300)[1] * 37) % 256).cast("uchar").copy()  # no two alike
    frames.set_type(pyvips.GValue.gint_type, "page-height", 4)
    animated = frames.colourspace("srgb").gifsave_buffer()
    assert probe(animated, Limits(max_frames=300)).frames == 300
    with pytest.raises(ImageError) as info:
        probe(animated, LIMITS)
    assert (info.value.code, info.value.message) == ("too_many_frames", "over 256 frames")  # ours, first
    empty = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x00"  # a frame without data
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    with pytest.raises(ImageError) as info:
        probe(header + empty * 100_000 + b"\x3b", LIMITS)
    assert (info.value.code, info.value.message) == ("too_many_frames", "over 256 frames")
    # A comment of a million one-byte blocks: counted blocks cost the walk, held to a million.
    comment = b"\x21\xfe" + b"\x01A" * 1_000_001 + b"\x00"
    with pytest.raises(ImageError) as info:
        probe(header + comment + empty + b"\x3b", LIMITS)
    assert (info.value.code, info.value.message) == ("corrupt_image", "GIF of over 1000000 data blocks")


def _heif_meta(
    primary: int, sizes: dict[int, tuple[int, int]], refs: list[tuple[bytes, int, list[int]]]
) -> bytes:
    """The boxes of a HEIF file that say what it codes (no image data): each item's size (`ispe`)
    and the references between items."""
    props = b"".join(_box(b"ispe", struct.pack(">II", *size), version=0) for size in sizes.values())
    ipma = struct.pack(">I", len(sizes)) + b"".join(
        struct.pack(">HBB", item, 1, index) for index, item in enumerate(sizes, start=1)
    )
    iref = b"".join(
        _box(kind, struct.pack(">HH", source, len(targets)) + b"".join(struct.pack(">H", t) for t in targets))
        for kind, source, targets in refs
    )
    meta = (
        _box(b"pitm", struct.pack(">H", primary), version=0)
        + _box(b"iref", iref, version=0)
        + _box(b"iprp", _box(b"ipco", props) + _box(b"ipma", ipma, version=0))
    )
    return _box(b"ftyp", b"avif\0\0\0\0mif1avifmiaf") + _box(b"meta", meta, version=0)


def test_libheif_quoting_the_files_own_bytes_is_a_corrupt_image() -> None:
    # libheif's error names an unknown essential property by its type, and pyvips could not read a
    # type that is not UTF-8 as text: a UnicodeDecodeError, which the worker took for its own fault
    # and retried.
    odd = _avif_derived((64, 64), essential=_box(b"ab\xc3(", b""))
    with pytest.raises(ImageError) as info:
        probe(odd, LIMITS)
    assert (info.value.code, info.value.message) == (
        "corrupt_image",
        "cannot read the HEIF/AVIF header: the data is damaged",
    )
    # libvips' error buffer kept the unreadable message: every later error of the process, whatever
    # the file, failed to read the same way.
    with pytest.raises(ImageError) as info:
        probe(gradient(64, 64).jpegsave_buffer()[:300], LIMITS)
    assert info.value.message == "cannot read the JPEG header: premature end of JPEG image"


def test_a_heifs_coded_images_include_what_is_decoded_beside_its_primary() -> None:
    # libheif decodes an alpha image with every tile of a grid, and an alpha image's own alpha;
    # libvips may decode a thumbnail in the primary's place when its declared size fits, and a
    # thumbnail made as a grid declares only its output. (1.85 kB of tiles' alpha took 3.8 GB.)
    tile, big = (64, 64), (8192, 8192)
    tiles_alpha = _heif_meta(1, {1: (256, 64), 2: tile, 3: big}, [(b"dimg", 1, [2] * 4), (b"auxl", 3, [2])])
    assert imaging._heif_coded_pixels(tiles_alpha) == (4 * (64 * 64 + 8192 * 8192), 8192 * 8192)
    alpha_of_alpha = _heif_meta(1, {1: tile, 2: tile, 3: big}, [(b"auxl", 2, [1]), (b"auxl", 3, [2])])
    assert imaging._heif_coded_pixels(alpha_of_alpha) == (2 * 64 * 64 + 8192 * 8192, 8192 * 8192)
    grid_thumbnail = _heif_meta(
        1, {1: (512, 512), 2: (256, 256), 3: big}, [(b"thmb", 2, [1]), (b"dimg", 2, [3, 3])]
    )
    assert imaging._heif_coded_pixels(grid_thumbnail) == (512 * 512 + 2 * 8192 * 8192, 8192 * 8192)
    # A thumbnail larger than the primary is never decoded in its place (`_heif_thumbnails_fit`).
    unused = _heif_meta(1, {1: (64, 48), 2: (5000, 4000)}, [(b"thmb", 2, [1])])
    assert imaging._heif_coded_pixels(unused) == (64 * 48, 64 * 48)


def test_webp_chunks_are_counted_before_libwebp_walks_them() -> None:
    """libvips reads an animated WebP's header asking the demuxer for each frame in turn, and the
    demuxer walks from the first each time: 100,000 frames of 1 x 1 (4.6 MB) took 32 s before the
    frame count could be checked; 6 million empty chunks held 640 MiB."""
    frames = ((pyvips.Image.xyz(1, 300)[1] * 37) % 256).cast("uchar").copy()  # no two alike in a row
    frames.set_type(pyvips.GValue.gint_type, "page-height", 1)
    animated = frames.webpsave_buffer(lossless=True)
    with pytest.raises(ImageError) as info:
        probe(animated, LIMITS)
    assert (info.value.code, info.value.message) == ("too_many_frames", "over 256 frames")  # ours, first
    assert probe(animated, Limits(max_frames=300)).frames == 300
    still = gradient(16, 16).webpsave_buffer()
    padded = bytearray(still + b"XTRA\0\0\0\0" * 1100)
    padded[4:8] = (len(padded) - 8).to_bytes(4, "little")
    with pytest.raises(ImageError) as info:
        probe(bytes(padded), LIMITS)
    assert (info.value.code, info.value.message) == ("corrupt_image", "WebP has over 1024 chunks")
    # Bytes after the end the RIFF header gives are not chunks (16 kB of zeros were 2,000 of them).
    assert probe(still + bytes(16_384), LIMITS).width == 16
    # libwebp's demuxer goes on from a frame's image, not from the end its ANMF size gives: frames
    # inside one frame that claims the rest of the file are frames (100,000 of them took 35 s).
    first = animated.index(b"ANMF")
    nested = bytearray(animated)
    nested[first + 4 : first + 8] = (len(animated) - first - 8).to_bytes(4, "little")
    with pytest.raises(ImageError) as info:
        probe(bytes(nested), LIMITS)
    assert (info.value.code, info.value.message) == ("too_many_frames", "over 256 frames")


def _interlaced_png(width: int, height: int, depth: int, colour: int, *, interlace: int = 1) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "mib"),
    [
        # A 40-byte GIF: libnsgif would allocate its whole RGBA canvas (and the previous one).
        (_gif_screen(10000, 10000), 762),
        # Every coefficient kept (2 B x 3 samples), and the variants' work beside it.
        (_claiming_jpeg(10000, 10000, progressive=True), 743),
        (_interlaced_png(9000, 9000, 16, 6), 842),  # decoded whole (8 bytes a pixel), then its rows
        (_avif_claiming(9000, 9000), 1274),
        # libwebp's lossless decoder holds the whole picture, whatever the target: a 34 kB file of
        # 10,000 x 10,000 took 461 MB for a 200 px thumbnail.
        (_webp_claiming(10000, 10000, lossless=True), 400),
        # Not interlaced, so it streams, but 1,000,000 px wide: its rows alone are about 1 GB (a real
        # 293 kB file of this shape took a worker from 45 MB to 962 MB for a 200 px thumbnail).
        (_interlaced_png(1_000_000, 100, 8, 2, interlace=0), 915),
        # A panorama, not interlaced: 1024 of its rows (a 6.9 MB file took 373 MB for a 1280 x 720 crop).
        (_interlaced_png(40_000, 2500, 8, 6, interlace=0), 500),
    ],
    ids=["gif", "progressive-jpeg", "interlaced-png", "avif", "lossless-webp", "wide-png", "panorama-png"],
)
def test_decode_budget_refuses_bombs_under_the_pixel_limit(data: bytes, mib: int) -> None:
    # Every one of these is within max_pixels: only the decode budget stops them.
    start = time.monotonic()
    with pytest.raises(ImageError) as info:
        render(data, [variant(width=100)], LIMITS)
    assert info.value.code == "image_too_large"
    assert f"about {mib} MiB" in info.value.message
    assert probe(data, Limits(max_decode_bytes=(mib + 1) * 1024 * 1024)).width in (
        9000,
        10000,
        40_000,
        1_000_000,
    )
    assert time.monotonic() - start < 1.0


def test_decode_estimates() -> None:
    def estimate(data: bytes) -> int:
        return imaging.decode_bytes(sniff(data), decode(data), data)

    card = gradient(100, 80)
    # Decoders that stream and shrink while they decode need no budget, whatever the size.
    for data in (
        card.jpegsave_buffer(),
        card.webpsave_buffer(),
        _claiming_jpeg(10000, 10000, progressive=False),
    ):
        assert estimate(data) == 0
    # PNG and TIFF stream at full width: the rows on their way to the resize (all 80 of these).
    rows = math.ceil(100 * 3 * 80 * 3.2)
    assert estimate(card.pngsave_buffer()) == estimate(card.tiffsave_buffer()) == rows
    assert estimate(card.cast("ushort").pngsave_buffer()) == 2 * rows  # 16-bit samples
    pixels = 100 * 80
    # Multi-scan JPEG: 2 bytes a coefficient, 1.3 times for the variants' work beside them. Each
    # component has 64 a block, in whole MCUs: 13 x 10 blocks at full resolution; 4:2:0's luma in
    # 2 x 2 MCUs (14 x 10), each chroma component 7 x 5.
    assert estimate(card.jpegsave_buffer(interlace=True, subsample_mode="off")) == math.ceil(
        3 * 13 * 10 * 64 * 2 * 1.3
    )
    assert estimate(card.jpegsave_buffer(interlace=True, subsample_mode="on")) == math.ceil(
        (14 * 10 + 2 * 7 * 5) * 64 * 2 * 1.3
    )
    assert estimate(card[0].jpegsave_buffer(interlace=True)) == math.ceil(13 * 10 * 64 * 2 * 1.3)  # grey
    assert estimate(card.pngsave_buffer(interlace=True)) == pixels * 3 + rows
    # A tiled TIFF also holds a row of its tiles (64 rows here).
    tiled = card.tiffsave_buffer(tile=True, tile_width=64, tile_height=64)
    assert estimate(tiled) == rows + math.ceil(100 * 3 * 64 * 1.4)
    assert estimate(card.gifsave_buffer()) == pixels * 8
    assert estimate(card.heifsave_buffer(compression="av1", effort=0)) == math.ceil(pixels * 16.5)
    # libheif's output grows with alpha and with deeper samples (4:4:4 assumed but for 8-bit RGB).
    alpha = card.bandjoin(255)
    assert estimate(alpha.heifsave_buffer(compression="av1", effort=0)) == math.ceil(pixels * 19.5)
    deep = card.cast("ushort").copy(interpretation="rgb16") * 256
    assert estimate(deep.heifsave_buffer(compression="av1", effort=0, bitdepth=10)) == pixels * 22.5
    deep_alpha = deep.bandjoin(65535)
    assert estimate(deep_alpha.heifsave_buffer(compression="av1", effort=0, bitdepth=12)) == pixels * 26
    # A still WebP: lossy decodes at the target's size; lossless whole; a lossy one's alpha whole.
    assert estimate(card.webpsave_buffer(lossless=True)) == math.ceil(pixels * 4.2)
    assert estimate(alpha.webpsave_buffer(lossless=True)) == math.ceil(pixels * 4.2)
    translucent = card.bandjoin(card[0])  # libwebp drops an alpha plane that is all opaque
    assert estimate(translucent.webpsave_buffer()) == math.ceil(pixels * 1.3)
    animation = _frames_strip(3, 8)
    assert estimate(animation.webpsave_buffer()) == 8 * 8 * 8


def test_a_variant_too_large_to_encode_is_refused_before_any_decoding() -> None:
    """The encoders hold a whole output image: an 8192 x 8192 WebP took a worker 411 MB, an AVIF 1.4 GB."""
    rgba = _interlaced_png(4096, 4096, 8, 6, interlace=0)  # a header: nothing past it is ever decoded
    big = Variant(name="big", width=4096, format="webp")  # with alpha: ~50 bytes a pixel
    with pytest.raises(ImageError) as info:
        render(rgba, [variant(width=100), big], LIMITS)
    assert info.value.code == "image_too_large"
    # 795 MiB for the encoder at quality 82, and the 4096 x 4096 RGBA intermediate both are cut from.
    assert "making variant 'big' (4096x4096 webp) from this 4096x4096 png would need about 859 MiB" in (
        info.value.message
    )
    # Within the budget, the same file goes on to be decoded (and is found to have no pixels).
    for fine in (Variant(name="w", width=1800, format="webp"), Variant(name="j", width=4096)):
        with pytest.raises(ImageError) as info:
            render(rgba, [fine], LIMITS)
        assert info.value.code == "corrupt_image"
    assert imaging.encode_bytes("avif", 2000, 2000, alpha=False) == 2000 * 2000 * 31.5
    assert imaging.encode_bytes("png", 100, 100, alpha=True) == 100 * 100 * 10
    # The lossy encoders hold more the higher the quality: interpolated between the qualities measured,
    # and the lowest's below them.
    assert imaging.encode_bytes("avif", 1000, 1000, alpha=False, quality=100) == 1000 * 1000 * 62.5
    assert imaging.encode_bytes("webp", 1000, 1000, alpha=False, quality=85) == 1000 * 1000 * 20.5
    assert imaging.encode_bytes("webp", 1000, 1000, alpha=True, quality=30) == 1000 * 1000 * 49.5


def test_a_lossy_webp_is_held_to_the_budget_at_the_size_it_decodes_to() -> None:
    # libwebp decodes a lossy still WebP whole, into an RGBA buffer of the size asked for: nothing for a
    # thumbnail, but 4 bytes a pixel of a large variant on top of its encoding (100 MP to 8192 px: 607 MB).
    big = _webp_claiming(10000, 10000, lossless=False)
    assert probe(big, LIMITS).width == 10000
    with pytest.raises(ImageError) as info:
        render(big, [variant(width=100), Variant(name="xl", width=8192)], LIMITS)
    assert "making variant 'xl' (8192x8192 jpeg) from this 10000x10000 webp would need about 377 MiB" in (
        info.value.message
    )
    # A "cover" crop to a strip decodes the whole scaled image first, 8192 x 8192 here (4.2 bytes a
    # pixel: 268 MiB); the crop itself holds nothing more.
    strip = Variant(name="strip", width=8192, height=1, fit="cover")
    with pytest.raises(ImageError) as info:
        render(big, [strip], LIMITS)
    assert "making variant 'strip' (8192x1 jpeg) from this 10000x10000 webp would need about 268 MiB" in (
        info.value.message
    )
    with pytest.raises(ImageError) as info:  # a thumbnail of it is let through (to fail on its pixels)
        render(big, [variant(width=100)], LIMITS)
    assert info.value.code == "corrupt_image"


def test_a_rotation_counts_the_image_thumbnail_copies_first_and_a_crop_streams() -> None:
    """`thumbnail` copies the resized image into memory before it turns an EXIF-rotated image
    upright. Its own "cover" crop copied too: an 8192 x 1 strip of a 10,000 px square JPEG held all
    8192 x 8192 of it (230 MiB over the process's baseline). The crop is ours now, of the resized
    rows as they stream (16 MiB over the baseline, measured by hand), counted as the fit is."""
    square = _claiming_jpeg(10000, 10000, progressive=False)
    strip = Variant(name="strip", width=8192, height=1, fit="cover")
    fit = Variant(name="fit", width=8192)
    header = decode(square)
    assert imaging.job_bytes("jpeg", header, square, [strip]) <= imaging.job_bytes(
        "jpeg", header, square, [fit]
    )
    (cut,) = render(square, [strip], LIMITS)
    assert (cut.width, cut.height) == (8192, 1)
    # Fitted inside the same box, it streams: let through.
    (fitted,) = render(square, [fit], LIMITS)
    assert (fitted.width, fitted.height) == (8192, 8192)

    def header(orientation: int) -> pyvips.Image:
        card = gradient(16, 16).copy()
        card.set_type(pyvips.GValue.gint_type, "orientation", orientation)
        data = bytearray(card.jpegsave_buffer())
        struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, 4000, 6000)
        return decode(bytes(data))

    full = [Variant(name="full", width=8192, format="png")]
    upright, sideways = (
        imaging.job_bytes("jpeg", header(1), b"", full),
        imaging.job_bytes("jpeg", header(6), b"", full),
    )
    assert sideways - upright == 4000 * 6000 * 3


def _stand_in(width: int, height: int, bands: int = 3, **metadata: object) -> pyvips.Image:
    """A header's stand-in: its size, bands and the fields the estimates read; no pixels."""
    header = pyvips.Image.black(width, height, bands=bands).cast("uchar").copy()
    for name, value in metadata.items():
        kind = pyvips.GValue.gint_type if isinstance(value, int) else pyvips.GValue.gstr_type
        header.set_type(kind, name, value)
    return header


@pytest.mark.parametrize(
    ("fmt", "source"),
    [
        ("heif", _stand_in(4032, 3024)),  # a 12 MP phone photo
        ("gif", _stand_in(6000, 4000, bands=4)),
        ("jpeg", _claiming_jpeg(8000, 6000, progressive=True, subsample="on")),
        ("jpeg", _claiming_jpeg(6216, 4144, progressive=True)),
        ("jpeg", _claiming_jpeg(6000, 4000, progressive=True, orientation=6)),
        ("png", _stand_in(7300, 5475, interlaced=1)),
    ],
    ids=[
        "heic-12mp",
        "gif-24mp",
        "progressive-420-48mp",
        "progressive-444-26mp",
        "rotated-444-24mp",
        "png-40mp",
    ],
)
def test_the_presets_fit_the_documented_sources(fmt: str, source: pyvips.Image | bytes) -> None:
    """The sources the README and `Limits` say the default budget takes: the decode, and every
    request of the presets, alone or together. A JPEG is a file whose headers claim the size (its
    frame header is read); the others are stand-ins for their headers."""
    header, data = (decode(source), source) if isinstance(source, bytes) else (source, b"")
    budget = Limits().max_decode_bytes
    assert imaging.decode_bytes(fmt, header, data) <= budget
    for names in (("thumb", "small", "medium", "large"), ("thumb",), ("small",), ("medium",), ("large",)):
        assert imaging.job_bytes(fmt, header, data, [PRESETS[name] for name in names]) <= budget, names


def test_a_source_counts_against_the_budget_beyond_the_room_set_aside_for_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The budget leaves `SOURCE_ROOM_BYTES` for the sources held beside a render; what a job's own
    source takes beyond that is held to the budget with the render (a 26 MP 4:4:4 progressive
    JPEG's `large` took a worker at concurrency 1 to 292 MiB from a 7 MB file, 314 from a 35 MB one)."""
    data = gradient(1600, 1200).jpegsave_buffer(Q=90, interlace=True)
    variants = [PRESETS["large"]]
    need = imaging.job_bytes("jpeg", pyvips.Image.new_from_buffer(data, ""), data, variants)
    monkeypatch.setattr(imaging, "SOURCE_ROOM_BYTES", len(data) // 2)
    beyond = len(data) - len(data) // 2
    (large,) = render(data, variants, Limits(max_decode_bytes=need + beyond))
    assert large.width == 1600  # `large` never scales up
    with pytest.raises(ImageError) as refused:
        render(data, variants, Limits(max_decode_bytes=need + beyond - 1))
    assert refused.value.code == "image_too_large"
    assert "source" in refused.value.message and "set aside for sources" in refused.value.message
    monkeypatch.setattr(imaging, "SOURCE_ROOM_BYTES", len(data))  # within the room: the render alone
    assert render(data, variants, Limits(max_decode_bytes=need))[0].width == 1600


def test_large_jpegs_are_written_baseline_so_they_stream() -> None:
    """A progressive or Huffman-optimised JPEG keeps every coefficient (410 MB at 8192 x 8192)."""

    def sof(data: bytes) -> bytes:
        return next(
            data[i : i + 2] for i in range(2, len(data)) if data[i : i + 2] in (b"\xff\xc0", b"\xff\xc2")
        )

    source = gradient(4000, 2200).jpegsave_buffer()  # 8.8 MP
    small, large = render(source, [Variant(name="s", width=2000), Variant(name="l", width=4000)], LIMITS)
    assert (small.width, large.width) == (2000, 4000)
    assert sof(small.data) == b"\xff\xc2"  # progressive
    assert sof(large.data) == b"\xff\xc0"  # baseline
    # Its output buffer and the copy to Python, more of them the higher the quality.
    assert imaging.encode_bytes("jpeg", 4000, 2200, alpha=False) == 4000 * 2200 * 1.5
    assert imaging.encode_bytes("jpeg", 4000, 2200, alpha=False, quality=100) == 4000 * 2200 * 8


class _MallocPeak:
    """The most bytes glibc's malloc had handed out (`mallinfo2`: heap and mmapped blocks) while a
    block ran, sampled every half millisecond from a thread of its own (libvips releases the GIL)."""

    class _Info(ctypes.Structure):
        _names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        _fields_ = [(name, ctypes.c_size_t) for name in _names.split()]

    def __init__(self) -> None:
        mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
        if mallinfo2 is None:
            pytest.skip("needs glibc's mallinfo2")
        mallinfo2.restype = self._Info
        self._mallinfo2 = mallinfo2
        self.peak = 0

    def in_use(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self) -> _MallocPeak:
        self._start, self.peak, self._running = self.in_use(), 0, True
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.in_use() - self._start)
            time.sleep(0.0005)

    def __exit__(self, *_: object) -> None:
        self._running = False
        self._thread.join()


def test_one_variant_lets_go_of_a_decoder_that_holds_the_image_before_encoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 24 MP 4:4:4 progressive JPEG's `large` alone peaked 11 MiB over its four presets: encoded
    straight from the decode, the encoder's buffers came on top of the decoder's coefficients. It
    is decoded into memory first now, and the decoding pipeline let go of before the encoder starts."""
    source = gradient(4000, 3000).jpegsave_buffer(interlace=True, subsample_mode="off")
    coefficients = 4000 * 3000 * 3 * 2  # libjpeg's, for the whole of a multi-scan image: 72 MB
    large = Variant(name="large", width=2048, height=2048, format="jpeg", quality=85)
    peaks: list[int] = []
    encode = imaging._encode

    def encoding(image: pyvips.Image, v: Variant) -> bytes:
        with _MallocPeak() as measure:
            out = encode(image, v)
        peaks.append(measure.peak)
        return out

    # The measure sees the coefficients when the encoder pulls the pixels through the decoder.
    streamed = pyvips.Image.thumbnail_buffer(source, 2048, height=2048)
    encoding(streamed, large)
    del streamed
    assert peaks.pop() > 0.9 * coefficients, peaks

    monkeypatch.setattr(imaging, "_encode", encoding)
    (out,) = render(source, [large], LIMITS)
    assert (out.width, out.height) == (2048, 1536)
    assert peaks == [pytest.approx(0, abs=coefficients / 3)]


def _noisy_progressive_jpeg(width: int, height: int) -> bytes:
    """A 4:4:4 progressive JPEG of a test card under noise: every coefficient kept by its decoder,
    and outputs that compress about as badly as photos can."""
    noise = [pyvips.Image.gaussnoise(width, height, sigma=40, seed=seed) for seed in (1, 2, 3)]
    card = gradient(width, height).cast("float") * 0.7 + noise[0].bandjoin(noise[1:]) * 0.3
    return (
        card.cast("uchar").copy(interpretation="srgb").jpegsave_buffer(interlace=True, subsample_mode="off")
    )


def test_a_job_is_held_to_the_budget_as_a_whole() -> None:
    """The decode and each encode used to be held to the budget each on its own, and a job needs
    both: a full-size PNG of a 26 MP 4:4:4 progressive JPEG took a worker at concurrency 1 to 428 MiB."""
    source = _noisy_progressive_jpeg(3000, 2000)
    full = Variant(name="full", width=8192, format="png")
    mib = 1024 * 1024
    limits = Limits(max_decode_bytes=56 * mib)
    assert imaging.decode_bytes("jpeg", decode(source), source) < 45 * mib  # the decode fits
    assert imaging.encode_bytes("png", 3000, 2000, alpha=False) < 43 * mib  # and so does the encode
    with pytest.raises(ImageError) as info:
        render(source, [full], limits)
    assert info.value.code == "image_too_large"
    assert info.value.message == (
        "making variant 'full' (3000x2000 png) from this 3000x2000 jpeg would need about 60 MiB, "
        "over the 56 MiB budget"
    )
    # Several variants: the intermediate they are cut from is held while each of them is encoded.
    with pytest.raises(ImageError) as info:
        render(source, [variant(width=200), full], limits)
    assert "making variant 'full' (3000x2000 png) from this 3000x2000 jpeg would need about 60 MiB" in (
        info.value.message
    )
    # A smaller variant of the same source fits.
    (out,) = render(source, [Variant(name="half", width=1500, format="png")], limits)
    assert (out.width, out.height) == (1500, 1000)


@pytest.mark.parametrize(
    "variants",
    [
        [Variant(name="full", width=8192, format="png")],
        [Variant(name="full", width=8192, format="webp")],
        [Variant(name="large", width=2048, format="jpeg")],
        [Variant(name="thumb", width=200), Variant(name="web", width=2048, format="webp")],
        [Variant(name="full", width=8192, format="webp", quality=100)],
        [Variant(name="web", width=1600, format="avif", quality=100)],
    ],
    ids=["full-png", "full-webp", "large-jpeg", "thumb-and-webp", "full-webp-q100", "avif-q100"],
)
def test_what_a_job_holds_stays_within_its_estimate(variants: list[Variant]) -> None:
    """`job_bytes` is what the budget holds a job to: the most glibc's malloc has handed out while
    the job renders must not exceed it (the source excepted: it was allocated before), and must be
    a fair part of it, or the estimate would refuse jobs for nothing. The measure can only fall short
    of the truth (samples every half millisecond; small blocks of libvips' threads, in arenas of
    their own, are not in `mallinfo2`): it read 0.53-0.96 of the estimate in these six jobs (the
    WebPs least: their encoder is held to what noise costs it, and this source is only part noise)."""
    source = _noisy_progressive_jpeg(3000, 2000)
    header = decode(source)
    estimate = imaging.job_bytes("jpeg", header, source, variants)
    del header
    with _MallocPeak() as measure:
        render(source, variants, Limits(max_decode_bytes=estimate))
    assert 0.4 * estimate < measure.peak <= estimate


def _frames_strip(count: int, size: int) -> pyvips.Image:
    strip = (((pyvips.Image.xyz(size, size * count)[1] / size).floor() % 2) * 255).cast("uchar")
    strip = strip.bandjoin([strip, strip]).copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", size)
    return strip


def test_decode_budget_is_configurable() -> None:
    data = gradient(100, 80).gifsave_buffer()
    assert probe(data, Limits(max_decode_bytes=100 * 80 * 8)).frames == 1
    with pytest.raises(ImageError) as info:
        render(data, [variant(width=10)], Limits(max_decode_bytes=100 * 80 * 8 - 1))
    assert info.value.code == "image_too_large"


# --------------------------------------------------------------------------------------------- TIFF data


def _tiff(order: str, data: bytes, *, claimed: int | None = None, width: int = 64, height: int = 64) -> bytes:
    """An uncompressed 8-bit grey TIFF, IFD first, one strip holding `data` (of `claimed` bytes)."""
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8 + 2 + 9 * 12 + 4),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, len(data) if claimed is None else claimed),
    ]
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    out = magic + struct.pack(f"{order}IH", 8, len(tags))
    for tag, kind, value in tags:
        if kind == 3:  # a SHORT sits in the first two bytes of the value field
            out += struct.pack(f"{order}HHIHH", tag, kind, 1, value, 0)
        else:
            out += struct.pack(f"{order}HHII", tag, kind, 1, value)
    return out + struct.pack(f"{order}I", 0) + data


@pytest.mark.parametrize("order", ["<", ">"])
def test_truncated_tiff_data_is_corrupt(order: str) -> None:
    pixels = bytes(range(256)) * 16  # 64x64
    whole = _tiff(order, pixels)
    assert decode(one(whole, width=64, format="png").data).avg() > 100
    # libvips alone would decode the missing half as black and succeed.
    for data in (whole[: len(whole) - 2048], _tiff(order, pixels[:10], claimed=len(pixels))):
        with pytest.raises(ImageError) as info:
            render(data, [variant(width=32)], LIMITS)
        assert info.value.code == "corrupt_image"
        assert "past the end" in info.value.message


def _striped_tiff(order: str, rows: int, *, short: int = 0, width: int = 8) -> bytes:
    """An uncompressed 8-bit grey TIFF of one row a strip, its strip tables (LONG) after the IFD;
    the last `short` bytes of the pixels are cut off."""
    entries = 9
    tables = 8 + 2 + entries * 12 + 4
    pixels = tables + 8 * rows
    tags = [
        (256, 4, 1, width),
        (257, 4, 1, rows),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, rows, tables),  # StripOffsets
        (277, 3, 1, 1),
        (278, 4, 1, 1),
        (279, 4, rows, tables + 4 * rows),  # StripByteCounts
    ]
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    out = bytearray(magic + struct.pack(f"{order}IH", 8, entries))
    for tag, kind, count, value in tags:
        if kind == 3:
            out += struct.pack(f"{order}HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack(f"{order}HHII", tag, kind, count, value)
    out += struct.pack(f"{order}I", 0)
    out += _longs(order, range(pixels, pixels + width * rows, width))
    out += _longs(order, [width] * rows)
    out += bytes(range(width)) * rows
    return bytes(out[: len(out) - short])


def _longs(order: str, values: Iterable[int]) -> bytes:
    table = array.array("I", values)
    if (order == "<") != (sys.byteorder == "little"):
        table.byteswap()
    return table.tobytes()


@pytest.mark.parametrize("order", ["<", ">"])
def test_strip_tables_are_read_in_either_byte_order(order: str) -> None:
    whole = _striped_tiff(order, 300)
    assert probe(whole, LIMITS).height == 300
    assert one(whole, width=8, format="png").height == 300
    with pytest.raises(ImageError) as info:
        probe(_striped_tiff(order, 300, short=3), LIMITS)
    assert info.value.code == "corrupt_image"
    assert info.value.message == "TIFF image data runs past the end of the data"


def test_a_table_of_millions_of_strips_is_checked_in_little_memory() -> None:
    """2.5 million strips (a 100 MP image of 40 px rows) held as Python ints took 180 MB."""
    rows = 2_500_000
    data = _striped_tiff("<", rows, width=1)
    tracemalloc.start()
    try:
        imaging._check_tiff_data(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * 4 * rows  # the two tables (4 bytes a strip each) and change


def _with_repeated_tags(tiff: bytes, order: str, tags: list[tuple[int, int]]) -> bytes:
    """`tiff` (IFD at 8, its entries after the count, classic) with `(tag, value)` LONG entries
    appended to its IFD, its pixels moved along by them."""
    (count,) = struct.unpack_from(f"{order}H", tiff, 8)
    end = 10 + count * 12
    extra = len(tags) * 12
    entries = bytearray(tiff[10:end])
    for index in range(count):  # the strip offsets point past the IFD: move them along
        tag, kind, n, value = struct.unpack_from(f"{order}HHII", entries, index * 12)
        if tag == 273:
            struct.pack_into(f"{order}HHII", entries, index * 12, tag, kind, n, value + extra)
    added = b"".join(struct.pack(f"{order}HHII", tag, 4, 1, value + extra) for tag, value in tags)
    return tiff[:8] + struct.pack(f"{order}H", count + len(tags)) + bytes(entries) + added + tiff[end:]


@pytest.mark.parametrize("order", ["<", ">"])
def test_repeated_strip_tables_are_corrupt(order: str) -> None:
    """libtiff reads a tag's first entry and ignores the rest: the check read the last, so a first
    strip past the end hid behind a later sound one (the file rendered black); and 4,096 entries of
    a table as large as the file were each a copy of it (48 MB: minutes in the probe)."""
    pixels = bytes(range(256)) * 16  # 64x64
    whole = _tiff(order, pixels)
    start = 8 + 2 + 9 * 12 + 4
    truncated = _tiff(order, pixels[:10], claimed=len(pixels))
    hidden = _with_repeated_tags(truncated, order, [(273, start), (279, 10)])
    for data in (hidden, _with_repeated_tags(whole, order, [(279, len(pixels))] * 50)):
        with pytest.raises(ImageError) as info:
            probe(data, LIMITS)
        assert (info.value.code, info.value.message) == (
            "corrupt_image",
            "TIFF directory repeats its strip or tile tables",
        )


def _tiff_pages(pages: int, extra_tags: int) -> bytes:
    """A little-endian TIFF of `pages` 2 x 2 grey pages, each directory with `extra_tags` private
    tags (SHORT) beside the nine it needs, all pages sharing one strip of pixels."""
    base = [(256, 2), (257, 2), (258, 8), (259, 1), (262, 1), (273, 8), (277, 1), (278, 2), (279, 4)]
    tags = sorted(base + [(40_000 + i, 0) for i in range(extra_tags)])
    size = 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 12) + bytes([0, 85, 170, 255]))
    for page in range(pages):
        following = 12 + (page + 1) * size if page < pages - 1 else 0
        out += struct.pack("<H", len(tags))
        out += b"".join(struct.pack("<HHIHH", tag, 3, 1, value, 0) for tag, value in tags)
        out += struct.pack("<I", following)
    return bytes(out)


def test_tiff_directories_are_counted_before_libtiff_reads_them() -> None:
    """libtiff reads every directory while libvips counts the pages, and a directory costs more than
    its entries: 20 pages of 4,000 tags (1 MB) took 6 s to probe, 256 of them 50 s."""
    assert probe(_tiff_pages(3, 20), LIMITS).frames == 3  # what real files look like
    for data, expected in (
        (_tiff_pages(257, 0), ("too_many_frames", "over 256 pages")),
        (_tiff_pages(1, 600), ("corrupt_image", "a TIFF directory of over 512 entries")),
        (_tiff_pages(40, 500), ("corrupt_image", "TIFF directories of over 16384 entries")),
    ):
        with pytest.raises(ImageError) as info:
            probe(data, LIMITS)
        assert (info.value.code, info.value.message) == expected


def test_a_bigtiff_directory_offset_past_any_file_is_corrupt() -> None:
    data = b"II+\x00" + struct.pack("<HHQ", 8, 0, 2**63)
    with pytest.raises(ImageError) as info:
        imaging._check_tiff_data(data)  # an OverflowError from struct, before
    assert info.value.code == "corrupt_image"


@pytest.mark.parametrize(
    "options",
    [{}, {"tile": True, "tile_width": 16, "tile_height": 16}, {"bigtiff": True}, {"compression": "jpeg"}],
    ids=["strips", "tiles", "bigtiff", "jpeg"],
)
def test_valid_tiffs_pass_the_data_check(options: dict[str, object]) -> None:
    data = gradient(300, 200).tiffsave_buffer(**options)
    assert probe(data, LIMITS) == SourceInfo(format="tiff", width=300, height=200, frames=1)
    assert one(data, width=30).width == 30
