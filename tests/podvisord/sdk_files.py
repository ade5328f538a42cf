"""E2B's Python SDK against podvisord: files (write, read, list, exists,
get_info, rename, make_dir, remove, watch_dir), a 100 MiB upload and
download compared by checksum, a pty."""
import hashlib
import os
import sys
import time

from e2b import Sandbox, FileType
from e2b.exceptions import NotEnoughSpaceException


from common import check, tenant

tenant(os.path.basename(__file__))


big_mib = int(os.environ.get("BIG_MIB", "100"))
sbx = Sandbox.create()
f = sbx.files
info = f.write("/home/user/hello.txt", "hello files\n")
check(info.path == "/home/user/hello.txt", f"write answers the path {info.path}")
check(f.read("/home/user/hello.txt") == "hello files\n", "read back")
check(f.read("hello.txt") == "hello files\n", "relative path under the user's home")
r = sbx.commands.run("stat -c %U /home/user/hello.txt")
check(r.stdout == "user\n", f"written as the user ({r.stdout.strip()})")
check(f.exists("/home/user/hello.txt"), "exists")
check(not f.exists("/home/user/nope"), "not exists")
gi = f.get_info("/home/user/hello.txt")
check(gi.type == FileType.FILE and gi.size == 12, f"get_info {gi.type} {gi.size}")
check(f.make_dir("/home/user/d/e"), "make_dir")
check(not f.make_dir("/home/user/d/e"), "make_dir of an existing dir is False")
f.write("/home/user/d/e/x", b"x")
names = sorted(e.name for e in f.list("/home/user/d", depth=2))
check(names == ["e", "x"], f"list depth 2 {names}")
f.rename("/home/user/d/e/x", "/home/user/d/y")
check(f.exists("/home/user/d/y") and not f.exists("/home/user/d/e/x"), "rename")
f.remove("/home/user/d")
check(not f.exists("/home/user/d"), "remove a tree")
try:
    f.read("/root/secret")
    check(False, "user cannot read what root made private")
except Exception as e:
    check("ermission" in str(e) or "denied" in str(e).lower() or "not found" in str(e).lower(), f"user's permissions apply ({type(e).__name__})")

w = f.watch_dir("/home/user")
f.write("/home/user/watched.txt", "w")
time.sleep(1)
evs = w.get_new_events()
w.stop()
check(any(e.name == "watched.txt" for e in evs), f"watch_dir sees the write ({[(e.name, e.type) for e in evs]})")

# Big file: up and down, by checksum.
path = "/tmp/podvisord-big.bin"
h = hashlib.sha256()
with open(path, "wb") as out:
    block = os.urandom(1 << 20)
    for i in range(big_mib):
        chunk = bytes([i % 256]) + block[1:]
        h.update(chunk)
        out.write(chunk)
t0 = time.monotonic()
with open(path, "rb") as src:
    f.write("/home/user/big.bin", src)
up = time.monotonic() - t0
r = sbx.commands.run("sha256sum /home/user/big.bin | cut -d' ' -f1")
check(r.stdout.strip() == h.hexdigest(), f"{big_mib} MiB upload intact ({up:.1f}s)")
t0 = time.monotonic()
d = hashlib.sha256()
for chunk in f.read("/home/user/big.bin", format="stream"):
    d.update(chunk)
down = time.monotonic() - t0
check(d.hexdigest() == h.hexdigest(), f"{big_mib} MiB download intact ({down:.1f}s)")
os.remove(path)

out = []
t = sbx.pty.create(size=__import__("e2b").PtySize(rows=24, cols=80))
sbx.pty.send_stdin(t.pid, b"tty; echo pty-$((6*7)); exit\n")
t.wait(on_pty=lambda b: out.append(bytes(b)))
text = b"".join(out).decode(errors="replace")
check("pty-42" in text and "/dev/pts/" in text, f"pty ({text[-80:]!r})")
# A full disk: 507, which the SDK raises as NotEnoughSpaceException, and the
# partial file does not stay.
r = sbx.commands.run("mkdir -p /mnt/small && mount -t tmpfs -o size=256k tmpfs /mnt/small && echo mounted",
                     user="root")
check(r.stdout == "mounted\n", f"a 256 KiB tmpfs in the sandbox {r.stdout!r}")
try:
    sbx.files.write("/mnt/small/big.bin", os.urandom(1 << 20))
    check(False, "a 1 MiB write to a 256 KiB disk fails")
except NotEnoughSpaceException as e:
    print(f"ok: a full disk is 507, NotEnoughSpaceException ({e})")
check(not sbx.files.exists("/mnt/small/big.bin"), "the partial file is removed")
sbx.files.write("/mnt/small/fits.txt", "small")
check(sbx.files.read("/mnt/small/fits.txt") == "small", "a write that fits still works")

sbx.kill()
print("PASS")
