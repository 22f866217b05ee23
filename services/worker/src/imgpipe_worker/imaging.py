"""The worker's image-processing core: sniff, probe and render, synchronously, all in memory.

Everything here is plain blocking code around libvips (through pyvips); the consumer runs `render()` in a
thread. The input is untrusted, so the module is written defensively:

* the format is decided by the bytes (`sniff`), never by a file name or a content type, and libvips is only
  allowed to use the loaders of the formats we accept (`configure_libvips`);
* size limits are checked from the header (`probe`) before a single pixel is decoded, so a small file that
  claims to be enormous is refused without allocating for it. Besides the pixel and frame counts, the
  memory a decoder that cannot stream would hold (GIF, interlaced PNG, progressive or multi-scan JPEG,
  HEIF/AVIF, animated WebP) is estimated from the header and held to a budget (`Limits.max_decode_bytes`),
  so no source, however crafted, makes one job allocate more than that for its decode;
* decoding and resizing go through `thumbnail`, which shrinks while decoding where the format allows
  (JPEG, WebP, HEIF), so the full-resolution image is rarely materialised;
* every `render()` call has a wall-clock budget enforced with libvips' own eval/kill machinery, so a slow
  image stops libvips itself rather than merely being abandoned by Python.

Errors that mean "this image is bad" are raised as `ImageError` with a stable `code`; the job fails at
once. Anything else (a bug, `MemoryError`) propagates unchanged so the caller can treat it as transient.
"""

from __future__ import annotations

import array
import itertools
import math
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import pyvips
from imgpipe.models import CONTENT_TYPES, Variant

from imgpipe_worker import progressive

__all__ = [
    "ALLOWED_LOADERS",
    "SOURCE_ROOM_BYTES",
    "ImageError",
    "Limits",
    "Rendered",
    "SourceInfo",
    "configure_libvips",
    "decode_bytes",
    "encode_bytes",
    "job_bytes",
    "probe",
    "render",
    "sniff",
]

#: libvips loader classes we re-enable after blocking every loader (names as in libvips 8.18). Only the
#: in-memory flavours of six decoders: `*Source`, as the worker opens every source from memory
#: (`_memory`), and `*Buffer` (libvips' buffer loaders are the same code over a source made of the
#: buffer). We never load from files, so the file flavours stay blocked, and make no source but from
#: memory.
#: Everything else stays off: SVG (librsvg, can fetch and parse XML), the libvips `.v` format,
#: CSV/matrix, raw, and Ultra HDR (a second JPEG code path; with it blocked such files decode as
#: ordinary JPEG).
ALLOWED_LOADERS: tuple[str, ...] = tuple(
    f"VipsForeignLoad{decoder}{flavour}"
    for decoder in ("Jpeg", "Png", "Webp", "Nsgif", "Heif", "Tiff")
    for flavour in ("Buffer", "Source")
)

# Which libvips loader (the `vips-loader` header field) belongs to which sniffed format. Used to refuse a
# polyglot file whose magic bytes say one thing while libvips picks a different decoder.
_LOADER_FORMAT: dict[str, str] = {
    "jpegload": "jpeg",
    "pngload": "png",
    "webpload": "webp",
    "gifload": "gif",
    "heifload": "heif",
    "tiffload": "tiff",
}

# ISO-BMFF brands that mean HEIF (HEIC) or AVIF; anything else in an `ftyp` box (MP4, MOV, ...) is refused.
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2"}
    | {b"avif", b"avis"}
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# How a failed job's message names each sniffed format.
_FORMAT_NAMES: dict[str, str] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WebP",
    "gif": "GIF",
    "heif": "HEIF/AVIF",
    "tiff": "TIFF",
}

# A shared intermediate is kept fully in memory; past this size (~64 MB at RGBA) we would rather decode
# once per variant, streaming, than hold it.
_SHARED_INTERMEDIATE_MAX_PIXELS = 16 * 1024 * 1024

# "truncated": refuse images whose data stops early (they would otherwise come out half grey), but
# tolerate the minor, recoverable oddities that real cameras and phones produce.
_FAIL_ON = "truncated"
# PNG at "error": only there does libpng check chunk CRCs. It then refuses a critical chunk (IHDR,
# PLTE, IDAT, IEND) whose CRC is wrong and drops an ancillary one, as browsers do; at "truncated" it
# computes no CRC at all, and a damaged file decoded to garbage. Over PngSuite, and on a bad Adler-32
# of the image data, bytes after IEND and an ancillary chunk with a bad CRC, the two levels differ
# only on the two files with a bad critical CRC. Checking the CRCs ourselves cost 4.4 ms of a 12 MB
# PNG's 85.
_PNG_FAIL_ON = "error"


def _fail_on(data: bytes) -> str:
    """The `fail_on` level `data`'s loader runs at (see `_FAIL_ON`, `_PNG_FAIL_ON`)."""
    return _PNG_FAIL_ON if bytes(data[:8]) == _PNG_SIGNATURE else _FAIL_ON


_KEEP_NONE = 0  # VipsForeignKeep NONE: strip EXIF, XMP, IPTC, ICC and everything else from the output


class ImageError(Exception):
    """A permanent problem with the source image: the job fails at once and is not retried.

    `code` is one of `empty_source`, `source_too_large`, `unsupported_format`, `image_too_large`,
    `too_many_frames`, `corrupt_image`, `processing_timeout`; `message` is a short human explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


#: What each render's budget (`Limits.max_decode_bytes`) leaves aside for the sources a worker holds
#: beside its renders: the jobs' own, and the next job's, whose body is read ahead of the renders only
#: into what the others leave of this room (`holds.Sources`). A job's own source larger than this
#: counts against the budget for the part beyond it. Without it, a worker at concurrency 1 went to
#: 311-314 MiB on a 26 MP 4:4:4 progressive JPEG (its `large`) of 15 to 35 MB, against 292 MiB on one
#: of 7 MB.
SOURCE_ROOM_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Resource limits for one source image."""

    max_bytes: int = 50 * 1024 * 1024  # size of the encoded source
    max_pixels: int = 100_000_000  # width*height of one frame, as stated by the header
    max_frames: int = 256  # n-pages of animated / multi-page input
    timeout_s: float = 30.0  # wall time for one render() call
    #: Memory a decoder that holds a whole frame would need, as estimated from the header (`decode_bytes`),
    #: and the most any step of a job may hold: the decoder's state, the pixels it writes, an encoder
    #: (`job_bytes`). 192 MiB keeps a worker at concurrency 1 under 300 MiB for any job it accepts
    #: (~97 MiB idle plus the job; the benchmark's hungriest accepted inputs, a 12 MP AVIF and a 26 MP
    #: 4:4:4 progressive JPEG, peaked at 290-294 MiB), and still takes, with the presets, a 12 MP 8-bit
    #: HEIC/AVIF phone photo (the hungriest decoder, ~16 bytes a pixel), a 24 MP GIF, a 4:2:0
    #: progressive JPEG up to 48 MP (4:4:4: 25 MP, 24 MP if EXIF-rotated) and an 8-bit RGB interlaced
    #: PNG up to 40 MP (`test_the_presets_fit_the_documented_sources`). A GIF or AVIF that claims
    #: 100 MP is refused instead of costing the worker over a gigabyte; raise it (and the memory limit)
    #: for 24 MP HEIC. Sources are held beside it (`SOURCE_ROOM_BYTES`): a source over that counts
    #: against the budget for what it takes beyond it.
    max_decode_bytes: int = 192 * 1024 * 1024


@dataclass(frozen=True)
class SourceInfo:
    """What the header says about a source.

    `width` and `height` are as stored, *before* EXIF orientation is applied (a portrait photo stored
    sideways with orientation 6 reports its sideways size). `frames` is libvips' n-pages (1 for stills).
    """

    format: str
    width: int
    height: int
    frames: int


@dataclass(frozen=True)
class Rendered:
    """One encoded output variant."""

    name: str
    format: str
    width: int
    height: int
    data: bytes

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


# --------------------------------------------------------------------------------------------------------
# libvips configuration

_config_lock = threading.Lock()
_configured = False


def configure_libvips(*, concurrency: int = 1, cache: bool = False) -> None:
    """Lock libvips down for untrusted input and size its thread pool. Idempotent.

    Blocks every operation libvips marks untrusted, then every loader, then re-enables only the in-memory
    loaders in `ALLOWED_LOADERS`. With `cache=False` the operation cache is switched off: cached
    operations would keep decoded pixels of earlier (untrusted, possibly huge) images alive and we never
    repeat an operation anyway. `concurrency` is libvips' worker threads per pipeline; the worker runs
    several jobs in parallel, so 1 is the sane default.

    The settings are process-wide: any other pyvips user in the process is restricted too.
    """
    global _configured
    with _config_lock:
        pyvips.block_untrusted_set(True)
        # Blocking the base class blocks every subclass, i.e. every loader, including ones a future
        # libvips adds; unblocking then works per class, so only the exact classes named come back.
        pyvips.operation_block_set("VipsForeignLoad", True)
        for name in ALLOWED_LOADERS:
            pyvips.operation_block_set(name, False)
        if cache:
            # libvips' own defaults.
            pyvips.cache_set_max(100)
            pyvips.cache_set_max_mem(100 * 1024 * 1024)
            pyvips.cache_set_max_files(100)
        else:
            pyvips.cache_set_max(0)
            pyvips.cache_set_max_mem(0)
            pyvips.cache_set_max_files(0)
        pyvips.concurrency_set(max(1, concurrency))
        _configured = True


def _ensure_configured() -> None:
    # A caller that forgot configure_libvips() must not get an unrestricted libvips: apply the defaults.
    if not _configured:
        configure_libvips()


# --------------------------------------------------------------------------------------------------------
# sniff / probe


def sniff(data: bytes) -> str:
    """Return the format of `data` from its magic bytes alone.

    One of "jpeg", "png", "webp", "gif", "heif" (HEIC and AVIF) or "tiff"; anything else raises
    `ImageError("unsupported_format")` (`empty_source` for no bytes at all).
    """
    if not data:
        raise ImageError("empty_source", "the source is empty")
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF
        return "tiff"
    if head[4:8] == b"ftyp" and _is_heif_ftyp(data):
        return "heif"
    raise ImageError("unsupported_format", "not a JPEG, PNG, WebP, GIF, HEIF/AVIF or TIFF image")


def _is_heif_ftyp(data: bytes) -> bool:
    # ftyp box: size(4) "ftyp" major_brand(4) minor_version(4) compatible_brands(4 each)...
    size = int.from_bytes(data[0:4], "big")
    end = min(size if size >= 16 else 16, len(data), 4096)
    if bytes(data[8:12]) in _HEIF_BRANDS:  # bytes(): a bytearray's slice cannot be looked up in a set
        return True
    return any(bytes(data[i : i + 4]) in _HEIF_BRANDS for i in range(16, end - 3, 4))


