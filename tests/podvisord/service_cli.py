"""A sandbox of a template made with `podvisor service template create`,
by a tenant made with `podvisor service tenant create` (its key in
E2B_API_KEY): it comes from the template's pool and runs a command."""
import os
import time

import httpx
from e2b import Sandbox

from common import check, URL

os.environ["E2B_API_URL"] = URL
os.environ["E2B_SANDBOX_URL"] = URL
name = os.environ["TEMPLATE"]
deadline = time.monotonic() + 90
ready = 0
while time.monotonic() < deadline:
    m = httpx.get(URL + "/metrics").text
    line = [l for l in m.splitlines() if l.startswith("podvisord_pool_ready") and f'"{name}"' in l]
    ready = float(line[0].split()[-1]) if line else 0
    if ready >= 1:
        break
    time.sleep(0.5)
check(ready >= 1, f"the new template's pool filled ({ready})")
sbx = Sandbox.create(template=name)
r = sbx.commands.run("echo from $(hostname) && nproc")
check(r.stdout.startswith("from "), f"a command in the new template {r.stdout!r}")
m = httpx.get(URL + "/metrics").text
check('podvisord_sandbox_create_seconds_count{path="pool"} 1' in m, "it was a pool hand-out")
if os.environ.get("LEAVE_RUNNING"):
    print(f"SANDBOX {sbx.sandbox_id}")
else:
    sbx.kill()
print("PASS")
