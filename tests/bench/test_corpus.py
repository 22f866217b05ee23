"""The benchmark's memory corpus: its hungriest images are the hungriest the default budget accepts."""

from __future__ import annotations

import pytest
import pyvips
from imgpipe_worker import imaging
from imgpipe_worker.settings import WorkerSettings

from bench import corpus, memory


def _header(spec: corpus.Spec, fmt: str, **metadata: object) -> pyvips.Image:
    """A stand-in for the header libvips reads of `spec`'s file: its size and what the estimate uses."""
    header = pyvips.Image.black(spec.width, spec.height, bands=3).cast("uchar").copy()
    for name, value in metadata.items():
        kind = pyvips.GValue.gint_type if isinstance(value, int) else pyvips.GValue.gstr_type
        header.set_type(kind, name, value)
    return header


@pytest.mark.parametrize(
    ("spec", "fmt", "metadata"),
    [
        # Quality 90: libvips writes no chroma subsampling.
        (corpus.LARGEST_PROGRESSIVE, "jpeg", {"jpeg-multiscan": 1, "jpeg-chroma-subsample": "4:4:4"}),
        (corpus.AVIF, "heif", {}),
    ],
    ids=["progressive jpeg", "avif"],
)
def test_the_hungriest_images_are_just_within_the_default_decode_budget(
    spec: corpus.Spec, fmt: str, metadata: dict[str, object]
) -> None:
    budget = WorkerSettings().max_decode_bytes
    assert imaging.Limits().max_decode_bytes == budget
    header = _header(spec, fmt, **metadata)
    needed = imaging.decode_bytes(fmt, header)
    assert 0.95 * budget < needed <= budget
    assert spec.width * spec.height <= imaging.Limits().max_pixels
    # And the whole of every request the memory section makes of them but its custom ones.
    for label, variants in memory.REQUESTS.items():
        if label not in memory.CUSTOM:
            assert imaging.job_bytes(fmt, header, b"", variants) <= budget, label
