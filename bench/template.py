#!/usr/bin/env python3
"""Benchmark of VM templates, in one run, medians, accelerator printed:
time to a ready sandbox running `true`, cold boot vs clone from a template
(alternating), and hand-out from a pool of ready clones (`podvisor pool
serve`); host memory (PSS) per idle sandbox, cold vs clone (three clones
alive together, as they share the template's pages); clones per second.
"""
import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sandbox_run import OUT, PODVISOR, machine, pss_kb, vmm_pss_kb  # noqa: E402


def run_true(root, template=None):
    cmd = [PODVISOR, "--root", root, "sandbox", "run", "--timings"]
    if template:
        cmd += ["--template", template]
    cmd += ["--memory", "256", "--", "true"]
    t = time.monotonic()
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.monotonic() - t
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {out.stderr.decode()}")
    timings = json.loads(out.stderr.decode().strip().splitlines()[-1])
    if template and timings.get("cloned_from") != template:
        sys.exit(f"expected a clone of {template}: {out.stderr.decode()}")
    return dt, timings


def pool_runs(root, runs):
    """`sandbox run --template bench -- true` served by a pool of 2 ready clones,
    each run taken from a full pool. Returns (wall s, hand-out ms, agent ready ms)."""
    config = os.path.join(root, "config.toml")
    with open(config, "w") as f:
        f.write('[[pool]]\ntemplate = "bench"\nsize = 2\n')
    daemon = subprocess.Popen([PODVISOR, "--root", root, "pool", "serve", "--config", config],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    status = os.path.join(root, "pools", "bench.json")

    def wait_full():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if json.load(open(status))["ready"] == 2:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        sys.exit("the pool never filled")
    try:
        if daemon.stdout.readline() != b"ready\n":
            sys.exit("pool serve did not start")
        out = []
        for _ in range(runs):
            wait_full()
            dt, tm = run_true(root, "bench")
            if not tm.get("pooled"):
                sys.exit(f"expected a pooled sandbox: {tm}")
            out.append((dt, tm["vmm_ready_ms"], tm["agent_ready_ms"]))
        return out
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def start_idle(root, template=None):
    cmd = [PODVISOR, "--root", root, "sandbox", "run"]
    if template:
        cmd += ["--template", template]
    cmd += ["--", "sh", "-c", "echo ready; read x"]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_ready(procs, timeout=300):
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        r, _, _ = select.select([p.stdout for p in pending], [], [], max(0, deadline - time.monotonic()))
        if not r:
            sys.exit("sandboxes did not get ready")
        for p in list(pending):
            if p.stdout in r:
                if p.stdout.readline() != b"ready\n":
                    sys.exit(f"sandbox failed: {p.stderr.read().decode()}")
                pending.remove(p)


def stop(procs):
    for p in procs:
        p.stdin.close()
    for p in procs:
        p.wait(timeout=60)


def group_pss(root, procs):
    """PSS (MiB) per sandbox: each podvisor process plus its QEMU and the
    QEMU's supervisor."""
    time.sleep(2)
    sandboxes = os.path.join(root, "sandboxes")
    vmm = [int(open(os.path.join(sandboxes, d, "vmm.pid")).read()) for d in os.listdir(sandboxes)]
    total = sum(pss_kb(p.pid) for p in procs) + sum(vmm_pss_kb(v) for v in vmm)
    return total / len(procs) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--clones", type=int, default=10, help="clones started at once for the rate")
    ap.add_argument("--quick", action="store_true", help="one run, small sizes: checks the benchmark still works (CI)")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.clones = 1, 2
    elif args.runs < 5:
        sys.exit("--runs must be at least 5 (medians)")
    if not os.path.exists(PODVISOR):
        sys.exit(f"{PODVISOR} missing: run `make build` first")
    tmp = tempfile.mkdtemp(prefix="podvisor-bench-tmpl-", dir="/dev/shm")
    root = os.path.join(tmp, "state")
    med = statistics.median
    try:
        t = time.monotonic()
        subprocess.run([PODVISOR, "--root", root, "template", "create", "--name", "bench", "--memory", "256"],
                       check=True, stdout=subprocess.DEVNULL)
        create_s = time.monotonic() - t
        cold, clone, cold_t, clone_t = [], [], [], []
        for _ in range(args.runs):
            dt, tm = run_true(root)
            cold.append(dt)
            cold_t.append(tm)
            dt, tm = run_true(root, "bench")
            clone.append(dt)
            clone_t.append(tm)
        accel = cold_t[0]["accel"]
        pooled = pool_runs(root, args.runs)

        procs = [start_idle(root)]
        wait_ready(procs)
        cold_pss = group_pss(root, procs)
        stop(procs)
        procs = [start_idle(root, "bench") for _ in range(3)]
        wait_ready(procs)
        clone_pss = group_pss(root, procs)
        stop(procs)

        t = time.monotonic()
        procs = [start_idle(root, "bench") for _ in range(args.clones)]
        wait_ready(procs)
        rate = args.clones / (time.monotonic() - t)
        stop(procs)

        print(f"template benchmark — accel {accel.upper()}, {args.runs} runs, 256 MiB guest")
        print(f"machine: {machine()}")
        print(f"template create                           {create_s * 1000:7.0f} ms")
        print(f"sandbox run -- true, cold boot            {med(cold) * 1000:7.0f} ms"
              f"   (agent ready {med(t['agent_ready_ms'] for t in cold_t):.0f} ms)")
        print(f"sandbox run --template -- true, clone     {med(clone) * 1000:7.0f} ms"
              f"   (agent ready {med(t['agent_ready_ms'] for t in clone_t):.0f} ms)")
        print(f"  speed-up cold/clone, no pool            {med(cold) / med(clone):7.1f}x   (target 10x)")
        print(f"sandbox run --template -- true, pool      {med(p[0] for p in pooled) * 1000:7.0f} ms"
              f"   (agent ready {med(p[2] for p in pooled):.0f} ms)")
        print(f"  hand-out from the pool                  {med(p[1] for p in pooled):7.1f} ms   (target < 20 ms)")
        print(f"  speed-up cold/pool (T's pool served)    {med(cold) / med(p[0] for p in pooled):7.1f}x   (target 10x)")
        print(f"PSS per idle sandbox, cold                {cold_pss:7.1f} MiB")
        print(f"PSS per idle sandbox, clone (3 alive)     {clone_pss:7.1f} MiB   ({clone_pss / cold_pss:.2f} of cold; target <= 0.33)")
        print(f"clones per second ({args.clones} at once)           {rate:7.1f}")
        print(json.dumps({"accel": accel, "machine": machine(), "runs": args.runs,
                          "cold_ms": med(cold) * 1000, "clone_ms": med(clone) * 1000,
                          "cold_agent_ready_ms": med(t["agent_ready_ms"] for t in cold_t),
                          "clone_agent_ready_ms": med(t["agent_ready_ms"] for t in clone_t),
                          "speedup": med(cold) / med(clone), "cold_pss_mib": cold_pss,
                          "pool_ms": med(p[0] for p in pooled) * 1000,
                          "pool_handout_ms": med(p[1] for p in pooled),
                          "pool_agent_ready_ms": med(p[2] for p in pooled),
                          "clone_pss_mib": clone_pss, "clones_per_second": rate}))
    finally:
        subprocess.run([PODVISOR, "--root", root, "template", "rm", "bench"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
