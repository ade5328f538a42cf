"""Load: 10 clients creating, using and killing 200 sandboxes in all
(LOAD_TOTAL), bounded in time; every create answered, none left running,
and the database agrees: every row of the run ended, killed by its client."""
import os
import sqlite3
import threading
import time

from e2b import Sandbox

from common import check, tenant

total = int(os.environ.get("LOAD_TOTAL", "200"))
tenant("load", {"maxSandboxes": 20})
errors, done = [], []
lock = threading.Lock()
deadline = time.monotonic() + 600


def client(n):
    for i in range(total // 10):
        if time.monotonic() > deadline:
            with lock:
                errors.append("out of time")
            return
        try:
            s = Sandbox.create(metadata={"client": str(n)})
            r = s.commands.run(f"echo {n}-{i}")
            assert r.stdout == f"{n}-{i}\n", r.stdout
            s.kill()
            with lock:
                done.append(s.sandbox_id)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            with lock:
                errors.append(repr(e))


t0 = time.monotonic()
ts = [threading.Thread(target=client, args=(n,)) for n in range(10)]
for t in ts:
    t.start()
for t in ts:
    t.join()
wall = time.monotonic() - t0
check(not errors, f"{len(done)} of {total} sandboxes created, used and killed in {wall:.0f}s; errors: {errors[:3]}")
check(len(done) == total, "every one answered")
check(Sandbox.list().next_items() == [], "none left running")
db = sqlite3.connect(os.environ["PODVISORD_DB"])
rows = db.execute("SELECT state, end_reason, COUNT(*) FROM sandboxes GROUP BY state, end_reason").fetchall()
check(rows == [("ended", "killed", total)], f"the database agrees: {rows}")
print("PASS")
