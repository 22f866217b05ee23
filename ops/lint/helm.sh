#!/usr/bin/env bash
# Static checks of the Helm chart deploy/helm/imgpipe (there is no cluster in CI):
#   1. the chart is staged in a temporary copy: every dependency of Chart.yaml that is not vendored
#      in charts/ gets an empty stand-in subchart (helm refuses to lint or render a chart whose
#      dependencies are missing, even when their `condition:` is false, and they cannot be fetched
#      here), and files/prometheus/alerts.yml and files/dashboards/*.json get stand-ins when
#      they do not exist yet, so their templates are still exercised;
#   2. for every value set deploy/helm/imgpipe/ci/*-values.yaml: `helm lint --strict`, then
#      `helm template` for each Kubernetes version in KUBE_VERSIONS, each twice: on a bare cluster
#      and on one serving the operators' APIs (`--api-versions` keda.sh/v1alpha1 and
#      monitoring.coreos.com/v1), so that both branches of every `auto` (the worker's autoscaler,
#      the ServiceMonitor, the PrometheusRule) are rendered and validated; then
#        - built-in kinds: `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas; a kind
#          it has no schema for is an error, not a warning),
#        - CRD kinds (KEDA ScaledObject/TriggerAuthentication, Prometheus Operator
#          ServiceMonitor/PrometheusRule): minimal JSON schemas of their required fields, below,
#        - house rules: restricted securityContext, probes, named ports, references between
#          objects (Services → pods, HPAs/ScaledObjects → Deployments, Ingress → Services, …),
#          the worker's grace period longer than its job timeout plus shutdown grace, the JWT key
#          source (JWKS settings and no generated secret, or HS* and the secret);
#        - the services' own settings classes (imgpipe.settings and each service's) load the
#          rendered ConfigMap + Secret as their environment, and every IMGPIPE_* key rendered is a
#          setting the code knows (needs the project's .venv, `make install`; skipped without it);
#      the PrometheusRule's groups also go through `promtool check rules` when promtool exists;
#   3. values.schema.json must reject bad values (negative replicas, a typo'd key, …), and the
#      chart must refuse inconsistent settings (fail/required in the templates).
# Tools come from .tools (ops/tools.sh): helm in .tools/bin, kubernetes-validate in .tools/venv.
# IMGPIPE_TOOLS_DIR overrides that directory; KUBE_VERSIONS the Kubernetes versions validated.
# Exits non-zero on any problem.
set -euo pipefail
cd "$(dirname "$0")/../.."

CHART=deploy/helm/imgpipe
TOOLS="${IMGPIPE_TOOLS_DIR:-$PWD/.tools}"
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.34.0}"
export PATH="$TOOLS/bin:$TOOLS/venv/bin:$PATH"
PY="$TOOLS/venv/bin/python"
HELM="$TOOLS/bin/helm"
KV="$TOOLS/venv/bin/kubernetes-validate"

for tool in "$HELM" "$KV" "$PY"; do
	if [ ! -x "$tool" ]; then
		echo "helm lint: $tool is missing; run ops/tools.sh first" >&2
		exit 2
	fi
done
PROMTOOL="$(command -v promtool || true)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILURES=()
fail() { FAILURES+=("$*"); printf '  FAIL %s\n' "$*"; }
ok() { printf '  ok   %s\n' "$*"; }

# --- 1. stage -------------------------------------------------------------------------------------
echo "== helm: staging $CHART ($("$HELM" version --short 2>/dev/null))"
cp -R "$CHART" "$WORK/imgpipe"
STAGED="$WORK/imgpipe"
"$PY" - "$STAGED" <<'PY'
import pathlib, sys
import yaml

chart = pathlib.Path(sys.argv[1])
meta = yaml.safe_load((chart / "Chart.yaml").read_text())
for dep in meta.get("dependencies") or []:
    name = dep["name"]
    vendored = list((chart / "charts").glob(f"{name}-*.tgz")) + [chart / "charts" / name]
    if any(p.exists() for p in vendored):
        print(f"  dependency {name}: vendored")
        continue
    stub = chart / "charts" / name
    stub.mkdir(parents=True)
    (stub / "Chart.yaml").write_text(
        f"apiVersion: v2\nname: {name}\nversion: 0.0.0-lint-stub\ndescription: empty stand-in for linting\n"
    )
    print(f"  dependency {name}: not vendored, empty stand-in (condition {dep.get('condition')})")

alerts = chart / "files/prometheus/alerts.yml"
if not alerts.exists():
    alerts.parent.mkdir(parents=True, exist_ok=True)
    alerts.write_text(
        "groups:\n  - name: lint-stand-in\n    rules:\n      - alert: LintStandIn\n"
        "        expr: vector(1) > 2\n        for: 5m\n        labels:\n          severity: info\n"
        "        annotations:\n          summary: \"stand-in on {{ $labels.namespace }}\"\n"
    )
    print("  files/prometheus/alerts.yml: absent, stand-in used")
else:
    print("  files/prometheus/alerts.yml: present")
dashboards = sorted((chart / "files/dashboards").glob("*.json"))
if not dashboards:
    (chart / "files/dashboards").mkdir(parents=True, exist_ok=True)
    (chart / "files/dashboards/lint-stand-in.json").write_text('{"title": "stand-in", "panels": []}\n')
    print("  files/dashboards/*.json: absent, stand-in used")
else:
    print(f"  files/dashboards/*.json: {len(dashboards)} present")
