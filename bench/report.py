"""The results as rows (figure, value, baseline, target, verdict): Markdown, JSON and a chart."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

from bench import memory
from bench.api import BARE, FLOOR, FLOOR_URL
from bench.harness import THREAD_KINDS


def _row(area, figure, value, baseline="", target="", ok=None, *, ratio=None, goal=None):
    """One line of the report. A figure held to a ratio also carries both numbers (`ratio`, `goal`),
    which the chart draws: the text is for reading, not for parsing back."""
    verdict = "" if ok is None else ("PASS" if ok else "FAIL")
    return {
        "area": area,
        "figure": figure,
        "value": value,
        "baseline": baseline,
        "target": target,
        "verdict": verdict,
        "ratio": ratio,
        "goal": goal,
    }


def _times(ratio: float, goal: float | None = None) -> str:
    """`ratio` as "1.23x", with more decimals where two would print the goal itself.

    0.897 is "0.90x" to two decimals, which beside a target of 0.9x and a FAIL reads as a mistake
    (and 1.004 as "1.00x" beside "> 1.0x" and a PASS): those get the digits that tell them apart.
    """
    digits = 2
    while goal is not None and digits < 6 and ratio != goal and round(ratio, digits) == goal:
        digits += 1
    return f"{ratio:.{digits}f}x"


def _spread(ratios: list[float] | None) -> str:
    """The range of a median's per-round ratios: how far one round could be from another."""
    if not ratios or len(ratios) < 2:
        return ""
    return f"; {len(ratios)} rounds, {min(ratios):.2f}-{max(ratios):.2f}x"


def _machine_row(label: str, s: dict) -> dict:
    """The whole machine's CPU per image, raw loop against pipeline, and what the pipeline's went to."""
    cpu = s["cpu_ms_per_image"]
    layout = s["headline_label"]
    machine = cpu[f"machine, {layout}"]
    parts = {
        "the worker": cpu[s["headline_layout"]],
        "S3 server": cpu[f"S3 server (moto), {layout}"],
        "RabbitMQ and Redis": cpu[f"RabbitMQ and Redis, {layout}"],
        "this benchmark's process": cpu[f"benchmark process, {layout}"],
    }
    # Medians of each part, so they need not add up exactly: "the rest" is an estimate.
    parts["the rest (kernel threads, other work)"] = machine - sum(parts.values())
    return _row(
        "throughput",
        f"{label}: the machine's CPU per image, raw loop / pipeline",
        f"{cpu['machine, raw libvips']:.0f} ms / {machine:.0f} ms = {s['machine_cpu_vs_raw']:.2f}x",
        "pipeline: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + " ms",
        "",
        None,
    )


def _threads_row(label: str, s: dict) -> dict | None:
    """The headline worker's CPU per image by kind of thread, beside the raw loop's (all image work)."""
    cpu = s["cpu_ms_per_image"]
    layout = s["headline_label"]
    kinds = {kind: cpu.get(f"worker's {kind}, {layout}") for kind in THREAD_KINDS}
    if any(ms is None for ms in kinds.values()):
        return None  # results of a run from before the breakdown
    user, system = kinds["event loop, user"], kinds["event loop, system"]
    return _row(
        "throughput",
        f"{label}: the worker's CPU per image by thread",
        f"libvips {kinds['libvips threads']:.1f}, Python threads (the renders, and the libvips work they "
        f"run) {kinds['Python threads']:.1f}, event loop {user + system:.1f} (user {user:.1f}, system "
        f"{system:.1f}), ended threads (libvips' idle workers) and others {kinds['ended and other']:.1f} ms",
        f"raw loop {cpu['raw libvips']:.1f} ms",
        "",
        None,
    )


