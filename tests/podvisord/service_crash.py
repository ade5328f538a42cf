"""podvisord killed (-9) at a crash point of create or kill, and started
again. `before` makes a tenant and drives a create (or a create, then a
kill) into the point, which the dying podvisord never answers; `after`
checks that the database and the host agree: no row left creating or
running, nothing listed, the key still works, a new sandbox runs and ends."""
import json
import os
import sqlite3
import sys

import httpx
from e2b import Sandbox

from common import URL, check, tenant

point = os.environ["CRASH_POINT"]
state = os.environ["CRASH_STATE"]
db = os.environ["PODVISORD_DB"]


def rows():
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return c.execute("SELECT id, state, end_reason FROM sandboxes").fetchall()
    finally:
        c.close()


if sys.argv[1] == "before":
    t = tenant("crash")
    json.dump({"key": t["apiKey"]}, open(state, "w"))
    try:
        sbx = Sandbox.create(request_timeout=120)
        check(point.startswith("kill."), f"the create answered ({sbx.sandbox_id}), past {point}")
        json.dump({"key": t["apiKey"], "id": sbx.sandbox_id}, open(state, "w"))
        sbx.kill(request_timeout=60)
        check(False, f"the kill answered, though {point} was set")
    except Exception as e:  # the connection dies with podvisord
        print(f"ok: podvisord died at {point} ({type(e).__name__})")
else:
    s = json.load(open(state))
    os.environ.update(E2B_API_KEY=s["key"], E2B_API_URL=URL, E2B_SANDBOX_URL=URL)
    left = [r for r in rows() if r[1] != "ended"]
    check(not left, f"no row is left creating or running after {point}: {rows()}")
    check(all(r[2] for r in rows()), f"every row says why it ended: {rows()}")
    if "id" in s:
        r = httpx.get(f"{URL}/sandboxes/{s['id']}", headers={"X-API-Key": s["key"]})
        check(r.status_code == 404, f"the sandbox being killed is gone ({r.status_code})")
    check(Sandbox.list().next_items() == [], "nothing is listed")
    sbx = Sandbox.create()
    check(sbx.commands.run("echo again").stdout == "again\n", "a new sandbox runs after the restart")
    sbx.kill()
    check([r for r in rows() if r[1] != "ended"] == [], "and ends cleanly")
print("PASS")
