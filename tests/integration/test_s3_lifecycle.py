"""S3 bucket lifecycle against a real dev cluster: Put/Get/DeleteBucketLifecycleConfiguration
with boto3, awscli and minio-py, S3's refusals on raw signed bodies, another tenant denied,
and the rules acting: the gateway's expirer deletes expired objects of an erasure-coded bucket
(and aborts stale uploads), a KV bucket's objects get the rule's TTL from the KV tier.

The cluster runs with a lifecycle "day" of 2 seconds and a pass every second
(KVTIER_GATEWAY_LIFECYCLE_DAY_S / _INTERVAL_S, as Ceph RGW's rgw_lc_debug_interval), so that
Days=1 means 2 to 4 seconds here. The expirer with an injected clock and real days is covered
over the in-process tier (tests/component/test_lifecycle.py). Every read compares bytes."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from tests.integration import s3_cluster
from tests.integration.s3_cluster import own_s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
#: A lifecycle day in this module's cluster, in seconds.
DAY_S = 2
_WAIT_S = 30.0


@pytest.fixture(scope="module", autouse=True)
def _short_days() -> Iterator[pytest.MonkeyPatch]:
    """Before the module's cluster starts (autouse fixtures come first): 2-second days."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVTIER_GATEWAY_LIFECYCLE_DAY_S", str(DAY_S))
        patch.setenv("KVTIER_GATEWAY_LIFECYCLE_INTERVAL_S", "1")
        yield patch


@pytest.fixture(scope="module")
def info(s3_cluster_fixture: Info, _short_days: pytest.MonkeyPatch) -> Info:  # noqa: F811
    """The cluster, once up with short days; the variables are gone again (the kvtier CLI,
    e.g. `admin user add`, takes any KVTIER_* variable as a sign of credentials in the
    environment)."""
    _short_days.undo()
    return s3_cluster_fixture


@pytest.fixture(scope="module")
def s3(info: Info) -> Any:
    return s3_cluster.client(info)


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    error = exc.value.response
    return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]


