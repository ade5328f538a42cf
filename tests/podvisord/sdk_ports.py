"""A sandbox's own ports through podvisord, as E2B's SDK hands them out
(`get_host`): HTTP (a GET, a 4 MiB POST echoed back), a WebSocket-style
upgrade carried both ways, the routing headers, a port nothing listens on,
the traffic token of a sandbox made with allow_public_traffic=False, and a
hostile server in the guest (garbage instead of HTTP, a connection that
never answers, an endless body) that leaves podvisord serving."""
import base64
import hashlib
import os
import socket
import time
import urllib.parse

import httpx
from e2b import Sandbox

from common import check, tenant, URL

tenant(os.path.basename(__file__))

# The guest's servers: plain Python, started in the sandbox.
SERVER = r'''
import base64, hashlib, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"]
            acc = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", acc)
            self.end_headers()
            self.wfile.flush()
            while True:
                b = self.connection.recv(65536)
                if not b:
                    return
                self.connection.sendall(b.upper())
        if self.path == "/endless":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            chunk = b"x" * 65536
            try:
                while True:
                    self.wfile.write(chunk)
            except OSError:
                return
        body = ("path=%s host=%s" % (self.path, self.headers.get("Host"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-From-Guest", "yes")
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        n = int(self.headers["Content-Length"])
        data = self.rfile.read(n)
        out = hashlib.sha256(data).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

def garbage():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 8001)); s.listen(16)
    while True:
        c, _ = s.accept()
        c.recv(65536)
        c.sendall(b"\x00\xffnot http at all\r\n\r\n" * 100)
        c.close()

def silent():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 8002)); s.listen(16)
    held = []
    while True:
        c, _ = s.accept()
        held.append(c)

threading.Thread(target=garbage, daemon=True).start()
threading.Thread(target=silent, daemon=True).start()
ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
'''


def wait_up(get, what):
    deadline = time.monotonic() + 60
    last = None
    while time.monotonic() < deadline:
        try:
            last = get()
            if last.status_code == 200:
                return last
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.3)
    check(False, f"{what} came up ({last})")


def host_get(host, path="/", **kw):
    kw.setdefault("timeout", 30)
    return httpx.get(URL + path, headers={"Host": host, **kw.pop("headers", {})}, **kw)


sbx = Sandbox.create()
sbx.files.write("/home/user/server.py", SERVER)
sbx.commands.run("python3 /home/user/server.py", background=True)
host = sbx.get_host(8000)
check(host == f"8000-{sbx.sandbox_id}.{sbx.sandbox_domain}", f"get_host {host}")
r = wait_up(lambda: host_get(host, "/hello?x=1"), "the guest's server")
check(r.text == f"path=/hello?x=1 host={host}", f"GET through Host routing: {r.text!r}")
check(r.headers.get("x-from-guest") == "yes", "the guest's headers come back")

r = httpx.get(URL + "/via-headers", timeout=30,
              headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"})
check(r.status_code == 200 and r.text.startswith("path=/via-headers"), f"GET through E2b-Sandbox-* headers: {r.status_code} {r.text!r}")

body = os.urandom(4 << 20)
r = httpx.post(URL + "/upload", content=body, headers={"Host": host}, timeout=60)
check(r.text == hashlib.sha256(body).hexdigest(), "a 4 MiB POST arrives whole")

# An upgrade: the bytes after 101 go both ways untouched.
u = urllib.parse.urlsplit(URL)
key = base64.b64encode(os.urandom(16)).decode()
s = socket.create_connection((u.hostname, u.port), timeout=30)
s.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(4096)
    check(chunk, "the upgrade is answered")
    head += chunk
check(head.startswith(b"HTTP/1.1 101"), f"101 Switching Protocols ({head[:40]!r})")
want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
check(want in head, "Sec-WebSocket-Accept from the guest")
rest = head.split(b"\r\n\r\n", 1)[1]
s.sendall(b"hello over the upgrade")
got = rest
while len(got) < len(b"hello over the upgrade"):
    got += s.recv(4096)
check(got == b"HELLO OVER THE UPGRADE", f"upgraded bytes both ways: {got!r}")
s.close()

r = host_get(sbx.get_host(8009))
check(r.status_code == 502 and "not open" in r.json()["message"], f"a closed port: {r.status_code} {r.text[:120]}")
r = host_get(f"8000-nosuchsandbox.{sbx.sandbox_domain}")
check(r.status_code == 404, f"an unknown sandbox: {r.status_code}")

# The hostile server.
r = host_get(sbx.get_host(8001))
check(r.status_code == 502, f"garbage instead of HTTP: {r.status_code} {r.text[:120]}")
try:
    host_get(sbx.get_host(8002), timeout=3)
    check(False, "a silent server times the client out")
except httpx.TimeoutException:
    print("ok: a silent server times the client out")
with httpx.stream("GET", URL + "/endless", headers={"Host": host}, timeout=30) as st:
    n = 0
    for chunk in st.iter_bytes():
        n += len(chunk)
        if n > 32 << 20:
            break
check(n > 32 << 20, f"an endless body streams ({n >> 20} MiB read, then hung up)")
r = host_get(host, "/after")
check(r.status_code == 200, "the port still serves after the hostile cases")
check(httpx.get(URL + "/health", timeout=10).status_code == 200, "podvisord still serves")

# A sandbox whose ports ask for its traffic token.
priv = Sandbox.create(network={"allow_public_traffic": False})
token = priv.traffic_access_token
check(token, "allow_public_traffic=False gives a traffic access token")
check(not sbx.traffic_access_token, "a public sandbox has none")
priv.files.write("/home/user/server.py", SERVER)
priv.commands.run("python3 /home/user/server.py", background=True)
phost = priv.get_host(8000)
wait_up(lambda: host_get(phost, headers={"e2b-traffic-access-token": token}), "the private sandbox's server")
r = host_get(phost)
check(r.status_code == 403 and "missing" in r.json()["message"], f"no token: {r.status_code}")
r = host_get(phost, headers={"e2b-traffic-access-token": "wrong"})
check(r.status_code == 403 and "invalid" in r.json()["message"], f"a wrong token: {r.status_code}")
r = host_get(phost, headers={"e2b-traffic-access-token": sbx.sandbox_id})
check(r.status_code == 403, "another sandbox's id is no token")
r = host_get(host, headers={"e2b-traffic-access-token": token})
check(r.status_code == 200, "a public sandbox ignores the header")
r = priv.commands.run("echo envd still works")
check(r.stdout == "envd still works\n", "envd of a private sandbox needs only its access token")

priv.kill()
sbx.kill()
r = host_get(host)
check(r.status_code == 404, f"a killed sandbox's port: {r.status_code}")
print("PASS")
