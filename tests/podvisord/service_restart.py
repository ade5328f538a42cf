"""podvisord killed with -9 and started again, in two phases the test runs
around the kill: `before` makes a tenant and a sandbox (its key and id
saved), `after` checks that the sandbox is ended (404, not listed), that
the key still works and that a new sandbox runs."""
import json
import os
import sys

from e2b import Sandbox

from common import URL, check, tenant

state = os.environ["RESTART_STATE"]
if sys.argv[1] == "before":
    t = tenant("restart")
    sbx = Sandbox.create()
    check(sbx.commands.run("echo up").stdout == "up\n", "a sandbox runs before the kill")
    json.dump({"key": t["apiKey"], "id": sbx.sandbox_id}, open(state, "w"))
else:
    s = json.load(open(state))
    os.environ.update(E2B_API_KEY=s["key"], E2B_API_URL=URL, E2B_SANDBOX_URL=URL)
    import httpx
    r = httpx.get(f"{URL}/sandboxes/{s['id']}", headers={"X-API-Key": s["key"]})
    check(r.status_code == 404, f"the sandbox of before the kill is ended ({r.status_code})")
    check(all(x.sandbox_id != s["id"] for x in Sandbox.list().next_items()), "and not listed")
    sbx = Sandbox.create()
    check(sbx.commands.run("echo again").stdout == "again\n", "a new sandbox runs after the restart")
    sbx.kill()
print("PASS")
