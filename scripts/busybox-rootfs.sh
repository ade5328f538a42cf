#!/usr/bin/env bash
# Makes a container root filesystem from Debian's busybox-static: /bin/busybox,
# a link per applet, /etc/passwd and /etc/group. Usage: busybox-rootfs.sh DIR
set -euo pipefail
dir=$1
bb=/bin/busybox
[ -x "$bb" ] && file -L "$bb" 2>/dev/null | grep -q static || bb=$(dpkg -L busybox-static 2>/dev/null | grep -m1 '/bin/busybox$' || true)
[ -n "$bb" ] && [ -x "$bb" ] || { echo "busybox-rootfs.sh: busybox-static is not installed (apt-get install busybox-static)" >&2; exit 1; }
tmp=$(mktemp -d "$(dirname "$dir")/.rootfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,home/user,var/www}
chmod 755 "$tmp"; chmod 1777 "$tmp/tmp"
cp "$bb" "$tmp/bin/busybox"
for applet in $("$tmp/bin/busybox" --list-full); do
  [ -e "$tmp/$applet" ] || ln -s /bin/busybox "$tmp/$applet"
done
cat > "$tmp/etc/passwd" <<'PW'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PW
cat > "$tmp/etc/group" <<'GR'
root:x:0:
user:x:1000:
nogroup:x:65534:
GR
chown 1000:1000 "$tmp/home/user"
echo "<h1>hello from podvisor</h1>" > "$tmp/var/www/index.html"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
