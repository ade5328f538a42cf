#!/usr/bin/env bash
# Makes the guest initramfs: podvisor-agent as /init and the empty directories
# it mounts on. Usage: mkinitrd.sh AGENT_BINARY OUTPUT.cpio
set -euo pipefail
agent=$1 out=$2
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,run,tmp}
install -m 0755 "$agent" "$stage/init"
# Uncompressed: the kernel copies it instead of inflating it under emulation.
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
