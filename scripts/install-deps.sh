#!/usr/bin/env bash
# Installs what podvisor needs on Debian 12 from Debian's own packages.
# Idempotent: installs only what is missing.
set -euo pipefail
# podman, docker.io, containerd, runc, conmon and the CNI plugins are the real
# clients the test suite drives; iproute2 (ip, tc) joins a container's
# network namespace to its VM. docker-registry, skopeo, openssl, apache2-utils
# (htpasswd) and zstd serve and feed the image tests' loopback registry.
pkgs=(qemu-system-x86 linux-source-6.1 build-essential bc flex bison libelf-dev cpio xz-utils
      protobuf-compiler busybox-static tmux iproute2
      podman conmon docker.io containerd runc containernetworking-plugins
      docker-registry skopeo openssl apache2-utils zstd)
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
