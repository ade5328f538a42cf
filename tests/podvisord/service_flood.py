"""A command that floods stdout: with no one attached (a background
command) podvisord keeps at most 1 MiB of it, so its memory does not grow;
attached, every byte arrives, in order, at the reader's pace."""
import os
import time

from e2b import Sandbox

from common import check, tenant


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


pid = int(os.environ["PODVISORD_PID"])
tenant("flood")
sbx = Sandbox.create()
before = rss_kib(pid)
h = sbx.commands.run("yes flood-flood-flood-flood", background=True)
time.sleep(8)
after = rss_kib(pid)
check(after - before < 32 * 1024, f"podvisord's RSS grew {((after - before) / 1024):.1f} MiB under an unread flood (before {before // 1024} MiB)")
sbx.commands.kill(h.pid)

# Attached: 8 MiB through, counted, nothing lost.
got = [0]
r = sbx.commands.run("head -c 8388608 /dev/zero | tr '\\0' x", on_stdout=lambda s: got.__setitem__(0, got[0] + len(s)), timeout=120)
check(got[0] == 8 << 20 and len(r.stdout) == 8 << 20, f"8 MiB arrive whole ({got[0]} bytes)")
r = sbx.commands.run("echo after-flood")
check(r.stdout == "after-flood\n", "the sandbox serves on")
sbx.kill()
print("PASS")