def _memory(data: bytes) -> pyvips.Source:
    # A memory source refers to `data` as it is, whatever kind of buffer it is (the worker's are
    # bytearrays: `imgpipe.bodies`). pyvips takes only `bytes` for a buffer argument, and copies it
    # into memory of libvips' own where an operation takes one (`thumbnail_buffer`): the source held
    # twice for the whole render, 29 MB more for a 100 MP JPEG.
    return pyvips.Source.new_from_memory(data)


def _header(data: bytes, fmt: str) -> pyvips.Image:
    # Lazy: with sequential access it parses the header and stops; no pixels decoded.
    try:
        return pyvips.Image.new_from_source(_memory(data), "", access="sequential", fail_on=_fail_on(data))
    except pyvips.Error as exc:
        raise ImageError(
            "corrupt_image", f"cannot read the {_FORMAT_NAMES[fmt]} header: {_vips_reason(exc)}"
        ) from exc
    except UnicodeDecodeError:
        _clear_vips_errors()
        raise ImageError(
            "corrupt_image", f"cannot read the {_FORMAT_NAMES[fmt]} header: the data is damaged"
        ) from None


def _clear_vips_errors() -> None:
    """Empty libvips' error buffer after a message pyvips could not read as UTF-8 (libheif quotes an
    unknown box's type, bytes of the file): pyvips raised while reading it, before it cleared it,
    and every later error of the process, whatever the file, then failed the same way."""
    pyvips.vips_lib.vips_error_clear()


def _loader(image: pyvips.Image) -> str:
    """The libvips loader that opened `image`, without its flavour: `jpegload` for `jpegload_source`."""
    return str(_get(image, "vips-loader", "")).removesuffix("_source").removesuffix("_buffer")


def probe(data: bytes, limits: Limits) -> SourceInfo:
    """Read the header of `data` and check it against `limits`, decoding no pixels.

    Raises `ImageError` with `empty_source`, `source_too_large`, `unsupported_format`, `corrupt_image`,
    `image_too_large` (width*height of one frame over `max_pixels`, or a decode estimated by
    `decode_bytes` over `max_decode_bytes`) or `too_many_frames`.
    """
    return _probe(data, limits)[0]


def _probe(data: bytes, limits: Limits) -> tuple[SourceInfo, pyvips.Image]:
    _ensure_configured()
    if not data:
        raise ImageError("empty_source", "the source is empty")
    if len(data) > limits.max_bytes:
        raise ImageError("source_too_large", f"the source is {len(data)} bytes, over {limits.max_bytes}")
    fmt = sniff(data)
    if fmt == "png":
        _check_png_chunks(data)  # before libvips reads the header: see the chunk limits
    elif fmt == "webp":
        _check_webp_chunks(data, limits)  # likewise
    elif fmt == "tiff":
        _check_tiff_directories(data, limits)  # likewise
    elif fmt == "gif":
        _check_gif_frames(data, limits)  # likewise
    elif (
        fmt == "jpeg"
        and progressive.header_markers(data, _JPEG_MAX_HEADER_MARKERS) > _JPEG_MAX_HEADER_MARKERS
    ):
        raise ImageError("corrupt_image", f"over {_JPEG_MAX_HEADER_MARKERS} markers before the image data")
    header = _header(data, fmt)
    loader = _loader(header)
    if _LOADER_FORMAT.get(loader) != fmt:
        # The bytes start like one format but libvips recognised another: a polyglot, refuse it.
        raise ImageError("unsupported_format", f"looks like {fmt} but decodes as {loader or 'unknown'}")
    width, height = header.width, header.height
    frames = header.get("n-pages") if header.get_typeof("n-pages") else 1
    if width * height > limits.max_pixels:
        raise ImageError(
            "image_too_large", f"{width}x{height} is {width * height} pixels, over {limits.max_pixels}"
        )
    if frames > limits.max_frames:
        raise ImageError("too_many_frames", f"{frames} frames, over {limits.max_frames}")
    if fmt == "heif":
        _check_heif_coding(data, width, height, limits)
    _check_decode_budget(f"this {width}x{height} {fmt}", decode_bytes(fmt, header, data), limits)
    if header.get_typeof("icc-profile-data"):
        _check_icc(header.get("icc-profile-data"))
    if fmt == "tiff":
        _check_tiff_data(data)
    if fmt == "jpeg" and _get(header, "jpeg-multiscan", 0):
        # Only a multi-scan JPEG reads scan after scan into its coefficient buffer: a single-scan one
        # is decoded from its first, and what follows is never read (767 copies of a 2000 x 2000
        # scan appended to one rendered as fast as the file alone). The count costs about 0.5 ms a MB.
        scans = progressive.scan_count(data, _MAX_JPEG_SCANS)
        if scans > _MAX_JPEG_SCANS:
            raise ImageError(
                "corrupt_image",
                f"over {_MAX_JPEG_SCANS} scans in one JPEG: no encoder writes that many, and each is a "
                "pass over the whole image",
            )
    return SourceInfo(format=fmt, width=width, height=height, frames=frames), header


def _check_heif_coding(data: bytes, width: int, height: int, limits: Limits) -> None:
    """Hold what libheif decodes, which the header does not show (`_heif_coded_pixels`), to
    `max_pixels`: every coded image of the primary, summed (`decode_bytes` holds the largest to the
    decode budget)."""
    coded = _heif_coded_pixels(data)
    if coded is None:
        raise ImageError("corrupt_image", "cannot read the HEIF/AVIF item boxes")
    if coded[0] > limits.max_pixels:
        raise ImageError(
            "image_too_large",
            f"this {width}x{height} image is coded as {coded[0]} pixels, over {limits.max_pixels}",
        )


# Cameras and phones write 10 to 30 markers before the first scan (APPn metadata, tables, the frame),
# an extended XMP (a depth map, a panorama's) some dozens of 64 kB APP1 segments more.
_JPEG_MAX_HEADER_MARKERS = 1024

# Progressive encoders write 6-10 scans (libjpeg's and libvips' scripts) and scan optimisation fewer;
# successive approximation of every band could take a few dozen. At 100, the scans of the largest
# multi-scan JPEG the decode budget lets through cost libjpeg about a second.
_MAX_JPEG_SCANS = 100


def _check_decode_budget(what: str, needed: int, limits: Limits) -> None:
    if needed > limits.max_decode_bytes:
        mib = 1024 * 1024
        raise ImageError(
            "image_too_large",
            f"decoding {what} would need about {needed // mib} MiB, "
            f"over the {limits.max_decode_bytes // mib} MiB budget",
        )


# Bytes per pixel that the decoders which cannot stream hold for one frame, measured with libvips 8.18
# (peak RSS over the process' baseline, rounded up): libnsgif composes every frame on a full RGBA canvas
# and keeps the previous one for "restore to previous" disposal; libwebp's animation decoder keeps two
# RGBA canvases too, and its lossless (VP8L) decoder one, for a still image (3.84-3.9 B/px measured at 24,
# 49 and 100 MP, whatever the target); a lossy still WebP with alpha has its alpha plane decoded whole
# (1.15 B/px). HEIF, interlaced PNG and multi-scan JPEG are handled in `decode_bytes`.
_BUFFERED_BYTES_PER_PIXEL = {"gif": 8.0, "webp-animated": 8.0, "webp-lossless": 4.2, "webp-alpha": 1.3}
# libheif decodes the whole image and converts it to RGB(A), 8 or 16 bits a sample, by the header's
# sample format and bands. Measured on 4000 x 3000 AVIFs (peak over baseline): 8-bit 4:2:0 15.8 B/px
# (15.7-16.2 at 12 and 24 MP), with alpha 17.2, with alpha 4:4:4 19.3; 10- and 12-bit 19.0, with
# alpha 21.5, with alpha 4:4:4 25.7. The header does not tell the chroma subsampling: 4:4:4 is assumed
# but for 8-bit RGB (phones write 4:2:0, and a 12 MP phone photo must fit the default budget).
_HEIF_BYTES_PER_PIXEL = {("uchar", 3): 16.5, ("uchar", 4): 19.5, ("ushort", 3): 22.5, ("ushort", 4): 26.0}

# A multi-scan JPEG's coefficient buffer is all its decode holds (a thumbnail's peak over the process'
# baseline: 0.98-0.99 times it at 24-63 MP), but a job of large variants holds their intermediate and
# resizes beside it: the four presets of a 24 MP 4:4:4 progressive JPEG peaked at 1.23 times it, its
# `large` alone at 1.30 (before one variant was decoded into memory ahead of its encoder:
# `_decode_first`). Unlike the other decoders' figures (peaks of whole renders), the coefficients
# alone let a 33 MP 4:4:4 progressive JPEG through the default budget, and a worker at concurrency 1
# then peaked at 348 MiB (`make bench`, memory).
_MULTISCAN_JOB_FACTOR = 1.3

# Fraction of a full-resolution plane each chroma component has, by libvips' `jpeg-chroma-subsample`.
_CHROMA_FRACTION = {"4:2:0": 0.25, "4:1:1": 0.25, "4:2:2": 0.5, "4:4:0": 0.5}

# PNG and TIFF cannot shrink while they decode, so whole rows reach the resize, and libvips holds up to
# about this many of them at full width at once (its sequential line cache, float copies for the
# kernels), about this many bytes per byte of a row's samples. First measured with libvips 8.18 on
# 20,000 to 1,000,000 px wide images of 100 to 2,000 rows (256 rows); images of 2,500 to 3,000 rows
# then held two to three times that (8,000 to 40,000 px wide, 8- and 16-bit, RGB and RGBA, PNG and
# TIFF, "inside" 200 and 2048 px and "cover" 1280 x 720 targets: 28-373 MB over the baseline, each
# 20-40% under this estimate; a 40,000 x 2,500 RGBA PNG to a 1280 x 720 crop, 373 MB). Negligible for
# photos (a 6000 px wide RGB row costs 18 kB), it is what a 300 kB PNG of 1,000,000 x 100 pixels would
# cost: about 1 GB.
_STREAMED_ROWS = 1024
_STREAMED_ROW_FACTOR = 3.2
# A tiled TIFF is read a row of tiles at a time, held whole (1.23-1.37 times its size measured).
_TILE_ROW_FACTOR = 1.4
_SAMPLE_BYTES = {"uchar": 1, "char": 1, "ushort": 2, "short": 2, "uint": 4, "int": 4, "float": 4}


