"""Pause and resume through E2B's SDK, in two phases the test runs around a
restart of podvisord (SIGTERM, same state directory):

`before`: a sandbox runs a process that counts in memory, holds a file open
(appending a line per count) and listens on a TCP port; a command is still
streaming when the sandbox is paused. Pausing again answers "already
paused", the sandbox is listed as paused, and its envd answers nothing. A
second sandbox is paused for the test to damage its snapshot, and a third
is made with `on_timeout: pause` and `auto_resume`.

`full`: with a full disk under the snapshots (a tmpfs the test mounted), a
pause fails, the sandbox runs on, and no partial snapshot is left.

`after`: `Sandbox.connect` resumes the first (same id): the count went on,
the file offset matches the file, the socket still answers, the streaming
command's process lives on. Two connects at once resume it once. The
damaged one fails to resume with a clear error and stays paused, then is
killed. The third paused itself at its timeout (before the restart) and a
request to its envd with its token resumes it."""
import concurrent.futures
import json
import os
import sys
import time

import httpx
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxException

from common import URL, check, tenant

HOLDER = r"""
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7777))
s.listen()
s.settimeout(0.2)
f = open("/tmp/held", "w")
n = 0
while True:
    n += 1
    f.write(f"{n}\n")
    f.flush()
    with open("/tmp/count", "w") as c:
        c.write(str(n))
    try:
        conn, _ = s.accept()
        conn.sendall(f"{n} {f.tell()}\n".encode())
        conn.close()
    except socket.timeout:
        pass
"""

ASK = r"""
import socket
s = socket.create_connection(("127.0.0.1", 7777), timeout=5)
print(s.recv(100).decode().strip())
"""

state_file = os.environ["PAUSE_STATE"]


def ask(sbx):
    out = sbx.commands.run("python3 /tmp/ask.py", timeout=30).stdout.split()
    return int(out[0]), int(out[1])


def paused_state(sandbox_id):
    return Sandbox.get_info(sandbox_id).state


