"""The benchmark's memory corpus: its hungriest images are the hungriest the default budget accepts."""

from __future__ import annotations

import pytest
import pyvips
from imgpipe_worker import imaging
from imgpipe_worker.settings import WorkerSettings

from bench import corpus, memory
from tests.worker.test_imaging import _stand_in


@pytest.mark.parametrize(
    "spec", [corpus.LARGEST_PROGRESSIVE, corpus.GRAINY_PROGRESSIVE, corpus.AVIF], ids=lambda spec: spec.name
)
def test_the_hungriest_images_are_just_within_the_default_decode_budget(spec: corpus.Spec) -> None:
    budget = WorkerSettings().max_decode_bytes
    assert imaging.Limits().max_decode_bytes == budget
    if spec.fmt == "avif":  # a stand-in for its header: encoding 12 MP as AVIF takes a while
        fmt, data, header = "heif", b"", _stand_in(spec.width, spec.height)
    else:  # the file itself: the estimate reads its frame header (quality 90: no chroma subsampling)
        fmt, data = "jpeg", corpus.generate(spec).read_bytes()
        header = pyvips.Image.new_from_buffer(data, "")
        assert header.get("jpeg-chroma-subsample") == "4:4:4" and header.get("jpeg-multiscan") == 1
    needed = imaging.decode_bytes(fmt, header, data)
    assert 0.95 * budget < needed <= budget
    assert spec.width * spec.height <= imaging.Limits().max_pixels
    # And the whole of every request the memory section makes of them but its custom ones.
    for label, variants in memory.REQUESTS.items():
        if label not in memory.CUSTOM:
            assert imaging.job_bytes(fmt, header, data, variants) <= budget, label


def test_the_grainy_source_fills_the_room_set_aside_for_sources() -> None:
    """Within the room, so its own size does not count against the budget; over half of it, so the
    next job's copy does not download ahead of its render (`holds.Sources`)."""
    size = corpus.generate(corpus.GRAINY_PROGRESSIVE).stat().st_size
    assert imaging.SOURCE_ROOM_BYTES / 2 < size <= imaging.SOURCE_ROOM_BYTES