def decode_bytes(fmt: str, header: pyvips.Image, data: bytes = b"") -> int:
    """Estimate how much memory decoding one frame of `header` holds at once, from its header alone
    (and, for WebP, the chunk that says which codec: `data`, the file).

    Small for decoders that stream and shrink while they decode (baseline JPEG), or decode at the
    target's size (lossy still WebP without alpha: see `_decoded_at_target`): their memory does not
    grow with the image. The others:

    * multi-scan JPEG (progressive, or baseline with one scan per component): libjpeg keeps every DCT
      coefficient, 2 bytes per sample, and chroma subsampling decides how many samples a pixel has
      (with the variants' work beside it: `_MULTISCAN_JOB_FACTOR`);
    * interlaced PNG: libpng decodes the whole image before the first row comes out;
    * PNG and TIFF stream, but at full width: their rows on the way to the resize (`_STREAMED_ROWS`),
      and a tiled TIFF's row of tiles, grow with the image's width;
    * HEIF/AVIF: see `_HEIF_BYTES_PER_PIXEL`;
    * GIF, animated WebP, lossless WebP and a lossy one's alpha: see `_BUFFERED_BYTES_PER_PIXEL`.
    """
    pixels = header.width * header.height  # one frame: libvips reports the first page only
    if fmt == "jpeg" and _get(header, "jpeg-multiscan", 0):
        return math.ceil(_coefficients(header, data) * _MULTISCAN_JOB_FACTOR)
    if fmt in ("png", "tiff"):
        row = header.width * header.bands * _SAMPLE_BYTES.get(header.format, 8)
        held = math.ceil(row * min(header.height, _STREAMED_ROWS) * _STREAMED_ROW_FACTOR)
        if fmt == "png" and _get(header, "interlaced", 0):
            held += row * header.height
        tile_height = _get(header, "tile-height", 0)
        if fmt == "tiff" and isinstance(tile_height, int) and tile_height > 0:
            held += math.ceil(row * min(header.height, tile_height) * _TILE_ROW_FACTOR)
        return held
    if fmt == "heif":
        # libheif decodes one coded image at a time, whole: a clean aperture's uncropped image, a
        # grid's tile. Where one is larger than the header says, it is what is held.
        coded = _heif_coded_pixels(data) if data else None
        pixels = max(pixels, coded[1] if coded else 0)
        sample = "uchar" if header.format == "uchar" else "ushort"
        return math.ceil(pixels * _HEIF_BYTES_PER_PIXEL[(sample, 4 if header.bands >= 4 else 3)])
    if fmt == "webp":
        fmt = "webp-animated" if _get(header, "n-pages", 1) > 1 else f"webp-{_webp_codec(data)}"
    return math.ceil(pixels * _BUFFERED_BYTES_PER_PIXEL.get(fmt, 0))


def _coefficients(header: pyvips.Image, data: bytes) -> float:
    """The bytes of a multi-scan JPEG's DCT coefficients, which libjpeg keeps for the whole image:
    2 a sample, and chroma subsampling decides how many samples a pixel has (read from the frame
    header, else from libvips' name for it)."""
    count = progressive.coefficient_count(data)
    if count is not None:
        return count * 2
    chroma = _CHROMA_FRACTION.get(str(_get(header, "jpeg-chroma-subsample", "")), 1.0)
    return header.width * header.height * (1 + (header.bands - 1) * chroma) * 2


def _webp_codec(data: bytes) -> str:
    """How a still WebP is coded: "lossless" (VP8L), "alpha" (lossy with an ALPH plane) or "lossy".

    From its RIFF chunks: the first one of a simple file, or those after a VP8X header. Unknown is
    taken for lossless, the hungrier decoder.
    """
    fourcc = bytes(data[12:16])
    if fourcc == b"VP8 ":
        return "lossy"
    if fourcc != b"VP8X":
        return "lossless"
    alpha = False
    # The image chunk follows a few metadata ones (ICCP, ANIM, ALPH).
    for fourcc in itertools.islice(_webp_chunks(data), 64):
        if fourcc == b"VP8L":
            return "lossless"
        if fourcc == b"ALPH":
            alpha = True
        if fourcc == b"VP8 ":
            return "alpha" if alpha else "lossy"
    return "lossless"


def _webp_chunks(data: bytes) -> Iterator[bytes]:
    """The type of each chunk of a WebP, in order, walked as libwebp's demuxer walks them: to the end
    the RIFF header gives (bytes after it are not chunks), and into a frame (ANMF) after its 16 bytes
    of placement, since the demuxer goes on from the frame's image rather than from the end the
    frame's size gives. A chunk that runs past the end is libwebp's to judge."""
    end = min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    offset = 12
    while offset + 8 <= end:
        fourcc = bytes(data[offset : offset + 4])
        yield fourcc
        if fourcc == b"ANMF":
            offset += 8 + 16
            continue
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        offset += 8 + size + (size & 1)


# libvips reads an animated WebP's header by asking libwebp's demuxer for each frame in turn, and
# the demuxer walks its list from the first frame each time: 30,000 frames of 1 x 1 (1.4 MB) took
# 2.6 s, 100,000 took 32 s, before the frame count could be checked; and 6 million empty chunks of
# no known kind (48 MB) held 640 MiB in the demuxers a render keeps open. Real files carry their
# frames and a handful of others (VP8X, ICCP, ANIM, EXIF, XMP).
_WEBP_MAX_CHUNKS = 1024


def _check_webp_chunks(data: bytes, limits: Limits) -> None:
    """Count a WebP's chunks (`_webp_chunks`) before libwebp does: `too_many_frames` for over
    `limits.max_frames` animation frames (ANMF), `corrupt_image` for over `_WEBP_MAX_CHUNKS` chunks
    in all."""
    frames = 0
    for chunks, fourcc in enumerate(_webp_chunks(data), start=1):
        if chunks > _WEBP_MAX_CHUNKS:
            raise ImageError("corrupt_image", f"WebP has over {_WEBP_MAX_CHUNKS} chunks")
        frames += fourcc == b"ANMF"
        if frames > limits.max_frames:
            raise ImageError("too_many_frames", f"over {limits.max_frames} frames")


def _decoded_at_target(fmt: str, header: pyvips.Image, data: bytes) -> bool:
    """Whether the decoder holds the whole image at the size it is asked for (shrink-on-load): lossy
    still WebP, decoded by libwebp straight to an RGBA buffer of the variant's (or intermediate's) size."""
    return fmt == "webp" and _get(header, "n-pages", 1) == 1 and _webp_codec(data) != "lossless"


def _get(image: pyvips.Image, name: str, default: object) -> object:
    return image.get(name) if image.get_typeof(name) else default


# libpng parses every chunk before the image data while it reads the header, and again when it
# decodes, inside one libvips call that the render deadline cannot interrupt; a malformed text chunk
# also costs a warning (a log line) each time. 100,000 empty `tEXt` chunks (1.2 MB) took 5.7 s and
# wrote 200,000 log lines; a 50 MB file would take minutes. Real files carry a handful of such
# chunks, and image data in chunks of kilobytes, so these limits only refuse files made to do this.
_PNG_MAX_METADATA_CHUNKS = 1024  # chunks other than image data and frames
_PNG_MAX_CHUNKS = 100_000
# IDAT, and an APNG's frames: each a control chunk (fcTL) and its data (fdAT). Counted as metadata,
# a real animation of over a thousand frames was refused as corrupt.
_PNG_IMAGE_DATA = frozenset({b"IDAT", b"fcTL", b"fdAT"})
# Chunks libpng inflates while it reads the header, and again when it decodes, in those same calls:
# a 48 kB zTXt of zeros is 50 MB of text, 0.1 s each time (a fuzzer's file of 40 held a render 6.8 s;
# 1,020 of them fit a 50 MB source, minutes). Real files inflate to kilobytes: an EXIF or XMP profile
# written as text, an ICC profile of a few hundred.
_PNG_COMPRESSED_METADATA = frozenset({b"zTXt", b"iTXt", b"iCCP"})
_PNG_MAX_INFLATED_METADATA = 16 * 1024 * 1024
_PNG_INFLATE_STEP = 1024 * 1024  # the most output counted per call into zlib


def _check_png_chunks(data: bytes) -> None:
    """Walk the PNG chunk list and count the chunks: a file with more than the limits above is
    corrupt, and so is one that does not start with IHDR or whose chunk runs past the end of the data.

    The CRCs are libpng's to check, as it reads (`_PNG_FAIL_ON`).
    """
    pos = len(_PNG_SIGNATURE)
    total = len(data)
    first = True
    chunks = metadata = inflated = 0
    while pos + 8 <= total:
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if first and ctype != b"IHDR":
            raise ImageError("corrupt_image", "PNG does not start with IHDR")
        first = False
        chunks += 1
        metadata += ctype not in _PNG_IMAGE_DATA
        if chunks > _PNG_MAX_CHUNKS or metadata > _PNG_MAX_METADATA_CHUNKS:
            raise ImageError(
                "corrupt_image",
                f"PNG has over {_PNG_MAX_CHUNKS} chunks, or over {_PNG_MAX_METADATA_CHUNKS} "
                "besides its image data",
            )
        end = pos + 8 + length + 4
        if length > 0x7FFFFFFF or end > total:
            name = ctype.decode("ascii", "backslashreplace")
            raise ImageError("corrupt_image", f"PNG chunk {name} runs past the end of the data")
        if ctype in _PNG_COMPRESSED_METADATA:
            inflated += _png_inflated(data, ctype, pos + 8, end - 4, _PNG_MAX_INFLATED_METADATA - inflated)
            if inflated > _PNG_MAX_INFLATED_METADATA:
                raise ImageError(
                    "corrupt_image",
                    f"PNG text and profile chunks inflate to over {_PNG_MAX_INFLATED_METADATA >> 20} MiB",
                )
        if ctype == b"IEND":
            return
        pos = end


def _png_inflated(data: bytes, ctype: bytes, start: int, end: int, room: int) -> int:
    """How many bytes the compressed part of the zTXt, iTXt or iCCP chunk in `data[start:end]`
    inflates to, counted no further than a step past `room` (so the count costs no more than the
    room). 0 for an iTXt whose text is not compressed, or a chunk without a keyword's end."""
    at = data.find(b"\0", start, min(end, start + 80))  # the keyword: 1 to 79 bytes
    if at < 0:
        return 0
    at += 1
    if ctype == b"iTXt":
        if at + 2 > end or data[at] != 1:  # the compression flag
            return 0
        at += 2  # the flag and the method
        for _ in range(2):  # the language tag and the translated keyword
            at = data.find(b"\0", at, end)
            if at < 0:
                return 0
            at += 1
    else:
        at += 1  # the compression method
    with memoryview(data) as view:
        compressed = view[at:end]
        try:
            return _inflated_size(compressed, room)
        finally:
            compressed.release()


def _inflated_size(compressed: memoryview, room: int) -> int:
    """How many bytes `compressed` (a zlib stream) inflates to, counted past `room` by a step at most.

    Inflated a step at a time: a stream that fails part-way (a bad checksum, a broken block) loses
    the output of the step that failed, which is charged whole, so that a file of streams made to
    fail late cannot have each inflated uncounted (libpng gives up on the first that fails)."""
    inflater = zlib.decompressobj()
    pending: bytes | memoryview = compressed
    inflated = 0
    try:
        while inflated <= room and not inflater.eof:
            step = len(inflater.decompress(pending, _PNG_INFLATE_STEP))
            inflated += step
            pending = inflater.unconsumed_tail
            if not step and not pending:
                break  # a stream that stops short: nothing more will come out
    except zlib.error:
        inflated += _PNG_INFLATE_STEP
    return inflated


