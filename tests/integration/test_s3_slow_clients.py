"""Slow clients on the S3 API: a client that sends or reads nothing holds no staging slot.

The gateway has 4 staging slots of 64 MiB (set explicitly here). Raw HTTPS connections (signed
with UNSIGNED-PAYLOAD, as boto3 does over HTTPS) stall mid-body or never read a GET's response;
boto3 PUTs and GETs beside them must still go through at once. A body idle for
s3_body_timeout_s ends in 400 RequestTimeout with nothing stored; a GET response left unread
for s3_send_timeout_s is cut off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from tests.integration import s3_cluster
from tests.integration.conftest import cli_env, dump_logs, kvtier_cmd

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
SLOTS = 4
BODY_TIMEOUT_S = 3.0
SEND_TIMEOUT_S = 3.0
#: Well under what a stalled slot costs (the engine waits 30 s for a free one).
QUICK_S = 15.0


@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A dev cluster whose gateway has SLOTS staging slots and short body/send timeouts."""
    state = tmp_path_factory.mktemp("s3slow") / "state"
    env = cli_env(
        KVTIER_GATEWAY_STAGING_BYTES=str(SLOTS * 64 * MIB),
        KVTIER_GATEWAY_STAGING_SLOT_BYTES=str(64 * MIB),
        KVTIER_GATEWAY_S3_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        KVTIER_GATEWAY_S3_SEND_TIMEOUT_S=str(SEND_TIMEOUT_S),
    )
    up = kvtier_cmd(
        "up", "--state-dir", str(state), "--detach", "--kvcache-nodes", "1",
        "--lease-ttl-s", "2", "--shutdown-grace-s", "2", timeout_s=150, env=env,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr + dump_logs(state)
    try:
        info = json.loads((state / "cluster.json").read_text())
        info["state"] = state
        s3 = s3_cluster.client(info)
        s3.create_bucket(Bucket="slow")
        yield info
    finally:
        kvtier_cmd("down", "--state-dir", str(state), timeout_s=90)


def _client(info: dict[str, Any]) -> Any:
    return s3_cluster.client(info, connect_timeout=5, read_timeout=QUICK_S)


def raw_request(
    info: dict[str, Any], method: str, path: str, headers: dict[str, str], rcvbuf: int = 0
) -> ssl.SSLSocket:
    """An HTTPS connection that has sent a SigV4-signed request's head (UNSIGNED-PAYLOAD):
    the caller sends the body, or reads the response, at its own pace."""
    url = urllib.parse.urlparse(info["gateway_s3"])
    signed = AWSRequest(method=method, url=info["gateway_s3"] + path, headers=headers)
    signed.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    credentials = Credentials(info["s3_access_key"], info["s3_secret_key"])
    S3SigV4Auth(credentials, "s3", "us-east-1").add_auth(signed)
    sock = socket.socket()
    if rcvbuf:  # before connect: the TCP window is agreed then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect((url.hostname, url.port))
    tls = s3_cluster.tls_context(info).wrap_socket(sock, server_hostname=url.hostname)
    head = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}"]
    head += [f"{name}: {value}" for name, value in signed.headers.items()]
    tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    return tls


def raw_put(info: dict[str, Any], key: str, size: int, query: str = "") -> ssl.SSLSocket:
    return raw_request(
        info, "PUT", f"/slow/{key}{query}",
        {"Content-Length": str(size), "Content-Type": "application/octet-stream"},
    )  # fmt: skip


def read_response(tls: ssl.SSLSocket, timeout_s: float) -> tuple[int, bytes]:
    """(status, body) of the response on tls (the body up to Content-Length or the close)."""
    tls.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    length = int(match[1]) if match else 0
    with contextlib.suppress(OSError):
        while len(rest) < length:
            chunk = tls.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, rest


