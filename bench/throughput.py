"""Worker throughput: the whole pipeline against a raw libvips loop, a Pillow loop and thumbor.

Every contender does the same work: each source image of the corpus, cycled, turned into the same
variants, with the same number of processes (one per core). "images/s" counts source images finished
with all of their variants.

- raw libvips: a `multiprocessing` pool looping `pyvips.thumbnail_buffer` (one call per variant, libvips
  defaults) and the same savers and options as `imaging.py`; no queue, no S3, no status.
- Pillow: the same pool running a careful Pillow design: open, `draft` (JPEG shrink-on-load) to the
  largest variant, decode once, then the largest variant resized from it (as `thumbnail` does) and
  the others from that one, each saved. No queue either, so it is an upper bound for a Celery+Pillow
  pipeline.
- imgpipe: the worker processes, fed through the real broker with every job's source in S3 (moto) and
  its status in Redis. Jobs are published directly with the store and publisher the api uses (so the
  api's cost is excluded; it is measured on its own); the clock runs from the first publish to the
  last job's terminal change on the store's channel. Two layouts: 1 worker x concurrency N (one worker
  with the default concurrency, the headline figure, fixed before the run) and N workers x
  concurrency 1 (reported beside it; picking the better of two noisy ratios after the run would
  flatter the pipeline).
- thumbor (a real peer, from PyPI, in its own venv): `--processes N`, file loader on the corpus
  directory, one HTTP request per variant (thumbor has no multi-variant request), result storage off,
  2N requests in flight, each on a new connection so that a free process takes it.

Three sets (`VARIANT_SETS`): one variant and four over the whole corpus, and one variant over the corpus
without its progressive JPEG. Every contender runs once a round, each round starting one contender later
than the one before, and a figure is the median over the rounds of its ratio to the same round's raw
loop (the report gives the rounds' range beside it). Beside the rates, each round records the CPU the
raw loop's pool and the worker processes spend per image, and the S3 server's per job
(`/proc/<pid>/stat`); and, for the pipeline, the CPU of the other processes on the same cores (RabbitMQ
and Redis where they run on this machine, and this process, which publishes the jobs and follows their
status), and the whole machine's busy CPU per image for both the raw loop and the pipeline
(`/proc/stat`). Where both keep every core busy, the ratio of the two machine figures is the throughput
ratio; the breakdown says which process the difference went to. Within the workers, their CPU by kind of
thread (`thread_cpu_seconds`): libvips' threads, Python's (the render threads), and the event loop's,
whose transfers, status writes and broker traffic the raw loop does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench import corpus
from bench.harness import (
    REPO,
    SOURCES_DEFERRED,
    THREAD_KINDS,
    BenchStack,
    counter_total,
    cpu_count,
    cpu_seconds,
    in_turn,
    local_server_pids,
    loop_lag_summary,
    loop_lag_totals,
    machine_busy_seconds,
    median,
    open_publisher,
    paired_ratios,
    profiled,
    submit_and_wait,
    submit_direct,
    thread_cpu_seconds,
)

SINGLE = ["thumb"]
FOUR = ["thumb", "small", "medium", "large"]
EVERY_IMAGE = tuple(s.name for s in corpus.THROUGHPUT)
# The progressive JPEG is the one image the pipeline decodes differently from `thumbnail_buffer` (from
# its DC scans, `imgpipe_worker.progressive`): the third set shows the 1-variant figure without it.
NO_PROGRESSIVE = tuple(s.name for s in corpus.THROUGHPUT if s.fmt != "jpeg-progressive")
#: label -> (presets, images cycled through, share of the run's jobs a round). A 4-variant round of the
#: full count lasts five times a 1-variant one and its figures sit far from their targets: half the jobs
#: leave time for the rounds the short, noisy 1-variant ones need.
VARIANT_SETS = {
    "1 variant": (SINGLE, EVERY_IMAGE, 1.0),
    "4 variants": (FOUR, EVERY_IMAGE, 0.5),
    "1 variant, no progressive JPEG": (SINGLE, NO_PROGRESSIVE, 1.0),
}


def _variants(names):
    from imgpipe.models import PRESETS

    return [PRESETS[n] for n in names]


# ---------------------------------------------------------------------------------------------------
# process-pool baselines (functions at module level so the pool can pickle them)

_DATA: dict[str, bytes] = {}


def _pool_init() -> None:
    _DATA.update(corpus.load())


def _raw_job(args: tuple[str, tuple[str, ...]]) -> int:
    import pyvips

    name, names = args
    data = _DATA[name]
    total = 0
    for v in _variants(names):
        kwargs = {"height": v.height or 10_000_000, "size": "down"}
        if v.fit == "cover":
            kwargs["crop"] = "centre"
        image = pyvips.Image.thumbnail_buffer(data, v.width or 10_000_000, **kwargs)
        if v.format == "jpeg":
            if image.hasalpha():
                image = image.flatten(background=[255, 255, 255])
            out = image.jpegsave_buffer(Q=v.quality, optimize_coding=True, interlace=True, keep=0)
        else:
            out = image.webpsave_buffer(Q=v.quality, effort=4, keep=0)
        total += len(out)
    return total


def _pillow_job(args: tuple[str, tuple[str, ...]]) -> int:
    from PIL import Image, ImageOps

    name, names = args
    # Largest first, and the others resized from it: imgpipe cuts its variants from one intermediate
    # of the largest's size. (A copy of the full-size image for each, then `thumbnail`, resized
    # every variant from all of it: a fifth more CPU on four variants.) The presets fit "inside".
    variants = sorted(_variants(names), key=lambda v: (v.width or 0) * (v.height or 0), reverse=True)
    with Image.open(io.BytesIO(_DATA[name])) as im:
        biggest = max((v.width or 0, v.height or 0) for v in variants)
        im.draft("RGB", biggest)  # JPEG only: DCT scaling, like libvips' shrink-on-load
        im = ImageOps.exif_transpose(im)
        im.load()
    total = 0
    width, height = im.size  # each variant's size from the source's, as imgpipe's `_output_size`
    for v in variants:
        scale = min((v.width or width) / width, (v.height or height) / height, 1.0)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # What `thumbnail` does (bicubic, and `reduce` first for large factors), minus its copy.
        out = im if size == im.size else im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
        if v is variants[0]:
            im = out  # the intermediate the others are cut from
        buf = io.BytesIO()
        if v.format == "jpeg":
            if out.mode in ("RGBA", "LA", "P"):
                out = out.convert("RGBA")
                flat = Image.new("RGB", out.size, (255, 255, 255))
                flat.paste(out, mask=out.getchannel("A"))
                out = flat
            out.save(buf, "JPEG", quality=v.quality, optimize=True, progressive=True)
        else:
            out.save(buf, "WEBP", quality=v.quality, method=4)
        total += buf.tell()
    return total


def _tasks(
    count: int, names: list[str], images: tuple[str, ...] = EVERY_IMAGE
) -> list[tuple[str, tuple[str, ...]]]:
    return [(images[i % len(images)], tuple(names)) for i in range(count)]


def run_pool(pool, fn, count: int, names: list[str], images: tuple[str, ...] = EVERY_IMAGE) -> float:
    tasks = _tasks(count, names, images)
    started = time.perf_counter()
    pool.map(fn, tasks, chunksize=1)
    return count / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    """A private stack with `workers` worker processes of `concurrency` each, corpus pre-uploaded."""

    def __init__(self, logdir: Path, workers: int, concurrency: int, extra_env=None) -> None:
        self.label = f"{workers} worker{'s' if workers != 1 else ''} x concurrency {concurrency}"
        self.stack = BenchStack(logdir, extra_env)
        self.keys = {
            s.name: self.stack.upload(s.name, s.path.read_bytes(), s.content_type) for s in corpus.THROUGHPUT
        }
        self.workers = [
            self.stack.start("worker", {"IMGPIPE_WORKER_CONCURRENCY": str(concurrency)})
            for _ in range(workers)
        ]

    async def run(
        self, count: int, names: list[str], images: tuple[str, ...] = EVERY_IMAGE, timeout_s: float = 600
    ) -> float:
        store = self.stack.job_store()
        connection, publisher = await open_publisher(self.stack.namespace)
        try:
            variants = _variants(names)
            await publisher.open()  # declare before the clock starts
            tasks = _tasks(count, names, images)
            started = time.monotonic()

            async def submit() -> list[str]:
                return await asyncio.gather(
                    *(submit_direct(store, publisher, self.keys[name], variants) for name, _ in tasks)
                )

            ids, done = await submit_and_wait(store, submit, timeout_s)
            elapsed = max(done.values()) - started
            failed = [i for i in ids if (await store.get(i)).status.value != "succeeded"]
            if failed:
                raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {await store.get(failed[0])}")
            return count / elapsed
        finally:
            await connection.close()
            await store.redis.aclose()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def urls(self) -> list[str]:
        return [w.url for w in self.workers]

    @property
    def moto_pid(self) -> int:
        return self.stack.moto.pid

    def close(self) -> None:
        self.stack.close()


# ---------------------------------------------------------------------------------------------------
# thumbor

THUMBOR_VENV = Path(__file__).resolve().parent / ".cache" / "thumbor-venv"


def thumbor_install() -> tuple[bool, str]:
    """Thumbor in its own venv (its pins conflict with the workspace); returns (ok, note)."""
    exe = THUMBOR_VENV / "bin" / "thumbor"
    if exe.exists():
        return True, "thumbor " + _thumbor_version()
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    try:
        # The uv `make` uses: the one on PATH, or the one ops/uv.sh installed from PyPI.
        uv = subprocess.run(
            ["bash", str(REPO / "ops" / "uv.sh")], check=True, capture_output=True, text=True, timeout=300
        ).stdout.strip()
        subprocess.run(
            [uv, "venv", "-q", "-p", sys.executable, str(THUMBOR_VENV)], check=True, env=env, timeout=120
        )
        subprocess.run(
            [uv, "pip", "install", "-q", "-p", str(THUMBOR_VENV / "bin" / "python"), "thumbor"],
            check=True,
            env=env,
            timeout=600,
            capture_output=True,
        )
    except Exception as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return False, f"thumbor did not install: {exc} {detail.decode(errors='replace')[-300:]}"
    return True, "thumbor " + _thumbor_version()


def _thumbor_version() -> str:
    out = subprocess.run(
        [
            str(THUMBOR_VENV / "bin" / "python"),
            "-c",
            "import thumbor, PIL; print(thumbor.__version__, 'Pillow', PIL.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


class Thumbor:
    def __init__(self, logdir: Path, processes: int) -> None:
        from tests.stack import free_port, wait_http

        conf = logdir / "thumbor.conf"
        conf.write_text(
            "LOADER = 'thumbor.loaders.file_loader'\n"
            f"FILE_LOADER_ROOT_PATH = '{corpus.CACHE}'\n"
            "STORAGE = 'thumbor.storages.no_storage'\n"
            "RESULT_STORAGE = None\n"
            "ALLOW_UNSAFE_URL = True\n"
            "AUTO_WEBP = False\n"
            "MAX_PIXELS = 100000000\n"
            "PRESERVE_EXIF_INFO = False\n"
            "RESPECT_ORIENTATION = True\n"
        )
        self.port = free_port()
        self._log = (logdir / "thumbor.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(THUMBOR_VENV / "bin" / "thumbor"),
                "-i",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-c",
                str(conf),
                "-l",
                "error",
                "--processes",
                str(processes),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # `--processes N` forks: its own process group lets `close` stop the children too
            # (terminating the parent alone left them running).
            start_new_session=True,
        )
        wait_http(f"http://127.0.0.1:{self.port}/healthcheck", timeout=60, proc=self.proc)

    def urls(self, name: str, names: list[str]) -> list[str]:
        spec = corpus.BY_NAME[name]
        urls = []
        for v in _variants(names):
            fmt = "jpeg" if v.format == "jpeg" else "webp"
            urls.append(
                f"http://127.0.0.1:{self.port}/unsafe/fit-in/{v.width}x{v.height}/"
                f"filters:quality({v.quality}):format({fmt})/{spec.path.name}"
            )
        return urls

    async def run(
        self, count: int, names: list[str], concurrency: int, images: tuple[str, ...] = EVERY_IMAGE
    ) -> float:
        import aiohttp

        tasks = _tasks(count, names, images)
        queue: asyncio.Queue = asyncio.Queue()
        for name, _ in tasks:
            queue.put_nowait(name)

        # A new connection per request. thumbor's processes share one listening socket, and a process
        # busy rendering does not accept, so each request goes to a free one. Kept-alive connections
        # stay with whichever process accepted them first: with 4 of them on 2 processes, a 3-1 or
        # 4-0 split left a process idle for the whole run (4 variants: 0.68-1.14 img/s from one run
        # to the next, against 1.20-1.47 with this).
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=300), connector=connector
        ) as http:

            async def one_image() -> None:
                while not queue.empty():
                    name = queue.get_nowait()
                    for url in self.urls(name, names):
                        async with http.get(url) as response:
                            body = await response.read()
                            if response.status != 200 or not body:
                                raise RuntimeError(f"thumbor {response.status} for {url}")

            started = time.perf_counter()
            await asyncio.gather(*(one_image() for _ in range(concurrency)))
            return count / (time.perf_counter() - started)

    def close(self) -> None:
        group = os.getpgid(self.proc.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # whatever of the group is still there
        self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------------------------------------


def measure(
    logdir: Path,
    *,
    rounds: int,
    jobs_per_round: int,
    thumbor: bool = True,
    profile_dir: Path | None = None,
    log=print,
) -> dict:
    n = cpu_count()
    corpus.load()
    result: dict = {"processes": n, "jobs_per_round": jobs_per_round, "rounds": rounds, "sets": {}}
    ctx = mp.get_context("spawn")  # a fresh libvips per process, nothing inherited from the parent
    pool = ctx.Pool(n, initializer=_pool_init)
    layouts = [Pipeline(logdir / "a", n, 1), Pipeline(logdir / "b", 1, n)]
    headline = layouts[1].label  # one worker at its default concurrency (= cores)
    peer = None
    if thumbor:
        ok, note = thumbor_install()
        result["thumbor"] = note
        if ok:
            try:
                peer = Thumbor(logdir, n)
            except Exception as exc:
                result["thumbor"] = f"thumbor installed but did not start: {exc}"
    else:
        result["thumbor"] = "skipped (--no-thumbor)"
    try:
        # Warm-up: every process has decoded every image once; the pipelines have done a job each.
        for names in (SINGLE, FOUR):
            run_pool(pool, _raw_job, 2 * len(corpus.THROUGHPUT), names)
            run_pool(pool, _pillow_job, len(corpus.THROUGHPUT), names)
            for layout in layouts:
                asyncio.run(layout.run(len(corpus.THROUGHPUT), names))
            if peer:
                asyncio.run(peer.run(len(corpus.THROUGHPUT), names, 2 * n))
        pool_pids = [child.pid for child in mp.active_children()]
        servers = local_server_pids()  # on the same cores as the worker: counted beside it
        result["local_servers"] = sorted(servers)
        for label, (names, images, share) in VARIANT_SETS.items():
            jobs = max(len(images), round(jobs_per_round * share))
            figures: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}  # CPU ms per image, by process group
            lag: dict[str, Counter[str]] = {}  # the workers' event-loop ticks, over all rounds
            deferred: Counter[str] = Counter()  # downloads the workers gave up for want of room
            steps = [
                ("raw libvips", partial(_raw_step, cpu, pool, pool_pids, jobs, names, images)),
                ("Pillow", partial(run_pool, pool, _pillow_job, jobs, names, images)),
                *(
                    (
                        f"imgpipe ({layout.label})",
                        partial(_pipeline_step, cpu, lag, deferred, servers, layout, jobs, names, images),
                    )
                    for layout in layouts
                ),
                *((("thumbor", partial(_thumbor_step, peer, jobs, names, images, 2 * n)),) if peer else ()),
            ]
            for r in range(rounds):
                order = in_turn(steps, r)
                ran = {key: step() for key, step in order}
                row = {key: ran[key] for key, _ in steps}
                for key, value in row.items():
                    figures.setdefault(key, []).append(value)
                log(
                    f"    {label} round {r + 1} (from {order[0][0]}): "
                    + ", ".join(f"{k} {v:.2f}/s" for k, v in row.items())
                )
            result["sets"][label] = _summarise(figures, cpu, headline) | {"jobs_per_round": jobs}
            if profile_dir is not None:  # one run more, not counted: py-spy slows what it samples
                slug = label.replace(" ", "-").replace(",", "")
                with profiled(layouts[1].pids()[0], profile_dir / f"worker-{slug}.speedscope.json", log):
                    asyncio.run(layouts[1].run(jobs, names, images))
            result["sets"][label]["loop_lag"] = {k: loop_lag_summary(v) for k, v in lag.items()}
            result["sets"][label]["sources_deferred"] = {
                layout.label: int(deferred[layout.label]) for layout in layouts
            }
    finally:
        pool.terminate()
        for layout in layouts:
            layout.close()
        if peer:
            peer.close()
    return result


def _raw_step(cpu, pool, pool_pids, jobs, names, images) -> float:
    """One round of the raw loop, with its pool's and the machine's CPU per image."""
    with (
        _cpu_ms_per_image(cpu, "raw libvips", pool_pids, jobs),
        _ms_per_image(cpu, "machine, raw libvips", machine_busy_seconds, jobs),
    ):
        return run_pool(pool, _raw_job, jobs, names, images)


def _pipeline_step(cpu, lag, deferred, servers, layout, jobs, names, images) -> float:
    """One round of a pipeline layout, with the CPU per image of everything it runs on."""
    key = f"imgpipe ({layout.label})"
    with (
        _cpu_ms_per_image(cpu, key, layout.pids(), jobs),
        _cpu_ms_per_image(cpu, f"S3 server (moto), {layout.label}", [layout.moto_pid], jobs),
        _cpu_ms_per_image(cpu, f"RabbitMQ and Redis, {layout.label}", [*servers.values()], jobs),
        _cpu_ms_per_image(cpu, f"benchmark process, {layout.label}", [os.getpid()], jobs),
        _ms_per_image(cpu, f"machine, {layout.label}", machine_busy_seconds, jobs),
        _loop_lag(lag, layout.label, layout.urls()),
        _counted(deferred, layout.label, layout.urls(), SOURCES_DEFERRED),
        _thread_ms_per_image(cpu, layout.label, layout.pids(), jobs),
    ):
        return asyncio.run(layout.run(jobs, names, images))


def _thumbor_step(peer, jobs, names, images, concurrency) -> float:
    return asyncio.run(peer.run(jobs, names, concurrency, images))


@contextlib.contextmanager
def _ms_per_image(into: dict[str, list[float]], key: str, seconds: Callable[[], float], images: int):
    """Append to `into[key]` the CPU (ms) that `seconds` (a running total: `cpu_seconds` of some
    processes, `machine_busy_seconds`) counted per image while the block ran."""
    before = seconds()
    yield
    into.setdefault(key, []).append((seconds() - before) / images * 1000)


@contextlib.contextmanager
def _loop_lag(into: dict[str, Counter[str]], key: str, urls: list[str]):
    """Add to `into[key]` the event-loop ticks the services at `urls` counted while the block ran."""
    before = loop_lag_totals(urls)
    yield
    into.setdefault(key, Counter()).update(loop_lag_totals(urls) - before)


@contextlib.contextmanager
def _counted(into: Counter[str], key: str, urls: list[str], name: str):
    """Add to `into[key]` what the counter `name` of the services at `urls` grew by while the block ran."""
    before = counter_total(urls, name)
    yield
    into[key] += counter_total(urls, name) - before


@contextlib.contextmanager
def _thread_ms_per_image(into: dict[str, list[float]], label: str, pids: list[int], images: int):
    """Append to `into["worker's <kind>, <label>"]` the CPU (ms) each kind of the worker processes'
    threads (`thread_cpu_seconds`) spent per image while the block ran."""
    before = thread_cpu_seconds(pids)
    yield
    after = thread_cpu_seconds(pids)
    for kind in THREAD_KINDS:
        into.setdefault(f"worker's {kind}, {label}", []).append((after[kind] - before[kind]) / images * 1000)


def _cpu_ms_per_image(into: dict[str, list[float]], key: str, pids: list[int], images: int):
    """Append to `into[key]` the CPU (user + system, ms) the processes `pids` spent per image."""
    return _ms_per_image(into, key, partial(cpu_seconds, pids), images)


def _summarise(figures: dict[str, list[float]], cpu: dict[str, list[float]], layout: str) -> dict:
    """Medians of the rounds, and the ratios of the pipeline in `layout` (its label) to the baselines."""
    headline = f"imgpipe ({layout})"
    raw = figures["raw libvips"]
    out = {
        "images_per_s": {k: median(v) for k, v in figures.items()},
        "rounds": figures,
        "headline_layout": headline,
        "headline_label": layout,
        "ratio_rounds": {k: paired_ratios(v, raw) for k, v in figures.items()},
    }
    out["ratio_vs_raw"] = {k: median(v) for k, v in out["ratio_rounds"].items()}
    out["pipeline_vs_raw"] = out["ratio_vs_raw"][headline]
    out["pipeline_vs_pillow"] = median(paired_ratios(figures[headline], figures["Pillow"]))
    if "thumbor" in figures:
        out["pipeline_vs_thumbor"] = median(paired_ratios(figures[headline], figures["thumbor"]))
    # Throughput per core of the worker itself: the raw loop's CPU per image over the worker
    # processes' (render, S3 transfers, broker, status), without the S3 server, Redis, RabbitMQ and
    # this process, which share the two cores here but not a production worker's.
    out["cpu_ms_per_image"] = {k: median(v) for k, v in cpu.items()}
    out["cpu_rounds"] = cpu
    out["worker_cpu_vs_raw"] = median(paired_ratios(cpu["raw libvips"], cpu[headline]))
    # The same on the whole machine: everything the pipeline needs here (S3 server, broker, Redis,
    # this process, the kernel's threads) against everything the raw loop needs.
    out["machine_cpu_vs_raw"] = median(paired_ratios(cpu["machine, raw libvips"], cpu[f"machine, {layout}"]))
    return out


if __name__ == "__main__":
    import json
    import tempfile

    quick = "--quick" in sys.argv
    res = measure(
        Path(tempfile.mkdtemp(prefix="bench-tp-")),
        rounds=1 if quick else 3,
        jobs_per_round=12,
        thumbor="--no-thumbor" not in sys.argv,
    )
    print(json.dumps(res, indent=1, default=str))
