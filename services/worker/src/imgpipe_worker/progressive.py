"""Progressive JPEGs cut down to what a 1/8-scale decode reads: their DC coefficients.

libjpeg decodes at 1/8 scale (libvips' JPEG shrink-on-load by 8, which `thumbnail` picks when the
image is to shrink 16 times or more) with a 1x1 inverse DCT: each output pixel is its 8x8 block's DC
coefficient alone. A baseline JPEG interleaves the AC coefficients with the DC ones, so they are
Huffman-decoded anyway to find the next block. A progressive JPEG sends them in scans of their own,
most of the file, and libjpeg decodes every scan into a whole-image coefficient buffer before the
first row comes out: at 1/8 scale a 24 MP progressive photo costs several times a baseline one.

`dc_only()` rewrites such a file into one holding its markers, its DC scans (first and refinement)
and, per full-resolution component, one synthetic AC scan of a few bytes that says "every AC
coefficient is zero" (EOB runs). That scan is not optional: with no AC scan at all libjpeg takes the AC
coefficients for unknown and smooths across blocks, which changes the pixels. A chroma component stored
at half resolution (4:2:0, 4:2:2) is decoded at 1/8 scale with a 2x2 (or larger) inverse DCT, which
does read AC coefficients: its AC scans are kept as they are (they are the small part of the file). A
1/8-scale decode of the rewritten file is then bit-identical to a 1/8-scale decode of the original (the
tests compare them), in a fraction of the time.

The input is untrusted: anything this parser does not fully understand (not progressive Huffman
8-bit, no end marker, an odd segment) gives None, and the caller decodes the original as usual.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator

__all__ = ["coefficient_count", "dc_only", "header_markers", "scan_count"]

_SOI = b"\xff\xd8"
_EOI = 0xD9
_SOS = 0xDA
_SOF_PROGRESSIVE_HUFFMAN = 0xC2
# Start-of-frame markers are C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

# What ends an entropy-coded segment: 0xFF followed by anything but a stuffed 0x00, a restart marker
# (RST0-RST7 live inside the segment) or another 0xFF (fill bytes before a marker).
_SEGMENT_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

# A marker where libjpeg looks for one: its last 0xFF (any fill bytes before it are passed over) and
# a byte that is not a stuffed 0x00. Not `\xff+[^\x00\xff]`: on a long run of 0xFF not followed by
# a marker, that pattern tried the whole rest of the run from each of its bytes, quadratic time in
# one call that holds the GIL (20 kB of them: 7 s, before libvips and its deadline).
_MARKER = re.compile(rb"\xff[^\x00\xff]")
# A run of fill bytes, passed over at once (`_rewrite`).
_FILL = re.compile(rb"\xff+")
# A file of more markers than this (before its end marker) counts as one of too many scans: no encoder
# writes thousands, and `scan_count` spends a turn of a Python loop on each.
_MAX_MARKERS = 4096

# The synthetic scans use AC Huffman table 3, defined after every kept scan (a table may be redefined
# between scans, and no original AC scan that could use the old one is left). It holds the 15 EOB-run
# symbols EOB0..EOB14 (run length class r in the high nibble), all 4-bit codes, so symbol r << 4 has
# code r.
_AC_TABLE = 3
_EOB_RUN_CLASSES = 15
_DHT_BODY = bytes([0x10 | _AC_TABLE]) + bytes([0, 0, 0, _EOB_RUN_CLASSES] + [0] * 12)
_DHT_BODY += bytes(r << 4 for r in range(_EOB_RUN_CLASSES))
_AC_HUFFMAN_TABLE = b"\xff\xc4" + struct.pack(">H", 2 + len(_DHT_BODY)) + _DHT_BODY
# DRI 0: no restart markers in the synthetic scans, whatever interval the original set.
_NO_RESTARTS = b"\xff\xdd\x00\x04\x00\x00"
_MAX_EOB_RUN = (1 << _EOB_RUN_CLASSES) - 1  # EOB14 with its 14 extra bits: 32767 blocks

# Real files have a few dozen segments (tables, APPn, a progressive script's 10-20 scans). A crafted one
# could hold millions of tiny ones, each a turn of the Python loop below: past this, it is not rewritten
# (libjpeg's own C parser then takes the file as usual).
_MAX_SEGMENTS = 512


def dc_only(data: bytes) -> bytes | None:
    """`data` rewritten to its DC coefficients, or None when it is not a JPEG this applies to.

    Only an 8-bit progressive Huffman JPEG (SOF2) that parses cleanly up to its end marker is
    rewritten. Decode the result at 1/8 scale only: at any other scale the zeroed AC coefficients show.
    """
    try:
        return _rewrite(data)
    except (struct.error, IndexError):
        return None


def _markers(data: bytes) -> Iterator[int]:
    """Each marker libjpeg would read in the JPEG `data` after its start, in order, to its end
    marker: found as libjpeg finds them, past any bytes in between (it warns about those and goes
    on), each segment skipped by its length, and a scan's entropy-coded data (and its restart
    markers) skipped after the scan's header. A segment whose length is cut off ends the walk."""
    pos, end = 2, len(data)
    while (found := _MARKER.search(data, pos)) is not None:
        marker, pos = data[found.end() - 1], found.end()
        if marker == _EOI or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            yield marker  # the end, or a standalone marker: no length follows
            if marker == _EOI:
                return
            continue
        if pos + 2 > end:
            return
        pos += struct.unpack_from(">H", data, pos)[0]
        yield marker
        if marker == _SOS:
            found = _SEGMENT_END.search(data, pos)
            if found is None:
                return
            pos = found.start()


