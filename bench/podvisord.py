#!/usr/bin/env python3
"""podvisord, driven by E2B's Python SDK (the pinned one of scripts/e2b-venv.sh):

(a) create -> first command output through the SDK (`Sandbox.create()` then
    `commands.run("echo hi")`), the template's pool refilled between runs,
    against the floor of the same run: a pool hand-out plus the same command
    (`/bin/bash -l -c "echo hi"`, as the SDK runs it) done with podvisor
    directly (`podvisor sandbox run --template`, the sandbox library's path
    without HTTP, tenants or envd);
(b) the API's own overhead: GET /sandboxes/{id} and GET /v2/sandboxes round
    trips (authentication, the database, JSON; no VM);
(c) sandbox creations per second with 10 concurrent clients, each creating,
    running `true` in and killing its sandboxes (no pool: clones).

Medians and p95, the accelerator printed. --quick runs each a few times.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CACHE = os.environ.get("PODVISOR_CACHE", os.path.expanduser("~/.cache/podvisor"))
VENV_PY = os.path.join(CACHE, "venv-e2b-2.63.0", "bin", "python")
try:
    import httpx
    from e2b import Sandbox
except ImportError:
    if os.path.exists(VENV_PY) and sys.executable != VENV_PY:
        os.execv(VENV_PY, [VENV_PY] + sys.argv)
    sys.exit(f"E2B's SDK is missing: run scripts/e2b-venv.sh (looked for {VENV_PY})")

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "target", "release")
PODVISORD = os.path.join(OUT, "podvisord")
PODVISOR = os.path.join(OUT, "podvisor")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def show(name, xs, unit="ms"):
    if len(xs) >= 5:
        print(f"  {name:46} median {statistics.median(xs):8.1f} {unit}   p95 {pct(xs, 95):8.1f} {unit}   (n={len(xs)})")
    else:
        print(f"  {name:46} median {statistics.median(xs):8.1f} {unit}   (n={len(xs)})")


class Service:
    def __init__(self, tmp, config):
        self.dir = tmp
        with open(os.path.join(tmp, "config.toml"), "w") as f:
            f.write(config)
        s = __import__("socket").socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(tmp, "podvisord.log"), "w")
        self.proc = subprocess.Popen(
            [PODVISORD, "--listen", f"127.0.0.1:{self.port}", "--state-dir", os.path.join(tmp, "state"),
             "--admin-token-file", os.path.join(tmp, "admin.token"), "--config", os.path.join(tmp, "config.toml")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 900
        while True:
            try:
                httpx.get(self.url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("podvisord did not start: " + open(os.path.join(tmp, "podvisord.log")).read()[-2000:])
                time.sleep(0.2)
        self.admin = {"X-Admin-Token": open(os.path.join(tmp, "admin.token")).read().strip()}
        r = httpx.post(self.url + "/admin/tenants", headers=self.admin,
                       json={"name": "bench", "quotas": {"maxSandboxes": 50, "maxVcpus": 100, "maxMemoryMib": 100000}})
        self.key = r.json()["apiKey"]
        os.environ.update(E2B_API_KEY=self.key, E2B_API_URL=self.url, E2B_SANDBOX_URL=self.url)
        self.vm_root = os.path.join(tmp, "state", "vm")

    def pool_ready(self, n=1, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = {x["name"]: x["pool"] for x in httpx.get(self.url + "/admin/templates", headers=self.admin).json()}
            if (t.get("base") or {}).get("ready", 0) >= n:
                return
            time.sleep(0.05)
        sys.exit("the pool did not fill")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def accel():
    out = subprocess.run([PODVISOR, "check"], capture_output=True, text=True).stdout
    line = next((l for l in out.splitlines() if l.startswith("accelerator:")), "accelerator: ?")
    return line.split(":", 1)[1].strip().upper()


def base_rootfs():
    d = os.path.join(CACHE, "podvisord")
    roots = [os.path.join(d, x) for x in os.listdir(d) if x.startswith("base-debian12-")]
    return roots[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    runs = 3 if a.quick else 20
    total = 10 if a.quick else 100
    print(f"podvisord, E2B SDK 2.63.0, {accel()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="pvb-", dir="/tmp") as tmp:
        svc = Service(tmp, '[[templates]]\nname = "base"\npool = 1\n')
        try:
            sdk, floor = [], []
            for _ in range(runs):
                svc.pool_ready()
                t0 = time.monotonic()
                sbx = Sandbox.create()
                out = sbx.commands.run("echo hi").stdout
                sdk.append((time.monotonic() - t0) * 1e3)
                assert out == "hi\n", out
                sbx.kill()
                svc.pool_ready()
                t0 = time.monotonic()
                r = subprocess.run([PODVISOR, "--root", svc.vm_root, "sandbox", "run", "--template", "podvisord-base",
                                    "--rootfs", base_rootfs(), "--", "/bin/bash", "-l", "-c", "echo hi"], capture_output=True, text=True)
                floor.append((time.monotonic() - t0) * 1e3)
                assert r.stdout == "hi\n", r.stderr
            print("(a) create -> first output")
            show("SDK: Sandbox.create + commands.run (pool)", sdk)
            show("floor: pool hand-out + exec (podvisor CLI)", floor)
            print(f"  ratio {statistics.median(sdk) / statistics.median(floor):.2f}x (target <= 1.5x)")

            sbx = Sandbox.create()
            h = {"X-API-Key": svc.key}
            one, lst = [], []
            with httpx.Client() as c:
                for _ in range(runs * 10):
                    t0 = time.monotonic()
                    c.get(f"{svc.url}/sandboxes/{sbx.sandbox_id}", headers=h).raise_for_status()
                    one.append((time.monotonic() - t0) * 1e3)
                    t0 = time.monotonic()
                    c.get(f"{svc.url}/v2/sandboxes", headers=h).raise_for_status()
                    lst.append((time.monotonic() - t0) * 1e3)
            sbx.kill()
            print("(b) API overhead (no VM work)")
            show("GET /sandboxes/{id}", one)
            show("GET /v2/sandboxes", lst)
            print(f"  target: median under 10 ms")
        finally:
            svc.stop()
    with tempfile.TemporaryDirectory(prefix="pvc-", dir="/tmp") as tmp:
        svc = Service(tmp, "")
        try:
            lat, errors = [], []
            lock = threading.Lock()
            per = total // 10

            def client():
                for _ in range(per):
                    t0 = time.monotonic()
                    try:
                        s = Sandbox.create()
                        s.commands.run("true")
                        s.kill()
                    except Exception as e:  # noqa: BLE001 - counted, reported
                        with lock:
                            errors.append(repr(e))
                        continue
                    with lock:
                        lat.append((time.monotonic() - t0) * 1e3)
            t0 = time.monotonic()
            ts = [threading.Thread(target=client) for _ in range(10)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            wall = time.monotonic() - t0
            print(f"(c) {total} sandboxes, 10 concurrent clients (clones)")
            show("create + run + kill, per sandbox", lat)
            print(f"  {len(lat) / wall:.2f} sandboxes/s, {len(errors)} errors")
            left = httpx.get(svc.url + "/v2/sandboxes", headers={"X-API-Key": svc.key}).json()
            if errors or left:
                sys.exit(f"errors: {errors[:3]}; left: {len(left)}")
        finally:
            svc.stop()


if __name__ == "__main__":
    main()
