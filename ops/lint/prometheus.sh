#!/usr/bin/env bash
# Prometheus: `promtool check config` on the compose Prometheus config (with the shared alert rules
# beside it, as they are mounted in the container), `promtool check rules` on the shared rules, and
# `promtool test rules` on their unit tests. Run from anywhere after ops/tools.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.tools/bin:$PATH"
command -v promtool >/dev/null || { echo "[prometheus] FAIL: no promtool; run ops/tools.sh" >&2; exit 1; }

RULES=deploy/helm/imgpipe/files/prometheus/alerts.yml
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# The container sees /etc/prometheus/prometheus.yml and /etc/prometheus/alerts.yml (see compose.yaml).
cp deploy/prometheus/prometheus.yml "$scratch/prometheus.yml"
cp "$RULES" "$scratch/alerts.yml"

echo "[prometheus] promtool check config deploy/prometheus/prometheus.yml"
promtool check config "$scratch/prometheus.yml"
echo "[prometheus] promtool check rules $RULES"
promtool check rules "$RULES"
echo "[prometheus] promtool test rules deploy/prometheus/alerts.test.yml"
promtool test rules deploy/prometheus/alerts.test.yml

# Every alert carries a severity, a `for:` and the annotations a person needs, and has a unit test.
"${PYTHON:-python3}" - "$RULES" deploy/prometheus/alerts.test.yml <<'PY'
import re, sys
rules_text, tests_text = open(sys.argv[1]).read(), open(sys.argv[2]).read()
alerts = re.findall(r"^\s*- alert: (\S+)", rules_text, re.M)
problems = []
blocks = re.split(r"^\s*- (?:alert|record): ", rules_text, flags=re.M)[1:]
for name, block in zip(alerts, blocks):
    for needed in ("for:", "severity:", "summary:", "description:", "runbook:"):
        if needed not in block:
            problems.append(f"{name}: no {needed}")
    if f"alertname: {name}" not in tests_text:
        problems.append(f"{name}: no promtool unit test")
for p in problems:
    print(f"[prometheus] FAIL {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"[prometheus] OK: {len(alerts)} alerts, each with for/severity/annotations and a unit test")
PY