class Trickle:
    """Sends one byte every interval_s on each connection (slowly, below the body timeout),
    from a thread, until stopped."""

    def __init__(self, conns: list[ssl.SSLSocket], interval_s: float) -> None:
        self._conns, self._interval_s = conns, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.sendall(b"x")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _timed(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    started = time.monotonic()
    result = fn(*args, **kwargs)
    took = time.monotonic() - started
    assert took < QUICK_S, f"{what} took {took:.1f}s beside slow clients"
    return result


def _put_get_beside(info: dict[str, Any], tag: str) -> None:
    """A small and a 64 MiB object PUT and read back by boto3, each quickly, bytes compared."""
    s3 = _client(info)
    for key, data in ((f"{tag}-small", os.urandom(1000)), (f"{tag}-big", os.urandom(64 * MIB))):
        _timed(f"PUT {key}", s3.put_object, Bucket="slow", Key=key, Body=data)
        got = _timed(f"GET {key}", lambda k=key: s3.get_object(Bucket="slow", Key=k)["Body"].read())
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def _absent(info: dict[str, Any], key: str) -> bool:
    try:
        s3_cluster.client(info).head_object(Bucket="slow", Key=key)
    except Exception as exc:  # botocore ClientError 404
        return "404" in str(exc)
    return False


def test_stalled_put_bodies_do_not_stall_others(slow_cluster: dict[str, Any]) -> None:
    """SLOTS PUTs that sent a few bytes of 64 MiB and then a byte a second (never idle long
    enough to time out) hold no slot: boto3 PUTs and GETs beside them finish at once. Once
    they go quiet, each gets 400 RequestTimeout and nothing is stored."""
    conns = [raw_put(slow_cluster, f"stalled-{i}", 64 * MIB) for i in range(SLOTS)]
    for conn in conns:
        conn.sendall(b"y" * 1000)
    trickle = Trickle(conns, 1.0)
    try:
        time.sleep(1.5)  # they reach their staging
        _put_get_beside(slow_cluster, "beside-puts")
    finally:
        trickle.stop()
    for i, conn in enumerate(conns):
        status, body = read_response(conn, BODY_TIMEOUT_S + 10)
        conn.close()
        assert status == 400, body
        assert b"<Code>RequestTimeout</Code>" in body, body
        assert b"not read from or written to within the timeout period" in body
        assert _absent(slow_cluster, f"stalled-{i}")


def test_idle_body_is_request_timeout(slow_cluster: dict[str, Any]) -> None:
    """A PUT that sends its head (or a few bytes) and then nothing: 400 RequestTimeout after
    about s3_body_timeout_s, nothing stored; the same for UploadPart (no part listed)."""
    s3 = s3_cluster.client(slow_cluster)
    s3.put_object(Bucket="slow", Key="idle-old", Body=b"before")
    no_body = raw_put(slow_cluster, "idle-new", 5 * MIB)
    some = raw_put(slow_cluster, "idle-old", 5 * MIB)
    some.sendall(b"z" * 4096)
    upload = s3.create_multipart_upload(Bucket="slow", Key="idle-mp")["UploadId"]
    part = raw_put(slow_cluster, "idle-mp", 6 * MIB, f"?partNumber=1&uploadId={upload}")
    part.sendall(b"p" * (2 * MIB))
    started = time.monotonic()
    for conn in (no_body, some, part):
        status, body = read_response(conn, BODY_TIMEOUT_S + 10)
        conn.close()
        assert status == 400, body
        assert b"<Code>RequestTimeout</Code>" in body, body
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    assert _absent(slow_cluster, "idle-new")
    got = s3.get_object(Bucket="slow", Key="idle-old")["Body"].read()
    assert got == b"before"  # the old version is intact
    assert s3.list_parts(Bucket="slow", Key="idle-mp", UploadId=upload).get("Parts", []) == []
    s3.abort_multipart_upload(Bucket="slow", Key="idle-mp", UploadId=upload)


def test_slow_steady_put_is_stored_exactly(slow_cluster: dict[str, Any]) -> None:
    """A body sent in bursts with pauses longer than a slot is kept waiting (but under the body
    timeout), across the engine's calls, is stored byte for byte."""
    data = os.urandom(40 * MIB)
    conn = raw_put(slow_cluster, "steady", len(data))
    bursts = [data[: 20 * MIB], data[20 * MIB : 20 * MIB + 7], data[20 * MIB + 7 : 33 * MIB]]
    bursts.append(data[33 * MIB :])
    for burst in bursts:
        conn.sendall(burst)
        time.sleep(BODY_TIMEOUT_S / 2)
    status, body = read_response(conn, 30)
    conn.close()
    assert status == 200, body
    got = s3_cluster.client(slow_cluster).get_object(Bucket="slow", Key="steady")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_unread_gets_do_not_stall_others(slow_cluster: dict[str, Any]) -> None:
    """SLOTS GETs of a 64 MiB object whose clients never read (their TCP windows fill) hold
    no slot: boto3 PUTs and GETs beside them finish at once; after s3_send_timeout_s the
    gateway cuts each one off (fewer bytes than Content-Length, then the close)."""
    s3 = s3_cluster.client(slow_cluster)
    s3.put_object(Bucket="slow", Key="unread", Body=os.urandom(64 * MIB))
    conns = [
        raw_request(slow_cluster, "GET", "/slow/unread", {}, rcvbuf=64 << 10) for _ in range(SLOTS)
    ]
    try:
        time.sleep(1.5)  # their responses fill the windows
        _put_get_beside(slow_cluster, "beside-gets")
        time.sleep(SEND_TIMEOUT_S + 2)
        for conn in conns:
            received, closed = 0, False
            conn.settimeout(15)
            try:
                while True:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        closed = True
                        break
                    received += len(chunk)
            except (ssl.SSLError, ConnectionError):
                closed = True
            assert closed, received
            assert received < 64 * MIB
    finally:
        for conn in conns:
            conn.close()
