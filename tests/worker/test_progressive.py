"""Tests for the DC-only rewrite of progressive JPEGs (`imgpipe_worker.progressive`) and its use in
`imaging.render`: the pixels must be exactly those of libvips' own 1/8-scale decode of the whole file.
"""

from __future__ import annotations

import pytest
import pyvips
from imgpipe.models import Variant
from imgpipe_worker import imaging, progressive
from imgpipe_worker.imaging import Limits, render
from imgpipe_worker.progressive import dc_only

from tests.stack import TESTDATA


@pytest.fixture(autouse=True, scope="module")
def _configured() -> None:
    imaging.configure_libvips()


def photo(width: int, height: int, *, bands: int = 3) -> pyvips.Image:
    """Smooth noise with detail at every scale: AC coefficients that matter in every block."""
    layers = [pyvips.Image.gaussnoise(width, height, mean=128, sigma=60) for _ in range(bands)]
    image = layers[0].bandjoin(layers[1:]) if bands > 1 else layers[0]
    image = (image.gaussblur(1.5) + pyvips.Image.xyz(width, height)[0] % 64).cast("uchar")
    return image.copy(interpretation={1: "b-w", 3: "srgb", 4: "cmyk"}[bands])


def progressive_jpeg(width: int = 1603, height: int = 1201, *, bands: int = 3, **save: object) -> bytes:
    return photo(width, height, bands=bands).jpegsave_buffer(Q=85, interlace=True, **save)


# Chroma subsampling decides which AC scans a 1/8 decode reads; odd sizes leave partial blocks and
# MCUs; restart markers and libvips' scan splitting change the scan layout.
SHAPES = {
    "4:2:0": {},
    "4:4:4": {"subsample_mode": "off"},
    "grey": {"bands": 1},
    "CMYK": {"bands": 4},
    "restart markers": {"restart_interval": 5},
    "split scans": {"optimize_scans": True},
    "small, odd": {"width": 41, "height": 23},
}


def _eighth(data: bytes) -> pyvips.Image:
    # fail_on="warning": the rewritten file must not make libjpeg warn about anything either.
    return pyvips.Image.new_from_buffer(data, "", shrink=8, fail_on="warning").copy_memory()


@pytest.mark.parametrize("shape", SHAPES)
def test_one_eighth_decode_is_bit_identical(shape: str) -> None:
    data = progressive_jpeg(**SHAPES[shape])
    reduced = dc_only(data)
    assert reduced is not None
    full, dc = _eighth(data), _eighth(reduced)
    assert (full.width, full.height, full.bands) == (dc.width, dc.height, dc.bands)
    assert (full - dc).abs().max() == 0


def test_the_rewrite_drops_the_ac_data_of_full_resolution_components() -> None:
    data = progressive_jpeg(2000, 1500, subsample_mode="off")
    reduced = dc_only(data)
    assert reduced is not None and len(reduced) < len(data) / 3
    # Decoded at full size, the AC coefficients are visibly gone: the file is for 1/8 scale only.
    assert (
        pyvips.Image.new_from_buffer(data, "") - pyvips.Image.new_from_buffer(reduced, "")
    ).abs().avg() > 2


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(photo(64, 48).jpegsave_buffer(), id="baseline"),
        pytest.param(progressive_jpeg(300, 200)[:-500], id="truncated"),
        pytest.param(progressive_jpeg(300, 200)[:2000], id="header only"),
        pytest.param(photo(64, 48).pngsave_buffer(), id="png"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xd8\xff", id="three bytes"),
        pytest.param(b"\xff\xd8\xff\xc2\x00\x02\xff\xd9", id="empty frame header"),
        pytest.param(
            b"\xff\xd8" + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\xff\xd9", id="scan first"
        ),
    ],
)
def test_anything_else_is_left_alone(data: bytes) -> None:
    assert dc_only(data) is None


def _scan_headers(data: bytes) -> list[int]:
    """Where each SOS marker stands (0xFF 0xDA cannot occur inside entropy-coded data)."""
    found, at = [], data.find(b"\xff\xda")
    while at != -1:
        found.append(at)
        at = data.find(b"\xff\xda", at + 2)
    return found


