#!/usr/bin/env bash
# E2B's JavaScript SDK from npm, pinned with its whole tree by
# tests/podvisord/js/package-lock.json, installed with `npm ci` into a
# directory cached under $PODVISOR_CACHE (one per lock file's hash).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
src=$here/tests/podvisord/js
cache=${PODVISOR_CACHE:-$HOME/.cache/podvisor}
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "e2b-node.sh: node and npm are missing (E2B's JS SDK needs Node.js >= 20.18.1)" >&2
  exit 1
fi
# The SDK's engines: >=20.18.1 <21 || >=22.
if ! node -e '
  const [a, b, c] = process.versions.node.split(".").map(Number);
  process.exit(a >= 22 || (a === 20 && (b > 18 || (b === 18 && c >= 1))) ? 0 : 1)'; then
  echo "e2b-node.sh: node $(node --version) is too old: E2B's JS SDK needs >= 20.18.1 (<21) or >= 22" >&2
  exit 1
fi
hash=$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -c1-16)
dir=$cache/node-e2b-$hash
if [ -f "$dir/node_modules/e2b/package.json" ]; then
  echo "$dir"
  exit 0
fi
echo "making $dir (npm ci of tests/podvisord/js)" >&2
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp"
cp "$src/package.json" "$src/package-lock.json" "$dir.tmp/"
(cd "$dir.tmp" && npm ci --no-audit --no-fund --loglevel=error >&2)
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "$dir"