def scan_count(data: bytes, most: int) -> int:
    """How many scans libjpeg would read in the JPEG `data` before its end marker, counted up to
    `most + 1` (the count stops there: the file is refused either way).

    A multi-scan JPEG is decoded scan by scan into a whole-image coefficient buffer, and each scan is
    a pass over every block of its components, however few bytes it has: a 4 MB file of 20,000 scans
    of a few bytes each kept libjpeg busy for 26 s, in one call that no render deadline interrupts.
    Garbage between segments hides no scan (`_markers`). A file of more than `_MAX_MARKERS` markers
    counts as having too many scans.
    """
    scans = 0
    for count, marker in enumerate(_markers(data), start=1):
        if marker == _EOI:
            break
        if count > _MAX_MARKERS:
            return most + 1
        scans += marker == _SOS
        if scans > most:
            break
    return scans


def header_markers(data: bytes, most: int) -> int:
    """How many markers the JPEG `data` has before its first scan (or its end), counted up to
    `most + 1`. libjpeg keeps every APPn segment it reads, whatever its size, with about 100 bytes of
    its own each: 12 million empty APP1 segments (48 MB) held 1.2 GB while the header was read."""
    count = 0
    for marker in _markers(data):
        if marker in (_SOS, _EOI) or count > most:
            break
        count += 1
    return count


def _rewrite(data: bytes) -> bytes | None:
    if not data.startswith(_SOI):
        return None
    view = memoryview(data)  # the kept pieces are views: one copy in all, by the final join
    parts: list[bytes | memoryview] = [_SOI]
    segments = 0
    # From the frame header: the full-resolution components' ids and 8x8 block counts (their AC
    # coefficients are the ones a 1/8-scale decode does not read).
    blocks: dict[int, int] | None = None
    pos, end = 2, len(data)
    while True:
        if pos + 2 > end or data[pos] != 0xFF:
            return None  # no end marker (truncated) or garbage where a marker belongs
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes: to the last of them, in one step however many there are
            pos = _FILL.match(data, pos).end() - 1  # type: ignore[union-attr]  # data[pos] is 0xFF
            continue
        if marker == _EOI:
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:
            return None  # a standalone marker outside a scan: nothing a valid file has here
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segment_end = pos + 2 + length
        segments += 1
        if length < 2 or segment_end > end or segments > _MAX_SEGMENTS:
            return None
        if marker in _SOF_MARKERS:
            if marker != _SOF_PROGRESSIVE_HUFFMAN or blocks is not None:
                return None
            blocks = _frame_blocks(data[pos + 4 : segment_end])
            if blocks is None:
                return None
        if marker == _SOS:
            if blocks is None:
                return None
            components = data[pos + 4]
            spectral_start, spectral_end = data[pos + 5 + 2 * components], data[pos + 6 + 2 * components]
            if length != 6 + 2 * components or (spectral_start == 0) != (spectral_end == 0):
                return None  # a scan header libjpeg would refuse: so must we, not decode around it
            if spectral_start and components != 1:
                return None  # an AC scan covers one component (ITU T.81 G.1.1.1.1)
            found = _SEGMENT_END.search(data, segment_end)
            if found is None:
                return None
            # A DC scan (first pass or refinement) is kept as it is, and so is an AC scan (always of
            # one component) of a subsampled component; the full-resolution ones' AC scans go.
            if spectral_start == 0 or data[pos + 5] not in blocks:
                parts.append(view[pos : found.start()])
            pos = found.start()
            continue
        parts.append(view[pos:segment_end])
        pos = segment_end
    if blocks is None:
        return None
    parts += [_NO_RESTARTS, _AC_HUFFMAN_TABLE]
    parts += [_zero_ac_scan(component, count) for component, count in blocks.items()]
    parts.append(b"\xff\xd9")
    return b"".join(parts)


