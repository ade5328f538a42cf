#!/usr/bin/env bash
# Builds podvisor's guest kernel (an uncompressed vmlinux with a PVH entry) from
# Debian's linux-source-6.1, cached under $PODVISOR_CACHE by a hash of the inputs.
# Prints the path of the vmlinux on stdout. Progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${PODVISOR_CACHE:-$HOME/.cache/podvisor}
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "build.sh: $tarball missing (apt-get install linux-source-6.1)" >&2; exit 1; }
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
hash=$( { echo "$srcver"; cat "$here/podvisor.config" "$here/build.sh"; } | sha256sum | cut -c1-16)
out=$cache/kernel/$hash
if [ -f "$out/vmlinux" ]; then echo "$out/vmlinux"; exit 0; fi

work=$(mktemp -d "$cache/kernel-build.XXXXXX" 2>/dev/null || { mkdir -p "$cache"; mktemp -d "$cache/kernel-build.XXXXXX"; })
trap 'rm -rf "$work"' EXIT
echo "building guest kernel $hash from linux-source $srcver (~6 min on 2 cores)" >&2
tar -xf "$tarball" -C "$work"
src=$(echo "$work"/linux-source-6.1)
make -C "$src" -s KCONFIG_ALLCONFIG="$here/podvisor.config" allnoconfig >&2
# Fail loudly on any requested symbol that Kconfig dropped.
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) ;; *) continue ;; esac
  grep -qx "$line" "$src/.config" || { echo "kernel config: $line did not stick" >&2; missing=1; }
done < "$here/podvisor.config"
[ "$missing" = 0 ] || exit 1
make -C "$src" -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out.tmp"
cp "$src/vmlinux" "$out.tmp/vmlinux"
cp "$src/.config" "$out.tmp/config"
strip --strip-debug "$out.tmp/vmlinux" 2>/dev/null || true
rm -rf "$out"; mv "$out.tmp" "$out"
echo "$out/vmlinux"
