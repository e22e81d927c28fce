"""POST Object (browser-form uploads with a signed POST policy) against a real dev cluster:
boto3's `generate_presigned_post` (V4 and V2) posted as real multipart/form-data over HTTPS
(urllib3 trusting the cluster CA), every stored object read back byte for byte, and S3's
errors, each with nothing stored: an expired, tampered or wrongly signed policy, a field no
condition names, content-length-range, starts-with, an anonymous form, another tenant."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import urllib3
from botocore.exceptions import ClientError

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
BUCKET = "post-objects"

Fields = list[tuple[str, Any]]


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def info(s3_cluster_fixture: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    return s3_cluster_fixture


@pytest.fixture(scope="module")
def users(info: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Two tenants' users (not admins): the bucket's owner and a stranger."""
    return {"owner": s3_cluster.add_user(info, "t-post"), "other": s3_cluster.add_user(info, "t-x")}


@pytest.fixture(scope="module")
def s3(info: dict[str, Any], users: dict[str, tuple[str, str]]) -> Any:
    client = s3_cluster.client(info, *users["owner"], signature_version="s3v4")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def http(info: dict[str, Any]) -> urllib3.PoolManager:
    return urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])


def _form(post: dict[str, Any], file: Any, *, drop: str = "") -> Fields:
    """The form of a presigned POST: its fields (but drop), the file last."""
    return [*((k, v) for k, v in post["fields"].items() if k != drop), ("file", file)]


def _send(
    http: urllib3.PoolManager, url: str, form: Fields, **headers: str
) -> urllib3.BaseHTTPResponse:
    body, content_type = urllib3.encode_multipart_formdata(form)
    return http.request(
        "POST", url, body=body, headers={"Content-Type": content_type, **headers},
        redirect=False, retries=False,
    )  # fmt: skip


def _error(response: urllib3.BaseHTTPResponse) -> tuple[int, str, str]:
    root = ET.fromstring(response.data)
    return response.status, root.findtext("Code") or "", root.findtext("Message") or ""


