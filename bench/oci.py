#!/usr/bin/env python3
"""Benchmark of podvisor as an OCI runtime, in one run, medians, accelerator printed:

(a) `podman run --rm IMAGE true` with podvisor as the runtime against runc (the
    floor), alternating, with podman's storage and configuration of its own;
(b) runc-CLI split: a bundle running `true`, driven by hand: `podvisor create`
    (holder up -> VM boot (QMP ready) -> agent ready -> container created, read
    from the holder's JSON log), `start` until `state` says stopped, the holder's
    exit (VM torn down), `delete`. Like conmon and the containerd shim, this script
    is a child subreaper and reaps the holders (some hosts' PID 1 reaps late).
"""
import argparse
import ctypes
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sandbox_run import OUT, PODVISOR, machine  # noqa: E402

IMAGE = "localhost/bench-busybox:latest"
CONF = """[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime_supports_json = ["podvisor", "runc"]
[engine.runtimes]
podvisor = ["{runtime}"]
"""
UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}


def run(cmd):
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.decode()}{out.stdout.decode()}")
    return out.stdout.decode()


def reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def accelerator():
    for line in run([PODVISOR, "check"]).splitlines():
        if line.startswith("accelerator:"):
            return line.split(":", 1)[1].strip()
    sys.exit("`podvisor check` printed no accelerator")


def podman_setup(tmp):
    # podman gives the runtime no --root, and its cleanup process (which deletes
    # --rm containers) gets no --runtime-flag: a wrapper gives every call our state root.
    wrapper = os.path.join(tmp, "podvisor")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {PODVISOR} --root {os.path.join(tmp, "pv")} "$@"\n')
    os.chmod(wrapper, 0o755)
    conf = os.path.join(tmp, "containers.conf")
    with open(conf, "w") as f:
        f.write(CONF.format(runtime=wrapper))
    os.environ["CONTAINERS_CONF"] = conf
    base = ["podman", "--root", os.path.join(tmp, "storage"), "--runroot", os.path.join(tmp, "run"),
            "--storage-driver", "vfs"]
    tar = os.path.join(tmp, "busybox.tar")
    run(["tar", "-C", os.path.join(OUT, "rootfs"), "-cf", tar, "."])
    run(base + ["import", tar, IMAGE])
    return base


def podman_once(base, runtime):
    t = time.monotonic()
    run(base + ["--runtime", runtime, "run", "--rm", IMAGE, "true"])
    dt = time.monotonic() - t
    reap()  # conmon, orphaned to us
    return dt


def make_bundle(tmp):
    bundle = os.path.join(tmp, "bundle")
    os.makedirs(bundle)
    run(["cp", "-a", os.path.join(OUT, "rootfs"), os.path.join(bundle, "rootfs")])
    run([PODVISOR, "spec", "--bundle", bundle])
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec = json.load(f)
    spec["process"].update(terminal=False, args=["true"])
    spec["root"]["readonly"] = False
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    with open(path, "w") as f:
        json.dump(spec, f)
    return bundle


def log_split(log):
    """(epoch of 'booting the container's VM', accel, vmm_ready ms, agent_ready ms, guest_ready ms)."""
    boot = accel = timings = None
    with open(log) as f:
        for line in f:
            rec = json.loads(line)
            msg = rec["fields"].get("message")
            if msg in ("starting the container's VM", "booting the container's VM"):
                boot = datetime.fromisoformat(rec["timestamp"]).timestamp()
                accel = rec["fields"]["accel"]
            elif msg == "agent ready":
                timings = {k: float(v) * UNITS.get(u, 1.0)
                           for k, v, u in re.findall(r"(\w+): ([\d.]+)(ns|µs|us|ms|s)?\b", rec["fields"]["timings"])}
    if boot is None or timings is None:
        sys.exit(f"the holder's log {log} lacks the boot or agent-ready line")
    return boot, accel, timings["vmm_ready"], timings["agent_ready"], timings.get("guest_ready_ms", 0)