# The tags of ICC v4's floating-point transforms, and the type they hold (multi-process elements).
# little-cms builds the transform from them while `thumbnail` sets up, in one call that no deadline
# reaches and that cannot be stopped: elements can all point at the same bytes, so a 2 kB profile of
# 32,000 of them held a render thread 34 s, and a 3 kB one over a minute. No camera, phone or image
# editor writes them into a photo.
_ICC_FLOAT_TAGS = frozenset({b"D2B0", b"D2B1", b"D2B2", b"D2B3", b"B2D0", b"B2D1", b"B2D2", b"B2D3"})
_ICC_TAG_TABLE = 128  # the tag count, then 12 bytes a tag: signature, offset, size


def _check_icc(profile: bytes) -> None:
    """Refuse an embedded ICC profile that uses multi-process elements (`unsupported_format`).

    A profile whose tag table cannot be read is left to little-cms, which decides as before.
    """
    try:
        (count,) = struct.unpack_from(">I", profile, _ICC_TAG_TABLE)
    except struct.error:
        return
    # little-cms reads no profile of over 100 tags (its MAX_TABLE_TAG): looking further is only work
    # (a WebP's 48 MB profile of 4 million tags held this loop 2.6 s).
    for index in range(min(count, 100, (len(profile) - _ICC_TAG_TABLE - 4) // 12)):
        signature, offset, _ = struct.unpack_from(">4sII", profile, _ICC_TAG_TABLE + 4 + 12 * index)
        if signature in _ICC_FLOAT_TAGS or profile[offset : offset + 4] == b"mpet":
            raise ImageError(
                "unsupported_format",
                "its ICC profile uses multi-process elements (ICC v4 D2Bx/B2Dx tags): not supported",
            )


# TIFF field types we meet in offset/count tags: SHORT, LONG, and BigTIFF's LONG8.
_TIFF_TYPE_SIZE = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}
_TIFF_DATA_TAGS = ((273, 279), (324, 325))  # (StripOffsets, StripByteCounts), (TileOffsets, TileByteCounts)


# Encoders fill their data blocks (255 bytes), so a GIF of 50 MB has about 200,000 of them. One of
# one-byte blocks held the walk below 3.4 s (with the GIL); libnsgif reads it in 0.14 s.
_GIF_MAX_SUB_BLOCKS = 1_000_000


def _check_gif_frames(data: bytes, limits: Limits) -> None:
    """Count a GIF's frames before libnsgif does (`too_many_frames` past `limits.max_frames`): it
    keeps a record of each while libvips reads the header, and 4.1 million frames without image data
    (49 MB) held 373 MiB before their count could be checked. Blocks that do not add up are
    libnsgif's to judge."""
    total = len(data)
    flags = data[10] if total > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # the header, the global colour table
    frames = hops = 0
    while pos < total:
        block = data[pos]
        if block == 0x2C:  # an image: its descriptor, a local colour table, the LZW code size, the data
            frames += 1
            if frames > limits.max_frames:
                raise ImageError("too_many_frames", f"over {limits.max_frames} frames")
            if pos + 10 > total:
                return
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
        elif block == 0x21:  # an extension: its label, then its data
            pos += 2
        else:  # the trailer, or bytes libnsgif stops at
            return
        while pos < total and data[pos]:  # sub-blocks, each its length first, to an empty one
            pos += data[pos] + 1
            hops += 1
            if hops > _GIF_MAX_SUB_BLOCKS:
                raise ImageError("corrupt_image", f"GIF of over {_GIF_MAX_SUB_BLOCKS} data blocks")
        pos += 1


# libtiff reads every directory while libvips counts a TIFF's pages for its header, and a directory's
# cost grows faster than its entries: 20 pages of 4,000 tags of no known kind (1 MB) took 6 s, 256 of
# them (12.6 MB, within the frame limit) 50 s, and a render reads the header several times; at 500
# entries, 256 pages still took 1 s to probe and 3.9 s to render. Cameras, scanners and GIS tools
# write 15 to 100 entries a page.
_TIFF_MAX_ENTRIES = 512
_TIFF_MAX_TOTAL_ENTRIES = 16_384


def _check_tiff_directories(data: bytes, limits: Limits) -> None:
    """Walk a TIFF's chain of directories (image file directories, one a page) before libtiff does,
    reading only each one's entry count and the next one's offset: `too_many_frames` for over
    `limits.max_frames` of them, `corrupt_image` for one of over `_TIFF_MAX_ENTRIES` entries, or over
    `_TIFF_MAX_TOTAL_ENTRIES` in all. Directories past the end, or in a loop, are libtiff's to judge."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        big = struct.unpack_from(f"{order}H", data, 2)[0] == 43
        count_fmt, entry_size, offset_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        offset = struct.unpack_from(f"{order}{offset_fmt}", data, 8 if big else 4)[0]
        seen: set[int] = set()
        total = 0
        while offset and offset not in seen:
            seen.add(offset)
            if len(seen) > limits.max_frames:
                raise ImageError("too_many_frames", f"over {limits.max_frames} pages")
            (entries,) = struct.unpack_from(f"{order}{count_fmt}", data, offset)
            total += entries
            if entries > _TIFF_MAX_ENTRIES:
                raise ImageError("corrupt_image", f"a TIFF directory of over {_TIFF_MAX_ENTRIES} entries")
            if total > _TIFF_MAX_TOTAL_ENTRIES:
                raise ImageError(
                    "corrupt_image", f"TIFF directories of over {_TIFF_MAX_TOTAL_ENTRIES} entries"
                )
            next_at = offset + struct.calcsize(count_fmt) + entries * entry_size
            (offset,) = struct.unpack_from(f"{order}{offset_fmt}", data, next_at)
    except (struct.error, OverflowError):
        return


def _check_tiff_data(data: bytes) -> None:
    """Check that every strip or tile of the first page lies inside `data`.

    libtiff reads a strip or tile that runs past the end of the file as far as it goes and libvips
    then decodes the rest as black, without an error even with `fail_on=truncated`: a truncated TIFF
    would come out half (or all) black. libvips has already parsed the header, so the IFD is there;
    anything here that does not add up is corrupt.
    """
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack_from(f"{order}H", data, 2)[0] == 43
    try:
        if big:
            ifd = struct.unpack_from(f"{order}Q", data, 8)[0]
            count = struct.unpack_from(f"{order}Q", data, ifd)[0]
            entry_fmt, first, size, inline = f"{order}HHQ8s", ifd + 8, 20, 8
        else:
            ifd = struct.unpack_from(f"{order}I", data, 4)[0]
            count = struct.unpack_from(f"{order}H", data, ifd)[0]
            entry_fmt, first, size, inline = f"{order}HHI4s", ifd + 2, 12, 4
        fields: dict[int, array.array[int]] = {}
        for index in range(min(count, 4096)):
            tag, kind, n, raw = struct.unpack_from(entry_fmt, data, first + index * size)
            if tag not in (273, 279, 324, 325) or kind not in _TIFF_TYPE_SIZE:
                continue
            if tag in fields:
                # libtiff reads the first and ignores the rest: checking a later one let a strip past
                # the end through (rendered black), and 4,096 copies of a table as large as the file
                # each cost a copy of the file.
                raise ImageError("corrupt_image", "TIFF directory repeats its strip or tile tables")
            code, width = _TIFF_TYPE_SIZE[kind]
            if n * width <= inline:
                fields[tag] = _tiff_values(order, code, memoryview(raw)[: n * width])
            else:
                offset = struct.unpack_from(f"{order}{'Q' if big else 'I'}", raw)[0]
                if offset + n * width > len(data):
                    raise ImageError("corrupt_image", "TIFF strip table runs past the end of the data")
                with memoryview(data) as view:
                    fields[tag] = _tiff_values(order, code, view[offset : offset + n * width])
    except (struct.error, OverflowError):  # OverflowError: an offset of 2**63 or more (BigTIFF)
        raise ImageError("corrupt_image", "TIFF directory runs past the end of the data") from None
    for offsets_tag, counts_tag in _TIFF_DATA_TAGS:
        offsets, counts = fields.get(offsets_tag), fields.get(counts_tag)
        if offsets is None:
            continue
        if counts is None or len(counts) < len(offsets):
            raise ImageError("corrupt_image", "TIFF strips or tiles without byte counts")
        total = len(data)
        if any(start + length > total for start, length in zip(offsets, counts, strict=False)):
            raise ImageError("corrupt_image", "TIFF image data runs past the end of the data")


def _tiff_values(order: str, code: str, raw: memoryview) -> array.array[int]:
    """A TIFF field's values, in an array: a table of millions of strips (a 100 MP image of one row
    each) held as a tuple of Python ints took 180 MB beside the render, counted by no budget."""
    values = array.array(code)
    values.frombytes(raw)
    if (order == "<") != (sys.byteorder == "little"):
        values.byteswap()
    return values


# libvips wraps a codec's complaint in lines about its own machinery ("unable to call
# VipsForeignLoadPngSource", "unable to copy to memory") and prefixes it with the part that raised it
# ("VipsJpeg: premature end of JPEG image"). A failed job's message keeps the complaint alone, or says
# the data is damaged where the codec gave none (libpng's header and CRC errors reach us without one).
_VIPS_MACHINERY = re.compile(r"unable to call \S+|unable to copy to memory|libpng read error")
_VIPS_PART = re.compile(r"^[A-Za-z0-9_]+: ")


def _vips_reason(exc: pyvips.Error) -> str:
    """The codec's own words from a libvips error, bounded in size, or "the data is damaged"."""
    lines = []
    for raw in f"{exc.message}\n{exc.detail or ''}".splitlines():
        line = _VIPS_PART.sub("", raw.strip())
        if line and not _VIPS_MACHINERY.fullmatch(line):
            lines.append(line)
    return (lines[-1] if lines else "the data is damaged")[:200]


# --------------------------------------------------------------------------------------------------------
# render


