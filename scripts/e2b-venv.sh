#!/usr/bin/env bash
# The clients podvisord's tests drive: E2B's Python SDK and schemathesis
# from PyPI, pinned,
# in a venv cached under $PODVISOR_CACHE (made once; a fresh one per pin).
set -euo pipefail
E2B_VERSION=2.63.0
# schemathesis: fuzzes podvisord's API from its /openapi.json.
SCHEMATHESIS_VERSION=4.32.5
cache=${PODVISOR_CACHE:-$HOME/.cache/podvisor}
venv=$cache/venv-e2b-$E2B_VERSION
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import e2b, schemathesis" 2>/dev/null; then
  exit 0
fi
echo "making $venv (pip install e2b==$E2B_VERSION schemathesis==$SCHEMATHESIS_VERSION)" >&2
rm -rf "$venv"
mkdir -p "$cache"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "e2b==$E2B_VERSION" "schemathesis==$SCHEMATHESIS_VERSION"
