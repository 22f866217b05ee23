"""`POST /jobs` throughput against a bare aiohttp handler, both loaded by `wrk` from another process.

- bare: an aiohttp app in its own process whose `POST /jobs` reads and parses the same JSON body and
  answers 202 with a small JSON body (`python -m bench.api --bare PORT`).
- durable floor: an aiohttp app in its own process that makes the three round trips a job is not
  accepted without (the S3 HEAD, a Redis write, a confirmed publish to a quorum queue) with the
  services' clients, and nothing else (`bench/floor.py`). `POST /jobs` against it is the cost of
  imgpipe's own code; the floor against the bare handler, the cost of the design on this machine.
- imgpipe: the real api service and its real path: JWT check, model validation, ownership, an S3 HEAD of
  the uploaded source (moto here; a real S3 or MinIO has a different cost), the `pending` record in Redis
  (Lua) and the publish with confirm. No worker runs, so the queue just fills. The same again with
  a new `Idempotency-Key` on every request, as a client that retries safely sends it (each one a
  first claim, never a replay). Also `POST /uploads`,
  the other call a client makes for each image (JWT, validation, a signed upload form, the grant in
  Redis); it has no target of its own, and is there for its rate and CPU per request.

Load: `wrk` (Debian) with a Lua script for the method, body and Authorization header, `-t1 -c<C>` fixed
concurrency, alternating bare and imgpipe for each round. Beside the rates: the CPU each server process
(and moto, for the key source) spends per request (`/proc/<pid>/stat`), which says where the gap is
when one process is saturated.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench import floor
from bench.harness import OWNER, BenchStack, cpu_seconds, in_turn, median, paired_ratios, profiled, token
from tests.stack import AMQP_URL, free_port, wait_http


def bare_server(port: int) -> None:
    from aiohttp import web

    async def create_job(request: web.Request) -> web.Response:
        body = await request.json()
        if "source" not in body:
            raise web.HTTPBadRequest()
        return web.json_response({"id": "0" * 32, "status": "pending"}, status=202)

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/jobs", create_job)
    app.router.add_get("/readyz", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
BARE = "bare aiohttp"
FLOOR = "durable floor (HEAD, Redis, confirmed publish)"
FLOOR_URL = "durable floor, URL source (Redis, confirmed publish)"
IDEMPOTENT = "imgpipe POST /jobs, a new Idempotency-Key each"
URL_SOURCE = "imgpipe POST /jobs (URL source, no S3 HEAD)"


def _with_new_keys(script: str) -> str:
    """`script` made to send a new Idempotency-Key with every request: a fresh prefix, then a count.

    The claims stay in Redis for the job retention, so every run needs a prefix of its own (wrk's
    `math.random` starts from the same seed in every run).
    """
    return (
        script
        + f'local prefix = "{uuid.uuid4().hex}"\n'
        + "local n = 0\n"
        + "request = function()\n"
        + "  n = n + 1\n"
        + '  wrk.headers["Idempotency-Key"] = prefix .. "-" .. n\n'
        + "  return wrk.format()\n"
        + "end\n"
    )


def _wrk(url: str, script: Path, seconds: float, connections: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        lat[f"p{p}"] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {
        "rps": rps,
        **lat,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
    }


def measure(
    logdir: Path,
    *,
    rounds: int,
    seconds: float,
    connections: int,
    profile_dir: Path | None = None,
    log=print,
) -> dict:
    if shutil.which("wrk") is None:
        return {"error": "wrk not installed (apt-get install wrk)"}
    stack = BenchStack(logdir)
    servers_started: list[subprocess.Popen] = []
    try:
        key = stack.upload("api-src", b"\xff\xd8\xff" + b"\0" * 1000, "image/jpeg")
        # 127.0.0.0/8 allowed so that a URL source on this machine passes the api's URL check. The
        # per-user limits are as high as they go: one user sends all the load, and 429s would measure
        # nothing, but every request still runs the admission scripts a deployment runs (a limit
        # of 0 would skip them).
        api = stack.start(
            "api",
            {
                "IMGPIPE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
                "IMGPIPE_RATE_JOBS_PER_MINUTE": "1000000",
                "IMGPIPE_RATE_UPLOADS_PER_HOUR": "10000000",
                "IMGPIPE_MAX_ACTIVE_JOBS": "1000000",
            },
        )
        port, floor_port = free_port(), free_port()
        for command, log_name, env in (
            (["bench.api", "--bare", str(port)], "bare.log", None),
            (["bench.floor", str(floor_port)], "floor.log", {**os.environ, **stack.env}),
        ):
            with (logdir / log_name).open("wb") as out:
                servers_started.append(
                    subprocess.Popen(
                        [sys.executable, "-m", *command], stdout=out, stderr=subprocess.STDOUT, env=env
                    )
                )
        bare, floor_server = servers_started
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=bare)
        wait_http(f"http://127.0.0.1:{floor_port}/readyz", proc=floor_server)
        body = json.dumps({"source": {"key": key}, "variants": ["thumb", "small"]})
        script = logdir / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {token(OWNER, ttl_s=3600)}"\n'
        )
        url_body = json.dumps(
            {"source": {"url": "http://127.0.0.1:9/photo.jpg"}, "variants": ["thumb", "small"]}
        )
        url_script = logdir / "post-url.lua"
        url_script.write_text(script.read_text().replace(json.dumps(body), json.dumps(url_body)))
        upload_script = logdir / "post-upload.lua"
        upload_body = json.dumps({"content_type": "image/jpeg", "size": 5_000_000})
        upload_script.write_text(script.read_text().replace(json.dumps(body), json.dumps(upload_body)))
        idempotent_script = logdir / "post-idempotent.lua"
        targets = {
            BARE: f"http://127.0.0.1:{port}/jobs",
            FLOOR: f"http://127.0.0.1:{floor_port}/jobs",
            FLOOR_URL: f"http://127.0.0.1:{floor_port}/jobs",
            "imgpipe POST /jobs": f"{api.url}/jobs",
            IDEMPOTENT: f"{api.url}/jobs",
            URL_SOURCE: f"{api.url}/jobs",
            "imgpipe POST /uploads": f"{api.url}/uploads",
        }
        scripts = {
            BARE: script,
            FLOOR: script,
            FLOOR_URL: url_script,
            "imgpipe POST /jobs": script,
            IDEMPOTENT: idempotent_script,
            URL_SOURCE: url_script,
            "imgpipe POST /uploads": upload_script,
        }
        servers = {k: [api.proc.pid] for k in targets} | {
            BARE: [bare.pid],
            FLOOR: [floor_server.pid],
            FLOOR_URL: [floor_server.pid],
        }

        def script_for(name: str) -> Path:
            """The target's script; for `IDEMPOTENT` written anew, with keys no run has sent."""
            if name == IDEMPOTENT:
                idempotent_script.write_text(_with_new_keys(script.read_text()))
            return scripts[name]

        for name, url in targets.items():  # warm-up
            _wrk(url, script_for(name), 1, connections)
        runs: dict[str, list[dict]] = {k: [] for k in targets}
        for r in range(rounds):
            for name, url in in_turn(list(targets.items()), r):
                path = script_for(name)
                before = cpu_seconds(servers[name]), cpu_seconds([stack.moto.pid])
                run = _wrk(url, path, seconds, connections)
                served = max(run["rps"] * seconds, 1.0)
                run["server_cpu_us"] = (cpu_seconds(servers[name]) - before[0]) / served * 1e6
                run["s3_cpu_us"] = (cpu_seconds([stack.moto.pid]) - before[1]) / served * 1e6
                runs[name].append(run)
            log(
                f"    round {r + 1}: "
                + ", ".join(
                    f"{k} {v[-1]['rps']:.0f} req/s p99 {v[-1]['p99']:.1f} ms" for k, v in runs.items()
                )
            )
        if profile_dir is not None:  # runs more, not counted: py-spy slows what it samples
            for name, out in (("imgpipe POST /jobs", "api-post-jobs"), (URL_SOURCE, "api-post-jobs-url")):
                with profiled(api.proc.pid, profile_dir / f"{out}.speedscope.json", log):
                    _wrk(targets[name], script_for(name), seconds, connections)
    finally:
        for server in servers_started:
            server.terminate()
            server.wait(10)
        try:
            asyncio.run(floor.delete_queue(AMQP_URL, stack.namespace))
        finally:
            stack.close()
    summary = {
        name: {
            "rps": median([x["rps"] for x in v]),
            "p50_ms": median([x["p50"] for x in v]),
            "p99_ms": median([x["p99"] for x in v]),
            "non_2xx": sum(x["non_2xx"] for x in v),
            "server_cpu_us": median([x["server_cpu_us"] for x in v]),
            "s3_cpu_us": median([x["s3_cpu_us"] for x in v]),
        }
        for name, v in runs.items()
    }

    def ratio(name: str, baseline: str) -> float:
        return median(paired_ratios([r["rps"] for r in runs[name]], [r["rps"] for r in runs[baseline]]))

    return {
        "connections": connections,
        "seconds": seconds,
        "rounds": rounds,
        "results": summary,
        "ratio": ratio("imgpipe POST /jobs", BARE),
        "floor_ratio": ratio("imgpipe POST /jobs", FLOOR),
        "floor_vs_bare": ratio(FLOOR, BARE),
        "url_floor_ratio": ratio(URL_SOURCE, FLOOR_URL),
        "url_floor_vs_bare": ratio(FLOOR_URL, BARE),
        "runs": runs,
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        bare_server(int(sys.argv[2]))
    else:
        import tempfile

        print(json.dumps(measure(Path(tempfile.mkdtemp()), rounds=2, seconds=3, connections=32), indent=1))
        time.sleep(0)
