#!/usr/bin/env bash
# compose.yaml and the gateway, checked without a Docker engine:
#  1. compose.yaml against the Compose Specification JSON schema (the copy check-jsonschema ships
#     as its builtin `vendor.compose-spec`);
#  2. what `make up` relies on: images pinned, every long-running service with a healthcheck,
#     depends_on with conditions, the worker scalable (no host port, no container_name), every
#     mounted file and Dockerfile present, the services' env only variables the code knows,
#     internal vs public S3 endpoints, Redis with AOF persistence, Prometheus scraping every service;
#  3. deploy/nginx/default.conf: `nginx -t`, then the routing itself: nginx runs here with the
#     api/status upstreams pointed at two local stub servers, and every route, method and the
#     unbuffered SSE stream are exercised.
# Run from anywhere after ops/tools.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.tools/bin:$PATH"
PY="$PWD/.tools/venv/bin/python"
[ -x "$PY" ] || { echo "[compose] FAIL: run ops/tools.sh first" >&2; exit 1; }

echo "[compose] check-jsonschema --builtin-schema vendor.compose-spec compose.yaml"
check-jsonschema --builtin-schema vendor.compose-spec compose.yaml

"$PY" - <<'PY'
import glob, re, sys
from pathlib import Path
import yaml

compose = yaml.safe_load(Path("compose.yaml").read_text())
services = compose["services"]
problems = []
def fail(msg): problems.append(msg); print(f"[compose] FAIL {msg}", file=sys.stderr)

if "version" in compose:
    fail("obsolete top-level 'version'")
expected = {"api", "status", "worker", "reconciler", "gateway", "rabbitmq", "redis", "minio",
            "minio-init", "prometheus", "grafana"}
for missing in sorted(expected - services.keys()):
    fail(f"no service {missing}")
ONE_SHOT = {"minio-init"}
for name, svc in services.items():
    image = svc.get("image", "")
    if "build" in svc:
        dockerfile = Path(svc["build"].get("context", ".")) / svc["build"]["dockerfile"]
        if not dockerfile.exists():
            fail(f"{name}: {dockerfile} does not exist")
    elif not re.search(r":[^:/]+$", image) or image.endswith(":latest"):
        fail(f"{name}: image {image!r} is not pinned to a tag")
    if name not in ONE_SHOT and "healthcheck" not in svc:
        fail(f"{name}: no healthcheck")
    for dep, cond in (svc.get("depends_on") or {}).items():
        if dep not in services:
            fail(f"{name}: depends on unknown {dep}")
        if not isinstance(cond, dict) or cond.get("condition") not in ("service_healthy", "service_completed_successfully"):
            fail(f"{name}: depends_on {dep} without a health/completion condition")
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
        if src.startswith("./") and not Path(src).exists():
            fail(f"{name}: mounted {src} does not exist")
for app in ("api", "status", "worker", "reconciler"):
    deps = services.get(app, {}).get("depends_on", {})
    for need in ("rabbitmq", "redis", "minio-init"):
        if need not in deps:
            fail(f"{app}: does not wait for {need}")
worker = services.get("worker", {})
if worker.get("ports") or worker.get("container_name"):
    fail("worker: host ports or container_name prevent --scale")

# The services' environment: only variables the code reads (settings fields or .env.example).
known = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", Path(".env.example").read_text(), re.M))
for settings in glob.glob("pkg/src/imgpipe/settings.py") + glob.glob("services/*/src/*/settings.py"):
    known |= {"IMGPIPE_" + f.upper() for f in re.findall(r"^\s+([a-z][a-z0-9_]*)\s*:", Path(settings).read_text(), re.M)}
env = compose.get("x-imgpipe-env", {})
for app in ("api", "status", "worker", "reconciler"):
    for key in services.get(app, {}).get("environment", {}):
        if key not in known:
            fail(f"{app}: environment {key} is not a setting the code knows")
if env.get("IMGPIPE_S3_ENDPOINT_URL") != "http://minio:9000" or "localhost:9000" not in str(env.get("IMGPIPE_S3_PUBLIC_ENDPOINT_URL")):
    fail("S3: services must use http://minio:9000 and presigned URLs http://localhost:9000")
if "localhost" in str(env.get("IMGPIPE_AMQP_URL")) + str(env.get("IMGPIPE_REDIS_URL")):
    fail("services must reach RabbitMQ and Redis by their compose names")

# Redis keeps job records across a restart only with AOF persistence on a volume.
redis = services.get("redis", {})
cmd = " ".join(redis.get("command") or [])
if "--appendonly yes" not in cmd or not any(str(v).endswith(":/data") for v in redis.get("volumes", [])):
    fail("redis: must run with --appendonly yes and /data on a volume (no job loss across a restart)")

