#!/usr/bin/env bash
# Static checks of infra/terraform (there is no terraform binary in CI):
#   1. every .tf file (and terraform.tfvars.example) parses as HCL2, and a few house rules hold:
#      variables have a description and a type, outputs a description, registry modules a
#      `version = "~> …"`, required_providers pinned versions, Terraform a required_version;
#      every var./local./module./resource reference points at something declared here, every
#      variable is used, and every key of terraform.tfvars.example is a declared variable;
#      every check skipped in .checkov.yaml has a justification comment above it.
#   2. checkov (offline: no module downloads, nothing fetched from Prisma Cloud) with
#      infra/terraform/.checkov.yaml.
# Tools come from .tools/venv (ops/tools.sh): checkov, and the `hcl2` module checkov itself parses
# Terraform with (PyPI bc-python-hcl2, a checkov dependency). Exits non-zero on any problem.
set -euo pipefail
cd "$(dirname "$0")/../.."

TF_DIR=infra/terraform
VENV=.tools/venv
PY="$VENV/bin/python"
CHECKOV="$VENV/bin/checkov"

if [ ! -x "$PY" ] || [ ! -x "$CHECKOV" ] || ! "$PY" -c 'import hcl2' 2>/dev/null; then
	echo "terraform lint: $VENV with checkov is missing; run ops/tools.sh first" >&2
	exit 2
fi

echo "== terraform: HCL2 parse and house rules ($TF_DIR)"
"$PY" - "$TF_DIR" <<'PY'
import pathlib
import re
import sys

import hcl2

root = pathlib.Path(sys.argv[1])
errors: list[str] = []


def first(value):
    """python-hcl2 wraps attribute values in one-element lists."""
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def strip_comments(text: str) -> str:
    """Drop #, // and /* */ comments, leaving string literals alone."""
    out, i, n = [], 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
        elif c == '"':
            in_str = True
            out.append(c)
            i += 1
        elif c == "#" or text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


files = sorted(root.glob("*.tf"))
if not files:
    errors.append(f"no .tf files in {root}")

parsed: dict[str, dict] = {}
for path in files:
    try:
        with path.open() as fh:
            parsed[path.name] = hcl2.load(fh)
    except Exception as exc:  # lark raises several exception types
        errors.append(f"{path}: not valid HCL2: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")

variables: dict[str, tuple[str, dict]] = {}
locals_: set[str] = set()
modules: set[str] = set()
resources: set[str] = set()
data_sources: set[str] = set()
providers_pinned = False
required_version = False

for name, doc in parsed.items():
    for block in doc.get("variable", []):
        for var, body in block.items():
            if var in variables:
                errors.append(f"{name}: variable {var!r} declared twice")
            variables[var] = (name, body)
            desc = first(body.get("description"))
            if not isinstance(desc, str) or not desc.strip():
                errors.append(f"{name}: variable {var!r} has no description")
            if "type" not in body:
                errors.append(f"{name}: variable {var!r} has no type")
    for block in doc.get("output", []):
        for out, body in block.items():
            desc = first(body.get("description"))
            if not isinstance(desc, str) or not desc.strip():
                errors.append(f"{name}: output {out!r} has no description")
    for block in doc.get("locals", []):
        locals_.update(k for k in block if not k.startswith("__"))
    for block in doc.get("module", []):
        for mod, body in block.items():
            modules.add(mod)
            source = first(body.get("source"))
            version = first(body.get("version"))
            local_source = isinstance(source, str) and source.startswith(("./", "../"))
            if not local_source and not (isinstance(version, str) and version.strip().startswith("~>")):
                errors.append(f"{name}: module {mod!r} ({source}) is not pinned with version = \"~> …\"")
    for block in doc.get("resource", []):
        for rtype, instances in block.items():
            for rname in instances:
                resources.add(f"{rtype}.{rname}")
    for block in doc.get("data", []):
        for dtype, instances in block.items():
            for dname in instances:
                data_sources.add(f"{dtype}.{dname}")
    for block in doc.get("terraform", []):
        if first(block.get("required_version")):
            required_version = True
        for providers in block.get("required_providers", []):
            for prov, spec in providers.items():
                if prov.startswith("__"):
                    continue
                spec = first(spec)
                version = spec.get("version") if isinstance(spec, dict) else None
                source = spec.get("source") if isinstance(spec, dict) else None
                if not source:
                    errors.append(f"{name}: provider {prov!r} has no source")
                if not (isinstance(version, str) and re.match(r"^\s*(~>|=|>=\s*\S+\s*,\s*<)", version)):
                    errors.append(f"{name}: provider {prov!r} version {version!r} is not pinned (use ~> X.Y)")
                else:
                    providers_pinned = True

