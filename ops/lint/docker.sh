#!/usr/bin/env bash
# Dockerfiles, checked without a Docker engine:
#  1. hadolint on every services/*/Dockerfile (no rules ignored), and checkov's Dockerfile checks.
#  2. Structure: multi-stage, pinned python:3.11-slim-bookworm, non-root USER 10001, HEALTHCHECK,
#     ENTRYPOINT imgpipe-<svc>, IMGPIPE_ENV=production by default in the final stage (so an image
#     run without it refuses the development JWT secret); libvips never from apt; jemalloc only in
#     the worker.
#  3. The build itself, minus Docker: the Dockerfile's own `uv sync` commands are run, in order, in a
#     scratch copy of the build context (the files .dockerignore lets through): first with only the
#     pyproject files and uv.lock (the dependency layer), then with the sources. The resulting venv
#     must run `imgpipe-<svc> --help`, hold no dev tools and no editable installs.
# Run from anywhere after ops/tools.sh. Set DOCKER_LINT_SKIP_SYNC=1 to skip step 3 (offline).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.tools/bin:$PATH"
export UV_PYTHON_DOWNLOADS=never
fail=0
err() { printf '[docker] FAIL %s\n' "$*" >&2; fail=1; }

mapfile -t dockerfiles < <(ls services/*/Dockerfile)
[ "${#dockerfiles[@]}" -ge 4 ] || err "expected a Dockerfile for api, status, worker, reconciler; found ${dockerfiles[*]}"

echo "[docker] hadolint ${dockerfiles[*]}"
hadolint --failure-threshold info "${dockerfiles[@]}" || err "hadolint"

echo "[docker] checkov --framework dockerfile (offline)"
checkov_args=()
for df in "${dockerfiles[@]}"; do checkov_args+=(-f "$df"); done
checkov_out="$(BC_SKIP_MAPPING=TRUE checkov --quiet --compact --skip-download --framework dockerfile \
	"${checkov_args[@]}" 2>/dev/null)" || err "checkov"
grep -E 'Passed checks|Failed checks|^Check:|FAILED' <<<"$checkov_out" || true

for df in "${dockerfiles[@]}"; do
	svc="$(basename "$(dirname "$df")")"
	froms="$(grep -c '^FROM ' "$df")"
	[ "$froms" -ge 2 ] || err "$df: not multi-stage"
	grep -Eq '^FROM python:3\.11-slim-bookworm(@sha256:[0-9a-f]{64})? AS builder$' "$df" || err "$df: builder is not python:3.11-slim-bookworm"
	[ "$(grep '^FROM ' "$df" | tail -1)" = "FROM python:3.11-slim-bookworm" ] || grep -Eq '^FROM python:3\.11-slim-bookworm@sha256:' "$df" || err "$df: final stage is not python:3.11-slim-bookworm"
	grep -Eq '^USER 10001(:10001)?$' "$df" || err "$df: no non-root USER 10001"
	grep -q '^HEALTHCHECK ' "$df" || err "$df: no HEALTHCHECK"
	grep -q '/healthz' "$df" || err "$df: HEALTHCHECK does not use /healthz"
	grep -Fq "ENTRYPOINT [\"imgpipe-$svc\"]" "$df" || err "$df: ENTRYPOINT is not imgpipe-$svc"
	grep -Eq 'uv sync --frozen .*--no-install-workspace' "$df" || err "$df: no cached dependency layer"
	# The final stage copies only the venv from the builder.
	final="$(awk '/^FROM /{n++} n>=2' "$df")"
	grep -Eq '^COPY --from=builder /app/.venv /app/.venv$' <<<"$final" || err "$df: final stage does not copy /app/.venv"
	if grep -Eq '^COPY (--chown=[^ ]+ )?[^-]' <<<"$final"; then err "$df: final stage copies files from the context"; fi
	grep -Eq '^ +IMGPIPE_ENV=production \\$' <<<"$final" || err "$df: final stage does not default IMGPIPE_ENV to production"
	if grep -Eiq 'apt-get install.*(libvips|build-essential|gcc|g\+\+|make)' "$df"; then err "$df: system libvips or build tools"; fi
	if [ "$svc" = worker ]; then
		grep -q 'libjemalloc2' "$df" && grep -q 'LD_PRELOAD=/usr/local/lib/libjemalloc.so.2' "$df" || err "$df: no jemalloc"
	else
		if grep -Eq 'apt-get|jemalloc|vips' "$df"; then err "$df: apt packages or libvips outside the worker"; fi
	fi
done

if [ "${DOCKER_LINT_SKIP_SYNC:-0}" != 1 ]; then
	scratch="$(mktemp -d)"
	trap 'rm -rf "$scratch"' EXIT
	for df in "${dockerfiles[@]}"; do
		svc="$(basename "$(dirname "$df")")"
		before="$fail"; fail=0
		ctx="$scratch/$svc/src"
		venv="$scratch/$svc/venv"
		mkdir -p "$ctx"
		mapfile -t syncs < <(grep -E '^\s*uv sync ' "$df" | sed -E 's/^\s+//')
		[ "${#syncs[@]}" -eq 2 ] || { err "$df: expected two uv sync commands, found ${#syncs[@]}"; continue; }
		# Layer 1: what the first COPY lines bring (pyproject files and the lock).
		cp pyproject.toml uv.lock "$ctx/"
		for member in pkg services/*; do
			[ -f "$member/pyproject.toml" ] && mkdir -p "$ctx/$member" && cp "$member/pyproject.toml" "$ctx/$member/"
		done
		echo "[docker] $svc: ${syncs[0]}"
		(cd "$ctx" && UV_PROJECT_ENVIRONMENT="$venv" UV_PYTHON=python3.11 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
			bash -c "${syncs[0]} --quiet") || { err "$df: dependency layer failed"; continue; }
		# Layer 2: the sources (what .dockerignore lets through: pkg/src and services/*/src).
		cp -r pkg/src "$ctx/pkg/"
		cp -r "services/$svc/src" "$ctx/services/$svc/"
		echo "[docker] $svc: ${syncs[1]}"
		(cd "$ctx" && UV_PROJECT_ENVIRONMENT="$venv" UV_PYTHON=python3.11 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
			bash -c "${syncs[1]} --quiet") || { err "$df: project layer failed"; continue; }
		rm -rf "$ctx"  # the venv must not need the sources any more
		"$venv/bin/imgpipe-$svc" --help >/dev/null || err "$df: imgpipe-$svc --help failed"
		site="$(echo "$venv"/lib/python3.11/site-packages)"
		for dev in pytest moto ruff; do [ ! -d "$site/$dev" ] || err "$df: dev package $dev in the image venv"; done
		if grep -rqs "$scratch" "$site"/*.pth; then err "$df: editable install in the image venv"; fi
		if [ "$svc" = worker ]; then
			# libvips from the wheel alone; under jemalloc too when this machine has it (Debian's
			# libjemalloc2, as in the image).
			preload=""
			for lib in /usr/lib/*-linux-gnu/libjemalloc.so.2; do [ -f "$lib" ] && preload="$lib"; done
			conf="$(sed -n 's/.*MALLOC_CONF=\([^ ]*\).*/\1/p' "$df")"
			[ -n "$conf" ] || err "$df: no MALLOC_CONF for the worker's jemalloc"
			LD_PRELOAD="$preload" MALLOC_CONF="$conf" \
				"$venv/bin/python" -c 'import pyvips; pyvips.Image.black(64, 64).write_to_buffer(".webp")' \
				|| err "$df: pyvips (pyvips-binary) does not work${preload:+ under $preload}"
		elif [ -d "$site/pyvips" ]; then
			err "$df: libvips in a non-worker image"
		fi
		[ "$fail" = 0 ] && echo "[docker] $svc: venv OK ($(ls "$site" | grep -c dist-info) distributions)"
		[ "$before" = 0 ] || fail=1
	done
fi

[ "$fail" = 0 ] && echo "[docker] OK: ${#dockerfiles[@]} Dockerfiles"
exit "$fail"
