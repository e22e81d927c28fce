"""The operator console (`kvtier console`) against a real secure dev cluster, over HTTPS with
the cluster's CA: login (the cluster checks the key and secret), the session cookie's
attributes, logout, session expiry, CSRF refusals, unauthenticated requests redirected or 401,
a non-admin refused the admin pages and actions, another tenant's bucket invisible and closed,
buckets and small objects through the pages (bytes compared with what S3 reads), users and KV
settings; and headless Chromium (DevTools protocol) logging in and reading the overview."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import urllib3
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kvtier import errors, security
from kvtier.cli import healqueue as healqueue_cli
from kvtier.cli import main as cli_main
from kvtier.cli import transfer
from kvtier.clients import gateway as gateway_client
from kvtier.clients import kvcache as kvcache_client
from kvtier.clients import metadata as metadata_client
from kvtier.proto.common.v1 import common_pb2
from tests.integration import s3_cluster as helpers
from tests.integration.conftest import cli_env, cluster_security
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
TENANT_A, TENANT_B = "console-a", "console-b"


def start_console(info: Info, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`kvtier console --state-dir ... --port 0`; (process, its URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli.main", "console", "--state-dir", str(info["state"]),
         "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready" is the line naming the bound port, never a sleep
    match = re.search(r"(https://\S+?)/ ", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"console did not start: {line}{proc.stdout.read()}")
    return proc, match.group(1)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def cluster(s3_cluster_fixture: Info) -> Info:  # noqa: F811 (the fixture, by its name)
    """The module's dev cluster (cluster.json, plus its state dir)."""
    return s3_cluster_fixture


@pytest.fixture(scope="module")
def console(cluster: Info) -> Iterator[str]:
    """A console for the module's cluster; its URL."""
    proc, url = start_console(cluster)
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def users(cluster: Info) -> dict[str, tuple[str, str]]:
    """A user of tenant A and one of tenant B."""
    return {t: helpers.add_user(cluster, t) for t in (TENANT_A, TENANT_B)}


class Browser:
    """Cookies, forms and redirects by hand (urllib3), so every status is visible."""

    def __init__(self, base: str, ca_file: str, source: str = "") -> None:
        self.base = base
        self.origin = base
        self.http = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_file,
            source_address=(source, 0) if source else None,  # another client address
        )
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []
        self.csrf = ""

    def _absorb(self, resp: Any) -> Any:
        for header in resp.headers.getlist("Set-Cookie"):
            self.set_cookie_headers.append(header)
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in header or value in ('""', ""):
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        found = re.search(r'name="csrf" value="([^"]+)"', resp.data.decode(errors="replace"))
        if found:
            self.csrf = found.group(1)
        return resp

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return {**({"Cookie": cookie} if cookie else {}), **(extra or {})}

    def get(self, path: str) -> Any:
        return self._absorb(
            self.http.request("GET", self.base + path, headers=self._headers(), redirect=False)
        )

    def post(
        self, path: str, fields: dict[str, Any], *, csrf: str | None = None, origin: str = "",
        multipart: bool = False,
    ) -> Any:  # fmt: skip
        fields = {"csrf": self.csrf if csrf is None else csrf, **fields}
        headers = self._headers({"Origin": origin or self.origin})
        return self._absorb(
            self.http.request(
                "POST",
                self.base + path,
                fields=fields,
                headers=headers,
                encode_multipart=multipart,
                redirect=False,
            )
        )

    def login(self, access_key: str, secret: str) -> Any:
        self.get("/login")
        return self.post("/login", {"access_key": access_key, "secret_key": secret})

    def text(self, resp: Any) -> str:
        return str(resp.data.decode())


def browser(info: Info, url: str) -> Browser:
    return Browser(url, info["ca_file"])


def admin(info: Info, url: str) -> Browser:
    b = browser(info, url)
    resp = b.login(info["s3_access_key"], info["s3_secret_key"])
    assert resp.status == 303, b.text(resp)
    assert resp.headers["Location"] == "/"
    return b


