"""The POST policy of browser-form uploads (`post_policy`): AWS's and botocore's signatures,
the document's rules, the conditions, and a fuzz of bad documents (only S3 errors come out)."""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from typing import Any

import boto3
import pytest
from botocore.config import Config

from services.gateway.s3 import post_policy, s3errors

log = logging.getLogger(__name__)

# AWS's example credentials and the policy botocore signs for them on 2015-12-29T00:00:00Z
# (generate_presigned_post("sigv4examplebucket", "user/user1/photo.jpg")).
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
VECTOR_POLICY = (
    "eyJleHBpcmF0aW9uIjogIjIwMTUtMTItMjlUMDE6MDA6MDBaIiwgImNvbmRpdGlvbnMiOiBbeyJidWNrZXQiOiAic2ln"
    "djRleGFtcGxlYnVja2V0In0sIHsia2V5IjogInVzZXIvdXNlcjEvcGhvdG8uanBnIn0sIHsieC1hbXotYWxnb3JpdGht"
    "IjogIkFXUzQtSE1BQy1TSEEyNTYifSwgeyJ4LWFtei1jcmVkZW50aWFsIjogIkFLSUFJT1NGT0ROTjdFWEFNUExFLzIw"
    "MTUxMjI5L3VzLWVhc3QtMS9zMy9hd3M0X3JlcXVlc3QifSwgeyJ4LWFtei1kYXRlIjogIjIwMTUxMjI5VDAwMDAwMFoi"
    "fV19"
)
VECTOR_SIGNATURE = "3364624b39010d9b06f5d9b8c9a18a6e478d261c048159c92f2fd6fa885f14e6"


def _b64(document: Any) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def _policy(conditions: Any, expiration: Any = "2099-01-01T00:00:00.000Z") -> str:
    return _b64({"expiration": expiration, "conditions": conditions})


def _code(policy_b64: str) -> str:
    with pytest.raises(s3errors.S3Error) as failed:
        post_policy.parse(policy_b64)
    code = failed.value.code
    assert failed.value.status == (400 if code == "InvalidPolicyDocument" else 403)
    return code


def test_signatures_match_aws_and_botocore() -> None:
    post_policy.verify_v4(
        VECTOR_POLICY, VECTOR_SIGNATURE, SECRET, day="20151229", region="us-east-1"
    )
    for bad in (VECTOR_SIGNATURE[:-1] + "0", VECTOR_SIGNATURE.upper(), "é" * 64, ""):
        with pytest.raises(s3errors.S3Error) as failed:
            post_policy.verify_v4(VECTOR_POLICY, bad, SECRET, day="20151229", region="us-east-1")
        assert failed.value.code == "SignatureDoesNotMatch"
    with pytest.raises(s3errors.S3Error):  # the policy as sent is what is signed
        post_policy.verify_v4(
            VECTOR_POLICY[:-2], VECTOR_SIGNATURE, SECRET, day="20151229", region="us-east-1"
        )
    policy = post_policy.parse(VECTOR_POLICY)
    assert policy.expiration == 1451350800.0
    assert [c.field for c in policy.conditions][:2] == ["bucket", "key"]

    client = boto3.client(
        "s3", region_name="us-east-1", aws_access_key_id="AK", aws_secret_access_key=SECRET,
        config=Config(signature_version="s3v4"),
    )  # fmt: skip
    post = client.generate_presigned_post(
        "bkt", "up/${filename}", Conditions=[["content-length-range", 1, 10]]
    )
    fields = post["fields"]
    key, day = post_policy.credential(
        fields["x-amz-credential"], fields["x-amz-date"], fields["x-amz-algorithm"],
        region="us-east-1",
    )  # fmt: skip
    assert (key, day) == ("AK", fields["x-amz-date"][:8])
    post_policy.verify_v4(
        fields["policy"], fields["x-amz-signature"], SECRET, day=day, region="us-east-1"
    )
    parsed = post_policy.parse(fields["policy"])
    assert (parsed.min_bytes, parsed.max_bytes) == (1, 10)
    # V2: base64 HMAC-SHA1 of the policy as sent (what s3-tests and boto3's "s3" signer send).
    v2 = boto3.client(
        "s3", region_name="us-east-1", aws_access_key_id="AK", aws_secret_access_key=SECRET,
        config=Config(signature_version="s3"),
    )  # fmt: skip
    v2_fields = v2.generate_presigned_post("bkt", "k")["fields"]
    post_policy.verify_v2(v2_fields["policy"], v2_fields["signature"], SECRET)
    with pytest.raises(s3errors.S3Error):
        post_policy.verify_v2(v2_fields["policy"], v2_fields["signature"], SECRET + "x")