def _frame(frame: bytes) -> tuple[int, int, int, list[tuple[int, int, int]]] | None:
    """A frame header's precision, width, height and components (id, horizontal and vertical
    sampling factors), or None for one libjpeg would refuse or that this parser leaves alone: a
    height given later by DNL, an odd component count (JPEG B.2.2)."""
    precision, height, width, count = struct.unpack_from(">BHHB", frame)
    if not height or not width or count not in (1, 3, 4) or len(frame) < 6 + 3 * count:
        return None
    components = [(frame[6 + 3 * i], frame[7 + 3 * i] >> 4, frame[7 + 3 * i] & 0x0F) for i in range(count)]
    if len({c[0] for c in components}) != count or not all(
        1 <= c[1] <= 4 and 1 <= c[2] <= 4 for c in components
    ):
        return None
    return precision, width, height, components


def _frame_blocks(frame: bytes) -> dict[int, int] | None:
    """Block counts of the full-resolution components, by id, in a one-component scan (JPEG A.2.2)."""
    parsed = _frame(frame)
    if parsed is None or parsed[0] != 8:
        return None  # 12-bit: not rewritten
    _, width, height, components = parsed
    h_max = max(c[1] for c in components)
    v_max = max(c[2] for c in components)
    blocks = math.ceil(width / 8) * math.ceil(height / 8)  # a full-resolution component's
    return {ident: blocks for ident, h, v in components if h == h_max and v == v_max}


def coefficient_count(data: bytes) -> int | None:
    """How many DCT coefficients libjpeg keeps for the whole of the multi-scan JPEG `data`, from its
    frame header; None when there is none this parser reads (the caller estimates otherwise).

    Each component's own: a subsampled one has fewer blocks, by its sampling factors against the
    largest, and libjpeg rounds each component's block rows and columns up to whole MCUs. The
    sampling factors, not libvips' `jpeg-chroma-subsample`, which calls 4:2:2 and 4:4:0 "4:2:0"
    (a 4:2:2 photo has a third more coefficients than a 4:2:0 one).
    """
    pos, markers = 2, 0
    try:
        while markers < _MAX_SEGMENTS:
            found = _MARKER.search(data, pos)
            if found is None:
                return None
            marker, pos = data[found.end() - 1], found.end()
            markers += 1
            if marker in (_SOS, _EOI):
                return None  # no frame header before the first scan
            if 0xD0 <= marker <= 0xD8 or marker == 0x01:
                continue
            (length,) = struct.unpack_from(">H", data, pos)
            if marker in _SOF_MARKERS:
                parsed = _frame(data[pos + 2 : pos + length])
                if parsed is None:
                    return None
                _, width, height, components = parsed
                h_max = max(c[1] for c in components)
                v_max = max(c[2] for c in components)
                return sum(
                    _round_up(math.ceil(width * h / (8 * h_max)), h)
                    * _round_up(math.ceil(height * v / (8 * v_max)), v)
                    * 64
                    for _, h, v in components
                )
            pos += length
    except struct.error:
        return None
    return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _zero_ac_scan(component: int, blocks: int) -> bytes:
    """A first AC scan (spectral 1-63, no successive approximation) of one component, all EOB runs."""
    header = bytes([1, component, _AC_TABLE, 1, 63, 0])
    bits = _BitWriter()
    while blocks:
        run = min(blocks, _MAX_EOB_RUN)
        length_class = run.bit_length() - 1
        bits.put(length_class, 4)  # the code of symbol EOBr is r (see _DHT_BODY)
        bits.put(run - (1 << length_class), length_class)
        blocks -= run
    return b"\xff\xda" + struct.pack(">H", 2 + len(header)) + header + bits.flush()


class _BitWriter:
    """MSB-first bits with JPEG byte stuffing (0x00 after every 0xFF), padded with 1 bits."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._acc = 0
        self._count = 0

    def put(self, value: int, width: int) -> None:
        self._acc = (self._acc << width) | value
        self._count += width
        while self._count >= 8:
            self._count -= 8
            byte = (self._acc >> self._count) & 0xFF
            self._out.append(byte)
            if byte == 0xFF:
                self._out.append(0)
        self._acc &= (1 << self._count) - 1

    def flush(self) -> bytes:
        if self._count:
            pad = 8 - self._count
            self.put((1 << pad) - 1, pad)
        return bytes(self._out)
