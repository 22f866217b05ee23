"""`python -m bench [--quick] [--only throughput,...] [--no-thumbor] [--profile DIR]`.

Sections: throughput, latency, api, sse, memory, reconcile.

Runs every measurement against its same-run baseline and writes
`bench/results/<timestamp>/{results.json,results.md,chart.png}`; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

from bench import api, corpus, latency, memory, report, sse, throughput
from bench.harness import cpu_count, worker_allocator

HERE = Path(__file__).resolve().parent
SECTIONS = ("throughput", "latency", "api", "sse", "memory", "reconcile")


def reconcile(outdir: Path, objects: int, log) -> dict:
    script = HERE / "reconcile.py"
    if not script.exists():
        return {"note": "bench/reconcile.py not there yet"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.reconcile", "--objects", str(objects)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=HERE.parent,
    )
    (outdir / "reconcile.out").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"note": f"bench/reconcile.py failed (exit {proc.returncode}); see reconcile.out"}
    try:
        data = json.loads(proc.stdout[proc.stdout.index("{") :])
        last = max(data["runs"], key=lambda r: r["objects"])
        figures = {
            f"scan rate over {last['objects']} objects": f"{last['scan_rate_per_s']} objects/s",
            "scan rate / a bare listing of the same bucket": (
                f"{last['scan_rate_per_s'] / last['listing_rate_per_s']:.2f}x "
                f"(listing {last['listing_rate_per_s']} objects/s)"
            ),
            "peak RSS": f"{last['peak_rss_mib']} MiB",
            "peak RSS growth across runs": f"{data.get('peak_rss_growth_mib')} MiB",
        }
        return {"figures": figures, "raw": data}
    except (ValueError, KeyError, TypeError):
        return {"note": "see bench/reconcile.py: " + " ".join(proc.stdout.split())[-200:]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (smaller N, no thumbor)")
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--no-thumbor", action="store_true")
    parser.add_argument(
        "--objects", type=int, default=None, help="reconciler objects (default 100k, quick 10k)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="record py-spy speedscope profiles into DIR: the worker (throughput, a run more per set),"
        " the api (api, a key-source and a URL-source run more) and the status process (sse)",
    )
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    started = datetime.now()
    outdir = HERE / "results" / started.strftime("%Y%m%d-%H%M%S")
    logdir = outdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    q = args.quick

    def log(msg: str) -> None:
        print(msg, flush=True)

    import pyvips

    res: dict = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "mode": "quick" if q else "full",
            "cpus": cpu_count(),
            "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
            "python": sys.version.split()[0],
            "worker_allocator": worker_allocator(),
        }
    }
    t0 = time.monotonic()
    log("corpus ...")
    corpus.load((*corpus.THROUGHPUT, *corpus.MEMORY))
    plan = {
        "throughput": lambda: throughput.measure(
            logdir / "throughput",
            # Rounds of a few seconds each on a shared machine: one can differ from the next by a fifth.
            rounds=3 if q else 5,
            jobs_per_round=24 if q else 48,
            thumbor=not (q or args.no_thumbor),
            profile_dir=args.profile,
            log=log,
        ),
        "latency": lambda: latency.measure(logdir / "latency", jobs=15 if q else 60, log=log),
        "api": lambda: api.measure(
            logdir / "api", rounds=3, seconds=2 if q else 5, connections=32, profile_dir=args.profile, log=log
        ),
        "sse": lambda: sse.measure(
            logdir / "sse",
            clients=1000 if q else 5000,
            rounds=2 if q else 3,
            profile_dir=args.profile,
            log=log,
        ),
        "memory": lambda: memory.measure(logdir / "memory", log=log),
        "reconcile": lambda: reconcile(outdir, args.objects or (10_000 if q else 100_000), log),
    }
    for name in SECTIONS:
        if name not in only:
            continue
        log(f"{name} ...")
        s = time.monotonic()
        try:
            res[name] = plan[name]()
        except Exception as exc:
            traceback.print_exc()
            res[name] = None
            res.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        log(f"  {name} done in {time.monotonic() - s:.0f}s")
    res["meta"]["duration_s"] = time.monotonic() - t0
    md = report.write(res, outdir)
    if res.get("errors"):
        md += "\nerrors: " + json.dumps(res["errors"]) + "\n"
    print()
    print(md)
    print(f"results in {outdir}")


if __name__ == "__main__":
    main()