PY

# Every value documented: each key of values.yaml has a `# --` comment (helm-docs style) on itself
# or on an enclosing key, and every documented key appears in the chart README's values table.
echo "== helm: values.yaml documentation"
if "$PY" - "$CHART/values.yaml" "$CHART/README.md" <<'PY'
import re
import sys

import yaml

values_file, readme_file = sys.argv[1:3]
lines = open(values_file).read().splitlines()
readme = open(readme_file).read()
documented, stack, pending, errors = set(), [], False, []
for line in lines:
    if re.match(r"^\s*# -- ", line):
        pending = True
        continue
    m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
    if not m or line.lstrip().startswith("-"):
        continue
    indent = len(m.group(1))
    while stack and stack[-1][0] >= indent:
        stack.pop()
    stack.append((indent, m.group(2)))
    if pending:
        documented.add(".".join(k for _, k in stack))
        pending = False


def leaves(node, path=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    else:
        yield ".".join(path)


for leaf in leaves(yaml.safe_load(open(values_file))):
    parts = leaf.split(".")
    if not any(".".join(parts[:n]) in documented for n in range(1, len(parts) + 1)):
        errors.append(f"{leaf}: no `# --` description")
for key in sorted(documented):
    if f"| `{key}` |" not in readme:
        errors.append(f"{key}: missing from the README values table")
for e in errors:
    print(f"  ERROR {e}")
print(f"  {len(documented)} documented keys")
sys.exit(1 if errors else 0)
PY
then ok "every value documented, README table complete"; else fail "values.yaml documentation / README values table"; fi

# The checker of rendered manifests: CRD schemas and house rules (built-in kinds are split out
# for kubernetes-validate).
cat >"$WORK/check.py" <<'PY'
"""check.py RENDERED VALUES_FILE OUT_BUILTIN OUT_RULES: CRD schemas and house rules."""
import ipaddress
import json
import re
import sys

import jsonschema
import yaml

rendered, values_file, out_builtin, out_rules = sys.argv[1:5]
values = yaml.safe_load(open(values_file)) or {}
existing_secret = (values.get("secrets") or {}).get("existingSecret") or ""
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
errors = []

BUILTIN = {"v1", "apps/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}


def crd(api, kind, spec):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name", "namespace"],
                "properties": {"name": NAME, "namespace": {"type": "string"}, "labels": STRMAP, "annotations": STRMAP},
            },
            "spec": spec,
        },
    }


SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): crd("keda.sh/v1alpha1", "ScaledObject", {
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "additionalProperties": False,
        "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                               "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                              "name": NAME, "envSourceContainerName": {"type": "string"}}},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "initialCooldownPeriod": {"type": "integer", "minimum": 0},
            "idleReplicaCount": {"type": "integer", "minimum": 0},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                         "properties": {"failureThreshold": {"type": "integer", "minimum": 1},
                                        "replicas": {"type": "integer", "minimum": 0}}},
            "advanced": {"type": "object", "additionalProperties": False, "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                  "properties": {"name": {"type": "string"},
                                                                 "behavior": {"type": "object"}}},
                "scalingModifiers": {"type": "object"}}},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                "properties": {
                    "type": {"type": "string"}, "name": {"type": "string"},
                    "useCachedMetrics": {"type": "boolean"},
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "metadata": STRMAP,
                    "authenticationRef": {"type": "object", "required": ["name"],
                                          "properties": {"name": NAME,
                                                         "kind": {"enum": ["TriggerAuthentication",
                                                                           "ClusterTriggerAuthentication"]}}},
                },
                "if": {"properties": {"type": {"const": "rabbitmq"}}},
                "then": {"properties": {"metadata": {
                    "required": ["queueName", "mode", "value"],
                    "properties": {"mode": {"enum": ["QueueLength", "MessageRate"]},
                                   "protocol": {"enum": ["amqp", "http", "auto"]},
                                   "value": {"pattern": "^[0-9]+(\\.[0-9]+)?$"}}}}},
            }},
        },
    }),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): crd("keda.sh/v1alpha1", "TriggerAuthentication", {
        "type": "object",
        "minProperties": 1,
        "properties": {
            "secretTargetRef": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                "properties": {"parameter": {"type": "string"}, "name": NAME, "key": {"type": "string"}}}},
        },
    }),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): crd("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "jobLabel": {"type": "string"},
            "namespaceSelector": {"type": "object", "properties": {"any": {"type": "boolean"},
                                                                   "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "selector": {"type": "object", "minProperties": 1, "properties": {
                "matchLabels": STRMAP, "matchExpressions": {"type": "array"}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                "properties": {"port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                               "path": {"type": "string", "pattern": "^/"}, "scheme": {"enum": ["http", "https"]},
                               "interval": DURATION, "scrapeTimeout": DURATION,
                               "honorLabels": {"type": "boolean"},
                               "relabelings": {"type": "array", "items": {"type": "object"}},
                               "metricRelabelings": {"type": "array", "items": {"type": "object"}}}}},
        },
    }),
    ("monitoring.coreos.com/v1", "PrometheusRule"): crd("monitoring.coreos.com/v1", "PrometheusRule", {
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"],
            "properties": {"name": {"type": "string", "minLength": 1}, "interval": DURATION,
                           "rules": {"type": "array", "minItems": 1, "items": {
                               "type": "object", "required": ["expr"], "additionalProperties": False,
                               "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                               "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                                              "expr": {"type": ["string", "integer"]}, "for": DURATION,
                                              "keep_firing_for": DURATION,
                                              "labels": STRMAP, "annotations": STRMAP}}}}}}},
    }),
}

