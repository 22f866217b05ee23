#!/usr/bin/env bash
# Grafana dashboards (deploy/helm/imgpipe/files/dashboards/*.json) and the alert rules' PromQL:
#  1. every dashboard is valid JSON with a Grafana dashboard's shape (uid, title, schemaVersion,
#     panels with unique ids, gridPos and targets with refId + expr; uids unique across files), and
#     every series it selects is filtered by its `namespace` variable (whose "All" is `.*`);
#  2. every metric name in every PromQL expression (dashboards and alerts.yml) is one the services
#     really export: api, status, worker and reconciler are started here, against the local RabbitMQ
#     and Redis (a namespace of their own, removed afterwards) and a moto S3 server, and their live
#     /metrics is read (imgpipe_* names, and the process_* ones prometheus_client adds, such as
#     process_start_time_seconds); `rabbitmq_*` names must be on the allow-list below (RabbitMQ's own
#     rabbitmq_prometheus plugin), which is also checked against a local RabbitMQ's :15692 when one
#     answers; and Prometheus's own per-target series (`up`) on theirs.
# Needs `make install` (.venv), RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379, like the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "[dashboards] FAIL: no .venv; run 'make install' first" >&2; exit 1; }

exec "$PY" - "$@" <<'PY'
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

DASHBOARDS = sorted(glob.glob("deploy/helm/imgpipe/files/dashboards/*.json"))
ALERTS = "deploy/helm/imgpipe/files/prometheus/alerts.yml"

# RabbitMQ's own metrics (rabbitmq_prometheus plugin, /metrics/per-object) that dashboards and
# alerts may use. Anything else named rabbitmq_* is refused: add it here once checked.
RABBITMQ_ALLOWED = {
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
}

# Series Prometheus itself writes for every scrape target (no exporter serves them).
PROMETHEUS_SYNTHETIC = {"up"}

# A metric selector in a dashboard's PromQL, its label matchers in group 2.
SELECTOR = re.compile(r"\b((?:imgpipe|process|rabbitmq)_\w+)(?:\{([^}]*)\})?(?!\w)")
NAMESPACE_MATCHER = 'namespace=~"$namespace"'

problems: list[str] = []


def fail(message: str) -> None:
    problems.append(message)
    print(f"[dashboards] FAIL {message}", file=sys.stderr)


# --- 1. shape -----------------------------------------------------------------------------------
def walk_panels(panels):
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


exprs: list[tuple[str, str]] = []  # (where, PromQL)
uids: dict[str, str] = {}
if not DASHBOARDS:
    fail("no dashboards in deploy/helm/imgpipe/files/dashboards")
for path in DASHBOARDS:
    try:
        board = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        fail(f"{path}: invalid JSON: {exc}")
        continue
    if not isinstance(board, dict):
        fail(f"{path}: not a JSON object")
        continue
    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list)):
        if not isinstance(board.get(key), kind):
            fail(f"{path}: missing or invalid '{key}'")
    if "dashboard" in board:
        fail(f"{path}: an API wrapper ({{\"dashboard\": ...}}), not a dashboard file")
    uid = board.get("uid", "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", str(uid)):
        fail(f"{path}: uid {uid!r} is not a valid Grafana uid")
    if uid in uids:
        fail(f"{path}: uid {uid!r} also used by {uids[uid]}")
    uids[uid] = path
    ids = set()
    for panel in walk_panels(board.get("panels", [])):
        title = panel.get("title", "?")
        pid = panel.get("id")
        if not isinstance(pid, int) or pid in ids:
            fail(f"{path}: panel {title!r}: missing or duplicate id {pid!r}")
        ids.add(pid)
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")) or grid.get("x", 0) + grid.get("w", 0) > 24:
            fail(f"{path}: panel {title!r}: bad gridPos {grid}")
        if not panel.get("type"):
            fail(f"{path}: panel {title!r}: no type")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            fail(f"{path}: panel {title!r}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or not all(refs):
            fail(f"{path}: panel {title!r}: missing or duplicate refId")
        for target in targets:
            if not str(target.get("expr", "")).strip():
                fail(f"{path}: panel {title!r}: target {target.get('refId')} has no expr")
            else:
                exprs.append((f"{path}: {title}", target["expr"]))
    variables = {v.get("name"): v for v in board.get("templating", {}).get("list", [])}
    for where, expr in [e for e in exprs if e[0].startswith(path)]:
        for var in re.findall(r"\$\{?([A-Za-z]\w*)", expr):
            if not var.startswith("__") and var not in variables:
                fail(f"{where}: uses undefined variable ${var}")
        # One release's panels on a cluster-wide Prometheus: every series is picked by the
        # `namespace` variable (RabbitMQ's by the broker's namespace, as in the alert rules).
        for selector in SELECTOR.finditer(expr):
            if NAMESPACE_MATCHER not in (selector.group(2) or ""):
                fail(f"{where}: {selector.group(1)} without {NAMESPACE_MATCHER}")
    namespace = variables.get("namespace", {})
    # "All" must match series without the label too (compose's Prometheus adds none): `.*`, not
    # Grafana's default, which lists the values it found.
    if not (namespace.get("includeAll") and namespace.get("allValue") == ".*"):
        fail(f"{path}: no `namespace` variable with includeAll and allValue '.*'")

rules = yaml.safe_load(Path(ALERTS).read_text())
for group in rules.get("groups", []):
    for rule in group.get("rules", []):
        exprs.append((f"{ALERTS}: {rule.get('alert') or rule.get('record')}", str(rule["expr"])))

# --- 2. metric names in PromQL ------------------------------------------------------------------
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    e = re.sub(r"\$\{?__\w+\}?|\$\{?\w+\}?", "1m", expr)            # Grafana variables
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', e)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)                                  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                 # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    found = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        token, before = m.group(0), e[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":                          # 1e3, 5m
            continue
        if e[m.end():].lstrip().startswith("(") or token in KEYWORDS:  # functions, keywords
            continue
        found.add(token)
    return found


# --- 2b. every dashboard expression parses (promtool, as a recording rule) ---------------------
# Grafana's variables become values Prometheus accepts: a range for the interval ones, `.*` for the
# namespace. alerts.yml is promtool's own check (prometheus.sh).
PROMTOOL = next((p for p in (".tools/bin/promtool", shutil.which("promtool")) if p and os.access(p, os.X_OK)), None)
board_exprs = [(w, e) for w, e in exprs if not w.startswith(ALERTS)]
if PROMTOOL is None:
    print("[dashboards] note: no promtool (ops/tools.sh installs it); expressions not parsed", file=sys.stderr)
else:
    values = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "namespace": ".*"}
    records = []
    for i, (where, expr) in enumerate(board_exprs):
        parsed = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), expr)
        records.append({"record": f"dashboard:expr_{i}", "expr": parsed})
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
        yaml.safe_dump({"groups": [{"name": "dashboards", "rules": records}]}, handle)
    check = subprocess.run([PROMTOOL, "check", "rules", handle.name], capture_output=True, text=True)
    os.unlink(handle.name)
    if check.returncode != 0:
        fail(f"promtool cannot parse a dashboard expression: {check.stdout.strip()} {check.stderr.strip()}")
    else:
        print(f"[dashboards] promtool parsed {len(records)} dashboard expressions", file=sys.stderr)

