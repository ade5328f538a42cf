"""Fork through E2B's SDK: five forks of a running sandbox each see the
parent's memory and files as of the fork, then diverge (a process's memory
and a file), each reading back only its own; each draws its own random
bytes; the parent runs on with its id. A snapshot of the parent is a
template of the tenant's own. Over the tenant's quota a fork fails alone
(429 in its slot). A fork outlives its parent, and pauses and resumes on
its own."""
import os
import time

from e2b import Sandbox
from e2b.exceptions import RateLimitException, SandboxException

from common import check, tenant

# Holds a value in memory: "get" answers it, "set V" replaces it.
HOLDER = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7777))
s.listen()
value = "parent"
while True:
    c, _ = s.accept()
    msg = c.recv(200).decode().strip()
    if msg.startswith("set "):
        value = msg[4:]
    c.sendall((value + "\n").encode())
    c.close()
"""

ASK = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", 7777), timeout=5)
s.sendall(" ".join(sys.argv[1:]).encode() or b"get")
print(s.recv(200).decode().strip())
"""


def ask(sbx, *msg):
    return sbx.commands.run("python3 /tmp/ask.py " + " ".join(msg), timeout=30).stdout.strip()


def random_bytes(sbx):
    return sbx.commands.run("head -c 16 /dev/urandom | od -An -tx1").stdout.strip()


tenant("fork", quotas={"maxSandboxes": 6})
parent = Sandbox.create(timeout=900)
parent.files.write("/tmp/holder.py", HOLDER)
parent.files.write("/tmp/ask.py", ASK)
parent.files.write("/tmp/file", "parent\n")
parent.commands.run("python3 /tmp/holder.py", background=True)
deadline = time.time() + 60
while time.time() < deadline:
    try:
        if ask(parent, "get") == "parent":
            break
    except Exception:  # noqa: BLE001 (not listening yet)
        time.sleep(0.5)
check(ask(parent, "get") == "parent", "the parent's process holds its value")

t0 = time.time()
forks = parent.fork(count=5, timeout=600)
check(len(forks) == 5 and all(isinstance(f, Sandbox) for f in forks),
      f"five forks ({time.time() - t0:.1f} s): {[type(f).__name__ for f in forks]}")
ids = {f.sandbox_id for f in forks}
check(len(ids) == 5 and parent.sandbox_id not in ids, "each with an id of its own")
for i, f in enumerate(forks):
    check(ask(f, "get") == "parent" and f.files.read("/tmp/file") == "parent\n",
          f"fork {i} sees the parent's memory and file as of the fork")
for i, f in enumerate(forks):
    ask(f, "set", f"fork{i}")
    f.files.write("/tmp/file", f"fork{i}\n")
ask(parent, "set", "parent2")
parent.files.write("/tmp/file", "parent2\n")
for i, f in enumerate(forks):
    check(ask(f, "get") == f"fork{i}" and f.files.read("/tmp/file") == f"fork{i}\n",
          f"fork {i} reads back only its own memory and file")
check(ask(parent, "get") == "parent2" and parent.files.read("/tmp/file") == "parent2\n",
      "the parent reads back its own")
draws = {random_bytes(s) for s in forks + [parent]}
check(len(draws) == 6, "each draws its own random bytes (the guest's RNG reseeded per fork)")

# A snapshot of the parent is a template of this tenant's: sandboxes made
# from it carry on from the moment it was taken; another tenant's key
# does not find it; it cannot be deleted while a sandbox runs from it.
for f in forks[1:]:
    f.kill()
snap = parent.create_snapshot()
check(snap.snapshot_id in [x.snapshot_id for x in Sandbox.list_snapshots().next_items()],
      f"snapshot {snap.snapshot_id} listed")
ask(parent, "set", "parent3")
child = Sandbox.create(snap.snapshot_id, timeout=300)
check(ask(child, "get") == "parent2" and child.files.read("/tmp/file") == "parent2\n",
      "a sandbox made from the snapshot has the parent's memory and files as of then")
check(ask(parent, "get") == "parent3", "and the parent runs on")
mine = os.environ["E2B_API_KEY"]
tenant("fork-other")
try:
    Sandbox.create(snap.snapshot_id)
    check(False, "another tenant cannot start the snapshot")
except SandboxException as e:
    check("not found" in str(e), f"another tenant cannot start the snapshot: {str(e)[:80]}")
os.environ["E2B_API_KEY"] = mine
try:
    Sandbox.delete_snapshot(snap.snapshot_id)
    check(False, "a snapshot in use is not deleted")
except SandboxException as e:
    check("in use" in str(e), f"a snapshot in use is not deleted: {str(e)[:100]}")
child.kill()
check(Sandbox.delete_snapshot(snap.snapshot_id) is True, "then it is")
check(Sandbox.list_snapshots().next_items() == [], "and listed no more")
forks = forks[:1]

# Over the quota (6): the slot of each fork that would break it holds a 429.
more = parent.fork(count=5)
check(len(more) == 5 and sum(isinstance(m, Sandbox) for m in more) == 4
      and isinstance(more[4], RateLimitException),
      f"forks over the quota fail alone: {[type(m).__name__ for m in more]}")
for m in more[:4]:
    m.kill()

# A fork outlives its parent, then pauses and resumes on its own.
parent.kill()
f0 = forks[0]
check(ask(f0, "get") == "fork0", "a fork runs on once its parent is killed")
check(f0.pause() is True, "a fork pauses")
f0 = Sandbox.connect(f0.sandbox_id)
check(ask(f0, "get") == "fork0" and f0.files.read("/tmp/file") == "fork0\n",
      "and resumes with its own state")
for f in forks:
    f.kill()
print("PASS")