def test_scan_headers_libjpeg_would_refuse_are_left_alone() -> None:
    data = progressive_jpeg(300, 200)
    scans = _scan_headers(data)
    dc = scans[0]  # libvips' first scan: the DC coefficients of all three components
    count = data[dc + 4]
    assert data[dc + 5 + 2 * count] == 0  # spectral start
    spectral_end = dc + 6 + 2 * count
    assert dc_only(data) is not None
    assert dc_only(data[:spectral_end] + b"\x3f" + data[spectral_end + 1 :]) is None  # DC scan to 63
    ac = next(at for at in scans if data[at + 4] == 1 and data[at + 7] > 0)
    # The same AC scan claiming two components: AC scans cover one.
    two = b"\xff\xda\x00\x0a\x02" + data[ac + 5 : ac + 7] * 2 + data[ac + 7 : ac + 10]
    assert dc_only(data[:ac] + two + data[ac + 10 :]) is None


def test_garbage_between_segments_is_left_alone() -> None:
    data = progressive_jpeg(300, 200)
    first_scan = data.index(b"\xff\xda")
    assert dc_only(data) is not None
    assert dc_only(data[:first_scan] + b"garbage" + data[first_scan:]) is None


def test_a_file_of_countless_tiny_segments_is_left_alone() -> None:
    # Each segment is a turn of a Python loop: a crafted file of millions must not cost seconds. The
    # rewrite gives up past 512 segments (this file has about 20 of its own).
    data = progressive_jpeg(300, 200)
    comment = b"\xff\xfe\x00\x02"  # an empty COM segment
    assert dc_only(data[:2] + comment * 400 + data[2:]) is not None
    assert dc_only(data[:2] + comment * 600 + data[2:]) is None


# ----------------------------------------------------------------------------- scan count


