#!/usr/bin/env python3
"""Benchmark of images on block devices, against their floors, in one run.

(a) pull and unpack of a Debian 12 image (debootstrap minbase, plus 2,000 small
    files) from a loopback registry (Debian's docker-registry): podvisor
    (`image pull` + `image root`, the ext4 block root) vs `skopeo copy` to a
    local dir vs `podman pull` (into a scratch storage root);
(b) `sandbox run -- true` with the image as a block root (--image) vs the same
    tree over 9p (--rootfs);
(c) a file-heavy command, block vs 9p: `find / -xdev | wc -l` and reading
    2,000 small files;
(d) disk used by 10 sandboxes of the image alive at once: the shared root plus
    each one's writable layer (qcow2), vs 10 copies of the tree.
Medians (and p95 where there are enough runs) are printed with the accelerator
and machine. --quick runs each once, on a busybox image (no debootstrap).
"""
import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "target", "release")
PODVISOR = os.path.join(OUT, "podvisor")
CACHE = os.path.join(os.environ.get("PODVISOR_CACHE", os.path.expanduser("~/.cache/podvisor")), "bench")


def machine():
    model = "unknown cpu"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cpus ({model}), Linux {platform.release()}"


def run(cmd, **kw):
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kw)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {out.stderr.decode()[-2000:]}")
    return out.stdout.decode()


def timed(cmd, **kw):
    t = time.monotonic()
    out = run(cmd, **kw)
    return time.monotonic() - t, out


def need(tool, package):
    if shutil.which(tool) is None:
        sys.exit(f"{tool} is missing: install Debian's {package} (scripts/install-deps.sh)")


def debian_tree(quick):
    """A root tree: Debian 12 minbase (cached) or, with quick, busybox."""
    if quick:
        tree = tempfile.mkdtemp(prefix="pv-bench-bb-")
        os.makedirs(os.path.join(tree, "bin"))
        shutil.copy("/bin/busybox", os.path.join(tree, "bin", "busybox"))
        for applet in run(["/bin/busybox", "--list"]).split():
            if applet != "busybox":
                os.symlink("busybox", os.path.join(tree, "bin", applet))
        for d in ["etc", "tmp", "proc", "sys", "dev", "root"]:
            os.makedirs(os.path.join(tree, d), exist_ok=True)
        return tree, "busybox"
    need("debootstrap", "debootstrap")
    tree = os.path.join(CACHE, "debian-12-minbase")
    if not os.path.exists(os.path.join(tree, ".complete")):
        shutil.rmtree(tree, ignore_errors=True)
        os.makedirs(CACHE, exist_ok=True)
        print("debootstrap --variant=minbase bookworm (once, cached in ~/.cache/podvisor/bench)", file=sys.stderr)
        run(["debootstrap", "--variant=minbase", "bookworm", tree, "http://deb.debian.org/debian"])
        open(os.path.join(tree, ".complete"), "w").close()
    return tree, "debian 12"


def add_small_files(tree):
    files = os.path.join(tree, "bench-files")
    os.makedirs(files, exist_ok=True)
    for i in range(2000):
        with open(os.path.join(files, f"f{i:04}"), "wb") as f:
            f.write(os.urandom(512))


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def oci_layout(tree, dest):
    """An OCI layout of `tree` as one gzip layer, tagged 1."""
    os.makedirs(os.path.join(dest, "blobs", "sha256"))
    with open(os.path.join(dest, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    tar = subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", tree, "--exclude=./.complete", "-cf", "-", "."],
                         stdout=subprocess.PIPE, check=True).stdout
    layer = gzip.compress(tar, compresslevel=6, mtime=0)

    def blob(b):
        d = sha(b)
        with open(os.path.join(dest, "blobs", "sha256", d[7:]), "wb") as f:
            f.write(b)
        return {"digest": d, "size": len(b)}

    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(layer)}],
    }).encode()
    m = blob(manifest)
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
                                                 "annotations": {"org.opencontainers.image.ref.name": "1"}}]}
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump(index, f)
    return len(layer)