class _Deadline:
    """A wall-clock budget that stops libvips itself when it runs out.

    `watch(image)` turns on progress reporting for `image`; libvips then emits `eval` every few tiles of
    any computation pulling pixels through it (the save at the end of a pipeline included), and when the
    deadline has passed we set the image's kill flag, which makes the running computation fail. Steps
    that run as one call into a codec (libheif's AVIF encode, a HEIF decode) cannot be interrupted
    mid-call; `check()` between steps stops the next one from starting.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at = time.monotonic() + timeout_s
        self.fired = False

    def expired(self) -> bool:
        return self.fired or time.monotonic() >= self.at

    def check(self) -> None:
        if self.expired():
            raise self.error()

    def error(self) -> ImageError:
        return ImageError("processing_timeout", f"processing took longer than {self.timeout_s:g}s")

    def watch(self, image: pyvips.Image) -> None:
        image.set_progress(True)
        image.signal_connect("eval", self._on_eval)

    def _on_eval(self, image: pyvips.Image, _progress: object) -> None:
        if time.monotonic() >= self.at:
            self.fired = True
            image.set_kill(True)


def _oriented_size(header: pyvips.Image) -> tuple[int, int]:
    """Width and height after EXIF auto-rotation (orientations 5-8 swap the axes)."""
    orientation = header.get("orientation") if header.get_typeof("orientation") else 1
    if orientation in (5, 6, 7, 8):
        return header.height, header.width
    return header.width, header.height


def _scale_needed(variant: Variant, width: int, height: int) -> float:
    """The downscale factor `variant` needs from a `width` x `height` image (at most 1: never upscale)."""
    sw = variant.width / width if variant.width else math.inf
    sh = variant.height / height if variant.height else math.inf
    scale = max(sw, sh) if variant.fit == "cover" else min(sw, sh)
    return min(scale, 1.0)


def _scaled(width: int, height: int, scale: float) -> tuple[int, int]:
    """A `width` x `height` image scaled by `scale`: each side rounded to the nearest, at least 1."""
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class _Sizing:
    """How one variant is cut from an upright image: scaled to exactly `width` x `height` (`size=
    "force"`), then, for "cover", the centre `crop` (left, top, width, height) of that kept.

    Both sides are worked out from the source's size, not left to `thumbnail`: it sizes the free
    side (or the side a "cover" crop trims) from the image its loader shrank, whose sides are rounded
    up, so a JPEG 7 px wide, decoded at 1/4 as 2 px, came out 17% too tall (1 x 833 for 1 x 714) and
    "cover" stretched what it kept as much; from an intermediate of rounded sides the free side came
    out a pixel off. One scale for both sides keeps the aspect ratio. The centre, not libvips'
    "attention": that is data-dependent and evaluates the image an extra time; centre streams.

    With alpha, an image resized on one side only is resized here, premultiplied: `thumbnail`
    premultiplies only when both sides change, and the colour of transparent pixels bled into the
    edges of what they surround (red on transparent black came out 14 of 255 red at the edge).
    """

    width: int
    height: int
    crop: tuple[int, int, int, int] | None
    source: tuple[int, int]  # the upright size of what the variant is made from
    alpha: bool

    @classmethod
    def of(cls, variant: Variant, width: int, height: int, *, alpha: bool) -> _Sizing:
        """`variant` made from a `width` x `height` image."""
        whole = cls.whole(_scale_needed(variant, width, height), width, height, alpha=alpha)
        out_w, out_h = _output_size(variant, width, height)
        if (out_w, out_h) == (whole.width, whole.height):
            return whole
        # The centre, as libvips' own `crop="centre"` takes it (rounded down).
        crop = ((whole.width - out_w) // 2, (whole.height - out_h) // 2, out_w, out_h)
        return replace(whole, crop=crop)

    @classmethod
    def whole(cls, scale: float, width: int, height: int, *, alpha: bool) -> _Sizing:
        """All of a `width` x `height` image, scaled by `scale`: each side rounded to the nearest."""
        return cls(*_scaled(width, height, scale), None, (width, height), alpha)

    def from_source(self, data: bytes, colour: dict[str, str], header: pyvips.Image | None) -> pyvips.Image:
        """The variant decoded from `data` (see `_from_buffer`), shrinking on load where it can."""
        if self._one_side_only(*self.source):
            # Decoded at its own size (no side shrinks, so neither could on load), then resized.
            width, height = self.source
            image = _from_buffer(data, width, header=header, height=height, size="force", **colour)
            return self._cut(self._premultiplied(image))
        if self.alpha and sniff(data) == "webp":
            return self._cut(self._from_webp(data, colour))
        return self._cut(_from_buffer(data, self.width, header=header, **colour, **self._args))

    def from_image(self, image: pyvips.Image) -> pyvips.Image:
        """The variant resized from `image`, an upright sRGB intermediate in memory."""
        if self._one_side_only(image.width, image.height):
            return self._cut(self._premultiplied(image))
        return self._cut(image.thumbnail_image(self.width, **self._args))

    def _from_webp(self, data: bytes, colour: dict[str, str]) -> pyvips.Image:
        # libwebp scales while it decodes, and `thumbnail` has it scale by the smaller of the two
        # sides' shrinks: that side comes out at its target, and when the other's rounding misses it
        # by a pixel, that side is resized alone, not premultiplied (transparent black bled into 19 of
        # 200 random sizes' edges, 38 of 255 red). Loaded the same way here, that case is caught.
        width, height = self.source
        scale = max(self.width / width, self.height / height)
        loaded = pyvips.Image.webpload_source(
            _memory(data), scale=scale, access="sequential", fail_on=_fail_on(data)
        )
        upright = _oriented_size(loaded)
        if self._one_side_only(*upright):
            # Made upright and sRGB at the size it has (so not resized), then resized premultiplied.
            image = loaded.thumbnail_image(upright[0], height=upright[1], size="force", **colour)
            return self._premultiplied(image)
        return loaded.thumbnail_image(self.width, **colour, **self._args)

    @property
    def _args(self) -> dict[str, object]:
        return {"height": self.height, "size": "force"}

    def _one_side_only(self, width: int, height: int) -> bool:
        return self.alpha and (width == self.width) != (height == self.height)

    def _premultiplied(self, image: pyvips.Image) -> pyvips.Image:
        resized = image.premultiply().resize(self.width / image.width, vscale=self.height / image.height)
        return resized.unpremultiply().cast(image.format)

    def _cut(self, image: pyvips.Image) -> pyvips.Image:
        return image.crop(*self.crop) if self.crop else image


def _colour_args(fmt: str, header: pyvips.Image, data: bytes) -> dict[str, str]:
    """`thumbnail`'s arguments that make the source 8-bit sRGB: none when it is that already.

    `output_profile` converts to sRGB with the embedded ICC profile when there is one (an Adobe RGB,
    P3 or CMYK image would otherwise come out with wrong colours once the profile is stripped), or
    else with libvips' fallback (sRGB, or its CMYK profile for CMYK); it also takes 16-bit input to
    8-bit. A HEIF/AVIF may give its colour space as code points (`nclx`) instead of a profile, and
    libvips reads only profiles: Display P3 ones (as some cameras and encoders write them) get
    libvips' P3 profile, or their saturated colours came out as sRGB's, 60 levels off.

    An untagged 8-bit sRGB image is left as it is: sending it through lcms anyway (import with the
    sRGB fallback, export to sRGB) is a no-op that costs a full colour transform of every decoded
    pixel, the largest single cost of a multi-variant job in the benchmark.
    """
    tagged = header.get_typeof("icc-profile-data") != 0
    if not tagged and fmt == "heif" and _heif_display_p3(data):
        return {"output_profile": "srgb", "input_profile": "p3"}
    if tagged or not (header.format == "uchar" and header.interpretation == "srgb"):
        return {"output_profile": "srgb"}
    return {}


# Loaders that cannot shrink while decoding: for them `thumbnail` would only parse the header a
# second time (9 ms of a 12 MB PNG's 100), so the thumbnail is cut from the probed header image instead.
_NO_SHRINK_ON_LOAD = frozenset({"pngload"})


def _from_buffer(
    data: bytes, width: int, *, header: pyvips.Image | None = None, **kwargs: object
) -> pyvips.Image:
    # header: the image `_probe` opened (sequential), offered for reuse; it must not be used again.
    # kwargs: `thumbnail`'s, the colour ones (`_colour_args`) among them.
    # fail_on goes in the loader option string: in libvips 8.18 thumbnail's own `fail_on` argument
    # does not reach the loader, so a truncated file would silently come out half grey.
    loader = _loader(header) if header is not None else ""
    if loader in _NO_SHRINK_ON_LOAD:
        return header.thumbnail_image(width, **kwargs)  # opened with fail_on already
    if loader == "heifload" and not _heif_thumbnails_fit(data, header):
        # `thumbnail` would decode the file's own thumbnail item instead of its primary image (the one
        # the probe checked) whenever that is large enough for the target, whatever its size: a 64 x 64
        # photo with a 10,000 x 10,000 "thumbnail" took 1.5 GB. Such a file gets its primary decoded.
        return header.thumbnail_image(width, **kwargs)
    if header is not None and _shrinks_by_8_on_load(header, width, kwargs):
        reduced = _dc_only_image(data)
        if reduced is not None:
            return reduced.thumbnail_image(width, **kwargs)
    return pyvips.Image.thumbnail_source(
        _memory(data), width, option_string=f"fail_on={_fail_on(data)}", **kwargs
    )


def _heif_thumbnails_fit(data: bytes, primary: pyvips.Image) -> bool:
    """Whether every thumbnail item of a HEIF file is no larger than its primary image (which the
    probe held to the limits), by the sizes its boxes declare (libheif refuses an image that decodes
    to another size). False when the boxes cannot be read: then no thumbnail is trusted."""
    sizes = _heif_thumbnail_sizes(data)
    return sizes is not None and all(w * h <= primary.width * primary.height for w, h in sizes)


def _heif_thumbnail_sizes(data: bytes) -> list[tuple[int, int]] | None:
    """The declared sizes of a HEIF file's thumbnail items (`thmb` references, `ispe` properties),
    read from its `meta` box without decoding anything; None when that box cannot be read."""
    try:
        meta = _bmff_child(data, 0, len(data), b"meta")
        if meta is None:
            return None
        body = (meta[0] + 4, meta[1])  # a full box: version and flags first
        thumbnails = list(_heif_references(data, _bmff_child(data, *body, b"iref"), b"thmb"))
        if not thumbnails:
            return []
        iprp = _bmff_child(data, *body, b"iprp")
        if iprp is None:
            return None
        sizes = _heif_item_sizes(data, _bmff_child(data, *iprp, b"ipco"), _bmff_child(data, *iprp, b"ipma"))
        return [sizes[item] for item in thumbnails]  # a KeyError: a thumbnail with no size
    except (struct.error, KeyError, IndexError, ValueError):
        return None


_BMFF_MAX_BOXES = 4096  # more children than any real file has: a bound on the work, not a format limit


def _bmff_boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """The (type, body start, body end) of each box between `start` and `end`."""
    for _ in range(_BMFF_MAX_BOXES):
        if start + 8 > end:
            return
        size, kind = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, start + 8)
            header = 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            raise ValueError("a box runs past its parent")
        yield kind, start + header, start + size
        start += size
    raise ValueError("too many boxes")


def _bmff_child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _bmff_boxes(data, start, end) if k == kind), None)


@dataclass(frozen=True)
class _HeifMeta:
    """Where a HEIF file's `meta` box keeps what the readers below need: its body (past version and
    flags), the primary item's id (`pitm`), and its item properties (`ipco`) and their associations
    (`ipma`)."""

    body: tuple[int, int]
    primary: int
    ipco: tuple[int, int] | None
    ipma: tuple[int, int] | None

    @classmethod
    def read(cls, data: bytes) -> _HeifMeta | None:
        """None when there is no `meta`, `pitm` or `iprp`; `struct.error`/`IndexError` when cut off."""
        meta = _bmff_child(data, 0, len(data), b"meta")
        if meta is None:
            return None
        body = (meta[0] + 4, meta[1])  # a full box: version and flags first
        pitm, iprp = _bmff_child(data, *body, b"pitm"), _bmff_child(data, *body, b"iprp")
        if pitm is None or iprp is None:
            return None
        primary = struct.unpack_from(">I" if data[pitm[0]] >= 1 else ">H", data, pitm[0] + 4)[0]
        return cls(body, primary, _bmff_child(data, *iprp, b"ipco"), _bmff_child(data, *iprp, b"ipma"))


def _heif_coded_pixels(data: bytes) -> tuple[int, int] | None:
    """What libheif decodes for a HEIF file's primary image, by the sizes its boxes declare: (the
    pixels of every coded image it decodes, a grid's or an overlay's inputs counted as often as they
    are referenced; the largest of those images). The header says neither: it gives the
    grid's output, or the size a clean aperture (`clap`) crops the coded image to, and a 1.3 kB file
    whose header said 16 x 16 decoded 16 tiles of 8192 x 8192 (17 s in one call no deadline reaches,
    1 GB). None when the boxes cannot be read."""
    try:
        meta = _HeifMeta.read(data)
        if meta is None:
            return None
        body, primary = meta.body, meta.primary
        sizes = _heif_item_sizes(data, meta.ipco, meta.ipma, largest=True)
        iref = _bmff_child(data, *body, b"iref")
        inputs = _heif_references(data, iref, b"dimg")
        # Images decoded with an image: its auxiliary ones (alpha, which libheif decodes for a grid's
        # every tile too and for an alpha image itself; a depth or gain map, counted though libvips
        # reads alpha alone).
        beside: dict[int, list[int]] = {}
        for item, targets in _heif_references(data, iref, b"auxl").items():
            for target in targets:
                beside.setdefault(target, []).append(item)
        # The primary's thumbnails, when `_heif_thumbnails_fit` lets libvips decode one of them in
        # its place: by their declared sizes, which say nothing of a thumbnail made as a grid.
        area = sizes[primary][0] * sizes[primary][1]
        thumbnails = [t for t, targets in _heif_references(data, iref, b"thmb").items() if primary in targets]
        if not all(t in sizes and sizes[t][0] * sizes[t][1] <= area for t in thumbnails):
            thumbnails = []
        # A grid's or an overlay's canvas is the size its own data gives, which its `ispe` (the
        # header) need not: libheif fills the whole canvas before it compares them.
        canvases = _heif_canvases(data, body, inputs)
        total, largest, pending, visited = 0, 0, [primary, *thumbnails], 0
        while pending:
            visited += 1
            if visited > _BMFF_MAX_BOXES:
                raise ValueError("too many images")
            item = pending.pop()
            pending.extend(beside.get(item, ()))
            if item in inputs:  # a derived image: a grid, an overlay, an identity
                pending.extend(inputs[item])
                largest = max(largest, canvases.get(item, 0))
            else:
                width, height = sizes[item]  # a KeyError: a coded image without a size
                total += width * height
                largest = max(largest, width * height)
        return total, largest
    except (struct.error, KeyError, IndexError, ValueError):
        return None


def _heif_canvases(data: bytes, meta: tuple[int, int], items: Iterable[int]) -> dict[int, int]:
    """The pixels of the canvas each grid or overlay among `items` gives in its own data (its output
    width and height); 0 for one that is neither, or whose data cannot be found: its `ispe` stands.
    `iinf` and `iloc` are read once for all of them."""
    try:
        types = _heif_item_types(data, _bmff_child(data, *meta, b"iinf"))
        wanted = {item for item in items if types.get(item) in (b"grid", b"iovl")}
        offsets = _heif_item_offsets(data, meta, wanted) if wanted else {}
    except (struct.error, IndexError, ValueError):
        return {}
    canvases = {}
    for item, at in offsets.items():
        try:
            flags = data[at + 1]
            size_at = at + (
                4 if types[item] == b"grid" else 2 + 8
            )  # past a grid's rows and columns, an overlay's fill
            width, height = struct.unpack_from(">II" if flags & 1 else ">HH", data, size_at)
        except (struct.error, IndexError):
            continue
        canvases[item] = width * height
    return canvases


def _heif_item_types(data: bytes, iinf: tuple[int, int] | None) -> dict[int, bytes]:
    """Each item's type (`infe` versions 2 and 3), from `iinf`."""
    if iinf is None:
        return {}
    start, end = iinf
    types = {}
    for kind, entry, _ in _bmff_boxes(data, start + 4 + (2 if data[start] == 0 else 4), end):
        if kind != b"infe" or data[entry] not in (2, 3):
            continue
        id_size = 2 if data[entry] == 2 else 4
        item = int.from_bytes(data[entry + 4 : entry + 4 + id_size], "big")
        types[item] = bytes(data[entry + 4 + id_size + 2 : entry + 4 + id_size + 6])
    return types