def _until(predicate: Callable[[], bool], timeout_s: float = _WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _gone(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        return bool(exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404)
    return False


def _body(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _signed_put(info: Info, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """A PUT signed with SigV4 as the admin, with exactly these headers (no SDK checksum):
    (status, the S3 error code or '')."""
    url = info["gateway_s3"].rstrip("/") + path
    request = AWSRequest(method="PUT", url=url, data=body, headers=headers)
    keys = Credentials(info["s3_access_key"], info["s3_secret_key"])
    S3SigV4Auth(keys, "s3", "us-east-1").add_auth(request)
    parsed = urllib.parse.urlparse(info["gateway_s3"])
    conn = http.client.HTTPSConnection(
        str(parsed.hostname), parsed.port, timeout=30, context=s3_cluster.tls_context(info)
    )
    try:
        conn.request("PUT", path, body=body, headers=dict(request.headers.items()))
        response = conn.getresponse()
        found = re.search(rb"<Code>([^<]+)</Code>", response.read())
        return response.status, found[1].decode() if found else ""
    finally:
        conn.close()


def _md5(body: bytes) -> dict[str, str]:
    return {"Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()}


RULES = [
    {
        "ID": "logs",
        "Filter": {"Prefix": "logs/"},
        "Status": "Enabled",
        "Expiration": {"Days": 30},
    },
    {
        "ID": "tmp-small",
        "Filter": {
            "And": {
                "Prefix": "tmp/",
                "Tags": [{"Key": "class", "Value": "scratch"}],
                "ObjectSizeGreaterThan": 10,
                "ObjectSizeLessThan": 4096,
            }
        },
        "Status": "Disabled",
        "Expiration": {"Date": "2031-01-01T00:00:00Z"},
    },
    {
        "ID": "uploads",
        "Filter": {"Prefix": ""},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
    },
]


def test_boto3_put_get_delete(s3: Any) -> None:
    s3.create_bucket(Bucket="lc-boto3")
    with pytest.raises(ClientError) as none:
        s3.get_bucket_lifecycle_configuration(Bucket="lc-boto3")
    assert _code(none) == ("NoSuchLifecycleConfiguration", 404)
    s3.put_bucket_lifecycle_configuration(
        Bucket="lc-boto3", LifecycleConfiguration={"Rules": RULES}
    )
    got = s3.get_bucket_lifecycle_configuration(Bucket="lc-boto3")["Rules"]
    assert [r["ID"] for r in got] == ["logs", "tmp-small", "uploads"]
    assert got[0]["Filter"] == {"Prefix": "logs/"}
    assert got[0]["Expiration"] == {"Days": 30}
    assert got[1]["Status"] == "Disabled"
    assert got[1]["Filter"]["And"]["Tags"] == [{"Key": "class", "Value": "scratch"}]
    assert got[1]["Filter"]["And"]["ObjectSizeLessThan"] == 4096
    assert got[1]["Expiration"]["Date"].isoformat() == "2031-01-01T00:00:00+00:00"
    assert got[2]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}
    # A new configuration replaces the old one whole.
    s3.put_bucket_lifecycle_configuration(
        Bucket="lc-boto3", LifecycleConfiguration={"Rules": RULES[:1]}
    )
    assert len(s3.get_bucket_lifecycle_configuration(Bucket="lc-boto3")["Rules"]) == 1
    s3.delete_bucket_lifecycle(Bucket="lc-boto3")
    with pytest.raises(ClientError) as deleted:
        s3.get_bucket_lifecycle_configuration(Bucket="lc-boto3")
    assert _code(deleted) == ("NoSuchLifecycleConfiguration", 404)
    s3.delete_bucket_lifecycle(Bucket="lc-boto3")  # again: still 204
    with pytest.raises(ClientError) as missing:
        s3.get_bucket_lifecycle_configuration(Bucket="lc-no-such-bucket")
    assert _code(missing) == ("NoSuchBucket", 404)


def test_refusals_store_nothing(s3: Any, info: Info) -> None:
    s3.create_bucket(Bucket="lc-refused")
    s3.put_bucket_lifecycle_configuration(
        Bucket="lc-refused", LifecycleConfiguration={"Rules": RULES[:1]}
    )

    def doc(rule: str) -> bytes:
        return f"<LifecycleConfiguration><Rule>{rule}</Rule></LifecycleConfiguration>".encode()

    good = doc("<ID>x</ID><Filter/><Status>Enabled</Status><Expiration><Days>1</Days></Expiration>")
    cases = [
        (b"<LifecycleConfiguration>", _md5, (400, "MalformedXML")),
        (
            doc("<ID>x</ID><Filter/><Status>Enabled</Status><Expiration><Days>0</Days></Expiration>"),
            _md5,
            (400, "InvalidArgument"),
        ),
        (
            doc("<ID>x</ID><Filter/><Status>Enabled</Status>"
                "<Expiration><Date>2031-01-01T12:00:00Z</Date></Expiration>"),
            _md5,
            (400, "InvalidArgument"),
        ),
        (
            doc("<ID>x</ID><Filter/><Status>Enabled</Status><Transition><Days>1</Days>"
                "<StorageClass>GLACIER</StorageClass></Transition>"),
            _md5,
            (501, "NotImplemented"),
        ),
        (good, lambda _: {}, (400, "InvalidRequest")),  # neither Content-MD5 nor a checksum
        (good, lambda _: _md5(b"other"), (400, "BadDigest")),
        (good, lambda _: {"x-amz-checksum-crc32": "AAAAAA=="}, (400, "BadDigest")),
    ]  # fmt: skip
    for body, headers, expected in cases:
        assert _signed_put(info, "/lc-refused?lifecycle", body, headers(body)) == expected, body
    rules = s3.get_bucket_lifecycle_configuration(Bucket="lc-refused")["Rules"]
    assert [r["ID"] for r in rules] == ["logs"]  # unchanged
    assert _signed_put(info, "/lc-refused?lifecycle", good, _md5(good)) == (200, "")
    rules = s3.get_bucket_lifecycle_configuration(Bucket="lc-refused")["Rules"]
    assert [r["ID"] for r in rules] == ["x"]


def test_other_tenant_is_denied(s3: Any, info: Info) -> None:
    s3.create_bucket(Bucket="lc-private")
    s3.put_bucket_lifecycle_configuration(
        Bucket="lc-private", LifecycleConfiguration={"Rules": RULES[:1]}
    )
    other = s3_cluster.client(info, *s3_cluster.add_user(info, "lc-other"))
    with pytest.raises(ClientError) as put:
        other.put_bucket_lifecycle_configuration(
            Bucket="lc-private", LifecycleConfiguration={"Rules": RULES[2:]}
        )
    assert _code(put) == ("AccessDenied", 403)
    with pytest.raises(ClientError) as get:
        other.get_bucket_lifecycle_configuration(Bucket="lc-private")
    assert _code(get) == ("AccessDenied", 403)
    with pytest.raises(ClientError) as delete:
        other.delete_bucket_lifecycle(Bucket="lc-private")
    assert _code(delete) == ("AccessDenied", 403)
    rules = s3.get_bucket_lifecycle_configuration(Bucket="lc-private")["Rules"]
    assert [r["ID"] for r in rules] == ["logs"]


def test_awscli(s3: Any, info: Info, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="lc-cli")
    config = tmp_path / "lifecycle.json"
    config.write_text(json.dumps({"Rules": RULES}))
    s3_cluster.aws_cli(
        info, "s3api", "put-bucket-lifecycle-configuration", "--bucket", "lc-cli",
        "--lifecycle-configuration", f"file://{config}",
    )  # fmt: skip
    out = s3_cluster.aws_cli(
        info, "s3api", "get-bucket-lifecycle-configuration", "--bucket", "lc-cli"
    )
    rules = json.loads(out.stdout)["Rules"]
    assert [r["ID"] for r in rules] == ["logs", "tmp-small", "uploads"]
    assert rules[0]["Expiration"] == {"Days": 30}
    s3_cluster.aws_cli(info, "s3api", "delete-bucket-lifecycle", "--bucket", "lc-cli")
    gone = s3_cluster.aws_cli(
        info, "s3api", "get-bucket-lifecycle-configuration", "--bucket", "lc-cli", check=False
    )
    assert gone.returncode != 0
    assert "NoSuchLifecycleConfiguration" in gone.stderr


def test_minio_client(info: Info) -> None:
    url = urllib.parse.urlparse(info["gateway_s3"])
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])
    mc = Minio(
        url.netloc, access_key=info["s3_access_key"], secret_key=info["s3_secret_key"],
        secure=True, region="us-east-1", http_client=pool,
    )  # fmt: skip
    mc.make_bucket("lc-minio")
    assert mc.get_bucket_lifecycle("lc-minio") is None
    config = LifecycleConfig(
        [
            Rule(
                ENABLED, rule_filter=Filter(prefix="cache/"), rule_id="cache",
                expiration=Expiration(days=90),
            )
        ]
    )  # fmt: skip
    mc.set_bucket_lifecycle("lc-minio", config)
    got = mc.get_bucket_lifecycle("lc-minio")
    assert got is not None
    (rule,) = got.rules
    assert rule.rule_filter is not None
    assert (rule.rule_id, rule.status, rule.rule_filter.prefix) == ("cache", ENABLED, "cache/")
    assert rule.expiration is not None
    assert rule.expiration.days == 90
    mc.delete_bucket_lifecycle("lc-minio")
    assert mc.get_bucket_lifecycle("lc-minio") is None


def test_expirer_deletes_expired_objects(s3: Any) -> None:
    s3.create_bucket(Bucket="lc-expire")
    bodies = {
        "exp/small": b"s" * 100,
        "exp/large": b"L" * 5000,
        "keep/c": b"kept",
    }
    for key, body in bodies.items():
        s3.put_object(Bucket="lc-expire", Key=key, Body=body)
    stale = s3.create_multipart_upload(Bucket="lc-expire", Key="up/x")["UploadId"]
    s3.put_bucket_lifecycle_configuration(
        Bucket="lc-expire",
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "exp",
                    "Filter": {"And": {"Prefix": "exp/", "ObjectSizeLessThan": 1000}},
                    "Status": "Enabled",
                    "Expiration": {"Days": 1},
                },
                {
                    "ID": "uploads",
                    "Filter": {"Prefix": "up/"},
                    "Status": "Enabled",
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                },
            ]
        },
    )
    _until(lambda: _gone(s3, "lc-expire", "exp/small"))

    def aborted() -> bool:
        uploads = s3.list_multipart_uploads(Bucket="lc-expire").get("Uploads", [])
        return stale not in [u["UploadId"] for u in uploads]

    _until(aborted)
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket="lc-expire")["Contents"]]
    assert listed == ["exp/large", "keep/c"]
    for key in listed:
        assert _body(s3, "lc-expire", key) == bodies[key]