def test_unauthenticated_requests_redirected_or_refused(cluster: Info, console: str) -> None:
    b = browser(cluster, console)
    for path in ("/", "/buckets", "/users", "/kv", "/buckets/x/download?key=k"):
        resp = b.get(path)
        assert resp.status == 303, path
        assert resp.headers["Location"] == "/login"
    for path in ("/buckets", "/users", "/kv/quota", "/heal", "/logout"):
        resp = b.post(path, {"bucket": "nope", "tenant": "t"}, csrf="x")
        assert resp.status == 401, path
    login = b.get("/login")
    assert login.status == 200
    assert "frame-ancestors 'none'" in login.headers["Content-Security-Policy"]
    assert login.headers["X-Frame-Options"] == "DENY"
    assert b.get("/static/console.css").status == 200
    # A forged cookie is no session.
    b.cookies["kvtier_console"] = "forged"
    assert b.get("/").status == 303


def test_login_wrong_secret_refused(cluster: Info, console: str) -> None:
    b = browser(cluster, console)
    resp = b.login(cluster["s3_access_key"], "not-the-secret-0123456789")
    assert resp.status == 401
    assert "wrong access key or secret" in b.text(resp)
    assert "kvtier_console" not in b.cookies
    resp = b.login("AKIANOSUCHUSER000000", "whatever-secret-0123456789")
    assert resp.status == 401
    assert "kvtier_console" not in b.cookies


def test_login_throttled_per_address(cluster: Info, console: str) -> None:
    # Loopback addresses other than 127.0.0.1: the rest of the module's logins stay unthrottled.
    attacker = Browser(console, cluster["ca_file"], source="127.0.0.2")
    key, secret = cluster["s3_access_key"], cluster["s3_secret_key"]
    replies = [attacker.login(key, f"wrong-secret-{i:020d}") for i in range(7)]
    assert [r.status for r in replies] == [401] * 5 + [429] * 2
    assert 1 <= int(replies[-1].headers["Retry-After"]) <= 15
    assert "too many failed logins" in attacker.text(replies[-1])
    # Locked out, the right secret is not even checked from that address...
    assert attacker.login(key, secret).status == 429
    assert "kvtier_console" not in attacker.cookies
    # ...while the key's owner logs in from another address (a success resets the key).
    owner = Browser(console, cluster["ca_file"], source="127.0.0.3")
    assert owner.login(key, secret).status == 303
    assert owner.get("/").status == 200


def test_login_overview_cookie_and_logout(cluster: Info, console: str) -> None:
    b = admin(cluster, console)
    cookie = next(h for h in b.set_cookie_headers if h.startswith("kvtier_console="))
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "secure", "max-age", "path"} <= attrs
    assert "SameSite=Strict" in cookie
    resp = b.get("/")
    page = b.text(resp)
    assert resp.status == 200
    assert re.search(r'id="count-datanode">6<', page)
    assert re.search(r'id="count-kvcache">1<', page)
    assert re.search(r'id="count-metadata">1<', page)
    assert re.search(r'id="count-gateway">1<', page)
    assert "cluster healthy" in page
    assert "12/12" in page
    assert f'id="epoch">{_epoch(cluster)}<' in page or 'id="epoch">' in page
    old = dict(b.cookies)
    resp = b.post("/logout", {})
    assert resp.status == 303
    assert resp.headers["Location"] == "/login"
    assert "kvtier_console" not in b.cookies
    b.cookies = old  # the old cookie, replayed after logout, is no session
    assert b.get("/").status == 303


def _epoch(info: Info) -> int:
    return int(info.get("map_epoch", 0))


def test_session_expires(cluster: Info) -> None:
    proc, url = start_console(cluster, "--session-ttl-s", "2")
    try:
        b = admin(cluster, url)
        assert b.get("/buckets").status == 200
        time.sleep(2.5)
        resp = b.get("/buckets")
        assert resp.status == 303
        assert resp.headers["Location"] == "/login"
        assert b.post("/buckets", {"bucket": "console-expired"}).status == 401
    finally:
        stop(proc)
    with pytest.raises(ClientError):
        helpers.client(cluster).head_bucket(Bucket="console-expired")