def _heif_item_offsets(data: bytes, meta: tuple[int, int], items: set[int]) -> dict[int, int]:
    """Where the data of each of `items` starts in `data` (its first extent), by `iloc`: in the
    file, or in the `idat` box (construction method 1); items stored elsewhere, or not found, are
    left out."""
    iloc = _bmff_child(data, *meta, b"iloc")
    if iloc is None:
        return {}
    idat = _bmff_child(data, *meta, b"idat")
    start, _ = iloc
    version = data[start]
    offset_size, length_size = data[start + 4] >> 4, data[start + 4] & 15
    base_size, index_size = data[start + 5] >> 4, (data[start + 5] & 15) if version in (1, 2) else 0
    at = start + 6
    count_size = 4 if version == 2 else 2
    count = int.from_bytes(data[at : at + count_size], "big")
    at += count_size
    offsets: dict[int, int] = {}
    seen: set[int] = set()
    for _ in range(min(count, _BMFF_MAX_BOXES)):
        item = int.from_bytes(data[at : at + count_size], "big")
        at += count_size
        method = 0
        if version in (1, 2):
            method = data[at + 1] & 15
            at += 2
        at += 2  # the data reference index
        base = int.from_bytes(data[at : at + base_size], "big")
        at += base_size
        extents = int.from_bytes(data[at : at + 2], "big")
        at += 2
        first = at + index_size
        offset = int.from_bytes(data[first : first + offset_size], "big")
        at += extents * (index_size + offset_size + length_size)
        if item not in items or item in seen:
            continue  # an item listed again: its first entry stands
        seen.add(item)
        if method == 0:
            offsets[item] = base + offset
        elif method == 1 and idat is not None:
            offsets[item] = idat[0] + base + offset
    return offsets


def _heif_references(data: bytes, iref: tuple[int, int] | None, kind: bytes) -> dict[int, list[int]]:
    """The `kind` references of `iref`: from each item, the items it refers to, in order."""
    if iref is None:
        return {}
    start, end = iref
    wide = data[start] >= 1  # version 1: 32-bit item ids
    id_format, id_size = (">I", 4) if wide else (">H", 2)
    references: dict[int, list[int]] = {}
    for box_kind, ref_start, ref_end in _bmff_boxes(data, start + 4, end):
        if box_kind != kind:
            continue
        (source,) = struct.unpack_from(id_format, data, ref_start)
        (count,) = struct.unpack_from(">H", data, ref_start + id_size)
        first = ref_start + id_size + 2
        if first + count * id_size > ref_end:
            raise ValueError("a reference runs past its box")
        if source in references:
            raise ValueError("an item with two lists of inputs")
        references[source] = [
            struct.unpack_from(id_format, data, first + i * id_size)[0] for i in range(count)
        ]
    return references


def _heif_item_sizes(
    data: bytes, ipco: tuple[int, int] | None, ipma: tuple[int, int] | None, *, largest: bool = False
) -> dict[int, tuple[int, int]]:
    """Each item's `ispe` (width, height), through the property associations. A ValueError when an
    item is listed twice or has two sizes: which one libheif believes is not ours to guess (a real
    large size first and a small one after it got a "thumbnail" past the check that way); or, with
    `largest`, the larger of them, for a bound on what may be decoded."""
    if ipco is None or ipma is None:
        return {}
    sizes: dict[int, tuple[int, int]] = {}
    listed = set()
    for item, properties in _heif_associations(data, ipco, ipma):
        if item in listed and not largest:
            raise ValueError("an item listed twice in ipma")
        listed.add(item)
        for kind, start in properties:
            if kind == b"ispe":
                size = struct.unpack_from(">II", data, start + 4)
                if item in sizes and not largest:
                    raise ValueError("an item with two sizes")
                if item not in sizes or size[0] * size[1] > sizes[item][0] * sizes[item][1]:
                    sizes[item] = size
    return sizes


def _heif_associations(
    data: bytes, ipco: tuple[int, int], ipma: tuple[int, int]
) -> Iterator[tuple[int, list[tuple[bytes, int]]]]:
    """Each `ipma` entry: an item and its properties (type, body start), in the order listed."""
    properties = [(kind, start) for kind, start, _ in _bmff_boxes(data, *ipco)]  # indexed from 1
    start, _ = ipma
    version, flags = data[start], int.from_bytes(data[start + 1 : start + 4], "big")
    offset = start + 4
    (count,) = struct.unpack_from(">I", data, offset)
    offset += 4
    for _ in range(min(count, _BMFF_MAX_BOXES)):
        if version < 1:
            (item,) = struct.unpack_from(">H", data, offset)
            offset += 2
        else:
            (item,) = struct.unpack_from(">I", data, offset)
            offset += 4
        associations = data[offset]
        offset += 1
        listed = []
        for _ in range(associations):
            if flags & 1:
                (index,) = struct.unpack_from(">H", data, offset)
                index &= 0x7FFF
                offset += 2
            else:
                index = data[offset] & 0x7F
                offset += 1
            if 0 < index <= len(properties):
                listed.append(properties[index - 1])
        yield item, listed


# nclx code points (ISO/IEC 23091-2): Display P3's primaries, and the transfers of HDR video (PQ,
# HLG), which no ICC profile of libvips' describes: those are left as they are decoded.
_NCLX_P3 = 12
_NCLX_HDR_TRANSFERS = frozenset({16, 18})


def _heif_display_p3(data: bytes) -> bool:
    """Whether a HEIF file's primary image gives its colours as Display P3 code points (a `colr`
    box of type `nclx`), by its boxes; False when they cannot be read. A grid with no colour box
    of its own has its first tile's, as libheif gives it. (Called for a file libvips found no ICC
    profile in: one beside the code points would be what it converts with.)"""
    try:
        meta = _HeifMeta.read(data)
        if meta is None or meta.ipco is None or meta.ipma is None:
            return False
        colours: dict[int, list[int]] = {}  # each item's colour boxes (where their bodies start)
        for item, properties in _heif_associations(data, meta.ipco, meta.ipma):
            colours.setdefault(item, []).extend(start for kind, start in properties if kind == b"colr")
        boxes = colours.get(meta.primary)
        if not boxes:
            tiles = _heif_references(data, _bmff_child(data, *meta.body, b"iref"), b"dimg").get(meta.primary)
            boxes = colours.get(tiles[0], []) if tiles else []
        for start in boxes:
            if data[start : start + 4] == b"nclx":
                primaries, transfer = struct.unpack_from(">HH", data, start + 4)
                return primaries == _NCLX_P3 and transfer not in _NCLX_HDR_TRANSFERS
        return False
    except (struct.error, IndexError, ValueError):
        return False


