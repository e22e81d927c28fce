"""Issue 6's acceptance with awscli and minio-py (unmodified), the security cases, hostile keys
and KV buckets, against a real dev cluster. Every read compares bytes."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import io
import re
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import botocore.auth
import numpy as np
import pytest
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, SSLError
from minio import Minio
from minio.error import S3Error as MinioError

from kvtier import pki
from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
Info = dict[str, Any]


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    error = exc.value.response
    return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]


def test_awscli_high_level_and_s3api(s3_cluster_fixture: Info, tmp_path: Path) -> None:  # noqa: F811
    info = s3_cluster_fixture
    big = tmp_path / "src" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(_data(1, 20 * MIB + 3))  # > 8 MiB: awscli uploads it in parts
    (tmp_path / "src" / "sub").mkdir()
    (tmp_path / "src" / "sub" / "small.txt").write_text("small")
    aws = s3_cluster.aws_cli
    aws(info, "s3", "mb", "s3://cli-bucket")
    aws(info, "s3", "cp", "--only-show-errors", str(big), "s3://cli-bucket/one/big.bin")
    listed = aws(info, "s3", "ls", "s3://cli-bucket/one/").stdout
    assert "big.bin" in listed
    assert str(20 * MIB + 3) in listed
    back = tmp_path / "back.bin"
    aws(info, "s3", "cp", "--only-show-errors", "s3://cli-bucket/one/big.bin", str(back))
    assert back.read_bytes() == big.read_bytes()
    aws(info, "s3", "sync", "--only-show-errors", str(tmp_path / "src"), "s3://cli-bucket/sync")
    again = aws(info, "s3", "sync", str(tmp_path / "src"), "s3://cli-bucket/sync").stdout
    assert "upload" not in again  # nothing changed: nothing sent
    out = tmp_path / "out"
    aws(info, "s3", "sync", "--only-show-errors", "s3://cli-bucket/sync", str(out))
    assert (out / "sub" / "small.txt").read_text() == "small"
    assert (out / "big.bin").read_bytes() == big.read_bytes()
    head = aws(info, "s3api", "head-object", "--bucket", "cli-bucket", "--key", "sync/big.bin")
    assert '"ContentLength": 20971523' in head.stdout
    aws(info, "s3api", "put-object", "--bucket", "cli-bucket", "--key", "api.txt", "--body",
        str(tmp_path / "src" / "sub" / "small.txt"))  # fmt: skip
    listing = aws(info, "s3api", "list-objects-v2", "--bucket", "cli-bucket", "--prefix", "sync/")
    assert "sync/sub/small.txt" in listing.stdout
    aws(info, "s3", "rm", "--only-show-errors", "--recursive", "s3://cli-bucket/")
    assert aws(info, "s3", "ls", "s3://cli-bucket/").stdout.strip() == ""
    aws(info, "s3", "rb", "s3://cli-bucket")


def test_minio_client(s3_cluster_fixture: Info) -> None:  # noqa: F811
    info = s3_cluster_fixture
    url = urllib.parse.urlparse(info["gateway_s3"])
    assert url.scheme == "https"
    # minio-py trusts a CA through the urllib3 pool it is given (or SSL_CERT_FILE).
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])
    mc = Minio(
        url.netloc, access_key=info["s3_access_key"], secret_key=info["s3_secret_key"],
        secure=True, region="us-east-1", http_client=pool,
    )  # fmt: skip
    mc.make_bucket("minio-bucket")
    assert mc.bucket_exists("minio-bucket")
    data = _data(2, 3 * MIB + 11)
    mc.put_object(
        "minio-bucket", "a/obj", io.BytesIO(data), len(data), metadata={"x-amz-meta-k": "v"}
    )
    stat = mc.stat_object("minio-bucket", "a/obj")
    assert stat.size == len(data)
    assert stat.etag == hashlib.md5(data).hexdigest()
    response = mc.get_object("minio-bucket", "a/obj")
    try:
        assert response.read() == data
    finally:
        response.close()
        response.release_conn()
    ranged = mc.get_object("minio-bucket", "a/obj", offset=100, length=1000)
    try:
        assert ranged.read() == data[100:1100]
    finally:
        ranged.close()
        ranged.release_conn()
    big = _data(3, 12 * MIB + 1)  # minio-py's multipart: parts of 5 MiB
    mc.put_object("minio-bucket", "a/big", io.BytesIO(big), len(big), part_size=5 * MIB)
    assert str(mc.stat_object("minio-bucket", "a/big").etag).endswith("-3")
    response = mc.get_object("minio-bucket", "a/big")
    try:
        assert response.read() == big
    finally:
        response.close()
        response.release_conn()
    names = sorted(
        o.object_name for o in mc.list_objects("minio-bucket", prefix="a/", recursive=True)
    )
    assert names == ["a/big", "a/obj"]
    for name in names:
        mc.remove_object("minio-bucket", name)
    assert list(mc.list_objects("minio-bucket", recursive=True)) == []
    with pytest.raises(MinioError) as missing:
        mc.stat_object("minio-bucket", "a/obj")
    assert missing.value.code in ("NoSuchKey", "ResponseError", "NoSuchObject")
    mc.remove_bucket("minio-bucket")


def test_tenants_are_isolated(s3_cluster_fixture: Info) -> None:  # noqa: F811
    info = s3_cluster_fixture
    alice = s3_cluster.client(info, *s3_cluster.add_user(info, "tenant-a"))
    bob = s3_cluster.client(info, *s3_cluster.add_user(info, "tenant-b"))
    alice.create_bucket(Bucket="alice-data")
    alice.put_object(Bucket="alice-data", Key="secret.txt", Body=b"alice's")
    assert "alice-data" not in [b["Name"] for b in bob.list_buckets()["Buckets"]]
    attempts: list[Callable[[], Any]] = [
        lambda: bob.list_objects_v2(Bucket="alice-data"),
        lambda: bob.get_object(Bucket="alice-data", Key="secret.txt"),
        lambda: bob.head_object(Bucket="alice-data", Key="secret.txt"),
        lambda: bob.put_object(Bucket="alice-data", Key="evil", Body=b"x"),
        lambda: bob.delete_object(Bucket="alice-data", Key="secret.txt"),
        lambda: bob.delete_bucket(Bucket="alice-data"),
        lambda: bob.copy_object(Bucket="alice-data", Key="c", CopySource="alice-data/secret.txt"),
        lambda: bob.create_multipart_upload(Bucket="alice-data", Key="m"),
    ]
    for attempt in attempts:
        with pytest.raises(ClientError) as denied:
            attempt()
        assert _code(denied)[1] == 403, denied.value
    bob.create_bucket(Bucket="bob-data")
    with pytest.raises(ClientError) as cross:
        bob.copy_object(Bucket="bob-data", Key="c", CopySource="alice-data/secret.txt")
    assert _code(cross) == ("AccessDenied", 403)
    assert alice.get_object(Bucket="alice-data", Key="secret.txt")["Body"].read() == b"alice's"
    assert [o["Key"] for o in alice.list_objects_v2(Bucket="alice-data")["Contents"]] == [
        "secret.txt"
    ]


def test_sigv2_headers_act_for_their_user_only(s3_cluster_fixture: Info) -> None:  # noqa: F811
    """Signature V2 Authorization headers (old clients; boto3's "s3" signer) resolve to the
    same user, tenant and rights as V4; a wrong secret, an unknown key or a skewed clock: 403."""
    info = s3_cluster_fixture
    key, secret = s3_cluster.add_user(info, "tenant-v2")
    carol = s3_cluster.client(info, key, secret, signature_version="s3")
    carol.create_bucket(Bucket="carol-v2")
    carol.put_object(
        Bucket="carol-v2", Key="k y/ü", Body=b"v2", ContentType="text/plain", Metadata={"m": "1"}
    )
    v4 = s3_cluster.client(info, key, secret)
    assert v4.get_object(Bucket="carol-v2", Key="k y/ü")["Body"].read() == b"v2"
    assert carol.get_object(Bucket="carol-v2", Key="k y/ü")["Metadata"] == {"m": "1"}
    assert carol.get_bucket_acl(Bucket="carol-v2")["Owner"]["ID"] == "tenant-v2"
    admin = s3_cluster.client(info)  # another tenant (one user less to add: ~2 s each)
    admin.create_bucket(Bucket="admin-v2")
    admin.put_object(Bucket="admin-v2", Key="k", Body=b"admin's")
    wrong = s3_cluster.client(info, key, "x" * 40, signature_version="s3")
    nobody = s3_cluster.client(info, "AKIDNOSUCHUSER", secret, signature_version="s3")
    denials: list[tuple[Callable[[], Any], str]] = [
        (lambda: carol.get_object(Bucket="admin-v2", Key="k"), "AccessDenied"),
        (lambda: carol.put_object(Bucket="admin-v2", Key="evil", Body=b"x"), "AccessDenied"),
        (lambda: carol.list_objects(Bucket="admin-v2"), "AccessDenied"),
        (lambda: wrong.get_object(Bucket="carol-v2", Key="k y/ü"), "SignatureDoesNotMatch"),
        (lambda: nobody.get_object(Bucket="carol-v2", Key="k y/ü"), "InvalidAccessKeyId"),
    ]
    for attempt, code in denials:
        with pytest.raises(ClientError) as denied:
            attempt()
        assert _code(denied) == (code, 403)
    skewed = "Tue, 07 Jul 2010 21:53:04 GMT"
    clock = mock.patch.object(botocore.auth.HmacV1Auth, "_get_date", return_value=skewed)
    with clock, pytest.raises(ClientError) as too_old:
        carol.get_object(Bucket="carol-v2", Key="k y/ü")
    assert _code(too_old) == ("RequestTimeTooSkewed", 403)


def _connection(info: Info) -> http.client.HTTPSConnection:
    """An HTTPS connection to the S3 API that trusts the cluster's CA."""
    url = urllib.parse.urlparse(info["gateway_s3"])
    return http.client.HTTPSConnection(
        str(url.hostname), url.port, timeout=30, context=s3_cluster.tls_context(info)
    )


def _raw(
    info: Info, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One HTTP request with exactly these headers and body (no client-side fixing up)."""
    conn = _connection(info)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _signed(
    info: Info,
    method: str,
    path: str,
    body: bytes,
    *,
    secret: str = "",
    when: datetime.datetime | None = None,
) -> dict[str, str]:
    """Headers of a SigV4-signed request (botocore's signer), optionally with a skewed clock."""
    url = info["gateway_s3"] + path
    request = AWSRequest(method=method, url=url, data=body)
    request.headers["x-amz-content-sha256"] = hashlib.sha256(body).hexdigest()
    signer = S3SigV4Auth(
        Credentials(info["s3_access_key"], secret or info["s3_secret_key"]), "s3", "us-east-1"
    )
    if when is None:
        signer.add_auth(request)
    else:  # the signer reads the clock through this function
        with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
            signer.add_auth(request)
    headers = dict(request.headers.items())
    headers["Content-Length"] = str(len(body))
    return headers


def test_bad_requests_are_refused_and_store_nothing(s3_cluster_fixture: Info) -> None:  # noqa: F811
    info = s3_cluster_fixture
    s3 = s3_cluster.client(info)
    s3.create_bucket(Bucket="guarded")
    body = _data(4, 256 * 1024)
    ok_status, _ = _raw(info, "PUT", "/guarded/ok", body, _signed(info, "PUT", "/guarded/ok", body))
    assert ok_status == 200
    skewed = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=20)
    cases = [
        ("/guarded/a", _signed(info, "PUT", "/guarded/a", body, secret="not-the-secret"), body,
         "SignatureDoesNotMatch", 403),
        ("/guarded/b", _signed(info, "PUT", "/guarded/b", body, when=skewed), body,
         "RequestTimeTooSkewed", 403),
        ("/guarded/c", _signed(info, "PUT", "/guarded/c", body), body[:-1] + b"!",
         "XAmzContentSHA256Mismatch", 400),
        ("/guarded/f", {k: v for k, v in _signed(info, "PUT", "/guarded/f", body).items()
                        if k != "Authorization"}, body, "AccessDenied", 403),  # anonymous
    ]  # fmt: skip
    for path, headers, payload, code, status in cases:
        got_status, reply = _raw(info, "PUT", path, payload, headers)
        assert got_status == status, (path, got_status, reply)
        assert f"<Code>{code}</Code>".encode() in reply, (path, reply)
    # Content-Length shorter than the body the signature covers: the stored bytes would not
    # be what was signed, so nothing is stored (the rest of the body is not a request either).
    shorter = _signed(info, "PUT", "/guarded/g", body)
    shorter["Content-Length"] = str(len(body) - 10)
    status, reply = _raw(info, "PUT", "/guarded/g", body, shorter)
    assert (status, b"<Code>XAmzContentSHA256Mismatch</Code>" in reply) == (400, True), reply
    unknown = _signed(info, "GET", "/guarded", b"")
    unknown["Authorization"] = unknown["Authorization"].replace(
        info["s3_access_key"], "NOSUCHKEY0000"
    )
    status, reply = _raw(info, "GET", "/guarded", b"", unknown)
    assert (status, b"<Code>InvalidAccessKeyId</Code>" in reply) == (403, True), reply
    # A truncated body: Content-Length promises more than is sent (the connection then closes).
    short = _signed(info, "PUT", "/guarded/e", body)
    conn = _connection(info)
    conn.putrequest("PUT", "/guarded/e", skip_accept_encoding=True)
    for name, value in short.items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(body[: len(body) // 2])
    # Half-close TCP under TLS (SSLSocket.shutdown drops TLS without a close_notify): the
    # server sees the body end early. Its answer, if any, can no longer be read as TLS.
    conn.sock.shutdown(1)
    conn.close()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="guarded").get("Contents", []))
    assert keys == ["ok"]  # nothing else was stored, not even partly


def test_hostile_keys_stay_keys(s3_cluster_fixture: Info) -> None:  # noqa: F811
    info = s3_cluster_fixture
    s3 = s3_cluster.client(info)
    s3.create_bucket(Bucket="keys")
    hostile = [
        "../../etc/passwd",
        "a/../../b",
        "./x",
        "..",
        "a//b",
        "%2e%2e/z",
        " lead",
        "é/ü/日本",
    ]
    for i, key in enumerate(hostile):
        s3.put_object(Bucket="keys", Key=key, Body=f"v{i}".encode())
    for i, key in enumerate(hostile):
        assert s3.get_object(Bucket="keys", Key=key)["Body"].read() == f"v{i}".encode(), key
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="keys")["Contents"])
    assert listed == sorted(hostile)
    state: Path = info["state"]
    assert not list(state.rglob("passwd"))  # no key became a path
    with pytest.raises(ClientError) as too_long:
        s3.put_object(Bucket="keys", Key="k" * 1025, Body=b"x")
    assert _code(too_long) == ("KeyTooLongError", 400)
    s3.put_object(Bucket="keys", Key="k" * 1024, Body=b"max")
    assert s3.get_object(Bucket="keys", Key="k" * 1024)["Body"].read() == b"max"


