"""podvisord killed (-9) at a crash point of create, kill, pause or resume,
and started again. `before` makes a tenant and drives a create (then a
kill, a pause, or a pause and a connect) into the point, which the dying
podvisord never answers; `after` checks that the database and the host
agree: no row left creating or running (one killed while resuming is
paused, and resumes), no snapshot left, nothing listed, the key still
works, a new sandbox runs and ends."""
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
        check(not point.startswith("create."), f"the create answered ({sbx.sandbox_id}), past {point}")
        json.dump({"key": t["apiKey"], "id": sbx.sandbox_id}, open(state, "w"))
        if point.startswith("kill."):
            sbx.kill(request_timeout=60)
        else:
            sbx.pause(request_timeout=120)
            check(point.startswith("resume."), f"the pause answered, past {point}")
            Sandbox.connect(sbx.sandbox_id, request_timeout=120)
        check(False, f"the call answered, though {point} was set")
    except Exception as e:  # the connection dies with podvisord
        print(f"ok: podvisord died at {point} ({type(e).__name__})")
else:
    s = json.load(open(state))
    os.environ.update(E2B_API_KEY=s["key"], E2B_API_URL=URL, E2B_SANDBOX_URL=URL)
    if point.startswith("resume."):
        # Killed while resuming: the snapshot is whole, the sandbox paused.
        check([r[1] for r in rows()] == ["paused"], f"the sandbox being resumed is paused again: {rows()}")
        sbx = Sandbox.connect(s["id"])
        check(sbx.commands.run("echo resumed").stdout == "resumed\n", "and resumes now")
        sbx.kill()
    left = [r for r in rows() if r[1] != "ended"]
    check(not left, f"no row is left creating, running or paused after {point}: {rows()}")
    check(all(r[2] for r in rows()), f"every row says why it ended: {rows()}")
    snapshots = [n for n in os.listdir(os.environ["SNAPSHOT_DIR"]) if "paused" in n]
    check(not snapshots, f"no snapshot is left after {point}: {snapshots}")
    if "id" in s:
        r = httpx.get(f"{URL}/sandboxes/{s['id']}", headers={"X-API-Key": s["key"]})
        check(r.status_code == 404, f"the sandbox being killed is gone ({r.status_code})")
    check(Sandbox.list().next_items() == [], "nothing is listed")
    sbx = Sandbox.create()
    check(sbx.commands.run("echo again").stdout == "again\n", "a new sandbox runs after the restart")
    sbx.kill()
    check([r for r in rows() if r[1] != "ended"] == [], "and ends cleanly")
print("PASS")