def _jpeg_shrink_on_load(shrink: float) -> int:
    """The factor (1, 2, 4 or 8) `thumbnail` has libjpeg decode a JPEG at when the image is to shrink
    `shrink` times: libvips leaves at least a factor of two to its resampling kernel after the block
    shrink of the decoder, so 1/8 from 16 times on."""
    return next((factor for factor in (8, 4, 2) if shrink >= 2 * factor), 1)


def _shrinks_by_8_on_load(header: pyvips.Image, width: int, kwargs: dict[str, object]) -> bool:
    """Whether `thumbnail` would decode this multi-scan JPEG at 1/8 scale for this target."""
    if _loader(header) != "jpegload" or not _get(header, "jpeg-multiscan", 0):
        return False
    source_w, source_h = _oriented_size(header)
    target_h = kwargs.get("height")
    across = source_w / width
    down = source_h / target_h if isinstance(target_h, int) and target_h > 0 else 0.0
    # "cover" (crop) shrinks by the smaller factor, to fill the box; "inside" by the larger, to fit it;
    # a forced size (`_Sizing`: both sides from one scale, each rounded) by the larger too, the
    # scale itself. libvips' own thumbnail takes the smaller there, which a rounding puts under 16
    # (4000 x 3000 to 250 x 188: 15.96), and decodes at 1/4 what the 1/8 decode serves at a
    # factor of 1.995 left to the resize: 2.4 times the CPU.
    shrink = min(across, down) if kwargs.get("crop") else max(across, down)
    return _jpeg_shrink_on_load(shrink) == 8


def _dc_only_image(data: bytes) -> pyvips.Image | None:
    """A progressive JPEG opened at 1/8 scale from its DC coefficients (`progressive.dc_only`).

    The same pixels as the 1/8 decode `thumbnail` makes of the whole file, at a fraction of
    the cost; None when the file is not one `dc_only` rewrites, and the caller decodes it whole.
    """
    reduced = progressive.dc_only(data)
    if reduced is None:
        return None
    try:
        return pyvips.Image.new_from_buffer(reduced, "", shrink=8, access="sequential", fail_on=_FAIL_ON)
    except pyvips.Error:
        return None


def _to_srgb8(image: pyvips.Image) -> pyvips.Image:
    """Safety net after thumbnail: make sure we hand the savers 8-bit sRGB (or 8-bit grey)."""
    if image.bands > 4:
        # e.g. TIFF with extra samples: keep colour (+ alpha) and drop the rest.
        image = image.extract_band(0, n=4 if image.hasalpha() else 3)
    if image.interpretation not in ("srgb", "b-w") or image.format != "uchar":
        # colourspace() scales (16-bit -> 8-bit is a shift, not a clip) and handles CMYK, Lab, grey16...
        target = "b-w" if image.interpretation in ("b-w", "grey16") else "srgb"
        image = image.colourspace(target)
        if image.format != "uchar":
            image = image.cast("uchar")
    return image


def _prepare_for(image: pyvips.Image, fmt: str) -> pyvips.Image:
    image = _to_srgb8(image)
    if fmt == "jpeg" and image.hasalpha():
        # JPEG has no alpha: composite onto white, the usual page background.
        image = image.flatten(background=[255] * (image.bands - 1))
        if image.format != "uchar":
            image = image.cast("uchar")
    if fmt != "png" and image.interpretation == "b-w":
        # Keep greyscale 1-band only for PNG; JPEG/WebP/AVIF consumers expect colour.
        image = image.colourspace("srgb")
    return image


# Memory an encoder holds for one output image, in bytes a pixel, by quality: the most glibc's malloc
# handed out while libvips 8.18 encoded noise (sigma 60: what compresses least; 1,000 to 3,000 px
# square), output and its copy to Python included, plus a tenth. libwebp and libheif/aom hold the
# whole picture, and more of it the higher the quality (an AVIF at 100 twice what it holds at 80); an
# alpha plane goes through libwebp's lossless encoder, far hungrier again; libjpeg keeps every
# coefficient of a progressive (or Huffman-optimised) JPEG; pngsave builds the whole file in memory,
# whatever the quality (it has none). Between the qualities measured, the cost is interpolated; below
# the lowest, it is the lowest's.
_ENCODE_QUALITIES = (80, 90, 95, 100)
_ENCODE_BYTES_PER_PIXEL = {
    "jpeg": (10.0, 15.0, 17.0, 17.0),
    "png": (7.5, 7.5, 7.5, 7.5),
    "webp": (18.5, 22.5, 26.0, 29.5),
    "avif": (31.5, 53.0, 54.5, 62.5),
}
_ENCODE_ALPHA_BYTES_PER_PIXEL = {
    "png": (10.0, 10.0, 10.0, 10.0),
    "webp": (49.5, 50.5, 50.5, 50.5),
    "avif": (60.0, 79.5, 81.5, 84.0),
}
# Larger JPEGs are written baseline with the standard Huffman tables, which stream (33 MB for 8192 x 8192
# against 410 MB), for about 10% more bytes; a progressive JPEG pays off most on the web-sized ones.
# What they hold is the output buffer and its copy to Python, which grow with the quality.
_JPEG_BUFFERED_MAX_PIXELS = 8 * 1024 * 1024
_JPEG_STREAMED_BYTES_PER_PIXEL = (1.5, 2.5, 4.5, 8.0)


def _jpeg_streams(pixels: int) -> bool:
    return pixels > _JPEG_BUFFERED_MAX_PIXELS


def _at_quality(costs: tuple[float, ...], quality: int) -> float:
    """`costs` (one for each of `_ENCODE_QUALITIES`) at `quality`, interpolated between them."""
    points = list(zip(_ENCODE_QUALITIES, costs, strict=True))
    if quality <= points[0][0]:
        return points[0][1]
    for (low_q, low), (high_q, high) in itertools.pairwise(points):
        if quality <= high_q:
            return low + (high - low) * (quality - low_q) / (high_q - low_q)
    return points[-1][1]


def encode_bytes(fmt: str, width: int, height: int, *, alpha: bool, quality: int = 80) -> int:
    """Estimate the memory encoding a `width` x `height` variant as `fmt` at `quality` holds."""
    pixels = width * height
    if fmt == "jpeg" and _jpeg_streams(pixels):
        costs = _JPEG_STREAMED_BYTES_PER_PIXEL
    elif alpha and fmt in _ENCODE_ALPHA_BYTES_PER_PIXEL:
        costs = _ENCODE_ALPHA_BYTES_PER_PIXEL[fmt]
    else:
        costs = _ENCODE_BYTES_PER_PIXEL[fmt]
    return math.ceil(pixels * _at_quality(costs, quality))


def _output_size(variant: Variant, width: int, height: int) -> tuple[int, int]:
    """The size `variant` comes out at from a `width` x `height` (upright) image."""
    scale = _scale_needed(variant, width, height)
    out_w, out_h = _scaled(width, height, scale)
    if variant.fit == "cover":
        out_w, out_h = min(out_w, variant.width or out_w), min(out_h, variant.height or out_h)
    return out_w, out_h


# What libwebp's scaled decode holds, in bytes a pixel of the size it decodes to: an RGBA buffer.
_AT_TARGET_BYTES_PER_PIXEL = 4.2

# While pixels are resampled on their way out of the decoder, libvips holds rows of the decoded image
# (its sequential line cache, the kernels' buffers), measured with libvips 8.18 at concurrency 1 over
# what the decoder keeps and the pixels written: beside a decoder that keeps the image (progressive
# JPEGs 4000 to 8000 px wide, to 1000-4096 px) 1,500-1,800 rows' worth of its samples; from a
# baseline JPEG, which streams, 1,000-2,650 rows of the width it decodes at (6000 x 4000 and 10,000
# x 10,000, shrunk 1.1 to 5 times; up to the whole of a shrink-on-load decode of 2,000 rows). Fewer,
# 500-700, when the size does not change.
_RESIZE_ROWS = 1900
_STREAMED_RESIZE_ROWS = 2700
_COPY_ROWS = 800


@dataclass(frozen=True)
class _Need:
    """The memory one step of a job holds at once, and what to call that step in an error."""

    bytes: int
    what: str


def _held_bytes(fmt: str, header: pyvips.Image, data: bytes) -> int:
    """What the decoder keeps for as long as pixels flow out of it: a multi-scan JPEG's coefficients,
    a HEIF's decoded image, and for the other decoders that cannot stream, their whole estimate
    (canvases, a whole frame, full-width rows). Nothing for those that stream (baseline JPEG, lossy
    still WebP: see `_decoded_at_target`)."""
    if fmt == "jpeg":
        return math.ceil(_coefficients(header, data)) if _get(header, "jpeg-multiscan", 0) else 0
    if fmt == "heif":
        bands = 4 if header.bands >= 4 else 3
        return header.width * header.height * bands * (1 if header.format == "uchar" else 2)
    return decode_bytes(fmt, header, data)


def _rows_bytes(fmt: str, header: pyvips.Image, held: int, scale: float) -> int:
    """The rows of the decoded image resampling holds on their way to the variant (`_RESIZE_ROWS`):
    for a JPEG at the size libjpeg decodes it at (shrink-on-load), for a HEIF at full size. The
    figures of the other decoders are the peaks of whole renders, these rows included."""
    bands = max(3, header.bands)
    if fmt == "jpeg":
        factor = _jpeg_shrink_on_load(1 / scale)
        width, height = math.ceil(header.width / factor), math.ceil(header.height / factor)
        resize_rows = _RESIZE_ROWS if held else _STREAMED_RESIZE_ROWS  # multi-scan, or baseline
    elif fmt == "heif":
        width, height, resize_rows = header.width, header.height, _RESIZE_ROWS
    else:
        return 0
    return width * bands * min(height, resize_rows if scale < 1 else _COPY_ROWS)