def _kv_bucket(s3: Any, name: str) -> None:
    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket=name)
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)


def test_kv_bucket_objects_get_the_rule_as_ttl(s3: Any) -> None:
    _kv_bucket(s3, "lc-kv")
    assert (
        s3.head_bucket(Bucket="lc-kv")["ResponseMetadata"]["HTTPHeaders"]["x-kvtier-bucket-kind"]
        == "kv"
    )
    s3.put_object(Bucket="lc-kv", Key="tmp/before", Body=b"written before the rule")
    s3.put_bucket_lifecycle_configuration(
        Bucket="lc-kv",
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "tmp",
                    "Filter": {"Prefix": "tmp/"},
                    "Status": "Enabled",
                    "Expiration": {"Days": 1},
                }
            ]
        },
    )
    rules = s3.get_bucket_lifecycle_configuration(Bucket="lc-kv")["Rules"]
    assert [r["ID"] for r in rules] == ["tmp"]
    s3.put_object(Bucket="lc-kv", Key="tmp/a", Body=b"expires")
    s3.put_object(Bucket="lc-kv", Key="keep/b", Body=b"stays")
    upload = s3.create_multipart_upload(Bucket="lc-kv", Key="tmp/mp")["UploadId"]
    part = s3.upload_part(
        Bucket="lc-kv", Key="tmp/mp", UploadId=upload, PartNumber=1, Body=b"assembled"
    )
    s3.complete_multipart_upload(
        Bucket="lc-kv", Key="tmp/mp", UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )  # fmt: skip
    assert _body(s3, "lc-kv", "tmp/a") == b"expires"  # readable until its TTL ends
    assert _body(s3, "lc-kv", "tmp/mp") == b"assembled"
    _until(lambda: _gone(s3, "lc-kv", "tmp/a"), timeout_s=3 * DAY_S + 10)
    _until(lambda: _gone(s3, "lc-kv", "tmp/mp"), timeout_s=3 * DAY_S + 10)
    assert _body(s3, "lc-kv", "keep/b") == b"stays"
    # Written before the rule: no TTL (the rule applies to objects written after it).
    assert _body(s3, "lc-kv", "tmp/before") == b"written before the rule"
    s3.delete_bucket_lifecycle(Bucket="lc-kv")
    with pytest.raises(ClientError) as deleted:
        s3.get_bucket_lifecycle_configuration(Bucket="lc-kv")
    assert _code(deleted) == ("NoSuchLifecycleConfiguration", 404)
