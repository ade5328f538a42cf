#!/usr/bin/env python3
"""Benchmark of snapshots of running sandboxes, in one run, medians,
accelerator printed: pause (the whole VM written to a snapshot and synced)
and resume (a clone of it, to its first exec) of a 256 MiB and a 1 GiB guest
with 50 and 500 MiB of guest memory touched, against the floor of writing
the same bytes on the host (`dd ... conv=fsync`); snapshot size against the
touched memory; fork of 10 (time until all answered an exec, PSS per fork
against its parent's).

The driver is `crates/sandbox/examples/snapshot_bench.rs` (one run as one
JSON line); this script builds it, repeats it and takes medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DRIVER = os.path.join(REPO, "target", "release", "examples", "snapshot_bench")


def build():
    cmd = ["cargo", "build", "--release", "-q", "-p", "podvisor-sandbox", "--example", "snapshot_bench"]
    lock = "/tmp/podvisor-cargo.lock"
    subprocess.run(["flock", lock] + cmd, cwd=REPO, check=True)


def floor_ms(mib):
    """Writing `mib` MiB already in memory to a file, synced: dd's time."""
    with tempfile.TemporaryDirectory(dir=tempfile.gettempdir()) as d:
        src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
        subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={mib}", "status=none"], check=True)
        subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)
        t = time.monotonic()
        subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync", "status=none"], check=True)
        return (time.monotonic() - t) * 1e3


def one(memory, touch, forks):
    out = subprocess.run([DRIVER, str(memory), str(touch), str(forks)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if out.returncode != 0:
        sys.exit(f"snapshot_bench {memory} {touch} {forks} failed:\n{out.stderr.decode()[-3000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small run (CI): its numbers are no measurement")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    build()
    shapes = [(256, 50, 3)] if a.quick else [(256, 50, 10), (256, 200, 10), (1024, 50, 10), (1024, 500, 10)]
    runs = 1 if a.quick else a.runs
    accel = None
    print(f"{'guest':>6} {'touched':>8} {'pause ms':>9} {'floor ms':>9} {'resume ms':>10} "
          f"{'size MiB':>9} {'size/touched':>12} {'forks':>5} {'forks ms':>9} {'PSS/fork':>9} {'PSS/parent':>10}")
    for memory, touch, forks in shapes:
        rs = [one(memory, touch, forks) for _ in range(runs)]
        floor = statistics.median(floor_ms(touch) for _ in range(runs))
        accel = rs[0]["accel"]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        size = med("snapshot_bytes") / 2**20
        print(f"{memory:>5}M {touch:>7}M {med('pause_ms'):>9.0f} {floor:>9.0f} {med('resume_ms'):>10.0f} "
              f"{size:>9.1f} {size / touch:>12.2f} {forks:>5} {med('forks_ms'):>9.0f} "
              f"{med('fork_pss_kib') / 1024:>8.1f}M {med('fork_pss_kib') / max(med('parent_pss_kib'), 1):>10.2f}")
    print(f"accelerator: {accel}; medians of {runs} run(s); machine: {os.cpu_count()} cores")
    print("size counts everything the guest holds (kernel, agent, page cache) beyond the touched bytes")


if __name__ == "__main__":
    main()