def _lag_row(label: str, s: dict) -> dict:
    """How late the worker's event loop ran its 0.1 s tick while the pipeline ran (both layouts)."""

    def figures(lag: dict) -> str:
        return (
            f"mean {lag['mean_ms']:.2f} ms, {lag['over_5ms']:.0%} of ticks over 5 ms,"
            f" {lag['over_25ms']:.0%} over 25 ms, the latest under {lag['worst_under_ms']:g} ms"
        )

    lags = s["loop_lag"]
    headline = lags[s["headline_label"]]
    others = [f"{k}: {figures(v)}" for k, v in lags.items() if k != s["headline_label"] and v.get("ticks")]
    return _row(
        "throughput",
        f"{label}: the worker's event-loop lag ({headline['ticks']} ticks)",
        figures(headline),
        "; ".join(others),
        "",
        None,
    )


def _deferred_row(label: str, s: dict) -> dict:
    """How many source downloads the workers gave up at their headers for want of room, and made
    again (`imgpipe_worker_sources_deferred_total`): what keeping the sources within the memory
    budget cost the read-ahead, over all rounds."""
    counts = s["sources_deferred"]
    jobs = s["jobs_per_round"] * len(s["rounds"]["raw libvips"])
    others = [f"{k}: {v}" for k, v in counts.items() if k != s["headline_label"]]
    return _row(
        "throughput",
        f"{label}: source downloads given up at their headers for want of room, and made again",
        f"{counts[s['headline_label']]} of {jobs} jobs",
        "; ".join(others),
        "",
        None,
    )