builtin, seen = [], set()
for doc in docs:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    where = f"{kind}/{name}"
    if (kind, name) in seen:
        errors.append(f"{where}: rendered twice")
    seen.add((kind, name))
    labels = (doc.get("metadata") or {}).get("labels") or {}
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart"):
        if key not in labels:
            errors.append(f"{where}: label {key} missing")
    if api in BUILTIN:
        builtin.append(doc)
    elif (api, kind) in SCHEMAS:
        for err in jsonschema.Draft7Validator(SCHEMAS[(api, kind)]).iter_errors(doc):
            path = "/".join(str(p) for p in err.absolute_path)
            errors.append(f"{where}: {path}: {err.message[:300]}")
    else:
        errors.append(f"{where}: {api} is neither a built-in API validated here nor a known CRD")

by_kind = {}
for doc in docs:
    by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
deployments = by_kind.get("Deployment", {})
config = next(iter(by_kind.get("ConfigMap", {}).values()), {"data": {}})
config = next((c for n, c in by_kind.get("ConfigMap", {}).items() if n.endswith("-config")), config)


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


# Pods: restricted security, probes, port http, resources, /tmp, references.
for name, dep in deployments.items():
    where = f"Deployment/{name}"
    tmpl = dep["spec"]["template"]
    pod = tmpl["spec"]
    if not selects(dep["spec"]["selector"]["matchLabels"], tmpl["metadata"]["labels"]):
        errors.append(f"{where}: selector does not match the pod labels")
    if "checksum/config" not in (tmpl["metadata"].get("annotations") or {}):
        errors.append(f"{where}: no checksum/config annotation")
    psc = pod.get("securityContext") or {}
    if not psc.get("runAsNonRoot") or (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        errors.append(f"{where}: pod securityContext is not restricted")
    if pod.get("automountServiceAccountToken") is not False:
        errors.append(f"{where}: automountServiceAccountToken is not false")
    sa = pod.get("serviceAccountName")
    if sa not in by_kind.get("ServiceAccount", {}) and "irsa" not in values_file and sa != "default":
        errors.append(f"{where}: ServiceAccount {sa} is not rendered")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for c in pod["containers"]:
        cw = f"{where}/{c['name']}"
        sc = c.get("securityContext") or {}
        if not (sc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
                and "ALL" in ((sc.get("capabilities") or {}).get("drop") or [])):
            errors.append(f"{cw}: container securityContext is not restricted")
        if [p.get("name") for p in c.get("ports") or []] != ["http"]:
            errors.append(f"{cw}: expected exactly one port, named http")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            got = ((c.get(probe) or {}).get("httpGet") or {})
            if got.get("path") != path or got.get("port") != "http":
                errors.append(f"{cw}: {probe} is not GET {path} on http")
        if not ((c.get("resources") or {}).get("requests")):
            errors.append(f"{cw}: no resource requests")
        tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            errors.append(f"{cw}: /tmp is not an emptyDir")
        for src in c.get("envFrom") or []:
            if "configMapRef" in src and src["configMapRef"]["name"] not in by_kind.get("ConfigMap", {}):
                errors.append(f"{cw}: ConfigMap {src['configMapRef']['name']} is not rendered")
            if "secretRef" in src:
                sname = src["secretRef"]["name"]
                if sname not in by_kind.get("Secret", {}) and sname != existing_secret:
                    errors.append(f"{cw}: Secret {sname} is neither rendered nor secrets.existingSecret")
    if tmpl["metadata"]["labels"].get("app.kubernetes.io/component") == "worker":
        data = config.get("data") or {}
        need = int(data.get("IMGPIPE_JOB_TIMEOUT_S", 0)) + int(data.get("IMGPIPE_SHUTDOWN_GRACE_S", 0))
        if int(pod.get("terminationGracePeriodSeconds", 30)) <= need:
            errors.append(f"{where}: terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds')} <= {need}")

# Services select pods; PDBs select pods; scalers target Deployments; Ingress targets Services.
pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
for name, svc in by_kind.get("Service", {}).items():
    if not any(selects(svc["spec"]["selector"], labels) for labels in pod_labels):
        errors.append(f"Service/{name}: selects no pod")
for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
    if not any(selects(pdb["spec"]["selector"]["matchLabels"], labels) for labels in pod_labels):
        errors.append(f"PodDisruptionBudget/{name}: selects no pod")
# The worker's egress policy: the worker's pods alone, and every exception inside its block's
# family (Kubernetes refuses an IPv6 `except` under 0.0.0.0/0 only when the policy is applied).
for name, policy in by_kind.get("NetworkPolicy", {}).items():
    chosen = sorted(
        labels.get("app.kubernetes.io/component", "?")
        for labels in pod_labels
        if selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    )
    if chosen != ["worker"]:
        errors.append(f"NetworkPolicy/{name}: selects {chosen}, not the worker alone")
    for rule in policy["spec"].get("egress", []):
        for peer in rule.get("to", []):
            block = peer.get("ipBlock")
            if block is None:
                continue
            network = ipaddress.ip_network(block["cidr"])
            for text in block.get("except", []):
                hole = ipaddress.ip_network(text, strict=False)
                if hole.network_address != ipaddress.ip_address(text.split("/")[0]):
                    errors.append(f"NetworkPolicy/{name}: except {text} has host bits set ({hole})")
                # Kubernetes wants each exception strictly inside its block.
                elif hole.version != network.version or hole == network or not hole.subnet_of(network):
                    errors.append(f"NetworkPolicy/{name}: except {text} is not inside {network}")
scaled = {}
for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
    for name, obj in by_kind.get(kind, {}).items():
        target = obj["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            errors.append(f"{kind}/{name}: target Deployment {target} is not rendered")
        elif target in scaled:
            errors.append(f"{kind}/{name}: {target} is already scaled by {scaled[target]}")
        elif "replicas" in deployments[target]["spec"]:
            errors.append(f"{kind}/{name}: {target} also sets spec.replicas")
        scaled[target] = f"{kind}/{name}"
for name, so in by_kind.get("ScaledObject", {}).items():
    for trig in so["spec"]["triggers"]:
        ref = (trig.get("authenticationRef") or {}).get("name")
        if ref and ref not in by_kind.get("TriggerAuthentication", {}):
            errors.append(f"ScaledObject/{name}: TriggerAuthentication {ref} is not rendered")
        if trig["type"] == "rabbitmq":
            want = (config.get("data") or {}).get("IMGPIPE_NAMESPACE", "") + ".jobs"
            if trig["metadata"]["queueName"] != want and not ((values.get("worker") or {}).get("autoscaling") or {}).get("keda", {}).get("queueName"):
                errors.append(f"ScaledObject/{name}: queue {trig['metadata']['queueName']} is not {want}")
for name, ta in by_kind.get("TriggerAuthentication", {}).items():
    for ref in ta["spec"].get("secretTargetRef") or []:
        if ref["name"] not in by_kind.get("Secret", {}) and ref["name"] != existing_secret:
            errors.append(f"TriggerAuthentication/{name}: Secret {ref['name']} is neither rendered nor existingSecret")
services = by_kind.get("Service", {})
for name, ing in by_kind.get("Ingress", {}).items():
    routes = {}
    for rule in ing["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            backend = p["backend"]["service"]
            svc = services.get(backend["name"])
            if not svc:
                errors.append(f"Ingress/{name}: Service {backend['name']} is not rendered")
            elif backend["port"].get("name") not in [sp.get("name") for sp in svc["spec"]["ports"]]:
                errors.append(f"Ingress/{name}: Service {backend['name']} has no port {backend['port']}")
            routes[(p["path"], p["pathType"])] = backend["name"].rsplit("-", 1)[-1]
    want = {("/jobs", "Exact"): "api", ("/jobs", "Prefix"): "status", ("/uploads", "Exact"): "api",
            ("/admin", "Prefix"): "api", ("/openapi.json", "Exact"): "api", ("/docs", "Exact"): "api"}
    if routes != want:
        errors.append(f"Ingress/{name}: routes {routes} are not the gateway's {want}")

# JWT key source: a JWKS (its settings rendered, public-key algorithms, no generated secret) or the
# shared secret (HS* only, no JWKS settings, the secret in the rendered Secret).
data = config.get("data") or {}
secret_docs = [s for n, s in by_kind.get("Secret", {}).items() if n.endswith("-secret")]
jwks = ((values.get("config") or {}).get("jwt") or {}).get("jwksUrl")
algs = json.loads(data.get("IMGPIPE_JWT_ALGORITHMS", "[]"))
hmac = [a for a in algs if a.startswith("HS")]
jwks_keys = {k for k in data if k.startswith("IMGPIPE_JWT_JWKS_")}
if jwks:
    if data.get("IMGPIPE_JWT_JWKS_URL") != jwks or len(jwks_keys) != 4:
        errors.append(f"ConfigMap: JWKS mode but the JWKS settings rendered are {sorted(jwks_keys)}")
    if hmac or not algs:
        errors.append(f"ConfigMap: JWKS mode with algorithms {algs}")
    if not ((values.get("secrets") or {}).get("jwtSecret")):
        for sec in secret_docs:
            if "IMGPIPE_JWT_SECRET" in (sec.get("data") or {}):
                errors.append(f"Secret/{sec['metadata']['name']}: a JWT secret generated in JWKS mode")
else:
    if jwks_keys:
        errors.append(f"ConfigMap: JWKS settings {sorted(jwks_keys)} rendered without config.jwt.jwksUrl")
    if not algs or len(hmac) != len(algs):
        errors.append(f"ConfigMap: shared-secret mode with algorithms {algs}")
    for sec in secret_docs:
        if "IMGPIPE_JWT_SECRET" not in (sec.get("data") or {}):
            errors.append(f"Secret/{sec['metadata']['name']}: no IMGPIPE_JWT_SECRET in shared-secret mode")

# PrometheusRule groups, for promtool.
rules = [r["spec"] for r in by_kind.get("PrometheusRule", {}).values()]
with open(out_rules, "w") as fh:
    if rules:
        yaml.safe_dump({"groups": [g for spec in rules for g in spec["groups"]]}, fh)
with open(out_builtin, "w") as fh:
    yaml.safe_dump_all(builtin, fh)

kinds = sorted({f"{d['kind']}" for d in docs})
print(json.dumps({"documents": len(docs), "builtin": len(builtin), "crd": len(docs) - len(builtin),
                  "kinds": kinds}))
for e in errors:
    print(f"ERROR {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

# The rendered ConfigMap + Secret as the pods' environment (JSON), for the settings check below.
cat >"$WORK/env.py" <<'PY'
"""env.py RENDERED VALUES_FILE OUT_JSON: the environment envFrom gives the pods, and the keys exempt
from the known-setting check (config.extra: passed through verbatim)."""
import base64, json, sys
import yaml

rendered, values_file, out = sys.argv[1:4]
values = yaml.safe_load(open(values_file)) or {}
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
env = {}
for d in docs:
    name = d["metadata"]["name"]
    if d["kind"] == "ConfigMap" and name.endswith("-config"):
        env.update(d.get("data") or {})
    if d["kind"] == "Secret" and name.endswith("-secret"):
        env.update({k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()})
if (values.get("secrets") or {}).get("existingSecret"):
    # What an existing Secret must hold, with stand-in values.
    env.setdefault("IMGPIPE_AMQP_URL", "amqps://u:p@rabbitmq.example.internal:5671/")
    env.setdefault("IMGPIPE_REDIS_URL", "rediss://:p@redis.example.internal:6380/0")
    if not ((values.get("config") or {}).get("jwt") or {}).get("jwksUrl"):
        env.setdefault("IMGPIPE_JWT_SECRET", "x" * 64)
passthrough = sorted((values.get("config") or {}).get("extra") or {})
components = sorted({d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component", "")
                     for d in docs if d["kind"] == "Deployment"})
json.dump({"env": env, "passthrough": passthrough, "components": components}, open(out, "w"))
PY
# Run by the project's Python: each settings class loads that environment, and nothing else.
cat >"$WORK/settings.py" <<'PY'
"""settings.py ENV_JSON: load every settings class of the services with the rendered environment."""
import importlib, inspect, json, os, sys

from pydantic_settings import BaseSettings

spec = json.load(open(sys.argv[1]))
for key in [k for k in os.environ if k.startswith(("IMGPIPE_", "AWS_"))]:
    del os.environ[key]
os.environ.update(spec["env"])
from imgpipe.settings import ConfigError, load  # noqa: E402

MODULES = {"": "imgpipe.settings", "worker": "imgpipe_worker.settings",
           "reconciler": "imgpipe_reconciler.settings", "status": "imgpipe_status.app"}
errors, known, loaded = [], set(), []
for component, module in MODULES.items():
    mod = importlib.import_module(module)
    for name, cls in inspect.getmembers(mod, inspect.isclass):
        if not issubclass(cls, BaseSettings) or cls.__module__ != mod.__name__:
            continue
        prefix = (cls.model_config.get("env_prefix") or "").upper()
        for field, info in cls.model_fields.items():
            choices = getattr(info.validation_alias, "choices", None)
            known |= {str(c).upper() for c in choices} if choices else {prefix + field.upper()}
        if component and component not in spec["components"]:
            continue  # a disabled component's settings need not hold
        try:
            load(cls)
            loaded.append(name)
        except ConfigError as exc:
            errors.append(f"{module}.{name}: {exc}")
for key in sorted(spec["env"]):
    if key.startswith("IMGPIPE_") and key not in known and key not in spec["passthrough"]:
        errors.append(f"{key} is rendered but is no setting of the services")
for e in errors:
    print(f"ERROR {e}", file=sys.stderr)
print(f"{len(loaded)} settings classes loaded, {len(spec['env'])} variables")
sys.exit(1 if errors else 0)
PY
PROJECT_PY="$PWD/.venv/bin/python"
if [ -x "$PROJECT_PY" ] && "$PROJECT_PY" -c 'import imgpipe.settings' 2>/dev/null; then HAVE_PROJECT=1; else HAVE_PROJECT=""; fi

# --- 2. every CI value set ---------------------------------------------------------------------
SETS=("$STAGED"/ci/*-values.yaml)
[ -e "${SETS[0]}" ] || { echo "no $CHART/ci/*-values.yaml" >&2; exit 1; }
DOCS=0
for values in "${SETS[@]}"; do
	set_name="$(basename "$values" -values.yaml)"
	echo "== helm: value set $set_name"
	if out="$("$HELM" lint --strict "$STAGED" -f "$values" 2>&1)"; then
		ok "helm lint --strict"
	else
		fail "$set_name: helm lint --strict"; printf '%s\n' "$out" | sed 's/^/       /'
	fi
	for kube in $KUBE_VERSIONS; do
	for apis in bare operators; do
		# bare: no CRD APIs (auto = HPA for the worker, no monitors); operators: KEDA and the
		# Prometheus Operator installed (auto = ScaledObject, ServiceMonitor, PrometheusRule).
		api_args=()
		[ "$apis" = operators ] && api_args=(--api-versions keda.sh/v1alpha1 --api-versions monitoring.coreos.com/v1)
		rendered="$WORK/$set_name-$kube-$apis.yaml"
		if ! "$HELM" template imgpipe "$STAGED" -f "$values" --namespace imgpipe \
			--kube-version "$kube" "${api_args[@]}" >"$rendered" 2>"$WORK/err"; then
			fail "$set_name: helm template (kube $kube, $apis)"; sed 's/^/       /' "$WORK/err"; continue
		fi
		if summary="$("$PY" "$WORK/check.py" "$rendered" "$values" "$WORK/builtin.yaml" "$WORK/rules.yaml" 2>"$WORK/err")"; then
			ok "kube $kube, $apis: CRD schemas and house rules $summary"
		else
			fail "$set_name: CRD schemas / house rules (kube $kube, $apis)"; sed 's/^/       /' "$WORK/err"
		fi
		DOCS=$((DOCS + $(grep -c '^kind: ' "$rendered" || true)))
		if [ "$kube" = "${KUBE_VERSIONS%% *}" ] && [ "$apis" = bare ]; then
			if [ -z "$HAVE_PROJECT" ]; then
				echo "  skip the services' settings: no project .venv with imgpipe (make install)"
			elif "$PY" "$WORK/env.py" "$rendered" "$values" "$WORK/env.json" \
				&& out="$(env -i PATH="$PATH" HOME="$HOME" "$PROJECT_PY" "$WORK/settings.py" "$WORK/env.json" 2>&1)"; then
				ok "the services' settings accept the rendered environment ($out)"
			else
				fail "$set_name: the services' settings refuse the rendered environment"; printf '%s\n' "$out" | sed 's/^/       /'
			fi
		fi
		if kv="$("$KV" --strict --quiet -k "$kube" "$WORK/builtin.yaml" 2>&1)" && ! grep -q "find schema" <<<"$kv"; then
			ok "kube $kube, $apis: kubernetes-validate --strict"
		else
			fail "$set_name: kubernetes-validate --strict (kube $kube, $apis)"; printf '%s\n' "$kv" | sed 's/^/       /'
		fi
		if [ -s "$WORK/rules.yaml" ] && [ -n "$PROMTOOL" ]; then
			if out="$("$PROMTOOL" check rules "$WORK/rules.yaml" 2>&1)"; then
				ok "kube $kube, $apis: promtool check rules (PrometheusRule groups)"
			else
				fail "$set_name: promtool check rules ($apis)"; printf '%s\n' "$out" | sed 's/^/       /'
			fi
		fi
	done
	done
done

# --- 3. what must be refused ---------------------------------------------------------------------
echo "== helm: values and settings that must be refused"
BASE="$STAGED/ci/default-values.yaml"
NEGATIVE=0
refuse() { # refuse "expected error text" helm-args...
	local want="$1"; shift
	NEGATIVE=$((NEGATIVE + 1))
	if "$HELM" template imgpipe "$STAGED" -f "$BASE" "$@" >/dev/null 2>"$WORK/err"; then
		fail "accepted: $*"
	elif grep -qF -- "$want" "$WORK/err"; then
		ok "refused: $*"
	else
		fail "refused for another reason: $* (wanted \"$want\")"; sed 's/^/       /' "$WORK/err"
	fi
}
refuse "/worker/replicas" --set worker.replicas=-1
refuse "additional properties 'replicsa' not allowed" --set api.replicsa=2
refuse "additional properties 'bogus' not allowed" --set bogus=1
refuse "/worker/autoscaling/type" --set worker.autoscaling.type=custom
refuse "/config/env" --set config.env=prod
refuse "/api/image/pullPolicy" --set api.image.pullPolicy=Sometimes
refuse "/api/service/port" --set api.service.port=70000
refuse "/secrets/jwtSecret" --set secrets.jwtSecret=too-short
refuse "/metrics/serviceMonitor/enabled" --set metrics.serviceMonitor.enabled=maybe
refuse "/reconciler/cron" --set reconciler.cron=hourly
refuse "reconciler.graceSeconds (600) must be at least" --set reconciler.graceSeconds=600
refuse "reconciler.stuckProcessingSeconds (100) must be longer" --set reconciler.stuckProcessingSeconds=100
# Over one job's time limit, but not over its every attempt and back-off (5 x 120 + 1 + 5 + 30 + 120).
refuse "reconciler.stuckProcessingSeconds (700) must be longer than config.maxAttempts x worker.jobTimeoutSeconds plus the config.retryDelaysSeconds between them (756)" --set reconciler.stuckProcessingSeconds=700
refuse "additional properties 'config' not allowed" --set reconciler.config.IMGPIPE_RECONCILE_CRON=1
refuse "/api/livenessProbe/successThreshold" --set api.livenessProbe.successThreshold=2
refuse "/api/pdb/minAvailable" --set api.pdb.minAvailable=half
refuse "/config/jwt/algorithms/0" --set 'config.jwt.algorithms={none}'
refuse "/irsaRoleArn" --set irsaRoleArn=my-role
refuse "must be greater than worker.jobTimeoutSeconds" --set worker.terminationGracePeriodSeconds=150
refuse "/worker/networkPolicy/deniedEgressCIDRs/0" --set 'worker.networkPolicy.deniedEgressCIDRs={169.254.169.254}'
refuse "worker.renderTimeoutSeconds (120) must be shorter than worker.jobTimeoutSeconds (120)" --set worker.renderTimeoutSeconds=120
refuse "secrets.amqpUrl is required" --set secrets.amqpUrl=
refuse "secrets.redisUrl is required" --set secrets.redisUrl=
refuse "rabbitmq.auth.password is required" --set rabbitmq.enabled=true
refuse "minio.auth.rootPassword is required" --set minio.enabled=true
refuse "minReplicas (5) is above maxReplicas (2)" --set api.autoscaling.minReplicas=5 --set api.autoscaling.maxReplicas=2
refuse "ingress.enabled needs both" --set ingress.enabled=true --set status.enabled=false
# JWT key sources: never HS* with a JWKS, never RS/ES/PS without one, https outside local/test.
JWKS=https://auth.example.com/.well-known/jwks.json
ISSUER=https://auth.example.com/
refuse "config.jwt.issuer is required when config.jwt.jwksUrl is set and config.env=production" --set config.jwt.jwksUrl=$JWKS
refuse "/config/jwt/algorithms/0': value must be one of 'RS256'" --set config.jwt.jwksUrl=$JWKS --set config.jwt.issuer=$ISSUER --set 'config.jwt.algorithms={HS256}'
refuse "/config/jwt/algorithms/1': value must be one of 'RS256'" --set config.jwt.jwksUrl=$JWKS --set config.jwt.issuer=$ISSUER --set 'config.jwt.algorithms={RS256,HS512}'
refuse "/config/jwt/algorithms/0': value must be one of 'HS256'" --set 'config.jwt.algorithms={RS256}'
refuse "/config/jwt/algorithms/0': value must be one of 'HS256'" --set 'config.jwt.algorithms={ES256}'
refuse "RS256 needs config.jwt.jwksUrl" --set 'config.jwt.algorithms={RS256}' --skip-schema-validation
refuse "HS256 cannot be used with config.jwt.jwksUrl" --set config.jwt.jwksUrl=$JWKS --set config.jwt.issuer=$ISSUER --set 'config.jwt.algorithms={HS256}' --skip-schema-validation
refuse "/config/jwt/jwksUrl" --set config.jwt.jwksUrl=http://auth.example.com/jwks.json
refuse "/config/jwt/jwksUrl" --set config.jwt.jwksUrl=not-a-url --set config.env=test
refuse "/config/jwt/jwksTimeoutSeconds" --set config.jwt.jwksUrl=$JWKS --set config.jwt.issuer=$ISSUER --set config.jwt.jwksTimeoutSeconds=0
refuse "/config/jwt/jwksCacheSeconds" --set config.jwt.jwksCacheSeconds=0
refuse "/config/jwt/scopeClaim" --set 'config.jwt.scopeClaim=my scopes'
refuse "secrets.jwtSecret must be at least 64 bytes" --set 'config.jwt.algorithms={HS512}' --set secrets.jwtSecret=0123456789abcdef0123456789abcdef0123456789abcdef
# Rate limits and the decode budget: bounds as in the code.
refuse "must be shorter than config.jobRetentionDays (86400 s)" --set-json 'config.retryDelaysSeconds=[5,86400]' --set config.jobRetentionDays=1
refuse "/config/urlSources/allowedPorts" --set-json 'config.urlSources.allowedPorts=[0]'
refuse "/config/urlSources/allowedPorts" --set-json 'config.urlSources.allowedPorts=[443,443]'
refuse "/config/urlSources/allowedPorts" --set-json 'config.urlSources.allowedPorts=[]'
refuse "/config/urlSources/allowedPorts" --set-json 'config.urlSources.allowedPorts=["*",443]'
refuse "config.urlSources.allowedPorts: list ports" --set-json 'config.urlSources.allowedPorts=null'
refuse "/config/limits/rateJobsPerMinute" --set config.limits.rateJobsPerMinute=-1
refuse "/config/limits/rateUploadsPerHour" --set config.limits.rateUploadsPerHour=1.5
refuse "/config/limits/maxActiveJobs" --set config.limits.maxActiveJobs=2000000
refuse "/worker/maxDecodeBytes" --set worker.maxDecodeBytes=1048576

# What must be rendered (or not) for a few switches.
echo "== helm: switches"
kinds() { "$HELM" template imgpipe "$STAGED" -f "$BASE" "$@" 2>&1 | grep '^kind: ' | sort | uniq -c | tr -s ' ' | tr '\n' ';'; }
expect() { # expect "description" "grep -E pattern on kinds" present|absent helm-args...
	local what="$1" pattern="$2" mode="$3"; shift 3
	local got; got="$(kinds "$@")"
	if { [ "$mode" = present ] && grep -qE "$pattern" <<<"$got"; } || { [ "$mode" = absent ] && ! grep -qE "$pattern" <<<"$got"; }; then
		ok "$what"
	else
		fail "$what: got $got"
	fi
}
expect "no ServiceMonitor/PrometheusRule without the operator (auto)" "ServiceMonitor|PrometheusRule" absent
expect "ServiceMonitor with the operator's API (auto)" "1 kind: ServiceMonitor" present --api-versions monitoring.coreos.com/v1
expect "PrometheusRule with the operator's API (auto)" "1 kind: PrometheusRule" present --api-versions monitoring.coreos.com/v1
expect "no ServiceMonitor when disabled, even with the API" "ServiceMonitor" absent --api-versions monitoring.coreos.com/v1 --set metrics.serviceMonitor.enabled=false
# worker.autoscaling.type=auto (the default): KEDA where the cluster serves its API, an HPA elsewhere.
KEDA_API=(--api-versions keda.sh/v1alpha1)
expect "auto without KEDA: no ScaledObject/TriggerAuthentication" "ScaledObject|TriggerAuthentication" absent
expect "auto without KEDA: a worker HPA beside api's and status's" " 3 kind: HorizontalPodAutoscaler;" present
expect "auto with KEDA's API: ScaledObject" " 1 kind: ScaledObject;" present "${KEDA_API[@]}"
expect "auto with KEDA's API: TriggerAuthentication" " 1 kind: TriggerAuthentication;" present "${KEDA_API[@]}"
expect "auto with KEDA's API: HPAs for api and status only" " 2 kind: HorizontalPodAutoscaler;" present "${KEDA_API[@]}"
expect "keda forced without the API (helm template for GitOps): ScaledObject" " 1 kind: ScaledObject;" present --set worker.autoscaling.type=keda
expect "keda forced: HPAs for api and status only" " 2 kind: HorizontalPodAutoscaler;" present --set worker.autoscaling.type=keda
expect "hpa forced with KEDA's API: no ScaledObject" "ScaledObject|TriggerAuthentication" absent --set worker.autoscaling.type=hpa "${KEDA_API[@]}"
expect "worker HPA instead of KEDA" "3 kind: HorizontalPodAutoscaler" present --set worker.autoscaling.type=hpa
expect "no ScaledObject with worker HPA" "ScaledObject|TriggerAuthentication" absent --set worker.autoscaling.type=hpa
expect "fixed workers with type none: no ScaledObject" "ScaledObject|TriggerAuthentication" absent --set worker.autoscaling.type=none
expect "fixed workers with type none: no worker HPA" " 2 kind: HorizontalPodAutoscaler;" present --set worker.autoscaling.type=none
expect "no Secret with existingSecret" " kind: Secret;" absent --set secrets.existingSecret=creds
expect "no PDBs when disabled" "PodDisruptionBudget" absent --set api.pdb.enabled=false --set status.pdb.enabled=false --set worker.pdb.enabled=false
if "$HELM" template imgpipe "$STAGED" -f "$BASE" --set config.jwt.jwksUrl=$JWKS --set config.jwt.issuer=$ISSUER | grep -q 'IMGPIPE_JWT_SECRET:'; then
	fail "a JWT secret is generated with a JWKS"
else
	ok "no JWT secret generated with a JWKS"
fi
if "$HELM" template imgpipe "$STAGED" -f "$BASE" | grep -q 'IMGPIPE_JWT_SECRET:'; then
	ok "a JWT secret generated without a JWKS"
else
	fail "no JWT secret generated in HS mode"
fi
# URL source ports: the schemes' own unless listed; ["*"] is any port (the services' `*`).
ports() { "$HELM" template imgpipe "$STAGED" -f "$BASE" "$@" | sed -n 's/^ *IMGPIPE_URL_ALLOWED_PORTS: //p'; }
got="$(ports)"
if [ "$got" = '"80,443"' ]; then ok "URL ports 80 and 443 by default"; else fail "URL ports by default: $got"; fi
got="$(ports --set-json 'config.urlSources.allowedPorts=["*"]')"
if [ "$got" = '"*"' ]; then ok "any URL port with [\"*\"]"; else fail "URL ports with [\"*\"]: $got"; fi
# The reconciler's alerts only where a reconciler runs (they would fire for its absence otherwise).
for args in "" "--set reconciler.enabled=false" "--set reconciler.replicas=0"; do
	# shellcheck disable=SC2086 # $args is one or two words on purpose
	alerts="$("$HELM" template imgpipe "$STAGED" -f "$BASE" --api-versions monitoring.coreos.com/v1 $args 2>&1 | grep -c 'alert: ImgpipeReconciler' || true)"
	want=2; [ -n "$args" ] && want=0
	if [ "$alerts" = "$want" ]; then ok "reconciler alerts in the PrometheusRule: $want${args:+ with $args}"; else fail "reconciler alerts in the PrometheusRule${args:+ with $args}: $alerts, not $want"; fi
done
# Numbers from a values file arrive as float64, which prints 1000000 as "1e+06" (refused by an
# integer setting): the ConfigMap must spell every whole number in digits.
cat >"$WORK/big-numbers.yaml" <<'YAML'
config:
  limits: {maxFrames: 1000000, maxPixels: 250000000}
  extra: {IMGPIPE_CI_NUMBER: 2000000, IMGPIPE_CI_FRACTION: 0.5}
  sse: {maxStreams: 3000000}
YAML
cm="$("$HELM" template imgpipe "$STAGED" -f "$BASE" -f "$WORK/big-numbers.yaml" -s templates/configmap.yaml 2>&1 || true)"
if grep -q 'IMGPIPE_MAX_FRAMES: "1000000"' <<<"$cm" && grep -q 'IMGPIPE_CI_NUMBER: "2000000"' <<<"$cm" \
	&& grep -q 'IMGPIPE_SSE_MAX_STREAMS: "3000000"' <<<"$cm" && grep -q 'IMGPIPE_CI_FRACTION: "0.5"' <<<"$cm" \
	&& ! grep -qE ': "[0-9.]+e[+-]?[0-9]+"' <<<"$cm"; then
	ok "large numbers in the ConfigMap are spelled in digits"
else
	fail "large numbers in the ConfigMap: $(grep -E 'FRAMES|CI_|STREAMS|e\+' <<<"$cm" | tr -s ' ' | tr '\n' ';')"
fi
expect "Grafana dashboards ConfigMap(s)" " ([2-9]|[0-9]{2,}) kind: ConfigMap;" present --set metrics.grafanaDashboards.enabled=true

# --- summary -----------------------------------------------------------------------------------
echo
echo "helm summary: ${#SETS[@]} value sets × Kubernetes ${KUBE_VERSIONS// /, }; $DOCS documents validated;"
echo "              $NEGATIVE refusals checked; promtool: ${PROMTOOL:-not installed (skipped)}"
if [ "${#FAILURES[@]}" -gt 0 ]; then
	echo "helm lint: ${#FAILURES[@]} problem(s):"
	printf '  - %s\n' "${FAILURES[@]}"
	exit 1
fi
echo "helm lint: OK"
