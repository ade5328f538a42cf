"""Two tenants against podvisord: each sees and touches only its own
sandboxes (another's is 404), a key revoked mid-session stops working,
quotas give 429 with Retry-After, an expired sandbox is killed, a deleted
tenant's sandboxes end. Then bad input: no key, a wrong key, an unknown
template, malformed and oversize JSON, unknown ids, envd without or with
another sandbox's token, malformed Connect messages."""
import json
import time

import httpx
from e2b import Sandbox, SandboxQuery
from e2b.exceptions import AuthenticationException, NotFoundException, SandboxException

from common import URL, admin, check, tenant

a = tenant("alice", {"maxSandboxes": 2})
b = tenant("bob", use=False)
A = {"X-API-Key": a["apiKey"]}
B = {"X-API-Key": b["apiKey"]}


def api(method, path, key, **kw):
    return httpx.request(method, URL + path, headers=key, timeout=120, **kw)


sa = Sandbox.create(metadata={"owner": "alice"}, api_key=a["apiKey"])
sb = Sandbox.create(api_key=b["apiKey"])

# Isolation: 404, never 403, for another tenant's sandbox.
for method, path, body in [
    ("GET", f"/sandboxes/{sa.sandbox_id}", None),
    ("DELETE", f"/sandboxes/{sa.sandbox_id}", None),
    ("POST", f"/sandboxes/{sa.sandbox_id}/timeout", {"timeout": 30}),
    ("POST", f"/v2/sandboxes/{sa.sandbox_id}/connect", {"timeout": 30}),
]:
    r = api(method, path, B, json=body)
    check(r.status_code == 404 and r.json()["code"] == 404, f"bob {method} {path} -> {r.status_code}")
ids_b = [s["sandboxID"] for s in api("GET", "/v2/sandboxes", B).json()]
check(sa.sandbox_id not in ids_b and sb.sandbox_id in ids_b, "bob lists only his own")
ids_a = [s.sandbox_id for s in Sandbox.list(api_key=a["apiKey"]).next_items()]
check(sa.sandbox_id in ids_a and sb.sandbox_id not in ids_a, "alice lists only hers")
r = sa.commands.run("echo still-alive")
check(r.stdout == "still-alive\n", "alice's sandbox untouched by bob's calls")

# envd: the token of one sandbox opens no other.
hdr = {"E2b-Sandbox-Id": sa.sandbox_id, "E2b-Sandbox-Port": "49983",
       "Content-Type": "application/json"}
r = httpx.post(URL + "/process.Process/List", headers=hdr, content=b"{}")
check(r.status_code == 401 and r.json()["code"] == "unauthenticated", f"envd without a token -> {r.status_code}")
r = httpx.post(URL + "/process.Process/List", headers={**hdr, "X-Access-Token": sb._envd_access_token}, content=b"{}")
check(r.status_code == 401, f"envd with bob's sandbox token on alice's -> {r.status_code}")
good = {**hdr, "X-Access-Token": sa._envd_access_token}
r = httpx.post(URL + "/process.Process/List", headers=good, content=b"{}")
check(r.status_code == 200, f"envd List with the token ({r.status_code} {r.text[:80]})")
# Routed by Host as well.
r = httpx.post(URL + "/process.Process/List",
               headers={"Host": f"49983-{sa.sandbox_id}.localhost", "X-Access-Token": sa._envd_access_token,
                        "Content-Type": "application/json"}, content=b"{}")
check(r.status_code == 200, f"envd routed by Host ({r.status_code})")
r = httpx.post(URL + "/process.Process/List", headers=good, content=b"{not json")
check(r.status_code == 400 and r.json()["code"] == "invalid_argument", f"malformed JSON message -> {r.status_code}")
r = httpx.post(URL + "/process.Process/List", headers={**good, "Content-Type": "application/proto"}, content=b"\xff\xff\xff")
check(r.status_code == 400, f"malformed protobuf message -> {r.status_code}")
r = httpx.post(URL + "/process.Process/Start", headers={**good, "Content-Type": "application/connect+json"},
               content=b"\x00\x00\x00\x00\x09{")
check(r.status_code == 200 and b"invalid_argument" in r.content, "a truncated envelope ends the stream with invalid_argument")
r = httpx.post(URL + "/process.Process/Nope", headers=good, content=b"{}")
check(r.status_code == 501, f"unknown method -> {r.status_code}")

