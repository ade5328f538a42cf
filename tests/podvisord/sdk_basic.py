"""E2B's Python SDK (unchanged, from PyPI) against podvisord: create, run
commands (output, exit codes, envs, cwd, user, background + connect), list
with a metadata filter, set_timeout, connect, kill. Exits non-zero with the
failed check on the first failure."""
import os
import sys
import time

from e2b import Sandbox, CommandExitException


from common import admin, check, tenant, URL

tenant(os.path.basename(__file__))

if os.environ.get("EXPECT_POOL"):
    # The template's pool fills in the background: wait for a ready clone.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pools = {t["name"]: t["pool"] for t in admin("GET", "/admin/templates").json()}
        if (pools.get("base") or {}).get("ready", 0) >= 1:
            break
        time.sleep(0.5)
    check((pools.get("base") or {}).get("ready", 0) >= 1, f"the base pool has a ready clone ({pools})")


t0 = time.monotonic()
sbx = Sandbox.create(metadata={"suite": "sdk_basic", "run": os.environ.get("RUN_ID", "")},
                     envs={"SANDBOX_WIDE": "yes"})
print(f"created {sbx.sandbox_id} in {time.monotonic() - t0:.2f}s")
if os.environ.get("EXPECT_POOL"):
    import httpx
    m = httpx.get(URL + "/metrics").text
    check('podvisord_sandbox_create_seconds_count{path="pool"} 1' in m, "the create was a pool hand-out")

r = sbx.commands.run("echo hello; echo oops >&2")
check(r.stdout == "hello\n", f"stdout {r.stdout!r}")
check(r.stderr == "oops\n", f"stderr {r.stderr!r}")
check(r.exit_code == 0, "exit code 0")

try:
    sbx.commands.run("exit 3")
    check(False, "a failing command raises CommandExitException")
except CommandExitException as e:
    check(e.exit_code == 3, f"exit code 3 in the exception ({e.exit_code})")

r = sbx.commands.run("echo $FOO $SANDBOX_WIDE", envs={"FOO": "bar"})
check(r.stdout == "bar yes\n", f"envs {r.stdout!r}")
r = sbx.commands.run("pwd", cwd="/tmp")
check(r.stdout == "/tmp\n", f"cwd {r.stdout!r}")
r = sbx.commands.run("whoami")
check(r.stdout == "user\n", f"default user {r.stdout!r}")
r = sbx.commands.run("whoami", user="root")
check(r.stdout == "root\n", f"user root {r.stdout!r}")
r = sbx.commands.run("python3 -c 'print(6*7)'")
check(r.stdout == "42\n", f"python3 {r.stdout!r}")

got = []
r = sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=lambda s: got.append(s))
check("".join(got) == "1\n2\n3\n", f"streamed stdout {got!r}")

h = sbx.commands.run("sleep 1; echo late", background=True)
pid = h.pid
listed = [p.pid for p in sbx.commands.list()]
check(pid in listed, f"background pid {pid} listed in {listed}")
h.disconnect()
h2 = sbx.commands.connect(pid)
res = h2.wait()
check(res.stdout == "late\n", f"connect replays output {res.stdout!r}")

h = sbx.commands.run("sleep 60", background=True)
check(sbx.commands.kill(h.pid), "kill a background command")

found = Sandbox.list(query=__import__("e2b").SandboxQuery(metadata={"suite": "sdk_basic"})).next_items()
check(any(s.sandbox_id == sbx.sandbox_id for s in found), "list with a metadata filter")
none = Sandbox.list(query=__import__("e2b").SandboxQuery(metadata={"suite": "nope"})).next_items()
check(not any(s.sandbox_id == sbx.sandbox_id for s in none), "a filter that matches nothing")

sbx.set_timeout(120)
info = sbx.get_info()
left = (info.end_at - info.started_at).total_seconds()
check(left > 100, f"set_timeout moved the end ({left:.0f}s after start)")

again = Sandbox.connect(sbx.sandbox_id)
r = again.commands.run("echo again")
check(r.stdout == "again\n", "Sandbox.connect then run")

sbx.kill()
check(not any(s.sandbox_id == sbx.sandbox_id for s in Sandbox.list().next_items()), "killed sandbox gone from list")
print("PASS")