if sys.argv[1] == "before":
    t = tenant("pause")
    sbx = Sandbox.create(timeout=900)
    sbx.files.write("/tmp/holder.py", HOLDER)
    sbx.files.write("/tmp/ask.py", ASK)
    sbx.files.write("/home/user/note.txt", "kept across the pause\n")
    sbx.commands.run("python3 /tmp/holder.py", background=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        r = sbx.commands.run("cat /tmp/count 2>/dev/null || echo 0")
        if int(r.stdout.strip() or 0) > 3:
            break
        time.sleep(0.5)
    n0, tell0 = ask(sbx)
    check(n0 > 3, f"the holder counts ({n0}) and holds its file (offset {tell0})")
    # A command still streaming when the pause comes.
    sbx.commands.run("sh -c 'while :; do echo tick; sleep 0.5; done' & echo $! > /tmp/ticker.pid; wait",
                     background=True)
    time.sleep(1)
    t0 = time.time()
    check(sbx.pause() is True, f"pause answers that it paused ({time.time() - t0:.1f} s)")
    check(Sandbox.pause(sbx.sandbox_id) is False, "a second pause answers: already paused")
    check(paused_state(sbx.sandbox_id) == SandboxState.PAUSED, "its info says paused")
    listed = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    check([x.sandbox_id for x in listed] == [sbx.sandbox_id], "listed as paused")
    running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
    check(running == [], "and not as running")
    try:
        sbx.commands.run("echo no", timeout=10)
        check(False, "a paused sandbox without autoResume runs no command")
    except Exception as e:  # noqa: BLE001
        check(True, f"a paused sandbox without autoResume runs no command ({type(e).__name__})")
    # To be damaged by the test.
    damaged = Sandbox.create(timeout=900)
    check(damaged.pause() is True, "a second sandbox paused")
    # Pauses itself at its timeout; resumed by a command.
    auto = Sandbox.create(timeout=5, lifecycle={"on_timeout": "pause", "auto_resume": True})
    auto.files.write("/tmp/mark", "auto\n")
    deadline = time.time() + 120
    while time.time() < deadline and paused_state(auto.sandbox_id) != SandboxState.PAUSED:
        time.sleep(1)
    check(paused_state(auto.sandbox_id) == SandboxState.PAUSED, "on_timeout pause: paused at its timeout")
    json.dump({"key": t["apiKey"], "id": sbx.sandbox_id, "damaged": damaged.sandbox_id,
               "auto": auto.sandbox_id, "auto_token": auto._envd_access_token,
               "n0": n0, "tell0": tell0}, open(state_file, "w"))
elif sys.argv[1] == "full":
    # The test mounted a 64 MiB tmpfs over podvisord's snapshot directory.
    s = json.load(open(state_file))
    os.environ.update(E2B_API_KEY=s["key"], E2B_API_URL=URL, E2B_SANDBOX_URL=URL)
    full = Sandbox.create(timeout=300)
    full.commands.run("head -c 100000000 /dev/urandom > /tmp/noise")
    try:
        full.pause()
        check(False, "a pause onto a full disk fails")
    except SandboxException as e:
        check(True, f"a pause onto a full disk fails: {str(e)[:160]}")
    check(full.commands.run("echo alive").stdout == "alive\n", "and the sandbox runs on")
    check(Sandbox.get_info(full.sandbox_id).state == SandboxState.RUNNING, "listed as running")
    left = os.listdir(os.environ["SNAPSHOT_DIR"])
    check(left == [], f"no partial snapshot is left ({left})")
    full.kill()
else:
    s = json.load(open(state_file))
    os.environ.update(E2B_API_KEY=s["key"], E2B_API_URL=URL, E2B_SANDBOX_URL=URL)
    check(paused_state(s["id"]) == SandboxState.PAUSED, "still paused after podvisord's restart")
    t0 = time.time()
    sbx = Sandbox.connect(s["id"], timeout=600)
    check(sbx.sandbox_id == s["id"], f"connect resumed it, same id ({time.time() - t0:.1f} s)")
    n1, tell1 = ask(sbx)
    check(n1 > s["n0"], f"the count went on in memory ({s['n0']} -> {n1}), never restarted")
    size = int(sbx.commands.run("stat -c %s /tmp/held").stdout)
    check(tell1 <= size and tell1 > s["tell0"], f"the held file's offset {tell1} is intact (file {size} bytes)")
    lines = sbx.commands.run("cat /tmp/held").stdout.split()
    check(lines == [str(i) for i in range(1, len(lines) + 1)], "one line per count, none lost or repeated")
    check(sbx.files.read("/home/user/note.txt") == "kept across the pause\n", "files survive")
    r = sbx.commands.run("kill -0 $(cat /tmp/ticker.pid) && echo alive")
    check(r.stdout.strip() == "alive", "the command streaming at the pause still runs")
    # Two connects at once: both get the sandbox; it was resumed once.
    sbx.pause()
    hdr = {"X-API-Key": s["key"]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        codes = sorted(pool.map(
            lambda _: httpx.post(f"{URL}/v2/sandboxes/{s['id']}/connect", json={"timeout": 300},
                                 headers=hdr, timeout=300).status_code, range(2)))
    check(codes == [200, 201], f"two connects at once: one resumed it, the other found it running ({codes})")
    check(ask(sbx)[0] > n1, "and it counts on")
    r = httpx.post(f"{URL}/sandboxes/{s['id']}/resume", json={"timeout": 60}, headers=hdr)
    check(r.status_code == 409, f"resume of a running sandbox: 409 ({r.status_code})")
    sbx.kill()
    r = httpx.get(f"{URL}/sandboxes/{s['id']}", headers=hdr)
    check(r.status_code == 404, "killed: gone")
    # The damaged snapshot.
    try:
        Sandbox.connect(s["damaged"])
        check(False, "a damaged snapshot does not resume")
    except SandboxException as e:
        check("snapshot" in str(e), f"a damaged snapshot does not resume: {str(e)[:160]}")
    check(paused_state(s["damaged"]) == SandboxState.PAUSED, "and the sandbox stays paused")
    Sandbox.kill(s["damaged"])
    r = httpx.get(f"{URL}/sandboxes/{s['damaged']}", headers=hdr)
    check(r.status_code == 404, "a paused sandbox is killed")
    # Paused at its timeout (before the restart), resumed by a request to
    # its envd with its token; one with a wrong token wakes nothing.
    envd = f"49983-{s['auto']}.localhost"
    r = httpx.get(f"{URL}/files", params={"path": "/tmp/mark"},
                  headers={"Host": envd, "X-Access-Token": "wrong"})
    check(r.status_code in (401, 404), f"a wrong token wakes nothing ({r.status_code})")
    check(paused_state(s["auto"]) == SandboxState.PAUSED, "it stays paused")
    r = httpx.get(f"{URL}/files", params={"path": "/tmp/mark", "username": "root"},
                  headers={"Host": envd, "X-Access-Token": s["auto_token"]}, timeout=300)
    check(r.status_code == 200 and r.text == "auto\n",
          f"a request to its envd resumed it (auto_resume) ({r.status_code} {r.text[:80]!r})")
    check(paused_state(s["auto"]) == SandboxState.RUNNING, "and it runs")
    Sandbox.kill(s["auto"])
print("PASS")