def start_registry(tmp):
    need("docker-registry", "docker-registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = os.path.join(tmp, "registry.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {tmp}/registry\nhttp:\n  addr: 127.0.0.1:{port}\n")
    child = subprocess.Popen(["docker-registry", "serve", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return child, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    sys.exit("docker-registry did not start")


def stats(xs):
    xs = sorted(xs)
    med = statistics.median(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return med, p95


def fmt(name, xs, unit="s"):
    med, p95 = stats(xs)
    tail = f", p95 {p95:.3f} {unit}" if len(xs) >= 5 else ""
    return f"{name:<44} median {med:.3f} {unit}{tail} (n={len(xs)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one run each, busybox image")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    for tool, pkg in [("skopeo", "skopeo"), ("podman", "podman"), ("mkfs.ext4", "e2fsprogs"), ("qemu-img", "qemu-utils")]:
        need(tool, pkg)
    if not os.access(PODVISOR, os.X_OK):
        sys.exit(f"{PODVISOR} is missing: run `make build`")
    tmp = tempfile.mkdtemp(prefix="pv-bench-image-")
    registry = None
    try:
        base, what = debian_tree(args.quick)
        tree = os.path.join(tmp, "tree")
        run(["cp", "-a", base, tree])
        add_small_files(tree)
        layer = oci_layout(tree, os.path.join(tmp, "layout"))
        registry, host = start_registry(tmp)
        ref = f"{host}/bench:1"
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{tmp}/layout:1", f"docker://{ref}"])
        print(f"image: {what} + 2,000 small files, one gzip layer of {layer >> 20} MiB; {machine()}")

        pv, sk, pm = [], [], []
        state = os.path.join(tmp, "state")
        for i in range(runs):
            store = os.path.join(tmp, f"store-{i}")
            t = time.monotonic()
            run([PODVISOR, "--root", state, "image", "--image-root", store, "pull", "--quiet", "--tls-verify=false", ref])
            root = run([PODVISOR, "--root", state, "image", "--image-root", store, "root", ref]).strip()
            pv.append(time.monotonic() - t)
            if i < runs - 1:
                shutil.rmtree(store)
            d = os.path.join(tmp, f"skopeo-{i}")
            sk.append(timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"dir:{d}"])[0])
            shutil.rmtree(d)
            proot = os.path.join(tmp, f"podman-{i}")
            pm.append(timed(["podman", "--root", proot, "--runroot", proot + "-run", "--storage-driver", "vfs",
                             "pull", "-q", "--tls-verify=false", ref])[0])
            subprocess.run(["podman", "--root", proot, "--runroot", proot + "-run", "--storage-driver", "vfs",
                            "system", "reset", "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(proot, ignore_errors=True)
            shutil.rmtree(proot + "-run", ignore_errors=True)
        print("(a) pull and unpack")
        print("  " + fmt("podvisor image pull + image root (ext4)", pv))
        print("  " + fmt("floor: skopeo copy to dir (no unpack)", sk))
        print("  " + fmt("podman pull (vfs storage, unpacked)", pm))
        print(f"  podvisor / podman: {stats(pv)[0] / stats(pm)[0]:.2f} (target <= 1)")

        store = os.path.join(tmp, f"store-{runs - 1}")
        block = [PODVISOR, "--root", state, "sandbox", "run", "--image-root", store, "--image", ref, "--"]
        nine = [PODVISOR, "--root", state, "sandbox", "run", "--rootfs", tree, "--"]
        heavy = {"find / -xdev | wc -l": "find / -xdev | wc -l",
                 "read 2,000 small files": "cat /bench-files/* | wc -c"}
        tb, t9 = [], []
        hb = {k: [] for k in heavy}
        h9 = {k: [] for k in heavy}
        for _ in range(runs):
            tb.append(timed(block + ["true"])[0])
            t9.append(timed(nine + ["true"])[0])
            for name, script in heavy.items():
                # Time inside the guest: the VM's boot is (b)'s business.
                # (/proc/uptime: 10 ms steps, so the work is done 5 times.)
                cmd = (f"read s x < /proc/uptime; for i in 1 2 3 4 5; do {script} >/dev/null; done; "
                       "read e x < /proc/uptime; echo $s $e")
                for cmdline, into in [(block, hb[name]), (nine, h9[name])]:
                    s0, e0 = map(float, run(cmdline + ["sh", "-c", cmd]).split())
                    into.append((e0 - s0) / 5)
        probe = subprocess.run(nine[:-1] + ["--timings", "--", "true"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        accel = json.loads(probe.stderr.decode().strip().splitlines()[-1])["accel"]
        print(f"(b) sandbox run -- true ({accel})")
        print("  " + fmt("block root (--image)", tb))
        print("  " + fmt("9p (--rootfs)", t9))
        print(f"  block / 9p: {stats(tb)[0] / stats(t9)[0]:.2f} (target <= 1)")
        print("(c) file-heavy, timed in the guest")
        for name in heavy:
            print("  " + fmt(f"{name}: block", hb[name]))
            print("  " + fmt(f"{name}: 9p", h9[name]))
            print(f"  9p / block: {stats(h9[name])[0] / stats(hb[name])[0]:.1f}x (target >= 3)")

        n = 3 if args.quick else 10
        procs = []
        for i in range(n):
            p = subprocess.Popen(block + ["sh", "-c", "dd if=/dev/zero of=/w bs=1M count=1 2>/dev/null; sync; echo ready; read x"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            procs.append(p)
        for p in procs:
            if p.stdout.readline() != b"ready\n":
                sys.exit("a sandbox did not get ready")
        layers = 0
        for sb in os.listdir(os.path.join(state, "sandboxes")):
            f = os.path.join(state, "sandboxes", sb, "layer.qcow2")
            if os.path.exists(f):
                layers += os.stat(f).st_blocks * 512
        shared = os.stat(root).st_blocks * 512
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.close()
            p.wait()
        tree_bytes = int(run(["du", "-sb", tree]).split()[0])
        print(f"(d) disk of {n} sandboxes alive, each having written 1 MiB")
        print(f"  shared root {shared >> 20} MiB + writable layers {layers >> 20} MiB = {(shared + layers) >> 20} MiB"
              f"; floor: {n} copies of the tree {n * tree_bytes >> 20} MiB")
    finally:
        if registry:
            registry.kill()
            registry.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
