#!/usr/bin/env python3
"""Pod benchmark over containerd's CRI: podvisor's shim against runc (the floor).

Starts a containerd of its own (CRI plugin, CNI bridge), then for the runtime
handlers "podvisor" and "runc", alternating: pod start (RunPodSandbox until the
first container runs), pod teardown (StopPodSandbox + RemovePodSandbox), and the
host memory (PSS) of one pod with two idle containers. Then the same for pods
whose VM is cloned from a template (a second containerd whose podvisor factory
policy names one), and pods whose VM a pool daemon hands out ready. Medians; the accelerator is printed. The work is done by `target/release/pod-bench` (tests/pod_bench.rs),
since CRI is gRPC.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sandbox_run import OUT, machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    # `--quick`: one run, to check the benchmark still works (CI).
    runs = "1" if sys.argv[1:] == ["--quick"] else sys.argv[1] if len(sys.argv) > 1 else "7"
    subprocess.run(["cargo", "build", "--release", "-p", "podvisor-client-tests", "--bin", "pod-bench"],
                   cwd=ROOT, check=True)
    print(f"machine: {machine()}")
    sys.stdout.flush()
    subprocess.run([os.path.join(OUT, "pod-bench"), runs], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