def split_once(tmp, bundle, n):
    root, cid, log = os.path.join(tmp, "pv-cli"), f"bench-{n}", os.path.join(tmp, f"holder-{n}.log")
    pv = [PODVISOR, "--root", root]
    t0, m0 = time.time(), time.monotonic()
    # The holder `create` leaves behind keeps the stdio it was given (as
    # conmon expects): not a pipe we would wait on for EOF.
    cmd = pv + ["--log", log, "--log-format", "json", "--debug", "create", "--bundle", bundle, cid]
    with open(log + ".stdio", "w+") as stdio:
        if subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio).returncode != 0:
            stdio.seek(0)
            sys.exit(f"{' '.join(cmd)} failed: {stdio.read()}")
    created = time.monotonic() - m0
    holder_pid = json.loads(run(pv + ["state", cid]))["pid"]
    m1 = time.monotonic()
    run(pv + ["start", cid])
    while json.loads(run(pv + ["state", cid]))["status"] != "stopped":
        if time.monotonic() - m1 > 120:
            sys.exit(f"{cid} did not stop within 120 s")
        time.sleep(0.01)
    exited = time.monotonic() - m1
    try:
        os.waitpid(holder_pid, 0)
    except ChildProcessError:  # not a subreaper: PID 1 reaps it, `delete` waits for that
        pass
    gone = time.monotonic() - m1
    m2 = time.monotonic()
    run(pv + ["delete", cid])
    deleted = time.monotonic() - m2
    boot, accel, vmm, agent, guest = log_split(log)
    holder = (boot - t0) * 1000
    return {"accel": accel, "holder_up_ms": holder, "vmm_ready_ms": holder + vmm, "agent_ready_ms": holder + agent,
            "guest_agent_ready_ms": guest, "created_ms": created * 1000, "start_to_exit_ms": exited * 1000,
            "holder_gone_ms": gone * 1000, "delete_ms": deleted * 1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="one run, small sizes: checks the benchmark still works (CI)")
    args = ap.parse_args()
    if args.quick:
        args.runs = 1
    elif args.runs < 3:
        sys.exit("--runs must be at least 3 (medians)")
    for tool in ("podman", "runc", "conmon"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/libexec/podman"):
            sys.exit(f"{tool} missing: install it (Debian packages podman, runc; see scripts/install-deps.sh)")
    for f in ("podvisor", "vmlinux", "podvisor-initrd.cpio", "rootfs"):
        if not os.path.exists(os.path.join(OUT, f)):
            sys.exit(f"{OUT}/{f} missing: run `make build` first")
    accel = accelerator()
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        print("warning: not a child subreaper: holders are reaped by PID 1", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="podvisor-bench-oci-")
    base = None
    med = statistics.median
    try:
        base = podman_setup(tmp)
        bundle = make_bundle(tmp)
        podman_once(base, "podvisor")  # warm-up: image, network, page cache
        podman_once(base, "runc")
        pv, rc, splits = [], [], []
        for n in range(args.runs):
            pv.append(podman_once(base, "podvisor"))
            rc.append(podman_once(base, "runc"))
            splits.append(split_once(tmp, bundle, n))
        if splits[0]["accel"] != accel:
            print(f"warning: `podvisor check` says {accel}, the holder used {splits[0]['accel']}", file=sys.stderr)
        s = {k: med(x[k] for x in splits) for k in splits[0] if k != "accel"}

        A = accel.upper()
        print(f"OCI runtime benchmark — accel {A}, {args.runs} runs")
        print(f"machine: {machine()}")
        print(f"podman run --rm true: podvisor median {med(pv):.1f} s, runc median {med(rc):.1f} s, "
              f"ratio {med(pv) / med(rc):.1f}x ({A})")
        print(f"runc-CLI split (bundle running `true`, ms since `podvisor create` was called; {A}):")
        print(f"  holder booting the VM                 {s['holder_up_ms']:7.0f} ms")
        print(f"  VM boot (QMP ready)                   {s['vmm_ready_ms']:7.0f} ms")
        print(f"  agent ready (handshake)               {s['agent_ready_ms']:7.0f} ms"
              f"   (guest clock at agent start: {s['guest_agent_ready_ms']:.0f} ms)")
        print(f"  create returned (container created)   {s['created_ms']:7.0f} ms")
        print(f"  start -> state stopped                {s['start_to_exit_ms']:7.0f} ms   (after create)")
        print(f"  start -> holder exited (VM torn down) {s['holder_gone_ms']:7.0f} ms")
        print(f"  delete                                {s['delete_ms']:7.0f} ms")
        print(json.dumps({"accel": accel, "runs": args.runs, "machine": machine(),
                          "podman_podvisor_s": med(pv), "podman_runc_s": med(rc), "ratio": med(pv) / med(rc),
                          "split": s}))
    finally:
        if base:
            subprocess.run(base + ["rm", "-af", "-t", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli_root = os.path.join(tmp, "pv-cli", "containers")
        for cid in (os.listdir(cli_root) if os.path.isdir(cli_root) else []):
            subprocess.run([PODVISOR, "--root", os.path.join(tmp, "pv-cli"), "delete", "-f", cid],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reap()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