used: dict[str, set[str]] = {}
for where, expr in exprs:
    names = metric_names(expr)
    if not names:
        fail(f"{where}: no metric in {expr!r}")
    for name in names:
        used.setdefault(name, set()).add(where)

# --- 3. the services' live /metrics ---------------------------------------------------------------
def get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            return get(url)
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s ({last})")


def exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind in ("histogram", "gaugehistogram"):
                names.update({name + "_bucket", name + "_sum", name + "_count"})
            elif kind == "summary":
                names.update({name + "_sum", name + "_count"})
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names


services = [("api", "imgpipe-api"), ("status", "imgpipe-status"), ("worker", "imgpipe-worker")]
if Path("services/reconciler/pyproject.toml").exists():
    services.append(("reconciler", "imgpipe-reconciler"))

namespace = f"imgpipe-lint-{uuid.uuid4().hex[:10]}"
logdir = Path(".dev/lint-dashboards")
logdir.mkdir(parents=True, exist_ok=True)
procs: list[subprocess.Popen] = []
live: set[str] = set()
per_service: dict[str, int] = {}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# The tests' helpers (tests/stack.py), so the lint starts and cleans up exactly as the suite does.
sys.path.insert(0, os.getcwd())
from tests.stack import drop_namespace, free_port, service_env, start_moto  # noqa: E402

moto, moto_url = start_moto()
try:
    import boto3

    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="imgpipe-lint")
    env = {
        **os.environ,
        **service_env(namespace, moto_url, bucket="imgpipe-lint", IMGPIPE_RETRY_DELAYS_S="[1, 2]",
                      IMGPIPE_WORKER_CONCURRENCY="1", IMGPIPE_LOG_LEVEL="WARNING"),
    }
    started = []
    for name, command in services:
        binary = Path(".venv/bin") / command
        if not binary.exists():
            fail(f"{binary} is missing: run 'make install'")
            continue
        port = free_port()
        log = open(logdir / f"{name}.log", "w")
        proc = subprocess.Popen([str(binary), "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        started.append((name, port, proc))
    for name, port, proc in started:
        try:
            text = wait(f"http://127.0.0.1:{port}/metrics", proc)
        except Exception as exc:
            fail(f"{name}: no /metrics ({exc}); see {logdir / (name + '.log')}")
            continue
        names = exported(text)
        per_service[name] = len([n for n in names if n.startswith("imgpipe_")])
        live |= names
finally:
    for proc in procs:
        stop(proc)
    stop(moto)
    try:
        drop_namespace(namespace)
    except Exception as exc:
        print(f"[dashboards] warning: could not remove {namespace}'s queues and keys: {exc}", file=sys.stderr)

print("[dashboards] live /metrics: " + ", ".join(f"{k} ({v} imgpipe_* names)" for k, v in per_service.items()))

# --- 4. compare ----------------------------------------------------------------------------------
rabbit_live: set[str] = set()
try:
    rabbit_live = exported(get("http://127.0.0.1:15692/metrics/per-object", timeout=5))
except OSError:
    print("[dashboards] note: no RabbitMQ prometheus plugin on :15692; allow-list not re-checked live")
if rabbit_live:
    for name in sorted(RABBITMQ_ALLOWED - rabbit_live):
        fail(f"allow-listed {name} is not served by the local RabbitMQ's /metrics/per-object")

for name, wheres in sorted(used.items()):
    if name.startswith("rabbitmq_"):
        ok = name in RABBITMQ_ALLOWED
    elif name in PROMETHEUS_SYNTHETIC:
        ok = True
    else:
        # The services' own metrics, and the process collector's (the reconciler's start time).
        ok = name.startswith(("imgpipe_", "process_")) and name in live
    if not ok:
        fail(f"metric {name!r} is not exported (used in {'; '.join(sorted(wheres))})")

if problems:
    print(f"[dashboards] {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1)
print(f"[dashboards] OK: {len(DASHBOARDS)} dashboards, {len(exprs)} expressions (dashboards + alerts), "
      f"{len(used)} metric names, all exported: " + ", ".join(sorted(used)))
PY