# Prometheus scrapes every service.
prom = yaml.safe_load(Path("deploy/prometheus/prometheus.yml").read_text())
text = yaml.safe_dump(prom["scrape_configs"])
for target in ("api:8000", "status:8001", "reconciler:8003", "rabbitmq:15692"):
    if target not in text:
        fail(f"prometheus does not scrape {target}")
if not any(sd.get("names") == ["worker"] for job in prom["scrape_configs"] for sd in job.get("dns_sd_configs", [])):
    fail("prometheus does not discover the scaled workers by DNS")
# The SSE location: nothing between status and the client may buffer the stream.
nginx_conf = Path("deploy/nginx/default.conf").read_text()
events = re.search(r"location ~ \^/jobs/\[\^/\]\+/events\$ \{(.*?)\n    \}", nginx_conf, re.S)
if not events:
    fail("gateway: no location for GET /jobs/{id}/events")
else:
    for directive in ("proxy_buffering off;", "proxy_cache off;", "proxy_read_timeout 1h;", "gzip off;"):
        if directive not in events.group(1):
            fail(f"gateway: the SSE location lacks '{directive}'")
    # Its error lines would quote the request line, ?access_token= included (checked live below).
    if not re.search(r"error_log \S+ (crit|alert|emerg);", events.group(1)):
        fail("gateway: the SSE location's error log is not at crit (its lines would carry the token)")
for directive in ("proxy_http_version 1.1;", 'proxy_set_header Connection "";'):
    if directive not in nginx_conf:
        fail(f"gateway: lacks '{directive}'")
if problems:
    sys.exit(1)
print(f"[compose] OK: {len(services)} services; healthchecks, depends_on conditions, pinned images, env, scrape targets")
PY

# --- the gateway -----------------------------------------------------------------------------------
command -v nginx >/dev/null || { echo "[compose] FAIL: no nginx; run ops/tools.sh" >&2; exit 1; }
scratch="$(mktemp -d)"
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	[ -f "$scratch/nginx.pid" ] && kill "$(cat "$scratch/nginx.pid")" 2>/dev/null || true
	rm -rf "$scratch"
}
trap cleanup EXIT
mkdir -p "$scratch/conf.d" "$scratch/tmp"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
write_main() {  # $1: the server config to include
	cat >"$scratch/nginx.conf" <<NGINX
pid $scratch/nginx.pid;
events { worker_connections 64; }
http {
    client_body_temp_path $scratch/tmp/body;
    proxy_temp_path $scratch/tmp/proxy;
    fastcgi_temp_path $scratch/tmp/fastcgi;
    uwsgi_temp_path $scratch/tmp/uwsgi;
    scgi_temp_path $scratch/tmp/scgi;
    include $1;
}
NGINX
}
cp deploy/nginx/default.conf "$scratch/conf.d/default.conf"
write_main "$scratch/conf.d/default.conf"
echo "[compose] nginx -t deploy/nginx/default.conf"
nginx -t -q -p "$scratch" -c "$scratch/nginx.conf" -e stderr

# Routing: the same file, upstreams swapped for local stubs and the listen port for a free one.
API_PORT="$(free_port)"; STATUS_PORT="$(free_port)"; GW_PORT="$(free_port)"
sed -e "s#http://api:8000#http://127.0.0.1:$API_PORT#" -e "s#http://status:8001#http://127.0.0.1:$STATUS_PORT#" \
	-e "s#listen 8080;#listen 127.0.0.1:$GW_PORT;#" -e "s#access_log /dev/stdout imgpipe;#access_log off;#" \
	deploy/nginx/default.conf >"$scratch/conf.d/routing.conf"
write_main "$scratch/conf.d/routing.conf"
cat >"$scratch/stub.py" <<'STUB'
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
NAME, PORT = sys.argv[1], int(sys.argv[2])
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length: self.rfile.read(length)
        if "/hangup" in self.path:  # no answer at all: nginx logs an error with the request line
            self.close_connection = True
            return
        if self.path.endswith("/events"):
            # An SSE stream: the first event now, the end 3 s later. Buffering would hold both.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk, pause in ((b"event: processing\ndata: {}\n\n", 3), (b"event: succeeded\ndata: {}\n\n", 0)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk)); self.wfile.flush(); time.sleep(pause)
            self.wfile.write(b"0\r\n\r\n"); self.wfile.flush()
            return
        body = f"{NAME} {self.command} {self.path} rid={self.headers.get('X-Request-ID', '')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