if not required_version:
    errors.append("no terraform { required_version = … }")
if not providers_pinned:
    errors.append("no terraform { required_providers { … } } with pinned versions")

# References: a small stand-in for `terraform validate`.
used_vars: set[str] = set()
for path in files:
    text = strip_comments(path.read_text())
    for var in re.findall(r"\bvar\.([A-Za-z_][A-Za-z0-9_-]*)", text):
        used_vars.add(var)
        if var not in variables:
            errors.append(f"{path.name}: var.{var} is not declared")
    for loc in set(re.findall(r"\blocal\.([A-Za-z_][A-Za-z0-9_-]*)", text)):
        if loc not in locals_:
            errors.append(f"{path.name}: local.{loc} is not defined")
    for mod in set(re.findall(r"\bmodule\.([A-Za-z_][A-Za-z0-9_-]*)", text)):
        if mod not in modules:
            errors.append(f"{path.name}: module.{mod} is not declared")
    for ref in set(re.findall(r"(?<![\w.\"/:])((?:aws|random|helm)_[a-z0-9_]+\.[A-Za-z_][A-Za-z0-9_-]*)", text)):
        if ref not in resources:
            errors.append(f"{path.name}: resource {ref} is not declared")
    for ref in set(re.findall(r"\bdata\.([a-z0-9_]+\.[A-Za-z_][A-Za-z0-9_-]*)", text)):
        if ref not in data_sources:
            errors.append(f"{path.name}: data.{ref} is not declared")
for var, (name, _) in sorted(variables.items()):
    if var not in used_vars:
        errors.append(f"{name}: variable {var!r} is declared but never used")

# The example tfvars: valid HCL2, and only declared variables.
example = root / "terraform.tfvars.example"
if not example.exists():
    errors.append(f"{example} is missing")
else:
    try:
        with example.open() as fh:
            values = hcl2.load(fh)
        for key in values:
            if not key.startswith("__") and key not in variables:
                errors.append(f"{example.name}: {key!r} is not a declared variable")
    except Exception as exc:
        errors.append(f"{example}: not valid HCL2: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")

# Every skipped checkov check carries a justification comment right above it.
config = root / ".checkov.yaml"
if config.exists():
    lines = config.read_text().splitlines()
    in_skip = False
    for i, line in enumerate(lines):
        if re.match(r"^skip-check:\s*$", line):
            in_skip = True
            continue
        if in_skip and re.match(r"^\S", line):
            in_skip = False
        m = re.match(r"^\s*-\s*(CKV\S*)", line) if in_skip else None
        if m and not (i > 0 and lines[i - 1].strip().startswith("#")):
            errors.append(f".checkov.yaml: skipped {m.group(1)} has no justification comment above it")

summary = (
    f"{len(parsed)}/{len(files)} files parsed; {len(variables)} variables, {len(modules)} modules, "
    f"{len(resources)} resources, {len(data_sources)} data sources"
)
if errors:
    for e in errors:
        print(f"  ERROR {e}")
    print(f"  {summary}; {len(errors)} problem(s)")
    sys.exit(1)
print(f"  ok: {summary}")
PY

echo "== terraform: checkov (offline)"
# --skip-download: no Prisma Cloud look-ups (guidelines, severities); external modules are not
# downloaded (download-external-modules: false in the config), so only our own resources and the
# module calls themselves are checked.
set +e
"$CHECKOV" --config-file "$TF_DIR/.checkov.yaml" -d "$TF_DIR" 2>&1 | grep -v -e 'Failed to download module' -e '^$'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
	echo "terraform lint: checkov found problems (exit $status)" >&2
	exit "$status"
fi
echo "terraform lint: ok"