def _job_needs(fmt: str, header: pyvips.Image, data: bytes, variants: Sequence[Variant]) -> list[_Need]:
    """What each step of rendering `variants` holds at once, following `render`'s own choices.

    Held to one budget, so that no job (not just no decode, and no encode on its own) needs more:

    * a variant streamed from the decoder: the decoder's state, the rows on their way through the
      resize and the encoder, together;
    * one variant decoded first (`_decode_first`), or the intermediate of several: the decoder's state,
      the rows and the pixels written, then those pixels and each encoder in turn;
    * several variants too large to share an intermediate: each streamed on its own;
    * and wherever `thumbnail` rotates, the resized image it copies into memory first. (Its own
      "cover" crop copied too: an 8192 x 1 strip of a 10,000 px square held all 8192 x 8192 of it,
      230 MiB; `_Sizing` crops the resized rows as they stream, and holds none of them.)
    """
    width, height = _oriented_size(header)
    held = _held_bytes(fmt, header, data)
    at_target = _decoded_at_target(fmt, header, data)
    bands = 4 if header.hasalpha() else 3
    rotated = _get(header, "orientation", 1) not in (1, 0)
    source = f"this {header.width}x{header.height} {fmt}"

    def scaled(scale: float) -> int:
        return math.prod(_scaled(width, height, scale))

    def resized(scale: float) -> int:
        return scaled(scale) * bands

    def decoded_at(scale: float) -> int:
        # Decoded at the scaled size, before a "cover" crop.
        return math.ceil(scaled(scale) * _AT_TARGET_BYTES_PER_PIXEL) if at_target else 0

    def copies(scale: float) -> int:
        # `thumbnail` copies the resized image into memory before it rotates it upright.
        return resized(scale) if rotated else 0

    def encoding(variant: Variant) -> tuple[int, str]:
        out_w, out_h = _output_size(variant, width, height)
        alpha = header.hasalpha() and variant.format != "jpeg"
        what = f"making variant {variant.name!r} ({out_w}x{out_h} {variant.format}) from {source}"
        return encode_bytes(variant.format, out_w, out_h, alpha=alpha, quality=variant.quality), what

    def decoding(scale: float) -> int:
        return held + _rows_bytes(fmt, header, held, scale) + decoded_at(scale)

    def streamed(variant: Variant) -> _Need:
        scale = _scale_needed(variant, width, height)
        encoder, what = encoding(variant)
        return _Need(decoding(scale) + copies(scale) + encoder, what)

    needs = [_Need(decode_bytes(fmt, header, data), f"decoding {source}")]
    if len(variants) == 1:
        (variant,) = variants
        if not _decode_first(fmt, header, data, variant):
            return [*needs, streamed(variant)]
        scale = _scale_needed(variant, width, height)
        out_w, out_h = _output_size(variant, width, height)
        pixels = out_w * out_h * bands
        encoder, what = encoding(variant)
        written = _Need(decoding(scale) + copies(scale) + pixels, what)
        return [*needs, written, _Need(pixels + encoder, what)]
    scale = max(_scale_needed(v, width, height) for v in variants)
    inter_w, inter_h = _scaled(width, height, scale)  # the intermediate `_render_many` makes
    if inter_w * inter_h > _SHARED_INTERMEDIATE_MAX_PIXELS:
        return [*needs, *(streamed(v) for v in variants)]
    intermediate = inter_w * inter_h * bands
    needs.append(
        _Need(
            decoding(scale) + intermediate * (1 + rotated),
            f"decoding {source} to the {inter_w}x{inter_h} its variants are made from",
        )
    )
    for variant in variants:
        encoder, what = encoding(variant)
        needs.append(_Need(intermediate + encoder, what))
    return needs


def job_bytes(fmt: str, header: pyvips.Image, data: bytes, variants: Sequence[Variant]) -> int:
    """Estimate the most memory rendering `variants` from `header`'s image holds at once, at any step:
    the decode, the pixels it writes for the variants, and each variant's encoding. `render` refuses
    a job over `Limits.max_decode_bytes` (with what its source takes beyond `SOURCE_ROOM_BYTES`)
    before it decodes anything."""
    return max(need.bytes for need in _job_needs(fmt, header, data, variants))


def _check_job_budget(
    fmt: str, header: pyvips.Image, data: bytes, variants: Sequence[Variant], limits: Limits
) -> None:
    """Refuse, before any work, a job one of whose steps would need more than the budget, with what
    its source takes beyond the room set aside for sources (`SOURCE_ROOM_BYTES`)."""
    need = max(_job_needs(fmt, header, data, variants), key=lambda need: need.bytes)
    beyond = max(0, len(data) - SOURCE_ROOM_BYTES)
    if need.bytes + beyond > limits.max_decode_bytes:
        mib = 1024 * 1024
        source = (
            f", and its {len(data) / mib:.0f} MiB source {beyond / mib:.0f} MiB more than the "
            f"{SOURCE_ROOM_BYTES // mib} MiB set aside for sources"
            if beyond
            else ""
        )
        raise ImageError(
            "image_too_large",
            f"{need.what} would need about {need.bytes // mib} MiB{source}, "
            f"over the {limits.max_decode_bytes // mib} MiB budget",
        )


def _decode_first(fmt: str, header: pyvips.Image, data: bytes, variant: Variant) -> bool:
    """Whether one variant should be decoded into memory, and the decoder let go of, before it is
    encoded: when both the decoder and the encoder would hold more than the variant's pixels.

    Streamed, the encoder's buffers come on top of what a multi-scan JPEG's decoder keeps (every
    coefficient) or a HEIF's (the whole image); decoded first, the variant's pixels do instead, and
    the decoder is gone by the time the encoder starts (as in `_render_many`). Where the encoder
    streams (a large baseline JPEG) holding the pixels would only add them. Measured at concurrency
    1 (`make bench`, memory): `large` alone, 24 MP progressive JPEG 288 → 278 MiB, 12 MP AVIF
    311 → 288 MiB; a full-size PNG of a 26 MP progressive JPEG, alone in a process, 330 → 286 MiB.
    """
    out_w, out_h = _output_size(variant, *_oriented_size(header))
    alpha = header.hasalpha() and variant.format != "jpeg"
    pixels = out_w * out_h * (4 if alpha else 3)
    encoder = encode_bytes(variant.format, out_w, out_h, alpha=alpha, quality=variant.quality)
    return decode_bytes(fmt, header, data) > pixels and encoder > pixels


def _encode(image: pyvips.Image, variant: Variant) -> bytes:
    fmt = variant.format
    if fmt == "jpeg":
        if _jpeg_streams(image.width * image.height):
            return image.jpegsave_buffer(Q=variant.quality, keep=_KEEP_NONE)
        return image.jpegsave_buffer(Q=variant.quality, optimize_coding=True, interlace=True, keep=_KEEP_NONE)
    if fmt == "png":
        return image.pngsave_buffer(compression=6, palette=False, keep=_KEEP_NONE)
    if fmt == "webp":
        return image.webpsave_buffer(Q=variant.quality, effort=4, keep=_KEEP_NONE)
    if fmt == "avif":
        # AV1 encoding is by far the slowest step and libheif cannot be interrupted mid-encode, so effort
        # is kept low; bitdepth 8 because the pipeline is 8-bit.
        return image.heifsave_buffer(
            compression="av1", Q=variant.quality, effort=2, bitdepth=8, keep=_KEEP_NONE
        )
    raise ValueError(f"unknown output format {fmt!r}")  # the model makes this unreachable


def _finish(image: pyvips.Image, variant: Variant, deadline: _Deadline) -> Rendered:
    deadline.check()
    image = _prepare_for(image, variant.format)
    # Watch the last image of the pipeline: the saver pulls every pixel (decode included) through it.
    deadline.watch(image)
    data = _encode(image, variant)
    return Rendered(
        name=variant.name, format=variant.format, width=image.width, height=image.height, data=data
    )


def render(data: bytes, variants: Sequence[Variant], limits: Limits) -> list[Rendered]:
    """Decode `data` once (where it pays) and produce every variant, in order. Blocking; call from a thread.

    The source is probed first (all of `probe`'s checks apply). Each variant is scaled down only, never up:
    "inside" fits within the box keeping the aspect ratio (a missing width or height leaves that axis
    unbounded), "cover" fills the box and crops the centre (both clamped to the source size). EXIF
    orientation is applied; animated input gives its first frame; output is 8-bit sRGB (greyscale may stay
    1-band in PNG), JPEG alpha is flattened onto white, and every metadata field is stripped.

    Raises `ImageError` for a bad source (see `probe`), `corrupt_image` when libvips fails to decode or
    process it, and `processing_timeout` when the whole call takes longer than `limits.timeout_s`.
    """
    deadline = _Deadline(limits.timeout_s)
    info, header = _probe(data, limits)
    if not variants:
        return []
    _check_job_budget(info.format, header, data, variants, limits)
    try:
        if len(variants) == 1:
            # One variant: one thumbnail straight to the target, streaming, shrinking during decode.
            variant = variants[0]
            sizing = _Sizing.of(variant, *_oriented_size(header), alpha=header.hasalpha())
            colour = _colour_args(info.format, header, data)
            held = _decode_first(info.format, header, data, variant)
            image = sizing.from_source(data, colour, header)
            del header  # `_from_buffer` may have made it the decoder: `image` holds it now, if so
            if held:
                deadline.watch(image)
                image = image.copy_memory()
            return [_finish(image, variant, deadline)]
        return _render_many(data, header, _colour_args(info.format, header, data), variants, deadline)
    except pyvips.Error as exc:
        if deadline.expired():
            raise deadline.error() from exc
        if "out of memory" in str(exc):
            # The worker's, not the image's: the budget let the job through, and memory ran short
            # anyway (other jobs, a tight container). Retried, not failed for good as a bad image.
            raise MemoryError(f"libvips ran out of memory: {_vips_reason(exc)}") from exc
        raise ImageError(
            "corrupt_image", f"cannot decode the {_FORMAT_NAMES[info.format]}: {_vips_reason(exc)}"
        ) from exc
    except UnicodeDecodeError as exc:
        _clear_vips_errors()
        if deadline.expired():
            raise deadline.error() from exc
        raise ImageError(
            "corrupt_image", f"cannot decode the {_FORMAT_NAMES[info.format]}: the data is damaged"
        ) from None


def _render_many(
    data: bytes,
    header: pyvips.Image,
    colour: dict[str, str],
    variants: Sequence[Variant],
    deadline: _Deadline,
) -> list[Rendered]:
    width, height = _oriented_size(header)
    alpha = header.hasalpha()
    # The intermediate is the largest variant, uncropped: no other is larger (its sides are rounded
    # from a smaller scale), and that one is cut from it as it is. (Sized by libvips within a box
    # rounded up, it could be a row larger, 500 x 501 from 1000 x 1001 at half, and the largest
    # variant was resampled again to lose it.)
    shared = _Sizing.whole(max(_scale_needed(v, width, height) for v in variants), width, height, alpha=alpha)
    if shared.width * shared.height > _SHARED_INTERMEDIATE_MAX_PIXELS:
        # Too big to hold: decode per variant instead, each one streaming. A HEIF's decode is chosen by
        # its header (`_from_buffer`): each gets its own, as a sequential image serves one pass only.
        heif = _loader(header) == "heifload"
        results = []
        for variant in variants:
            own = _header(data, "heif") if heif else None
            image = _Sizing.of(variant, width, height, alpha=alpha).from_source(data, colour, own)
            results.append(_finish(image, variant, deadline))
        return results

    deadline.check()
    lazy = shared.from_source(data, colour, header)
    deadline.watch(lazy)
    # Decode (and colour-convert) once into memory; every variant is then cut from these pixels.
    intermediate = lazy.copy_memory()
    # Drop the decoding pipeline now, not at return: it owns the decoder's state, which for a
    # multi-scan JPEG is libjpeg's whole-image coefficient buffer (144 MB at 24 MP), and keeping it
    # while the variants are encoded would add that to the job's peak memory.
    del lazy
    results = []
    for variant in variants:
        # The intermediate is already upright (thumbnail drops the orientation tag after rotating) and
        # already sRGB, so this is a pure resize/crop, sized from the source.
        image = _Sizing.of(variant, width, height, alpha=alpha).from_image(intermediate)
        results.append(_finish(image, variant, deadline))
    return results