def _absent(s3: Any, key: str, bucket: str = BUCKET) -> None:
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=bucket, Key=key)
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_v4_post_with_filename_metadata_and_201(
    s3: Any, http: urllib3.PoolManager, info: dict[str, Any]
) -> None:
    data = _data(1, 3 * MIB + 5)
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    post = s3.generate_presigned_post(
        BUCKET, "up/${filename}",
        Fields={"Content-Type": "text/plain", "x-amz-meta-owner": "alice",
                "success_action_status": "201", "x-amz-checksum-sha256": sha},
        Conditions=[{"Content-Type": "text/plain"}, ["starts-with", "$x-amz-meta-owner", "al"],
                    {"success_action_status": "201"}, ["content-length-range", 1, 10 * MIB],
                    {"x-amz-checksum-sha256": sha}],
    )  # fmt: skip
    assert post["url"] == f"{info['gateway_s3']}/{BUCKET}"
    response = _send(http, post["url"], _form(post, ("data.bin", data, "application/x-raw")))
    assert response.status == 201, response.data
    root = ET.fromstring(response.data)
    assert root.tag == "PostResponse"
    assert (root.findtext("Bucket"), root.findtext("Key")) == (BUCKET, "up/data.bin")
    assert root.findtext("ETag") == response.headers["ETag"]
    assert response.headers["x-amz-checksum-sha256"] == sha
    assert root.findtext("Location") == f"{info['gateway_s3']}/{BUCKET}/up%2Fdata.bin"
    got = s3.get_object(Bucket=BUCKET, Key="up/data.bin")
    assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(data).digest()
    assert got["ETag"] == response.headers["ETag"]
    assert got["ContentType"] == "text/plain"
    assert got["Metadata"] == {"owner": "alice"}
    # The checksum is stored as a PUT's is: answered with checksum mode.
    head = s3.head_object(Bucket=BUCKET, Key="up/data.bin", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == sha


def test_v4_post_default_204_and_v2_post(
    s3: Any, http: urllib3.PoolManager, info: dict[str, Any], users: dict[str, tuple[str, str]]
) -> None:
    data = _data(2, 1000)
    post = s3.generate_presigned_post(BUCKET, "plain.bin")
    # Expect: 100-continue is answered without authenticating headers (the form signs).
    response = _send(http, post["url"], _form(post, ("x", data)), Expect="100-continue")
    assert (response.status, response.data) == (204, b""), response.data
    assert response.headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert s3.get_object(Bucket=BUCKET, Key="plain.bin")["Body"].read() == data
    # Signature Version 2 (AWSAccessKeyId, signature: what ceph's s3-tests send), an empty file.
    v2 = s3_cluster.client(info, *users["owner"], signature_version="s3")
    post = v2.generate_presigned_post(BUCKET, "v2.bin", Fields={"x-ignore-me": "1"})
    assert "AWSAccessKeyId" in post["fields"]
    # As s3-tests send forms (requests' files=): every part with a filename, here its name.
    form = [(k, (k, v)) for k, v in post["fields"].items()]
    response = _send(http, post["url"], [*form, ("file", ("v2", b""))])
    assert response.status == 204, response.data
    assert s3.get_object(Bucket=BUCKET, Key="v2.bin")["Body"].read() == b""


def test_success_action_redirect(s3: Any, http: urllib3.PoolManager) -> None:
    target = "https://app.example/done?x=1"
    post = s3.generate_presigned_post(
        BUCKET, "redirected.txt", Fields={"success_action_redirect": target},
        Conditions=[{"success_action_redirect": target}],
    )  # fmt: skip
    response = _send(http, post["url"], _form(post, ("r", b"hello")))
    assert response.status == 303, response.data
    etag = f'"{hashlib.md5(b"hello").hexdigest()}"'
    query = urllib.parse.urlencode({"bucket": BUCKET, "key": "redirected.txt", "etag": etag})
    assert response.headers["Location"] == f"{target}&{query}"
    assert s3.get_object(Bucket=BUCKET, Key="redirected.txt")["Body"].read() == b"hello"


Case = Callable[[Any], tuple[str, Fields]]


def _fields(post: dict[str, Any], **replace: str) -> tuple[str, Fields]:
    return post["url"], [(k, replace.get(k, v)) for k, v in post["fields"].items()]


def _tampered(s3: Any) -> tuple[str, Fields]:
    post = s3.generate_presigned_post(BUCKET, "bad/tampered")
    other = s3.generate_presigned_post(BUCKET, "bad/tampered", ExpiresIn=7200)
    return _fields(post, policy=other["fields"]["policy"])


def _wrong_signature(s3: Any) -> tuple[str, Fields]:
    post = s3.generate_presigned_post(BUCKET, "bad/signature")
    signature = post["fields"]["x-amz-signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    return _fields(post, **{"x-amz-signature": flipped})


def _extra(s3: Any) -> tuple[str, Fields]:
    url, fields = _fields(s3.generate_presigned_post(BUCKET, "bad/extra"))
    return url, [*fields, ("x-amz-meta-note", "hi")]


def _bad_digest(s3: Any) -> tuple[str, Fields]:
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    post = s3.generate_presigned_post(
        BUCKET, "bad/digest", Fields={"x-amz-checksum-sha256": wrong},
        Conditions=[{"x-amz-checksum-sha256": wrong}],
    )  # fmt: skip
    return _fields(post)


def _checksum_field(key: str, value: str, *, named: bool) -> Case:
    """A form with an x-amz-checksum-sha256 field, a condition naming it or not (s3-tests'
    test_post_object_upload_checksum names none: S3 refuses any field no condition names)."""

    def case(s3: Any) -> tuple[str, Fields]:
        conditions = [{"x-amz-checksum-sha256": value}] if named else []
        post = s3.generate_presigned_post(BUCKET, key, Conditions=conditions)
        url, fields = _fields(post)
        return url, [*fields, ("x-amz-checksum-sha256", value)]

    return case


def _range(low: int, high: int) -> Case:
    def case(s3: Any) -> tuple[str, Fields]:
        key = "bad/small" if low else "bad/large"
        conditions = [["content-length-range", low, high]]
        return _fields(s3.generate_presigned_post(BUCKET, key, Conditions=conditions))

    return case


@pytest.mark.parametrize(
    ("key", "case", "status", "code", "message"),
    [
        ("bad/expired", lambda s3: _fields(s3.generate_presigned_post(
         BUCKET, "bad/expired", ExpiresIn=-60)),
         403, "AccessDenied", "Invalid according to Policy: Policy expired."),
        ("bad/tampered", _tampered, 403, "SignatureDoesNotMatch", ""),
        ("bad/signature", _wrong_signature, 403, "SignatureDoesNotMatch", ""),
        ("bad/extra", _extra, 403, "AccessDenied",
         "Invalid according to Policy: Extra input fields: x-amz-meta-note"),
        ("bad/starts", lambda s3: _fields(s3.generate_presigned_post(
         BUCKET, "up/${filename}"), key="bad/starts"), 403, "AccessDenied",
         'Invalid according to Policy: Policy Condition failed: ["starts-with", "$key", "up/"]'),
        ("bad/small", _range(100, 200), 400, "EntityTooSmall", ""),
        ("bad/large", _range(0, MIB), 400, "EntityTooLarge", ""),
        ("bad/digest", _bad_digest, 400, "BadDigest", ""),
        ("bad/sum-unnamed", _checksum_field(
         "bad/sum-unnamed", base64.b64encode(hashlib.sha256(b"x").digest()).decode(),
         named=False), 403, "AccessDenied",
         "Invalid according to Policy: Extra input fields: x-amz-checksum-sha256"),
        ("bad/sum-malformed", _checksum_field("bad/sum-malformed", "sailorjerry", named=True),
         400, "BadDigest", ""),
    ],
)  # fmt: skip
def test_refused_forms_store_nothing(
    s3: Any,
    http: urllib3.PoolManager,
    key: str,
    case: Case,
    status: int,
    code: str,
    message: str,
) -> None:
    url, fields = case(s3)
    size = 3 * MIB if key == "bad/large" else 50
    response = _send(http, url, [*fields, ("file", ("f.bin", _data(3, size)))])
    got_status, got_code, got_message = _error(response)
    assert (got_status, got_code) == (status, code), response.data
    assert not message or got_message == message
    _absent(s3, key)


def _sign_v4(secret: str, day: str, policy: str) -> str:
    """The V4 signature of a policy (AWS's HMAC chain, written out independently)."""
    key = f"AWS4{secret}".encode()
    for part in (day, "us-east-1", "s3", "aws4_request", policy):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key.hex()


def test_malformed_forms(
    s3: Any, http: urllib3.PoolManager, info: dict[str, Any], users: dict[str, tuple[str, str]]
) -> None:
    url = f"{info['gateway_s3']}/{BUCKET}"
    anonymous = _send(http, url, [("key", "bad/anon"), ("file", ("a", b"x"))])
    assert _error(anonymous)[:2] == (403, "AccessDenied")
    post = s3.generate_presigned_post(BUCKET, "bad/nokey")
    no_key = _send(http, url, _form(post, ("a", b"x"), drop="key"))
    assert _error(no_key)[:2] == (400, "InvalidArgument")
    no_file = _send(http, url, [(k, v) for k, v in post["fields"].items()])
    assert _error(no_file)[:2] == (400, "InvalidArgument")
    after = _send(http, url, [("key", "bad/after"), ("file", ("a", b"x")), *post["fields"].items()])
    assert _error(after)[:2] == (403, "AccessDenied")  # fields after the file are ignored
    not_form = http.request("POST", url, body=b"key=a", headers={"Content-Type": "text/plain"})
    assert _error(not_form)[:2] == (412, "PreconditionFailed")
    for content_type, body in (
        ("multipart/form-data", b"x"),
        ("multipart/form-data; boundary=b", b"x"),
    ):
        malformed = http.request("POST", url, body=body, headers={"Content-Type": content_type})
        assert _error(malformed)[:2] == (400, "MalformedPOSTRequest")
    too_big = _send(http, url, [("x-ignore-pad", "p" * 30000), *_form(post, ("a", b"x"))])
    assert _error(too_big)[:2] == (400, "MaxPostPreDataLengthExceeded")
    unknown = s3_cluster.client(info, "NOSUCHKEY", "secret", signature_version="s3v4")
    bad_key = unknown.generate_presigned_post(BUCKET, "bad/nokey")
    assert _error(_send(http, url, _form(bad_key, ("a", b"x"))))[:2] == (
        403, "InvalidAccessKeyId",
    )  # fmt: skip
    # A policy signed right but not a policy (no conditions): 400 InvalidPolicyDocument.
    broken = base64.b64encode(b'{"expiration": "2099-01-01T00:00:00Z"}').decode()
    fields = dict(post["fields"], key="bad/policy", policy=broken)
    fields["x-amz-signature"] = _sign_v4(users["owner"][1], fields["x-amz-date"][:8], broken)
    invalid = _send(http, url, [*fields.items(), ("file", ("a", b"x"))])
    assert _error(invalid)[:2] == (400, "InvalidPolicyDocument")
    for key in ("bad/anon", "bad/nokey", "bad/after", "bad/policy"):
        _absent(s3, key)


def test_another_tenant_is_denied_and_nothing_stored(
    s3: Any, http: urllib3.PoolManager, info: dict[str, Any], users: dict[str, tuple[str, str]]
) -> None:
    other = s3_cluster.client(info, *users["other"], signature_version="s3v4")
    post = other.generate_presigned_post(BUCKET, "stolen.bin")
    response = _send(http, post["url"], _form(post, ("s", _data(4, 4096))))
    assert _error(response)[:2] == (403, "AccessDenied")
    _absent(s3, "stolen.bin")
    # The stranger's own policy replayed for the owner's credentials is a bad signature.
    mine = s3.generate_presigned_post(BUCKET, "stolen.bin")
    post["fields"]["x-amz-credential"] = mine["fields"]["x-amz-credential"]
    assert _error(_send(http, post["url"], _form(post, ("s", b"x"))))[:2] == (
        403, "SignatureDoesNotMatch",
    )  # fmt: skip
    _absent(s3, "stolen.bin")


def test_anonymous_forms_are_admitted_as_anonymous_puts(
    s3: Any, http: urllib3.PoolManager, info: dict[str, Any], users: dict[str, tuple[str, str]]
) -> None:
    """A form without signature nor policy is anonymous: stored where the bucket grants WRITE
    to AllUsers (acl and tagging applied, as s3-tests' anonymous POSTs check), AccessDenied on
    a private or public-read bucket, as an anonymous PutObject is."""
    s3.create_bucket(Bucket="post-public", ACL="public-read-write")
    s3.create_bucket(Bucket="post-readonly", ACL="public-read")
    tagging = "<Tagging><TagSet><Tag><Key>a</Key><Value>1</Value></Tag></TagSet></Tagging>"
    form = [
        ("key", "anon.txt"), ("acl", "public-read"), ("Content-Type", "text/plain"),
        ("tagging", tagging), ("success_action_status", "201"), ("file", ("f", b"bar")),
    ]  # fmt: skip
    url = f"{info['gateway_s3']}/post-public"
    response = _send(http, url, form)
    assert response.status == 201, response.data
    assert ET.fromstring(response.data).findtext("Key") == "anon.txt"
    got = s3.get_object(Bucket="post-public", Key="anon.txt")
    assert (got["Body"].read(), got["ContentType"]) == (b"bar", "text/plain")
    tags = s3.get_object_tagging(Bucket="post-public", Key="anon.txt")["TagSet"]
    assert tags == [{"Key": "a", "Value": "1"}]
    grants = s3.get_object_acl(Bucket="post-public", Key="anon.txt")["Grants"]
    assert {"Grantee": {"Type": "Group", "URI": "http://acs.amazonaws.com/groups/global/AllUsers"},
            "Permission": "READ"} in grants  # fmt: skip
    # A policy needs its signature (S3: AWSAccessKeyId is required with a policy).
    unsigned = [("key", "nosig.txt"), ("policy", "e30="), ("file", ("f", b"x"))]
    assert _error(_send(http, url, unsigned))[:2] == (400, "InvalidArgument")
    # Denied where an anonymous PUT is: a private bucket, a bucket granting READ alone.
    for bucket in (BUCKET, "post-readonly"):
        denied = _send(http, f"{info['gateway_s3']}/{bucket}", form)
        assert _error(denied)[:2] == (403, "AccessDenied")
        _absent(s3, "anon.txt", bucket)
    _absent(s3, "nosig.txt", "post-public")
    # Another tenant's signed form: admitted by the same WRITE grant as its PutObject, and
    # its own object as a PutObject's is (the bucket's owner reads it only by its ACL).
    other = s3_cluster.client(info, *users["other"], signature_version="s3v4")
    post = other.generate_presigned_post("post-public", "theirs.txt")
    assert _send(http, post["url"], _form(post, ("f", b"t"))).status == 204
    assert other.get_object(Bucket="post-public", Key="theirs.txt")["Body"].read() == b"t"
    _denied(lambda: s3.get_object(Bucket="post-public", Key="theirs.txt"))


def _denied(call: Callable[[], Any]) -> None:
    with pytest.raises(ClientError) as failed:
        call()
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def _owned(client: Any, bucket: str, key: str) -> tuple[str, list[tuple[str, str]]]:
    """(owner id, [(grantee id, permission)]) of GetObjectAcl."""
    got = client.get_object_acl(Bucket=bucket, Key=key)
    grants = [(g["Grantee"].get("ID", ""), g["Permission"]) for g in got["Grants"]]
    return got["Owner"]["ID"], grants


def test_forms_are_owned_as_put_object_makes_them(
    s3: Any, http: urllib3.PoolManager, info: dict[str, Any], users: dict[str, tuple[str, str]]
) -> None:
    """A form of another tenant's user (admitted by a WRITE grant) stores an object of its
    tenant, by PutObject's Object Ownership rules: ObjectWriter (its ACL relative to the
    writer, bucket-owner-full-control granting the bucket's owner), BucketOwnerPreferred with
    bucket-owner-full-control (the bucket's owner), BucketOwnerEnforced (the writer's objects
    the bucket's owner's; its grant dropped, as enforcing needs, the form denied, nothing
    stored, until a bucket policy allows it, on a condition on the form's tags)."""
    bucket, mine, theirs = "post-owned", "t-post", "t-x"
    s3.create_bucket(Bucket=bucket, GrantWrite=f'id="{theirs}"')
    other = s3_cluster.client(info, *users["other"], signature_version="s3v4")

    def post(key: str, **fields: str) -> int:
        form = other.generate_presigned_post(
            bucket, key, Fields=fields, Conditions=[{k: v} for k, v in fields.items()]
        )
        response = _send(http, form["url"], _form(form, ("f", key.encode())))
        assert response.status in (204, 403), response.data
        return response.status

    assert post("writer.bin") == 204
    assert _owned(other, bucket, "writer.bin") == (theirs, [(theirs, "FULL_CONTROL")])
    _denied(lambda: s3.get_object(Bucket=bucket, Key="writer.bin"))  # the writer's private ACL
    assert post("granted.bin", acl="bucket-owner-full-control") == 204
    assert _owned(s3, bucket, "granted.bin") == (
        theirs, [(theirs, "FULL_CONTROL"), (mine, "FULL_CONTROL")],
    )  # fmt: skip
    preferred = {"Rules": [{"ObjectOwnership": "BucketOwnerPreferred"}]}
    s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls=preferred)
    assert post("preferred.bin", acl="bucket-owner-full-control") == 204
    assert _owned(s3, bucket, "preferred.bin") == (mine, [(mine, "FULL_CONTROL")])
    assert post("still-theirs.bin") == 204  # no bucket-owner-full-control: the writer's
    assert _owned(other, bucket, "still-theirs.bin")[0] == theirs
    s3.put_bucket_acl(Bucket=bucket, ACL="private")
    enforced = {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls=enforced)
    assert _owned(s3, bucket, "writer.bin") == (mine, [(mine, "FULL_CONTROL")])
    assert post("enforced.bin") == 403  # ACLs disabled: no grant admits another tenant
    _absent(s3, "enforced.bin", bucket)
    # A bucket policy's Allow does, decided on the form's key and fields (s3:PutObject, its
    # `tagging` field as x-amz-tagging): the bucket's owner owns what it stores.
    public = (
        "<Tagging><TagSet><Tag><Key>security</Key><Value>public</Value></Tag></TagSet></Tagging>"
    )
    allow = {
        "Effect": "Allow", "Principal": {"AWS": theirs}, "Action": "s3:PutObject",
        "Resource": f"arn:aws:s3:::{bucket}/*",
        "Condition": {"StringEquals": {"s3:RequestObjectTag/security": "public"}},
    }  # fmt: skip
    policy = {"Version": "2012-10-17", "Statement": [allow]}
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    assert post("enforced.bin") == 403  # the Allow's condition fails: nothing stored
    _absent(s3, "enforced.bin", bucket)
    assert post("enforced.bin", tagging=public) == 204
    assert _owned(s3, bucket, "enforced.bin") == (mine, [(mine, "FULL_CONTROL")])
    # A Deny on the form's tags refuses the bucket's owner too.
    deny = {**allow, "Effect": "Deny", "Principal": "*"}
    policy["Statement"] = [allow, deny]
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    mine_form = s3.generate_presigned_post(
        bucket, "denied.bin", Fields={"tagging": public}, Conditions=[{"tagging": public}]
    )
    denied = _send(http, mine_form["url"], _form(mine_form, ("f", b"d")))
    assert _error(denied)[:2] == (403, "AccessDenied")
    _absent(s3, "denied.bin", bucket)


def test_kv_bucket_is_not_implemented(s3: Any, http: urllib3.PoolManager) -> None:
    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket="post-kv")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)
    post = s3.generate_presigned_post("post-kv", "k")
    assert _error(_send(http, post["url"], _form(post, ("k", b"x"))))[:2] == (
        501, "NotImplemented",
    )  # fmt: skip
