#!/usr/bin/env bash
# Print the path of the uv to use, installing uv from PyPI first when none is on PATH.
#
# It goes into a venv of its own (.tools/uv): a distribution's Python marks itself externally
# managed (PEP 668) and refuses `pip install` outside a venv. Without the venv module (Debian's
# python3-venv), pip itself is the last resort.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v uv >/dev/null 2>&1; then
	command -v uv
	exit 0
fi
own=.tools/uv/bin/uv
if [ ! -x "$own" ]; then
	if python3 -m venv .tools/uv >/dev/null 2>&1; then
		.tools/uv/bin/python -m pip install --quiet 'uv>=0.5' >&2
	else
		rm -rf .tools/uv
		python3 -m pip install --quiet 'uv>=0.5' >&2
		# pip's scripts directory may not be on PATH (e.g. ~/.local/bin): ask Python where uv went.
		python3 -c 'import uv; print(uv.find_uv_bin())'
		exit 0
	fi
fi
echo "$PWD/$own"
