"""podvisord serving TLS (--tls-cert, --tls-key), E2B's SDK trusting the
test's certificate through SSL_CERT_FILE: create, a command, a file, a
sandbox port, kill; cleartext HTTP to the TLS port gets nowhere."""
import os
import ssl
import time

import certifi

import httpx
from e2b import Sandbox

from common import check, tenant, URL

check(URL.startswith("https://"), f"podvisord is served over TLS ({URL})")
tenant(os.path.basename(__file__))

sbx = Sandbox.create()
r = sbx.commands.run("echo over tls")
check(r.stdout == "over tls\n", f"a command over TLS {r.stdout!r}")
sbx.files.write("/home/user/t.txt", "tls")
check(sbx.files.read("/home/user/t.txt") == "tls", "a file over TLS")

sbx.commands.run("mkdir -p /tmp/w && echo hi > /tmp/w/i.txt")
sbx.commands.run("cd /tmp/w && python3 -m http.server 8000", background=True)
host = sbx.get_host(8000)
deadline = time.monotonic() + 60
got = None
while time.monotonic() < deadline:
    got = httpx.get(URL + "/i.txt", headers={"Host": host}, timeout=20)
    if got.status_code == 200:
        break
    time.sleep(0.3)
check(got.status_code == 200 and got.text == "hi\n", f"a sandbox port over TLS: {got.status_code}")

with httpx.Client(http2=False, verify=True) as c:
    check(c.get(URL + "/health").status_code == 200, "HTTP/1.1 over TLS")

plain = URL.replace("https://", "http://")
try:
    r = httpx.get(plain + "/health", timeout=5)
    check(False, f"cleartext to the TLS port answered {r.status_code}")
except httpx.HTTPError as e:
    print(f"ok: cleartext to the TLS port fails ({type(e).__name__})")
try:
    # certifi's roots only: not the test's own certificate.
    httpx.get(URL + "/health", timeout=5, verify=ssl.create_default_context(cafile=certifi.where()))
    check(False, "a client that does not trust the certificate connects")
except httpx.ConnectError:
    print("ok: a client that does not trust the certificate is refused")

sbx.kill()
print("PASS")