def _with_scans(data: bytes, extra: int) -> bytes:
    """A progressive grey JPEG with `extra` more AC scans (EOB runs only) before its end marker:
    a few bytes each, and each one a pass of libjpeg over every block."""
    header = pyvips.Image.new_from_buffer(data, "")
    scan = progressive._zero_ac_scan(1, -(-header.width // 8) * -(-header.height // 8))
    return data[:-2] + progressive._AC_HUFFMAN_TABLE + scan * extra + b"\xff\xd9"


def test_scan_count_counts_the_scans_libjpeg_reads() -> None:
    data = progressive_jpeg(300, 200)
    scans = len(_scan_headers(data))
    assert scans >= 6
    assert progressive.scan_count(data, 100) == scans
    # Garbage before a marker, which libjpeg skips with a warning, hides no scan.
    first_scan = data.index(b"\xff\xda")
    assert progressive.scan_count(data[:first_scan] + b"garbage" + data[first_scan:], 100) == scans
    # Nothing after the end marker is read (an MPF image, a gain map).
    assert progressive.scan_count(data + data, 100) == scans
    # The count stops once past `most`.
    assert progressive.scan_count(_with_scans(data, 1000), 100) == 101
    assert progressive.scan_count(_with_scans(data, 1000), 5000) == scans + 1000


def test_coefficient_count_reads_the_frame_header() -> None:
    """Every component's blocks, in whole MCUs, 64 coefficients each: 300 x 200 is 38 x 25 blocks at
    full resolution; 4:2:0's luma rounds to 38 x 26 and its chroma components have 19 x 13."""
    assert progressive.coefficient_count(progressive_jpeg(300, 200, subsample_mode="off")) == 3 * 38 * 25 * 64
    data = progressive_jpeg(300, 200, subsample_mode="on")
    assert progressive.coefficient_count(data) == (38 * 26 + 2 * 19 * 13) * 64
    assert progressive.coefficient_count(progressive_jpeg(300, 200, bands=1)) == 38 * 25 * 64
    # Garbage between segments, which libjpeg passes over with a warning, hides nothing.
    assert progressive.coefficient_count(data[:2] + b"garbage" + data[2:]) == (38 * 26 + 2 * 19 * 13) * 64
    # No frame header it reads: none before a scan, cut short, or a height left to a DNL marker.
    sof = data.index(b"\xff\xc2")
    first_scan = data.index(b"\xff\xda")
    assert progressive.coefficient_count(data[:sof] + data[first_scan:]) is None
    assert progressive.coefficient_count(data[: sof + 6]) is None
    assert progressive.coefficient_count(data[: sof + 5] + b"\x00\x00" + data[sof + 7 :]) is None
    assert progressive.coefficient_count(b"not a jpeg") is None


def test_a_file_of_countless_markers_counts_as_too_many_scans() -> None:
    data = progressive_jpeg(300, 200)
    comment = b"\xff\xfe\x00\x02"
    assert progressive.scan_count(data[:2] + comment * 1000 + data[2:], 100) == len(_scan_headers(data))
    assert progressive.scan_count(data[:2] + comment * 5000 + data[2:], 100) == 101


def test_a_jpeg_of_too_many_scans_is_refused_before_it_is_decoded() -> None:
    """A render cannot be stopped inside libjpeg's reading of the scans: 20,000 tiny ones took 26 s
    of a 4,000 x 4,000 image (and held a render slot that long) before this check."""
    data = progressive_jpeg(640, 480, bands=1)
    allowed = _with_scans(data, imaging._MAX_JPEG_SCANS - len(_scan_headers(data)))
    assert progressive.scan_count(allowed, 1000) == imaging._MAX_JPEG_SCANS
    assert render(allowed, [_thumb(200, 200)], Limits())[0].width == 200
    with pytest.raises(imaging.ImageError) as caught:
        render(_with_scans(data, imaging._MAX_JPEG_SCANS), [_thumb(200, 200)], Limits())
    assert caught.value.code == "corrupt_image"
    assert "scans" in caught.value.message


def test_every_shared_test_image_is_parsed_without_error() -> None:
    files = [p for p in TESTDATA.rglob("*") if p.is_file()]
    assert len(files) > 100, f"test corpus missing under {TESTDATA}"
    for path in files:
        data = path.read_bytes()
        for cut in (len(data), len(data) // 2, 10):
            out = dc_only(data[:cut])
            assert out is None or out.startswith(b"\xff\xd8")
            assert 0 <= progressive.scan_count(data[:cut], 100) <= 101


# ----------------------------------------------------------------------------- render


def _thumb(width: int, height: int, fit: str = "inside") -> Variant:
    return Variant(name="t", width=width, height=height, fit=fit, format="jpeg", quality=80)


def _libvips_thumbnail(data: bytes, variant: Variant) -> pyvips.Image:
    """What libvips' own thumbnail makes of the whole file, asked for the variant as render asks."""
    header = pyvips.Image.new_from_buffer(data, "")
    sizing = imaging._Sizing.of(variant, *imaging._oriented_size(header), alpha=False)
    image = pyvips.Image.thumbnail_buffer(data, sizing.width, height=sizing.height, size="force")
    return image.crop(*sizing.crop) if sizing.crop else image


@pytest.fixture
def rewrites(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry for every `dc_only` call that render makes (the DC path was taken)."""
    calls: list[bool] = []
    real = progressive.dc_only
    monkeypatch.setattr(progressive, "dc_only", lambda data: calls.append(True) or real(data))
    return calls


@pytest.mark.parametrize(
    ("size", "box", "fit", "dc_used"),
    [
        ((3200, 2400), (200, 200), "inside", True),  # shrink 16: the smallest that decodes at 1/8
        ((3200, 2400), (160, 150), "cover", True),  # cover shrinks by the smaller factor, 16
        ((3200, 2400), (201, 201), "inside", False),  # shrink 15.9: libvips decodes at 1/4
        ((3200, 2400), (200, 160), "cover", False),
        ((2400, 3200), (200, 200), "inside", True),  # portrait
    ],
)
def test_render_matches_libvips_thumbnail_exactly(
    rewrites: list[bool], size: tuple[int, int], box: tuple[int, int], fit: str, dc_used: bool
) -> None:
    data = progressive_jpeg(*size)
    variant = _thumb(*box, fit=fit)
    [out] = render(data, [variant], Limits())
    assert rewrites == ([True] if dc_used else [])
    expected = _libvips_thumbnail(data, variant)
    got = pyvips.Image.new_from_buffer(out.data, "")
    assert (got.width, got.height) == (expected.width, expected.height)
    # Bit-identical pixels give a bit-identical file with the same saver settings.
    assert out.data == imaging._encode(expected, variant)


@pytest.mark.parametrize("variants", [[_thumb(250, 250)], [_thumb(250, 250), _thumb(100, 100)]])
def test_a_size_a_rounding_puts_a_side_under_16_still_decodes_from_the_dc_scans(
    rewrites: list[bool], variants: list[Variant]
) -> None:
    # 4000 x 3000 at 1/16 is 250 x 187.5, rounded to 188: 3000 / 188 is 15.96, and with the sides
    # forced, the smaller factor decided, so libvips decoded at 1/4 (2.4 times the CPU) what the
    # 1/8 decode serves, resized by 1.995 after it.
    data = progressive_jpeg(4000, 3000)
    made = render(data, variants, Limits())
    assert rewrites == [True]
    assert (made[0].width, made[0].height) == (250, 188)
    # What libvips makes of the 1/8 decode of the whole file, resized to that size: the same bytes.
    eighth = pyvips.Image.new_from_buffer(data, "", shrink=8).thumbnail_image(250, height=188, size="force")
    assert made[0].data == imaging._encode(eighth, variants[0])


def test_exif_orientation_is_applied_on_the_dc_path(rewrites: list[bool]) -> None:
    image = photo(3200, 1600).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)  # stored sideways: 1600 wide once upright
    data = image.jpegsave_buffer(Q=85, interlace=True)
    [out] = render(data, [_thumb(100, 100)], Limits())
    assert rewrites == [True]
    assert (out.width, out.height) == (50, 100)
    assert out.data == imaging._encode(_libvips_thumbnail(data, _thumb(100, 100)), _thumb(100, 100))


def test_multi_variant_intermediate_uses_the_dc_path_only_when_it_shrinks_enough(
    rewrites: list[bool],
) -> None:
    data = progressive_jpeg(3200, 2400)
    small = [_thumb(200, 200), _thumb(100, 100)]
    outs = render(data, small, Limits())
    assert rewrites == [True]
    assert [(o.width, o.height) for o in outs] == [(200, 150), (100, 75)]
    render(data, [*small, _thumb(800, 800)], Limits())  # the 800 px variant needs more than 1/8
    assert rewrites == [True]


def test_truncated_progressive_jpeg_is_still_corrupt() -> None:
    data = progressive_jpeg(3200, 2400)
    with pytest.raises(imaging.ImageError) as caught:
        render(data[: len(data) * 2 // 3], [_thumb(200, 200)], Limits())
    assert caught.value.code == "corrupt_image"


def test_a_long_run_of_ff_bytes_is_passed_over_in_one_pass() -> None:
    """The marker search used to try a run of 0xFF not followed by a marker again from each of its
    bytes: quadratic, in one regex call that holds the GIL, before libvips and its deadline (20 kB
    took 7 s; the 2 MB here, hours, far past the test's timeout). The worker's loop stood still."""
    data = progressive_jpeg(300, 200)
    scans = len(_scan_headers(data))
    run = b"\xff" * 2_000_000
    # Bytes libjpeg skips with a warning (0xFF ... 0xFF 0x00) right after the start of image.
    extraneous = data[:2] + run + b"\x00" + data[2:]
    assert progressive.scan_count(extraneous, 100) == scans
    assert render(extraneous, [_thumb(100, 100)], Limits())[0].width == 100
    # Fill bytes before a marker, which a JPEG may hold: counted and rewritten as without them.
    filled = data[:2] + run + data[2:]
    assert progressive.scan_count(filled, 100) == scans
    assert dc_only(filled) == dc_only(data) is not None
