"""Shared by podvisord's test scripts: the service's address and admin
token come from the test (PODVISORD_URL, PODVISORD_ADMIN_TOKEN); a tenant
of its own per script, its key set as E2B's SDK reads it."""
import os
import sys

import httpx

URL = os.environ["PODVISORD_URL"]
ADMIN = {"X-Admin-Token": os.environ["PODVISORD_ADMIN_TOKEN"]}


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def admin(method, path, **kw):
    return httpx.request(method, URL + path, headers=ADMIN, timeout=120, **kw)


def tenant(name, quotas=None, use=True):
    body = {"name": name}
    if quotas:
        body["quotas"] = quotas
    r = admin("POST", "/admin/tenants", json=body)
    check(r.status_code == 201, f"tenant {name} created ({r.status_code} {r.text[:200]})")
    t = r.json()
    if use:
        os.environ["E2B_API_KEY"] = t["apiKey"]
        os.environ["E2B_API_URL"] = URL
        os.environ["E2B_SANDBOX_URL"] = URL
    return t


if __name__ == "__main__" and sys.argv[1:] == ["--new-tenant"]:
    r = admin("POST", "/admin/tenants", json={"name": "schemathesis"})
    print(r.json()["apiKey"])