def rows(res: dict) -> list[dict]:
    out = []
    tp = res.get("throughput")
    if tp:
        for label, s in tp["sets"].items():
            ips = s["images_per_s"]
            headline = s["headline_layout"]
            target = 0.9 if label.startswith("1 variant") else 1.0
            r = s["pipeline_vs_raw"]
            out.append(
                _row(
                    "throughput",
                    f"{label}: {headline} vs raw libvips loop",
                    f"{ips[headline]:.2f} img/s = {_times(r, target)}",
                    f"raw {ips['raw libvips']:.2f} img/s" + _spread(s.get("ratio_rounds", {}).get(headline)),
                    f">= {target}x",
                    r >= target,
                    ratio=r,
                    goal=target,
                )
            )
            for k, v in ips.items():
                if k.startswith("imgpipe") and k != headline:
                    out.append(
                        _row(
                            "throughput",
                            f"{label}: {k} (other layout)",
                            f"{v:.2f} img/s = {s['ratio_vs_raw'][k]:.2f}x",
                            _spread(s.get("ratio_rounds", {}).get(k)).removeprefix("; "),
                            "",
                            None,
                        )
                    )
            if "worker_cpu_vs_raw" in s:
                cpu = s["cpu_ms_per_image"]
                moto = cpu.get(f"S3 server (moto), {s['headline_label']}")
                out.append(
                    _row(
                        "throughput",
                        f"{label}: per-core efficiency, raw loop's CPU per image / the worker processes'",
                        f"{cpu['raw libvips']:.0f} ms / {cpu[headline]:.0f} ms"
                        f" = {s['worker_cpu_vs_raw']:.2f}x",
                        f"S3 server {moto:.1f} ms a job on the same cores" if moto is not None else "",
                        "",
                        None,
                    )
                )
            if "machine_cpu_vs_raw" in s:
                out.append(_machine_row(label, s))
            if "cpu_ms_per_image" in s and (threads := _threads_row(label, s)):
                out.append(threads)
            if s.get("loop_lag", {}).get(s["headline_label"], {}).get("ticks"):
                out.append(_lag_row(label, s))
            if "sources_deferred" in s:
                out.append(_deferred_row(label, s))
            p = s["pipeline_vs_pillow"]
            out.append(
                _row(
                    "throughput",
                    f"{label}: vs Pillow loop",
                    _times(p, 1.0),
                    f"Pillow {ips['Pillow']:.2f} img/s",
                    "> 1.0x",
                    p > 1.0,
                    ratio=p,
                    goal=1.0,
                )
            )
            if "pipeline_vs_thumbor" in s:
                t = s["pipeline_vs_thumbor"]
                out.append(
                    _row(
                        "throughput",
                        f"{label}: vs thumbor",
                        _times(t, 1.0),
                        f"thumbor {ips['thumbor']:.2f} img/s",
                        "> 1.0x",
                        t > 1.0,
                        ratio=t,
                        goal=1.0,
                    )
                )
        if "pipeline_vs_thumbor" not in next(iter(tp["sets"].values())):
            out.append(_row("throughput", "thumbor", tp.get("thumbor", "not run")))
    lat = res.get("latency")
    if lat:
        o, lt = lat["overhead_ms"], lat["latency_ms"]
        out.append(
            _row(
                "latency",
                f"overhead per job ({lat['image']}, {'+'.join(lat['variants'])}) p50",
                f"{o['p50']:.1f} ms",
                f"raw render {lat['raw_render_ms']['p50']:.1f} ms (timed after each job)",
                "<= 20 ms",
                o["p50"] <= 20,
            )
        )
        out.append(_row("latency", "overhead p95 / p99", f"{o['p95']:.1f} / {o['p99']:.1f} ms"))
        if "s3_calls_ms" in lat:
            out.append(
                _row(
                    "latency",
                    "overhead less the job's 3 S3 calls timed alone (client and server work), p50",
                    f"{lat['overhead_net_of_s3_ms']['p50']:.1f} ms",
                    f"HEAD+GET+PUT alone {lat['s3_calls_ms']['p50']:.1f} ms"
                    + (
                        f" (back to back, without the pause before each job: {warm['p50']:.1f} ms)"
                        if (warm := lat.get("s3_calls_back_to_back_ms"))
                        else ""
                    ),
                )
            )
        out.append(
            _row(
                "latency",
                "submit -> succeeded p50 / p95 / p99",
                f"{lt['p50']:.1f} / {lt['p95']:.1f} / {lt['p99']:.1f} ms",
            )
        )
        for key, figure in (
            (
                "stages_ms",
                "where a job's time goes, means from the services' metrics (api request; worker stages)",
            ),
            ("api_steps_ms", "the api's request step by step, means (imgpipe_api_submit_stage_seconds)"),
        ):
            if key in lat:
                means = "; ".join(f"{k} {v:.1f}" for k, v in lat[key].items())
                out.append(_row("latency", figure, f"{means} ms"))
    api = res.get("api")
    if api and "results" in api:
        real, bare = api["results"]["imgpipe POST /jobs"], api["results"][BARE]
        out.append(
            _row(
                "api",
                f"POST /jobs req/s (c={api['connections']})",
                f"{real['rps']:.0f} req/s = {_times(api['ratio'], 0.5)}",
                f"bare aiohttp {bare['rps']:.0f} req/s",
                ">= 0.5x",
                api["ratio"] >= 0.5,
                ratio=api["ratio"],
                goal=0.5,
            )
        )
        # Against the durable floor (`bench/floor.py`): imgpipe's own cost, apart from the design's.
        for floor_name, key, figure in (
            (
                FLOOR,
                "floor",
                "POST /jobs against the durable floor (the same S3 HEAD, Redis write and "
                "confirmed publish, and nothing else)",
            ),
            (
                FLOOR_URL,
                "url_floor",
                "POST /jobs, URL source, against the durable floor (its Redis write and confirmed publish)",
            ),
        ):
            floor = api["results"].get(floor_name)
            if floor:
                out.append(
                    _row(
                        "api",
                        figure,
                        f"{api[f'{key}_ratio']:.2f}x",
                        f"floor {floor['rps']:.0f} req/s = {api[f'{key}_vs_bare']:.2f}x the bare handler, "
                        f"{floor['server_cpu_us']:.0f} µs a request, p50 / p99 {floor['p50_ms']:.1f} / "
                        f"{floor['p99_ms']:.1f} ms",
                    )
                )
        out.append(
            _row(
                "api",
                "POST /jobs latency p50 / p99",
                f"{real['p50_ms']:.1f} / {real['p99_ms']:.1f} ms",
                f"bare {bare['p50_ms']:.1f} / {bare['p99_ms']:.1f} ms",
            )
        )
        nohead = api["results"].get("imgpipe POST /jobs (URL source, no S3 HEAD)")
        uploads = api["results"].get("imgpipe POST /uploads")
        idempotent = api["results"].get("imgpipe POST /jobs, a new Idempotency-Key each")
        # The other targets of the run, without targets of their own: their rate against the bare handler.
        for result, label, detail in (
            (
                idempotent,
                "POST /jobs with a new Idempotency-Key each request, req/s, server CPU per request",
                "{server_cpu_us:.0f} µs a request",
            ),
            (
                nohead,
                "POST /jobs, URL source (no S3 HEAD) req/s, p50 / p99",
                "{p50_ms:.1f} / {p99_ms:.1f} ms",
            ),
            (uploads, "POST /uploads req/s, server CPU per request", "{server_cpu_us:.0f} µs a request"),
        ):
            if result:
                rate = f"{result['rps']:.0f} req/s = {result['rps'] / bare['rps']:.2f}x"
                out.append(_row("api", label, rate, detail.format(**result)))
        if "server_cpu_us" in real:
            url_cpu = f", URL source {nohead['server_cpu_us']:.0f} µs" if nohead else ""
            out.append(
                _row(
                    "api",
                    "server process CPU per request",
                    f"{real['server_cpu_us']:.0f} µs{url_cpu}",
                    f"bare {bare['server_cpu_us']:.0f} µs; "
                    f"S3 server {real['s3_cpu_us']:.0f} µs a key-source POST",
                )
            )
        refused = {name: r["non_2xx"] for name, r in api["results"].items() if r["non_2xx"]}
        if refused:
            out.append(
                _row(
                    "api",
                    "non-2xx answers",
                    ", ".join(f"{count} ({name})" for name, count in refused.items()),
                    "",
                    "0",
                    False,
                )
            )
    elif api:
        out.append(_row("api", "POST /jobs", api.get("error", "not run")))
    sse = res.get("sse")
    if sse:
        d, m = sse["delivery_ms"], sse["status_rss_mb"]
        n = sse["clients"]
        ok_all = sse["received"] == n
        out.append(
            _row(
                "sse",
                f"{n} clients: delivered",
                f"{sse['received']}/{n}",
                f"connect {sse['connect_s']:.1f}s",
                f"{n}/{n}",
                ok_all,
            )
        )
        out.append(
            _row(
                "sse",
                f"{n} clients: delivery p50 / p99",
                f"{d['p50']:.0f} / {d['p99']:.0f} ms",
                "",
                f"p99 <= 250 ms, to all {n}",
                # A percentile of the streams that got the change says nothing of those that did not.
                d["p99"] <= 250 and ok_all,
            )
        )
        out.append(
            _row(
                "sse",
                f"{n} clients: status process peak RSS",
                f"{m['peak']:.0f} MiB",
                f"idle {m['idle']:.0f} MiB",
                "<= 300 MiB",
                m["peak"] <= 300,
            )
        )
    mem = res.get("memory")
    if mem:
        for name, r in mem["images"].items():
            for label, v in r.items():
                # Runs before 2026-12-07 measured the four presets only.
                runs = v.get("requests", {"4 presets": v})
                # A custom request the worker's budget refused whole proves no peak, and is allowed;
                # any other job not done fails the figure.
                allowed = {k for k in v.get("may_refuse", ()) if memory.refused(runs[k])}
                jobs: Counter = Counter()
                for k, run in runs.items():
                    if k not in allowed:
                        jobs.update(run["jobs"])
                done = set(jobs) == {"succeeded"}
                queued = sum(v["jobs"].values())
                if len(runs) > 1:
                    figure = f"worker peak RSS, {name}, {label}, the worst of {len(runs)} requests"
                    value = f"{v['peak_rss_mb']:.0f} MiB ({v['worst_request']})"
                    each = ", ".join(
                        f"{k} refused by the budget" if k in allowed else f"{k} {run['peak_rss_mb']:.0f} MiB"
                        for k, run in runs.items()
                    )
                    baseline = f"{queued} jobs queued each: {each}; idle {v['idle_rss_mb']:.0f} MiB"
                else:
                    figure = f"worker peak RSS, {name}, {label}, {queued} jobs queued"
                    value = f"{v['peak_rss_mb']:.0f} MiB"
                    baseline = f"idle {v['idle_rss_mb']:.0f} MiB"
                baseline += "; " + ", ".join(f"{k} {c}" for k, c in jobs.items())
                out.append(
                    _row(
                        "memory",
                        figure,
                        value,
                        baseline,
                        "<= 300 MiB, all succeeded" if label == "concurrency 1" else "all succeeded",
                        (v["peak_rss_mb"] <= 300 and done) if label == "concurrency 1" else done,
                    )
                )
    rec = res.get("reconcile")
    if rec:
        if isinstance(rec, dict) and "figures" in rec:
            for k, v in rec["figures"].items():
                out.append(_row("reconcile", k, v))
        else:
            out.append(_row("reconcile", "scan rate / peak RSS", rec.get("note", "see bench/reconcile.py")))
    return out


def markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [
        f"imgpipe bench {meta['started']} ({meta['mode']}, {meta['cpus']} CPUs, libvips {meta['libvips']}, "
        f"{meta['duration_s']:.0f} s)",
        "",
        f"Workers run on {meta.get('worker_allocator', 'the default allocator')}.",
        "",
        "| area | figure | value | same-run baseline | target | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows(res):
        lines.append(
            "| "
            + " | ".join(str(r[k]) for k in ("area", "figure", "value", "baseline", "target", "verdict"))
            + " |"
        )
    return "\n".join(lines) + "\n"


def chart_bars(res: dict) -> list[tuple[str, float, float, bool]]:
    """The chart's ratio bars: (figure, ratio, goal, met), with the verdict the table gives."""
    return [
        (r["figure"], r["ratio"], r["goal"], r["verdict"] == "PASS")
        for r in rows(res)
        if r["goal"] is not None
    ]


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = chart_bars(res)
    # Room for every bar's label in full (wrapped), rather than cut to a width that hides which is which.
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4.8, 0.6 * len(bars) + 1.5)))
    tp = res.get("throughput")
    if tp:
        ax = axes[0]
        sets = list(tp["sets"])
        names = list(tp["sets"][sets[0]]["images_per_s"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar(
                [j + i * width for j in range(len(sets))],
                [tp["sets"][s]["images_per_s"].get(name, 0) for s in sets],
                width,
                label=name,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], [textwrap.fill(s, 22) for s in sets])
        ax.set_ylabel("source images / s (median of rounds)")
        ax.set_title(f"throughput, {tp['processes']} processes")
        ax.legend(fontsize=7)
    ax = axes[1]
    if bars:
        labels = [textwrap.fill(figure, 48) for figure, *_ in bars]
        ax.barh(labels, [b[1] for b in bars], color=["tab:green" if b[3] else "tab:red" for b in bars])
        ax.scatter([b[2] for b in bars], labels, marker="|", s=300, color="black", label="target", zorder=3)
        ax.invert_yaxis()  # in the table's order, top down
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("ratio vs same-run baseline")
    ax.set_title("headline ratios (green = meets target)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict, outdir: Path) -> str:
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (outdir / "results.md").write_text(md)
    try:
        chart(res, outdir / "chart.png")
    except Exception as exc:  # the figures matter more than the picture
        md += f"\n(chart not drawn: {exc})\n"
    return md