@pytest.mark.parametrize(
    ("text", "region"),
    [
        ("AK/20151229/us-west-1/s3/aws4_request", "us-east-1"),
        ("AK/2015122/us-east-1/s3/aws4_request", "us-east-1"),
        ("/20151229/us-east-1/s3/aws4_request", "us-east-1"),
        ("AK/20151229/us-east-1/ec2/aws4_request", "us-east-1"),
        ("AK/20151229/us-east-1/s3/aws5_request", "us-east-1"),
        ("AK/20151229/us-east-1/s3", "us-east-1"),
    ],
)
def test_bad_credentials_are_invalid_argument(text: str, region: str) -> None:
    with pytest.raises(s3errors.S3Error) as failed:
        post_policy.credential(text, "20151229T000000Z", "AWS4-HMAC-SHA256", region=region)
    assert (failed.value.code, failed.value.status) == ("InvalidArgument", 400)
    for date, algorithm in (("2015-12-29", "AWS4-HMAC-SHA256"), ("20151229T000000Z", "AWS3")):
        with pytest.raises(s3errors.S3Error):
            post_policy.credential(
                "AK/20151229/us-east-1/s3/aws4_request", date, algorithm, region="us-east-1"
            )


@pytest.mark.parametrize(
    "document",
    [
        {"CONDITIONS": [], "expiration": "2099-01-01T00:00:00Z"},
        {"conditions": [], "EXPIRATION": "2099-01-01T00:00:00Z"},
        {"conditions": []},
        {"expiration": "2099-01-01T00:00:00Z"},
        {"expiration": "2099-01-01 00:00:00.123456", "conditions": []},
        {"expiration": "2099-01-01T00:00:00+02:00", "conditions": []},
        {"expiration": "2099-13-01T00:00:00Z", "conditions": []},
        {"expiration": 4102444800, "conditions": []},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": {}},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [{}]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [{"a": "1", "b": "2"}]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [{"a": 1}]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [{"a": None}]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [[]]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [["eq", "$key"]]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [["matches", "$key", "x"]]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [["eq", "$key", 5]]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": ["eq"]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [["content-length-range", 0]]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [["content-length-range", -1, 0]]},
        {"expiration": "2099-01-01T00:00:00Z", "conditions": [["content-length-range", 0, 1.5]]},
        ["expiration", "conditions"],
    ],
)
def test_bad_documents_are_invalid_policy_document(document: Any) -> None:
    assert _code(_b64(document)) == "InvalidPolicyDocument"


def test_undecodable_policies() -> None:
    for text in ("not base64!", "é", base64.b64encode(b"\xff\xfe").decode(), _b64("x")[:-1]):
        assert _code(text) == "InvalidPolicyDocument"
    nan = base64.b64encode(b'{"expiration": NaN, "conditions": []}').decode()
    assert _code(nan) == "InvalidPolicyDocument"
    deep = base64.b64encode(b"[" * 100000).decode()
    assert _code(deep) == "InvalidPolicyDocument"
    # A bound that is not a number: S3 answers it as a failed condition (403).
    assert _code(_policy([["content-length-range", "test", "10"]])) == "AccessDenied"
    parsed = post_policy.parse(_policy([["content-length-range", "5", "10"]]))
    assert (parsed.min_bytes, parsed.max_bytes) == (5, 10)