# Bad input on the REST API.
r = httpx.post(URL + "/v2/sandboxes", json={"templateID": "base"})
check(r.status_code == 401 and r.json()["code"] == 401, "no key -> 401")
r = api("POST", "/v2/sandboxes", {"X-API-Key": "e2b_wrong"}, json={"templateID": "base"})
check(r.status_code == 401, "wrong key -> 401")
r = api("POST", "/v2/sandboxes", A, json={"templateID": "nope"})
check(r.status_code == 404 and "nope" in r.json()["message"], f"unknown template -> {r.status_code}")
r = api("POST", "/v2/sandboxes", {**A, "Content-Type": "application/json"}, content=b"{")
check(r.status_code == 400 and r.json()["code"] == 400, f"malformed JSON -> {r.status_code} {r.text[:100]}")
r = api("POST", "/v2/sandboxes", A, json={"templateID": "base", "metadata": {"k": "v" * (2 << 20)}})
check(r.status_code == 413, f"oversize body -> {r.status_code}")
r = api("POST", "/v2/sandboxes", A, json={"templateID": "base", "timeout": -5})
check(r.status_code == 400, f"negative timeout -> {r.status_code}")
r = api("GET", "/sandboxes/doesnotexist", A)
check(r.status_code == 404, "unknown sandbox id -> 404")
try:
    Sandbox.connect("doesnotexist", api_key=a["apiKey"])
    check(False, "SDK connect to an unknown id raises")
except (NotFoundException, SandboxException) as e:
    check(True, f"SDK connect to an unknown id raises {type(e).__name__}")

# Quota: alice may have 2.
sa2 = Sandbox.create(api_key=a["apiKey"])
r = api("POST", "/v2/sandboxes", A, json={"templateID": "base"})
check(r.status_code == 429 and "concurrent sandboxes" in r.json()["message"] and "retry-after" in r.headers,
      f"over quota -> {r.status_code} {r.json()['message']!r}")
sa2.kill()

# A key revoked mid-session.
key_id = a["key"]["id"]
r = admin("DELETE", f"/admin/tenants/{a['id']}/keys/{key_id}")
check(r.status_code == 204, "key revoked")
r = api("GET", f"/sandboxes/{sa.sandbox_id}", A)
check(r.status_code == 401, f"revoked key -> {r.status_code}")
try:
    Sandbox.list(api_key=a["apiKey"]).next_items()
    check(False, "SDK with a revoked key fails")
except AuthenticationException:
    check(True, "SDK with a revoked key raises AuthenticationException")
r = admin("POST", f"/admin/tenants/{a['id']}/keys")
A2 = {"X-API-Key": r.json()["apiKey"]}
check(api("GET", f"/sandboxes/{sa.sandbox_id}", A2).status_code == 200, "a new key works")

# Expiry: a sandbox with a 2 s timeout is killed.
sx = Sandbox.create(timeout=2, api_key=A2["X-API-Key"])
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    if api("GET", f"/sandboxes/{sx.sandbox_id}", A2).status_code == 404:
        break
    time.sleep(0.5)
check(api("GET", f"/sandboxes/{sx.sandbox_id}", A2).status_code == 404, "expired sandbox killed")

# Admin API: unauthenticated and wrong token.
check(httpx.get(URL + "/admin/tenants").status_code == 401, "admin without a token -> 401")
check(httpx.get(URL + "/admin/tenants", headers={"X-Admin-Token": "x"}).status_code == 401, "admin with a wrong token -> 401")
check(admin("POST", "/admin/tenants", json={"name": "alice"}).status_code == 409, "duplicate tenant -> 409")

# Deleting a tenant ends its sandboxes and its keys.
r = admin("DELETE", f"/admin/tenants/{b['id']}")
check(r.status_code == 204, "bob deleted")
check(api("GET", "/v2/sandboxes", B).status_code == 401, "bob's key is gone")
try:
    sb.commands.run("true")
    check(False, "bob's sandbox ended with him")
except Exception as e:
    check(True, f"bob's sandbox ended with him ({type(e).__name__})")

m = httpx.get(URL + "/metrics").text
check("podvisord_sandbox_create_seconds" in m and "podvisord_api_requests_total" in m, "metrics exposed")
check(Sandbox.kill(sa.sandbox_id, api_key=A2["X-API-Key"]), "alice kills hers with the new key")
print("PASS")