def test_csrf_refused(cluster: Info, console: str) -> None:
    b = admin(cluster, console)
    b.get("/buckets")
    for csrf, origin in (("", ""), ("wrong-token", ""), (None, "https://evil.example")):
        resp = b.post("/buckets", {"bucket": "console-csrf"}, csrf=csrf, origin=origin)
        assert resp.status == 403, (csrf, origin)
        assert "CSRF" in b.text(resp)
    with pytest.raises(ClientError):
        helpers.client(cluster).head_bucket(Bucket="console-csrf")
    # Logout needs the token too; login needs the login form's double-submit cookie.
    assert b.post("/logout", {}, csrf="wrong").status == 403
    assert b.get("/").status == 200
    fresh = browser(cluster, console)
    resp = fresh.post(
        "/login", {"access_key": cluster["s3_access_key"],
                   "secret_key": cluster["s3_secret_key"]}, csrf="guessed",
    )  # fmt: skip
    assert resp.status == 403
    assert "kvtier_console" not in fresh.cookies


def test_non_admin_refused_admin_pages(
    cluster: Info, console: str, users: dict[str, tuple[str, str]]
) -> None:
    b = browser(cluster, console)
    assert b.login(*users[TENANT_A]).status == 303
    page = b.text(b.get("/"))
    assert 'href="/users"' not in page
    assert f"tenant {TENANT_A}" in page
    assert b.get("/users").status == 403
    b.get("/kv")
    resp = b.post("/users", {"tenant": TENANT_A, "display_name": "sneaky", "is_admin": "1"})
    assert resp.status == 403
    assert b.post("/users/" + users[TENANT_B][0] + "/delete", {}).status == 403
    assert b.post("/kv/quota", {"tenant": TENANT_A, "value": "1GiB"}).status == 403
    assert b.post("/heal", {"target": ""}).status == 403
    listed = s3_cluster_users(cluster)
    assert "sneaky" not in listed
    assert users[TENANT_B][0] in listed


def s3_cluster_users(info: Info) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", "admin", "user", "list", "--state-dir",
         str(info["state"])],
        capture_output=True, text=True, env=cli_env(), timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


def test_other_tenants_bucket_invisible(
    cluster: Info, console: str, users: dict[str, tuple[str, str]]
) -> None:
    s3_b = helpers.client(cluster, *users[TENANT_B])
    s3_b.create_bucket(Bucket="console-b-private")
    s3_b.put_object(Bucket="console-b-private", Key="secret.txt", Body=b"tenant b only")
    b = browser(cluster, console)
    assert b.login(*users[TENANT_A]).status == 303
    page = b.text(b.get("/buckets"))
    assert "console-b-private" not in page
    assert b.get("/buckets/console-b-private").status in (403, 404)
    resp = b.get("/buckets/console-b-private/download?key=secret.txt")
    assert resp.status in (403, 404)
    assert b"tenant b only" not in resp.data
    resp = b.post("/buckets/console-b-private/delete-object", {"key": "secret.txt"})
    assert resp.status in (403, 404)
    assert b.post("/buckets/console-b-private/delete", {}).status in (400, 403, 404)
    assert s3_b.get_object(Bucket="console-b-private", Key="secret.txt")["Body"].read() == (
        b"tenant b only"
    )
    # The admin sees it, with its tenant.
    page = admin(cluster, console).text(admin(cluster, console).get("/buckets"))
    assert "console-b-private" in page
    assert TENANT_B in page


