#!/usr/bin/env python3
"""The jail's cost, A/B in one run (jail on vs PODVISOR_JAIL=off, same kernel,
alternating, medians, accelerator printed): cold `sandbox run -- true`, a clone
from a template, and the hand-out from a pool of ready clones. Targets: at most
5% on cold and clone, at most 2 ms on the hand-out.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sandbox_run import PODVISOR, machine  # noqa: E402
from template import pool_runs, run_true  # noqa: E402


def jail(on):
    if on:
        os.environ.pop("PODVISOR_JAIL", None)
    else:
        os.environ["PODVISOR_JAIL"] = "off"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="one run, small sizes: checks the benchmark still works (CI)")
    args = ap.parse_args()
    if args.quick:
        args.runs = 1
    elif args.runs < 5:
        sys.exit("--runs must be at least 5 (medians)")
    if not os.path.exists(PODVISOR):
        sys.exit(f"{PODVISOR} missing: run `make build` first")
    tmp = tempfile.mkdtemp(prefix="podvisor-bench-jail-", dir="/dev/shm")
    root = os.path.join(tmp, "state")
    med = statistics.median
    try:
        subprocess.run([PODVISOR, "--root", root, "template", "create", "--name", "bench", "--memory", "256"],
                       check=True, stdout=subprocess.DEVNULL)
        res = {on: {"cold": [], "clone": []} for on in (True, False)}
        accel = None
        for _ in range(args.runs):
            for on in (True, False):
                jail(on)
                dt, tm = run_true(root)
                accel = tm["accel"]
                res[on]["cold"].append(dt * 1e3)
                dt, _ = run_true(root, "bench")
                res[on]["clone"].append(dt * 1e3)
        # The pool daemon starts its clones jailed or not; the caller's
        # hand-out is its VMM-ready time (socket round trip, tap and tree
        # attach, resume).
        for on in (True, False):
            jail(on)
            res[on]["handout"] = [v for _, v, _ in pool_runs(root, args.runs)]
        jail(True)
        print(f"machine: {machine()}")
        print(f"accelerator: {accel}")
        print(f"runs: {args.runs} each, alternating jail on/off (medians, ms)")
        print(f"{'':24}{'jail on':>10}{'jail off':>10}{'cost':>10}")
        for key, label, target in [("cold", "cold run -- true", "5%"), ("clone", "clone run -- true", "5%"),
                                   ("handout", "pool hand-out", "2 ms")]:
            a, b = med(res[True][key]), med(res[False][key])
            cost = f"{(a - b) / b * 100:+.1f}%" if target.endswith("%") else f"{a - b:+.1f} ms"
            print(f"{label:24}{a:10.1f}{b:10.1f}{cost:>10}   (target: at most {target})")
    finally:
        jail(True)
        subprocess.run([PODVISOR, "--root", root, "template", "rm", "bench"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
