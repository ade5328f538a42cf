#!/usr/bin/env python3
"""Benchmark of `podvisor sandbox run` against its floor, in one run.

(a) wall time of `podvisor sandbox run -- true`;
(b) the same split: VMM ready -> agent ready -> process exit;
(c) the floor: raw qemu-system-x86_64 -M microvm booting the same kernel with a
    trivial static init that resets the VM, same accelerator; (a)/(c) is the
    stack's overhead;
(d) host memory (PSS) of one idle sandbox: podvisor + QEMU.
Runs alternate (a) and (c). Medians are printed with the accelerator and machine.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "target", "release")
PODVISOR = os.path.join(OUT, "podvisor")


def machine():
    model = "unknown cpu"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return f"{os.cpu_count()} cpus ({model}), {mem_kb // 1024 // 1024} GiB, Linux {platform.release()}"


def build_floor_initrd(tmp):
    init = os.path.join(tmp, "root", "init")
    os.makedirs(os.path.dirname(init))
    subprocess.run(["gcc", "-static", "-O2", "-o", init, os.path.join(HERE, "trivial-init.c")], check=True)
    cpio = os.path.join(tmp, "floor.cpio")
    with open(cpio, "wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], input=b"init\n",
                       cwd=os.path.dirname(init), stdout=out, check=True)
    return cpio


def floor_once(kernel, initrd, accel, memory):
    cpu = "host" if accel == "kvm" else "max"
    cmd = ["qemu-system-x86_64", "-M", "microvm,acpi=off,isa-serial=on,rtc=off,memory-backend=mem",
           "-accel", accel, "-cpu", cpu, "-m", f"{memory}M",
           "-object", f"memory-backend-ram,id=mem,size={memory}M",
           "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-kernel", kernel, "-initrd", initrd,
           "-append", "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init", "-serial", "stdio"]
    t = time.monotonic()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    dt = time.monotonic() - t
    if b"trivial init" not in out.stdout:
        sys.exit(f"floor VM did not reach its init: {out.stdout[-500:]!r}")
    return dt


def podvisor_once(root, memory):
    t = time.monotonic()
    out = subprocess.run([PODVISOR, "--root", root, "sandbox", "run", "--memory", str(memory), "--timings", "--", "true"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.monotonic() - t
    if out.returncode != 0:
        sys.exit(f"podvisor sandbox run failed: {out.stderr.decode()}")
    timings = json.loads(out.stderr.decode().strip().splitlines()[-1])
    return dt, timings


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def supervisor_of(vmm):
    """The VM's supervisor: QEMU's parent (its PSS counts as the sandbox's)."""
    try:
        with open(f"/proc/{vmm}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def vmm_pss_kb(vmm):
    """PSS of a VMM and its supervisor."""
    return pss_kb(vmm) + pss_kb(supervisor_of(vmm))


def idle_sandbox_pss(root, memory):
    p = subprocess.Popen([PODVISOR, "--root", root, "sandbox", "run", "--memory", str(memory), "--",
                          "sh", "-c", "echo ready; read x"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stdout.readline()
    if line != b"ready\n":
        sys.exit(f"idle sandbox did not start: {p.stderr.read().decode()}")
    time.sleep(2)  # let the guest settle
    sandboxes = os.path.join(root, "sandboxes")
    vmm = [int(open(os.path.join(sandboxes, d, "vmm.pid")).read()) for d in os.listdir(sandboxes)]
    total = pss_kb(p.pid) + sum(vmm_pss_kb(v) for v in vmm)
    qemu = sum(pss_kb(v) for v in vmm)
    p.stdin.close()
    p.wait(timeout=60)
    return total, qemu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="one run, small sizes: checks the benchmark still works (CI)")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.memory = 1, 128
    elif args.runs < 5:
        sys.exit("--runs must be at least 5 (medians)")
    for f in ("podvisor", "vmlinux", "podvisor-initrd.cpio"):
        if not os.path.exists(os.path.join(OUT, f)):
            sys.exit(f"{OUT}/{f} missing: run `make build` first")
    kernel = os.path.join(OUT, "vmlinux")
    tmp = tempfile.mkdtemp(prefix="podvisor-bench-")
    root = os.path.join(tmp, "state")
    try:
        initrd = build_floor_initrd(tmp)
        wall, floor, splits = [], [], []
        accel = None
        for _ in range(args.runs):
            dt, t = podvisor_once(root, args.memory)
            accel = t["accel"]
            wall.append(dt)
            splits.append(t)
            floor.append(floor_once(kernel, initrd, accel, args.memory))
        pss = [idle_sandbox_pss(root, args.memory) for _ in range(1 if args.quick else 3)]

        med = statistics.median
        ms = lambda s: f"{s * 1000:7.0f} ms"
        print(f"podvisor sandbox run benchmark — accel {accel.upper()}, {args.runs} runs, {args.memory} MiB guest")
        print(f"machine: {machine()}")
        print(f"(a) podvisor sandbox run -- true        {ms(med(wall))}")
        print(f"(b)   VMM ready (QMP answered)          {med(t['vmm_ready_ms'] for t in splits):7.0f} ms")
        print(f"      agent ready (handshake)           {med(t['agent_ready_ms'] for t in splits):7.0f} ms"
              f"   (guest clock at agent start: {med(t['guest_agent_ready_ms'] for t in splits):.0f} ms)")
        print(f"      process exited                    {med(t['process_exit_ms'] for t in splits):7.0f} ms")
        print(f"      total inside podvisor              {med(t['total_ms'] for t in splits):7.0f} ms")
        print(f"(c) floor: raw QEMU + trivial init      {ms(med(floor))}")
        print(f"    overhead (a)/(c)                    {med(wall) / med(floor):7.2f}x")
        print(f"(d) PSS of an idle sandbox              {med(p[0] for p in pss) / 1024:7.1f} MiB"
              f"   (QEMU {med(p[1] for p in pss) / 1024:.1f} MiB)")
        print(json.dumps({
            "accel": accel, "runs": args.runs, "machine": machine(),
            "sandbox_run_true_ms": med(wall) * 1000,
            "vmm_ready_ms": med(t["vmm_ready_ms"] for t in splits),
            "agent_ready_ms": med(t["agent_ready_ms"] for t in splits),
            "process_exit_ms": med(t["process_exit_ms"] for t in splits),
            "floor_ms": med(floor) * 1000,
            "overhead_ratio": med(wall) / med(floor),
            "idle_pss_mib": med(p[0] for p in pss) / 1024,
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
