"""End to end: upload → POST /jobs → RabbitMQ → worker → S3, watched over SSE and polled like a client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pyvips

from tests.stack import Client, Stack

pytestmark = pytest.mark.e2e


def _image(width: int, height: int, fmt: str = ".jpg") -> bytes:
    return pyvips.Image.xyz(width, height).extract_band(0).cast("uchar").write_to_buffer(fmt)


async def test_upload_submit_watch_download(alice: Client) -> None:
    key = await alice.upload(_image(1600, 1200))
    job = await alice.submit(
        {"key": key},
        ["thumb", {"name": "card", "width": 300, "height": 300, "fit": "cover", "format": "webp"}],
    )
    assert job["status"] == "pending"
    assert job["error"] is None

    events = await alice.events(job["id"])
    names = [name for name, _ in events]
    assert names[-1] == "succeeded", events
    assert set(names) <= {"pending", "processing", "succeeded"}
    final = events[-1][1]
    assert final["id"] == job["id"]

    status, polled = await alice.get(job["id"])
    assert status == 200
    assert polled["status"] == "succeeded"
    by_name = {v["name"]: v for v in polled["variants"]}
    assert set(by_name) == {"thumb", "card"}
    thumb = pyvips.Image.new_from_buffer(await alice.download(by_name["thumb"]["url"]), "")
    assert (thumb.width, thumb.height) == (200, 150)
    assert (by_name["thumb"]["width"], by_name["thumb"]["height"]) == (200, 150)
    card_bytes = await alice.download(by_name["card"]["url"])
    card = pyvips.Image.new_from_buffer(card_bytes, "")
    assert (card.width, card.height) == (300, 300)
    assert card.get("vips-loader").startswith("webpload")
    assert by_name["card"]["bytes"] == len(card_bytes)


def _threads(pid: int) -> list[tuple[int, str, int]]:
    """(thread id, name, nice value) of each thread of process `pid`, from /proc."""
    threads = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        threads.append((int(task.name), name, int(fields[16])))  # field 19 of stat(5), after pid and comm
    return threads


async def test_renders_run_below_the_workers_event_loop(alice: Client, stack: Stack) -> None:
    """IMGPIPE_RENDER_NICE (10 by default): the render threads, and the libvips threads they start,
    run at nice 10 above the worker's event loop, so the loop gets a core as soon as it has work."""
    job = await alice.submit({"key": await alice.upload(_image(1600, 1200))})
    assert (await alice.wait(job["id"]))["status"] == "succeeded"
    pid = stack.services["worker"].proc.pid
    threads = _threads(pid)
    loop = next(nice for tid, _, nice in threads if tid == pid)
    libvips = [nice for _, name, nice in threads if name == "libvips worker"]
    assert libvips, threads
    assert set(libvips) == {loop + 10}
    # Python's threads keep the process's name; the pool starts its threads as renders come, up to
    # IMGPIPE_WORKER_CONCURRENCY (2 here).
    renders = [tid for tid, name, nice in threads if name != "libvips worker" and nice == loop + 10]
    assert 1 <= len(renders) <= 2, threads


async def test_sse_with_query_token_on_finished_job(alice: Client) -> None:
    key = await alice.upload(_image(400, 300))
    job = await alice.submit({"key": key})
    await alice.wait(job["id"])
    events = await alice.events(job["id"], query_token=True)
    # A finished job: the current state at once, then the stream ends.
    assert [name for name, _ in events] == ["succeeded"]


@pytest.mark.parametrize("name", [f"{kind}_{n}" for kind in ("Landscape", "Portrait") for n in range(9)])
async def test_exif_orientations_come_out_upright(alice: Client, testdata: Path, name: str) -> None:
    source = (testdata / "exif-orientation" / f"{name}.jpg").read_bytes()
    reference = (testdata / "exif-orientation" / f"{name.split('_')[0]}_1.jpg").read_bytes()
    variant = {"name": "small", "width": 120, "height": 120, "format": "png"}
    jobs = [await alice.submit({"key": await alice.upload(data)}, [variant]) for data in (source, reference)]
    results = [await alice.wait(job["id"]) for job in jobs]
    images = [
        pyvips.Image.new_from_buffer(await alice.download(r["variants"][0]["url"]), "").colourspace("b-w")
        for r in results
    ]
    out, ref = images
    if name.startswith("Landscape"):
        assert out.width > out.height
    else:
        assert out.height > out.width
    assert (out.width, out.height) == (ref.width, ref.height)
    # Same picture the same way up: a rotated or mirrored one differs far more than this.
    assert (out - ref).abs().avg() < 20


async def test_pngsuite_valid_succeed_and_corrupt_fail(alice: Client, testdata: Path) -> None:
    files = sorted((testdata / "pngsuite").glob("*.png"))
    assert len(files) > 150
    jobs = {}
    for path in files:
        key = await alice.upload(path.read_bytes(), "image/png")
        jobs[path.name] = await alice.submit({"key": key}, [{"name": "t", "width": 64, "format": "jpeg"}])
    results = await asyncio.gather(*(alice.wait(job["id"], within=120) for job in jobs.values()))
    for name, result in zip(jobs, results, strict=True):
        if name.startswith("x"):
            assert result["status"] == "failed", (name, result)
            assert result["error"]["code"] in {"corrupt_image", "unsupported_format", "empty_source"}, name
        else:
            assert result["status"] == "succeeded", (name, result)
            assert result["variants"][0]["width"] <= 64