def test_buckets_and_objects_through_the_pages(
    cluster: Info, console: str, users: dict[str, tuple[str, str]]
) -> None:
    b = browser(cluster, console)
    assert b.login(*users[TENANT_A]).status == 303
    b.get("/buckets")
    resp = b.post("/buckets", {"bucket": "console-a-data"})
    assert resp.status == 200
    assert "created console-a-data" in b.text(resp)
    assert b.post("/buckets", {"bucket": "Bad_Name"}).status == 400
    data = os.urandom(70_000)
    resp = b.post(
        "/buckets/console-a-data/upload",
        {"prefix": "dir/", "key": "", "file": ("blob.bin", data, "application/octet-stream")},
        multipart=True,
    )
    assert resp.status == 200, b.text(resp)
    s3_a = helpers.client(cluster, *users[TENANT_A])
    got = s3_a.get_object(Bucket="console-a-data", Key="dir/blob.bin")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    s3_a.put_object(Bucket="console-a-data", Key="top.txt", Body=b"from s3")
    page = b.text(b.get("/buckets/console-a-data"))
    assert "dir/" in page
    assert "top.txt" in page
    assert "blob.bin" not in page
    page = b.text(b.get("/buckets/console-a-data?prefix=dir%2F"))
    assert "blob.bin" in page
    resp = b.get("/buckets/console-a-data/download?key=dir%2Fblob.bin")
    assert resp.status == 200
    assert hashlib.sha256(resp.data).digest() == hashlib.sha256(data).digest()
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["Content-Disposition"].startswith("attachment")
    resp = b.post("/buckets/console-a-data/delete", {})  # not empty: refused, kept
    assert resp.status == 400
    assert "console-a-data: " in b.text(resp)
    s3_a.head_bucket(Bucket="console-a-data")
    for key in ("dir/blob.bin", "top.txt"):
        assert b.post("/buckets/console-a-data/delete-object", {"key": key}).status == 200
    resp = b.post("/buckets/console-a-data/delete", {})
    assert resp.status == 200
    assert "deleted console-a-data" in b.text(resp)
    with pytest.raises(ClientError):
        s3_a.head_bucket(Bucket="console-a-data")


def test_admin_manages_users(cluster: Info, console: str) -> None:
    b = admin(cluster, console)
    b.get("/users")
    resp = b.post("/users", {"tenant": "console-new", "display_name": "made in console"})
    page = b.text(resp)
    assert resp.status == 200
    key = re.search(r'id="created-key">([^<]+)<', page)
    secret = re.search(r'id="created-secret">([^<]+)<', page)
    assert key
    assert secret
    new = browser(cluster, console)  # the new credential works at once
    assert new.login(key.group(1), secret.group(1)).status == 303
    assert "tenant console-new" in new.text(new.get("/"))
    assert new.get("/buckets").status == 200
    resp = b.post(f"/users/{key.group(1)}/delete", {})
    assert resp.status == 200
    assert key.group(1) not in b.text(resp)
    assert browser(cluster, console).login(key.group(1), secret.group(1)).status == 401
    # The deleted user's console session ends at once (its token would still be accepted by
    # the cluster until it expires, an hour later by default).
    resp = new.post("/buckets", {"bucket": "console-made-after-deletion"})
    assert resp.status == 401
    assert new.get("/buckets").status == 303


def test_kv_page_and_settings(
    cluster: Info, console: str, users: dict[str, tuple[str, str]]
) -> None:
    b = admin(cluster, console)
    page = b.text(b.get("/kv"))
    assert "kvcache-1" in page
    assert "whole nodes" in page
    resp = b.post("/kv/ttl", {"tenant": TENANT_A, "namespace": "ns1", "value": "30"})
    assert resp.status == 200
    assert "kvcache-1: set" in b.text(resp)
    resp = b.post("/kv/durability", {"tenant": TENANT_A, "namespace": "ns1", "value": "bogus"})
    assert resp.status == 400
    user = browser(cluster, console)
    assert user.login(*users[TENANT_A]).status == 303
    page = user.text(user.get("/kv"))
    assert f"tenant {TENANT_A}" in page
    assert 'action="/kv/quota"' not in page
    # Another tenant's namespace: the kvcache node refuses the user.
    resp = user.post("/kv/ttl", {"tenant": TENANT_B, "namespace": "ns1", "value": "5"})
    assert "kvcache-1: failed" in user.text(resp)