def test_fuzzed_policies_raise_only_s3_errors() -> None:
    seed = random.randrange(1 << 30)
    log.info("seed %d", seed)
    rng = random.Random(seed)
    atoms: list[Any] = [
        "eq", "starts-with", "content-length-range", "$key", "$bucket", "", 0, -1, 1.5, None,
        True, [], {}, "2099-01-01T00:00:00Z", "x" * 50, 10**30, "\x00", "é",
    ]  # fmt: skip

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 3 or roll < 0.4:
            return rng.choice(atoms)
        if roll < 0.7:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["expiration", "conditions", "key"]): value(depth + 1)}

    for _ in range(3000):
        kind = rng.random()
        if kind < 0.2:
            text = base64.b64encode(rng.randbytes(rng.randrange(64))).decode()
        elif kind < 0.3:
            text = "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(20)))
        else:
            document: Any = {"expiration": value(0), "conditions": value(0)}
            if rng.random() < 0.5:
                document = {"expiration": "2099-01-01T00:00:00Z", "conditions": [value(1)]}
            raw = json.dumps(document).encode()
            if rng.random() < 0.2:
                raw = raw[: rng.randrange(len(raw) + 1)]
            text = base64.b64encode(raw).decode()
        code = ""
        try:
            post_policy.parse(text)
        except s3errors.S3Error as exc:
            code = exc.code
        assert code in ("", "InvalidPolicyDocument", "AccessDenied"), (seed, text)


def _check(conditions: Any, fields: dict[str, str], sent: list[str], now: float = 0.0) -> None:
    post_policy.check(post_policy.parse(_policy(conditions)), fields, sent, now=now)


def _denied(conditions: Any, fields: dict[str, str], sent: list[str], now: float = 0.0) -> str:
    with pytest.raises(s3errors.S3Error) as failed:
        _check(conditions, fields, sent, now)
    assert (failed.value.code, failed.value.status) == ("AccessDenied", 403)
    return failed.value.message


def test_conditions() -> None:
    base = [{"bUcKeT": "b"}, ["StArTs-WiTh", "$KeY", "up/"]]
    fields = {"bucket": "b", "key": "up/a.txt", "policy": "p", "x-amz-signature": "s"}
    sent = ["Key", "Policy", "X-Amz-Signature", "x-ignore-me", "file", "bucket"]
    _check(base, fields, sent)
    assert _denied(base, {**fields, "key": "down/a"}, sent) == (
        'Invalid according to Policy: Policy Condition failed: ["StArTs-WiTh", "$KeY", "up/"]'
    )
    assert "Policy expired." in _denied(base, fields, sent, now=time.time() + 1e10)
    message = _denied(base, {**fields, "x-amz-meta-a": "1"}, [*sent, "X-Amz-Meta-A", "acl"])
    assert message == "Invalid according to Policy: Extra input fields: X-Amz-Meta-A, acl"
    # A condition on a field the form lacks fails, even starts-with "".
    _denied([*base, ["starts-with", "$Content-Type", ""]], fields, sent)
    # eq is exact and case-sensitive; a reference without '$' names no field.
    _denied([*base, ["eq", "$acl", "Private"]], {**fields, "acl": "private"}, [*sent, "acl"])
    _denied([*base, ["eq", "acl", "private"]], {**fields, "acl": "private"}, [*sent, "acl"])
    _check([*base, {"ACL": "private"}], {**fields, "acl": "private"}, [*sent, "acl"])
    # Content-Type lists: every entry must start with the prefix.
    typed = [*base, ["starts-with", "$Content-Type", "image/"]]
    _check(typed, {**fields, "content-type": "image/jpg, image/png"}, [*sent, "Content-Type"])
    _denied(typed, {**fields, "content-type": "image/jpg,text/plain"}, [*sent, "Content-Type"])
    # Without a bucket condition the bucket is an extra field.
    assert "Extra input fields: bucket" in _denied(base[1:], fields, sent)
