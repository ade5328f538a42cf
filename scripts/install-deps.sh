#!/usr/bin/env bash
# Installs what podvisor needs on Debian 12 from Debian's own packages.
# Idempotent: installs only what is missing.
set -euo pipefail
# podman, docker.io, containerd, runc, conmon and the CNI plugins are the real
# clients the test suite drives; iproute2 (ip, tc) joins a container's
# network namespace to its VM. docker-registry, skopeo, openssl, apache2-utils
# (htpasswd) and zstd serve and feed the image tests' loopback registry;
# e2fsprogs (mkfs.ext4 -d) makes block roots of images, qemu-utils (qemu-img)
# their writable qcow2 layers; libcap2-bin (setcap) and python3 (tarfile)
# make the test layers a file capability and hostile entries; debootstrap
# the Debian image of bench/image.py and podvisord's base template;
# python3-venv the venv of E2B's SDK that podvisord's tests drive.
pkgs=(linux-source-6.1 build-essential bc flex bison libelf-dev cpio xz-utils
      protobuf-compiler busybox-static tmux iproute2
      podman conmon docker.io containerd runc containernetworking-plugins
      docker-registry skopeo openssl apache2-utils zstd
      e2fsprogs libcap2-bin python3 python3-venv debootstrap)
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
# QEMU from bookworm-backports (10.0): 7.2 in bookworm cannot map a template's
# memory file read-only (memory-backend-file readonly=on,rom=off needs 8.2), so
# a restored VM could write through to the template every clone shares.
bpo=/etc/apt/sources.list.d/bookworm-backports.list
if ! grep -qs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/*; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $sudo tee "$bpo" >/dev/null
  $sudo apt-get update -qq
fi
qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
if ! dpkg --compare-versions "${qemu_version:-0}" ge 1:10.0; then
  echo "installing: qemu-system-x86 qemu-utils (bookworm-backports)" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -t bookworm-backports \
    qemu-system-x86 qemu-utils >/dev/null
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Node.js for E2B's JS SDK (podvisord's tests): this machine has NodeSource's 20;
# where node is missing, Debian's is installed (scripts/e2b-node.sh then says
# whether its version is new enough for the SDK).
if ! command -v npm >/dev/null; then
  echo "installing: nodejs npm" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nodejs npm >/dev/null
fi