def test_admin_heal_dry_run(cluster: Info, console: str) -> None:
    s3 = helpers.client(cluster)
    s3.create_bucket(Bucket="console-heal")
    for i in range(3):
        s3.put_object(Bucket="console-heal", Key=f"k{i}", Body=b"x" * (1000 + i))
    b = admin(cluster, console)
    b.get("/")
    resp = b.post("/heal", {"target": "console-heal", "dry_run": "1"})
    result = re.search(r'id="heal-result">([^<]+)<', b.text(resp))
    assert resp.status == 200
    assert result is not None
    assert result.group(1).startswith("scanned 3, healed 0, unrecoverable 0")
    assert "dry run" in result.group(1)
    # The Heal page keeps it: who, what, the counts and bytes, done.
    page = b.text(b.get("/heal"))
    (row,) = [r for r in re.findall(r"<tr>(.*?)</tr>", page) if "console-heal" in r]
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[1:4] == ["console-heal", "dry run", cluster["s3_access_key"]]
    assert re.search(r">done<", cells[4])
    assert cells[6:12] == ["3", "3", "0", "0", "0", "0"]  # scanned, healthy, healed...
    assert cells[12] == "2.9 KiB"  # 1000 + 1001 + 1002 bytes scanned
    assert "kvtier_gateway_heal_queue_length" in page


def test_heal_page_admins_only(
    cluster: Info, console: str, users: dict[str, tuple[str, str]]
) -> None:
    anonymous = browser(cluster, console)
    assert anonymous.get("/heal").status == 303
    user = browser(cluster, console)
    assert user.login(*users[TENANT_A]).status == 303
    resp = user.get("/heal")
    assert resp.status == 403
    assert "heal-runs" not in user.text(resp)
    assert 'href="/heal"' not in user.text(user.get("/"))


def test_heal_page_and_cli_list_every_gateways_heal_queue(
    cluster: Info, console: str, users: dict[str, tuple[str, str]]
) -> None:
    """The Heal page shows what the gateways' heal queues hold (asked as the admin); the CLI
    asks every gateway of the map with the operator's certificate; a tenant user's own
    ListHealQueue call is refused (PERMISSION_DENIED) and so is the page (403)."""
    sec = cluster_security(Path(cluster["state"]))
    gateways = asyncio.run(healqueue_cli.cluster_gateways(cluster["metadata"], sec))
    assert gateways
    out = io.StringIO()
    assert asyncio.run(healqueue_cli.run(gateways, 5, out, sec)) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == healqueue_cli.HEADER
    n = len(gateways)
    assert re.fullmatch(rf"queued \d+ on {n} gateways? \(waiting \d+, .*\); \d+ shown, \d+ more",
                        lines[-1]), lines  # fmt: skip
    b = admin(cluster, console)
    page = b.text(b.get("/heal"))
    assert 'id="heal-queue-error"' not in page
    assert re.search(rf'id="heal-queue-totals">queued \d+ on {n} gateways? ', page)
    assert '<table id="heal-queue"><thead><tr><th>gateway</th><th>age</th>' in page
    with pytest.raises(errors.PermissionDenied):
        asyncio.run(_list_heal_queue_as(cluster, *users[TENANT_A]))
    user = browser(cluster, console)
    assert user.login(*users[TENANT_A]).status == 303
    resp = user.get("/heal")
    assert resp.status == 403
    assert "heal-queue" not in user.text(resp)


async def _list_heal_queue_as(info: Info, access_key: str, secret: str) -> Any:
    sec = security.ClientSecurity(
        ca_file=info["ca_file"], access_key=access_key, secret_key=secret,
        token_address=info["metadata_client"],
    )  # fmt: skip
    async with metadata_client.MetadataClient(info["metadata_client"], security=sec) as md:
        cmap = await md.get_cluster_map()
    assert cmap is not None
    gateway = healqueue_cli.gateways_of(cmap, service_port=False)[0]
    async with gateway_client.AdminServiceClient(gateway.address, security=sec) as client:
        return await client.list_heal_queue()


def test_kv_settings_shown_as_the_cluster_keeps_them(
    cluster: Info, console: str, users: dict[str, tuple[str, str]]
) -> None:
    b = admin(cluster, console)
    b.get("/kv")
    namespace = "<ns&1>"  # shown escaped
    for kind, value in (("quota", "3GiB"), ("ttl", "45"), ("durability", "none")):
        resp = b.post(f"/kv/{kind}", {"tenant": TENANT_B, "namespace": namespace, "value": value})
        assert "kvcache-1: set" in b.text(resp), kind
    page = b.text(b.get("/kv"))
    shown = "<td>&lt;ns&amp;1&gt;</td>"
    assert f"<td>{TENANT_B}</td><td>3.0 GiB (3221225472 bytes)</td>" in _table(page, "kv-quotas")
    assert f"<td>{TENANT_B}</td>{shown}<td>45 s</td>" in _table(page, "kv-ttls")
    assert f"<td>{TENANT_B}</td>{shown}<td>none</td>" in _table(page, "kv-policies")
    # A user sees no settings, and the kvcache node refuses ListSettings to a user.
    user = browser(cluster, console)
    assert user.login(*users[TENANT_A]).status == 303
    assert "kv-quotas" not in user.text(user.get("/kv"))
    with pytest.raises(errors.PermissionDenied):
        asyncio.run(_list_settings_as(cluster, *users[TENANT_A]))


