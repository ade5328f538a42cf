#!/usr/bin/env bash
# Installs what podvisor needs on Debian 12 from Debian's own packages.
# Idempotent: installs only what is missing.
set -euo pipefail
pkgs=(qemu-system-x86 linux-source-6.1 build-essential bc flex bison libelf-dev cpio xz-utils
      protobuf-compiler busybox-static tmux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