def test_kv_bucket_serves_s3_from_dram(s3_cluster_fixture: Info) -> None:  # noqa: F811
    info = s3_cluster_fixture
    s3 = s3_cluster.client(info)

    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    s3.create_bucket(Bucket="kv-blocks")
    blocks = {f"model/r0/{i:03d}.bin": _data(10 + i, 2 * MIB + i) for i in range(5)}
    for key, block in blocks.items():
        put = s3.put_object(Bucket="kv-blocks", Key=key, Body=block)
        # boto3's trailing CRC32 vouched for the bytes: the ETag is the version's, not an MD5.
        assert re.fullmatch(r'"[0-9a-f]{32}-1"', put["ETag"])
    for key, block in blocks.items():
        assert s3.get_object(Bucket="kv-blocks", Key=key)["Body"].read() == block
        part = s3.get_object(Bucket="kv-blocks", Key=key, Range="bytes=1000-1999")
        assert part["Body"].read() == block[1000:2000]
        assert s3.head_object(Bucket="kv-blocks", Key=key)["ContentLength"] == len(block)
    listed = s3.list_objects_v2(Bucket="kv-blocks", Prefix="model/")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [(k, len(b)) for k, b in blocks.items()]
    with pytest.raises(ClientError) as exists:
        s3.put_object(Bucket="kv-blocks", Key="model/r0/000.bin", Body=b"x", IfNoneMatch="*")
    assert _code(exists)[1] == 412
    with pytest.raises(ClientError) as copy:  # multipart works: test_s3_kv_buckets.py
        s3.copy_object(Bucket="kv-blocks", Key="copy", CopySource="kv-blocks/model/r0/001.bin")
    assert _code(copy) == ("NotImplemented", 501)
    s3.delete_object(Bucket="kv-blocks", Key="model/r0/000.bin")
    with pytest.raises(ClientError) as gone:
        s3.head_object(Bucket="kv-blocks", Key="model/r0/000.bin")
    assert _code(gone)[1] == 404
    with pytest.raises(ClientError) as full:
        s3.delete_bucket(Bucket="kv-blocks")
    assert _code(full) == ("BucketNotEmpty", 409)
    s3.delete_objects(Bucket="kv-blocks", Delete={"Objects": [{"Key": k} for k in blocks]})
    s3.delete_bucket(Bucket="kv-blocks")