def _table(page: str, table_id: str) -> str:
    found = re.search(rf'<table id="{table_id}">(.*?)</table>', page)
    assert found, table_id
    return found.group(1)


async def _list_settings_as(info: Info, access_key: str, secret: str) -> Any:
    sec = security.ClientSecurity(
        ca_file=info["ca_file"], access_key=access_key, secret_key=secret,
        token_address=info["metadata_client"],
    )  # fmt: skip
    async with metadata_client.MetadataClient(info["metadata_client"], security=sec) as md:
        cmap = await md.get_cluster_map()
    assert cmap is not None
    (node,) = [n for n in cmap.nodes if n.role == common_pb2.NODE_ROLE_KVCACHE]
    async with kvcache_client.KVCacheClient(node.client_address, security=sec) as kvc:
        return await kvc.list_settings()


# `kvtier cp` (here, not in a module of its own, to share this module's cluster: CI time).


def _cp(info: Info, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", "cp", *args, "--state-dir", str(info["state"])],
        capture_output=True, text=True, env=env or cli_env(), timeout=120,
    )  # fmt: skip


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cp_here(info: Info, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`kvtier cp` in this process (no interpreter start: CI time): (exit code, stdout,
    stderr), with the credentials the command would take from env."""
    state = str(info["state"])
    parsed = cli_main._parser().parse_args(["cp", *args, "--state-dir", state])
    sec = transfer.client_security(state, env if env is not None else cli_env())
    out, err = io.StringIO(), io.StringIO()
    code = transfer.run(parsed, out, err, sec)
    return code, out.getvalue(), err.getvalue()


def test_cp_round_trip_single_put_and_multipart(cluster: Info, tmp_path: Path) -> None:
    s3 = helpers.client(cluster)
    s3.create_bucket(Bucket="cli-cp")
    small, big = os.urandom((1 << 20) + 123), os.urandom((6 << 20) + 7)
    (tmp_path / "small.bin").write_bytes(small)
    (tmp_path / "big.bin").write_bytes(big)
    # The real command once (its progress on stderr); in this process after that (CI time).
    up = _cp(cluster, str(tmp_path / "big.bin"), "s3://cli-cp/dir/", "--multipart-threshold",
             "6MiB", "--part-size", "5MiB")  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert re.search(r"upload: \[#{20}\] 100% 6.0 MiB of 6.0 MiB, .*/s, ETA 0s", up.stderr)
    assert "big.bin -> s3://cli-cp/dir/big.bin (6.0 MiB, ETag " in up.stdout
    code, _, stderr = _cp_here(cluster, str(tmp_path / "small.bin"), "s3://cli-cp/dir/small.bin")
    assert code == 0, stderr
    for name, data in (("small.bin", small), ("big.bin", big)):
        got = s3.get_object(Bucket="cli-cp", Key=f"dir/{name}")
        assert _sha(got["Body"].read()) == _sha(data)
        assert got["ETag"].strip('"').endswith("-2") == (name == "big.bin")  # 5 + 1 MiB parts
        (tmp_path / name).unlink()
        code, _, stderr = _cp_here(cluster, f"s3://cli-cp/dir/{name}", str(tmp_path))  # a folder
        assert code == 0, stderr
        assert "download: [####################] 100%" in stderr
        assert _sha((tmp_path / name).read_bytes()) == _sha(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "small.bin"]  # no temp left


def test_cp_errors_are_one_line_with_exit_codes(cluster: Info, tmp_path: Path) -> None:
    local = tmp_path / "f.txt"
    local.write_bytes(b"hello")
    for args in (
        (str(local), "s3://cli-cp-no-such-bucket/k"),
        ("s3://cli-cp-no-such-bucket/k", str(tmp_path / "out")),
    ):
        code, _, stderr = _cp_here(cluster, *args)
        assert code == 1, stderr
        (line,) = stderr.splitlines()
        assert line.startswith("kvtier cp: error: NotFound: ")
        assert "cli-cp-no-such-bucket" in line
    assert not (tmp_path / "out").exists()
    # A missing object in a bucket that exists: named as typed, not by its storage name.
    helpers.client(cluster).create_bucket(Bucket="cli-cp-missing")
    code, _, stderr = _cp_here(cluster, "s3://cli-cp-missing/no/such.bin", str(tmp_path / "out"))
    assert (code, stderr) == (
        1, "kvtier cp: error: NotFound: s3://cli-cp-missing/no/such.bin: no such object\n"
    )  # fmt: skip
    assert not (tmp_path / "out").exists()
    # Bad arguments (exit 2): tests/unit/test_cli_transfer.py.


def test_cp_other_tenant_cannot_read_or_write(
    cluster: Info, users: dict[str, tuple[str, str]], tmp_path: Path
) -> None:
    s3_a = helpers.client(cluster, *users[TENANT_A])
    s3_a.create_bucket(Bucket="cli-cp-a")
    s3_a.put_object(Bucket="cli-cp-a", Key="secret.bin", Body=b"tenant a only")

    def as_user(tenant: str) -> dict[str, str]:
        key, secret = users[tenant]
        return cli_env(
            KVTIER_ACCESS_KEY=key, KVTIER_SECRET_KEY=secret, KVTIER_CA_FILE=cluster["ca_file"]
        )

    stolen = tmp_path / "stolen.bin"
    code, _, stderr = _cp_here(
        cluster, "s3://cli-cp-a/secret.bin", str(stolen), env=as_user(TENANT_B)
    )
    assert code == 1
    assert re.match(r"kvtier cp: error: (PermissionDenied|NotFound): ", stderr)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file
    planted = tmp_path / "planted.bin"
    planted.write_bytes(b"from b")
    code, _, stderr = _cp_here(
        cluster, str(planted), "s3://cli-cp-a/planted.bin", env=as_user(TENANT_B)
    )
    assert code == 1, stderr
    with pytest.raises(ClientError):
        s3_a.head_object(Bucket="cli-cp-a", Key="planted.bin")
    # The same command as the owner works (the refusal is the tenant's, not the command's).
    code, _, stderr = _cp_here(
        cluster, "s3://cli-cp-a/secret.bin", str(stolen), env=as_user(TENANT_A)
    )
    assert code == 0, stderr
    assert stolen.read_bytes() == b"tenant a only"


# Headless Chromium over the DevTools protocol.


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _spki_hash(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return dict(msg.get("result", {}))

    async def wait_for(self, expression: str, timeout_s: float = 20) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
            value = reply.get("result", {}).get("value")
            if value:
                return value
            await asyncio.sleep(0.2)
        reply = await self.call(
            "Runtime.evaluate", expression="document.body.innerText", returnByValue=True
        )
        page = reply.get("result", {}).get("value")
        raise AssertionError(f"{expression} stayed false; the page says: {page}")


async def _drive_chromium(
    devtools_url: str, console: str, info: Info, shot: Path
) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(devtools_url.replace("ws://", "http://").split("/devtools")[0]
                            + "/json/list") as resp:  # fmt: skip
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tools = DevTools(ws)
            await tools.call("Page.enable")
            await tools.call("Page.navigate", url=console + "/login")
            await tools.wait_for("!!document.getElementById('access_key')")
            key, secret = json.dumps(info["s3_access_key"]), json.dumps(info["s3_secret_key"])
            fill = (
                f"document.getElementById('access_key').value = {key};"
                f"document.getElementById('secret_key').value = {secret};"
                "document.getElementById('login').click(); true"
            )
            await tools.call("Runtime.evaluate", expression=fill)
            await tools.wait_for("!!document.getElementById('count-datanode')")
            counts = await tools.wait_for(
                "JSON.stringify(Object.fromEntries(['metadata','datanode','kvcache','gateway']"
                ".map(r => [r, document.getElementById('count-' + r).textContent])))"
            )
            verdict = await tools.wait_for("document.getElementById('verdict').textContent")
            cookie_visible = await tools.call(
                "Runtime.evaluate", expression="document.cookie", returnByValue=True
            )
            png = await tools.call(
                "Page.captureScreenshot", format="png", captureBeyondViewport=True
            )
            await asyncio.to_thread(shot.write_bytes, base64.b64decode(png["data"]))
            return {
                "counts": json.loads(counts),
                "verdict": verdict,
                "document_cookie": cookie_visible["result"].get("value", ""),
                **await _kv_and_heal_pages(tools, console, shot.parent),
            }


async def _screenshot(tools: DevTools, path: Path) -> None:
    png = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    await asyncio.to_thread(path.write_bytes, base64.b64decode(png["data"]))


async def _kv_and_heal_pages(tools: DevTools, console: str, shots: Path) -> dict[str, Any]:
    """Set a quota through the KV page's form and read it back from the settings table; run a
    dry-run heal from the Heal page and read its row. Screenshots of both pages."""
    await tools.call("Page.navigate", url=console + "/kv")
    await tools.wait_for("!!document.getElementById('set-quota')")
    fill = (
        "const f = document.querySelector('form[action=\"/kv/quota\"]');"
        "f.querySelector('[name=tenant]').value = 'chromium-tenant';"
        "f.querySelector('[name=value]').value = '2GiB';"
        "document.getElementById('set-quota').click(); true"
    )
    await tools.call("Runtime.evaluate", expression=fill)
    quotas = await tools.wait_for(
        "(document.getElementById('kv-quotas') || {}).textContent?.includes('chromium-tenant')"
        " && document.getElementById('kv-quotas').textContent"
    )
    await _screenshot(tools, shots / "console-kv.png")
    await tools.call("Page.navigate", url=console + "/heal")
    await tools.wait_for("!!document.getElementById('heal')")
    await tools.call("Runtime.evaluate", expression="document.getElementById('heal').click(); true")
    result = await tools.wait_for(
        "(document.getElementById('heal-result') || {}).textContent", timeout_s=90
    )
    first_run = await tools.wait_for("document.querySelector('#heal-runs tbody tr').textContent")
    await _screenshot(tools, shots / "console-heal.png")
    return {"quotas": quotas, "heal_result": result, "heal_run": first_run}


def test_chromium_logs_in_and_sees_the_overview(cluster: Info, console: str) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    spki = _spki_hash(Path(cluster["state"]) / "pki" / "console.crt")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--window-size=1280,1000",
             # Trust exactly the console's key (the dev CA is not in Chromium's store).
             f"--ignore-certificate-errors-spki-list={spki}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            url = ""
            deadline = time.monotonic() + 60
            while not url and time.monotonic() < deadline:
                line = proc.stderr.readline()
                if not line and proc.poll() is not None:
                    pytest.skip(f"chromium cannot run here (exit {proc.returncode})")
                found = re.search(r"DevTools listening on (ws://\S+)", line)
                url = found.group(1) if found else ""
            assert url, "chromium printed no DevTools address"
            shots = Path(os.environ.get("CONSOLE_SCREENSHOT_DIR", profile))
            shots.mkdir(parents=True, exist_ok=True)
            result = asyncio.run(
                _drive_chromium(url, console, cluster, shots / "console-overview.png")
            )
            shot_bytes = (shots / "console-overview.png").stat().st_size
        finally:
            # Chromium's helpers share its process group (its own session): stop them all.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    assert result["counts"] == {"metadata": "1", "datanode": "6", "kvcache": "1", "gateway": "1"}
    assert result["verdict"] == "cluster healthy"
    assert "kvtier_console" not in result["document_cookie"]  # HttpOnly: no script reads it
    assert shot_bytes > 10_000  # a rendered page, not a blank one
    assert "chromium-tenant2.0 GiB (2147483648 bytes)" in result["quotas"]
    assert result["heal_result"].startswith("scanned ")
    assert "(every bucket)dry run" in result["heal_run"]
    assert "done" in result["heal_run"]