STUB
"$PY" "$scratch/stub.py" api "$API_PORT" & pids+=($!)
"$PY" "$scratch/stub.py" status "$STATUS_PORT" & pids+=($!)
nginx -p "$scratch" -c "$scratch/nginx.conf" -e "$scratch/error.log"
"$PY" - "$GW_PORT" "$API_PORT" "$STATUS_PORT" <<'PY'
import http.client, socket, sys, time
port = int(sys.argv[1])
# The gateway answers /gateway/healthz itself: also wait for both stubs (slow to start on a busy
# machine), or the first routes would see 502s.
for p in map(int, sys.argv[1:4]):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", p), timeout=1).close(); break
        except OSError:
            time.sleep(0.1)
def call(method, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=b"{}" if method == "POST" else None, headers=headers or {})
    r = c.getresponse()
    return r.status, r.read().decode()
cases = [
    ("POST", "/uploads", 200, "api"), ("POST", "/jobs", 200, "api"),
    ("POST", "/admin/reconcile", 200, "api"), ("GET", "/admin/reconcile/abc", 200, "api"),
    ("GET", "/admin/dead-letters", 200, "api GET /admin/dead-letters"),
    ("GET", "/admin/dead-letters?limit=5", 200, "api GET /admin/dead-letters?limit=5"),
    ("POST", "/admin/dead-letters/replay", 200, "api POST /admin/dead-letters/replay"),
    ("GET", "/openapi.json", 200, "api GET /openapi.json"), ("GET", "/docs", 200, "api GET /docs"),
    ("POST", "/docs", 405, "method_not_allowed"), ("DELETE", "/openapi.json", 405, "method_not_allowed"),
    ("GET", "/docs/", 404, "not_found"),
    ("GET", "/jobs/abc", 200, "status"), ("GET", "/gateway/healthz", 200, "gateway"),
    ("GET", "/jobs", 405, "method_not_allowed"), ("GET", "/uploads", 405, "method_not_allowed"),
    ("DELETE", "/jobs/abc", 405, "method_not_allowed"), ("POST", "/jobs/abc/events", 405, "method_not_allowed"),
    ("GET", "/metrics", 404, "not_found"), ("GET", "/", 404, "not_found"),
]
problems = []
for method, path, status, marker in cases:
    got, body = call(method, path)
    if got != status or marker not in body:
        problems.append(f"{method} {path}: expected {status} from {marker}, got {got} {body[:80]!r}")
got, body = call("POST", "/jobs", {"X-Request-ID": "lint-abc"})
if "rid=lint-abc" not in body:
    problems.append("X-Request-ID from the client is not passed on")
got, body = call("POST", "/jobs")
if "rid=" not in body or body.endswith("rid="):
    problems.append("the gateway does not add an X-Request-ID")
# SSE: the first event must arrive before the stream ends (3 s later): nothing buffered.
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
started = time.monotonic()
c.request("GET", "/jobs/abc/events")
r = c.getresponse()
first = r.read1(4096) if hasattr(r, "read1") else r.fp.readline()
elapsed = time.monotonic() - started
if r.status != 200 or b"processing" not in first or elapsed > 2:
    problems.append(f"SSE is buffered or misrouted: status {r.status}, first bytes after {elapsed:.1f}s: {first[:40]!r}")
rest = r.read()
if b"succeeded" not in first + rest:
    problems.append("SSE stream cut short")
# An upstream that hangs up: a 502 both times; nginx's error log quotes the request line of the
# second (a control: the log works) but not of the stream's, whose query carries a token.
for path in ("/jobs/hangup/events?access_token=lint-secret-token", "/jobs/hangup?visible=lint-control"):
    got, _ = call("GET", path)
    if got != 502:
        problems.append(f"GET {path}: expected 502 from an upstream that hangs up, got {got}")
for p in problems:
    print(f"[compose] FAIL gateway: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"[compose] OK: gateway routes {len(cases) + 2} cases, request ids, and an unbuffered SSE stream")
PY
sleep 0.2  # nginx writes its error lines as they happen; give the last a moment
grep -q "lint-control" "$scratch/error.log" || { echo "[compose] FAIL gateway: nginx logged no upstream error at all" >&2; exit 1; }
if grep -q "lint-secret-token" "$scratch/error.log"; then
	echo "[compose] FAIL gateway: nginx's error log holds an SSE stream's ?access_token=" >&2
	exit 1
fi
echo "[compose] OK: the SSE location's upstream errors leave its token out of nginx's error log"