def _served_cert(info: Info) -> bytes:
    """The certificate (DER) a new TLS handshake with the S3 port gets."""
    url = urllib.parse.urlparse(info["gateway_s3"])
    context = s3_cluster.tls_context(info)
    with (
        socket.create_connection((str(url.hostname), url.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=url.hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_s3_is_https_only_and_reloads_a_replaced_certificate(s3_cluster_fixture: Info) -> None:  # noqa: F811
    info = s3_cluster_fixture
    url = urllib.parse.urlparse(info["gateway_s3"])
    assert url.scheme == "https"
    assert url.hostname == "127.0.0.1"  # nothing listens on a wildcard address unless asked
    # Plain HTTP to the S3 port gets no HTTP answer.
    plain = http.client.HTTPConnection(str(url.hostname), url.port, timeout=10)
    plain.request("GET", "/")
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        plain.getresponse()
    plain.close()
    # A client that does not trust the cluster's CA refuses the server.
    untrusting = boto3.client(
        "s3", endpoint_url=info["gateway_s3"], region_name="us-east-1",
        aws_access_key_id=info["s3_access_key"], aws_secret_access_key=info["s3_secret_key"],
    )  # fmt: skip
    with pytest.raises(SSLError):
        untrusting.list_buckets()

    # Rotation: a new gateway certificate in the same files is served on new connections
    # within the gateway's check interval (s3/tls.py: 1 s), without a restart.
    certs = Path(info["ca_file"]).parent
    assert _served_cert(info) == ssl.PEM_cert_to_DER_cert((certs / "gateway-1.crt").read_text())
    authority = pki.load_authority(certs)
    took = []
    for _ in range(3):
        before = _served_cert(info)
        fresh = authority.issue("gateway", "gateway-1", hosts=pki.local_hosts())
        pki.write_pair(certs, "gateway-1", fresh)
        replaced = time.monotonic()
        while (served := _served_cert(info)) == before:
            assert time.monotonic() - replaced < 10, "the S3 port still serves the old certificate"
            time.sleep(0.02)
        took.append(time.monotonic() - replaced)
        assert served == ssl.PEM_cert_to_DER_cert(fresh[0].decode())
    sys.stderr.write(
        f"S3 served a replaced certificate after {', '.join(f'{t:.2f}' for t in took)} s\n"
    )
    s3 = s3_cluster.client(info)
    s3.create_bucket(Bucket="after-rotation")
    s3.put_object(Bucket="after-rotation", Key="k", Body=b"rotated")
    assert s3.get_object(Bucket="after-rotation", Key="k")["Body"].read() == b"rotated"
