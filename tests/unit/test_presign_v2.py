"""Signature Version 2 (services/gateway/s3/presign_v2.py): boto3's own presigned URLs and
Authorization headers verify and act for their user; expired URLs, URLs valid for more than 7
days, skewed or missing dates, wrong secrets, unknown keys and foreign signatures are refused
with 403s (a malformed header with a 400), never a 500."""

from __future__ import annotations

import email.utils
import functools
import time
import urllib.parse
from typing import Any
from unittest import mock

import boto3
import botocore.auth
import botocore.config
import pytest
from aiohttp.test_utils import make_mocked_request
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from services.gateway.s3 import auth, presign_v2, s3errors

ACCESS = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
WEEK_S = 7 * 24 * 3600


def boto_v2_url(expires_in: int, method: str = "get_object") -> str:
    """A URL presigned by boto3 with Signature Version 2 ("s3"), valid for expires_in s."""
    client = boto3.client(
        "s3",
        endpoint_url="http://localhost:9000",
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=botocore.config.Config(signature_version="s3", s3={"addressing_style": "path"}),
    )
    url: str = client.generate_presigned_url(
        method, Params={"Bucket": "b", "Key": "k y/ü"}, ExpiresIn=expires_in
    )
    return url


def split(url: str) -> tuple[str, dict[str, str]]:
    """The raw path and the decoded query of a URL, as aiohttp hands them over."""
    parts = urllib.parse.urlsplit(url)
    return parts.path, dict(urllib.parse.parse_qsl(parts.query))


def verify(raw_path: str, query: dict[str, str], now: float, **headers: str) -> None:
    signed = presign_v2.parse_v2(query)
    assert signed is not None
    presign_v2.verify_v2(
        signed, SECRET, method="GET", raw_path=raw_path, query=query, headers=headers, now=now
    )


def refused(code: str, raw_path: str, query: dict[str, str], now: float) -> s3errors.S3Error:
    with pytest.raises(s3errors.S3Error) as caught:
        verify(raw_path, query, now)
    assert (caught.value.code, caught.value.status) == (code, 403), caught.value
    return caught.value


def test_boto3_v2_urls_verify_until_they_expire() -> None:
    raw_path, query = split(boto_v2_url(3600))
    now = time.time()
    verify(raw_path, query, now)
    verify(raw_path, query, now + 3590)
    assert "expired" in refused("AccessDenied", raw_path, query, now + 3700).message


def test_v2_urls_may_be_valid_for_7_days_at_most() -> None:
    raw_path, query = split(boto_v2_url(WEEK_S))
    verify(raw_path, query, time.time())  # exactly a week: as V4's X-Amz-Expires allows
    raw_path, query = split(boto_v2_url(WEEK_S + 120))
    error = refused("AccessDenied", raw_path, query, time.time())
    assert "7 days" in error.message
    # The same URL is fine once it is within a week of expiring.
    verify(raw_path, query, time.time() + 600)
    raw_path, query = split(boto_v2_url(10 * 365 * 24 * 3600))  # the old "valid for years"
    refused("AccessDenied", raw_path, query, time.time())


@pytest.mark.parametrize("signature", ["é", "é" * 28, "\u2603=", "\udcff", "\uff42" * 28])
def test_a_non_ascii_v2_signature_is_a_403(signature: str) -> None:
    raw_path, query = split(boto_v2_url(3600))
    query["Signature"] = signature
    refused("SignatureDoesNotMatch", raw_path, query, time.time())


@pytest.mark.parametrize("expires", ["²", "٣٣٣", "1_000", " 7", "+7", "9" * 5000, "-1", ""])
def test_expires_must_be_ascii_digits(expires: str) -> None:
    query = {"AWSAccessKeyId": ACCESS, "Signature": "c2ln", "Expires": expires}
    with pytest.raises(s3errors.S3Error) as caught:
        presign_v2.parse_v2(query)
    assert (caught.value.code, caught.value.status) == ("AccessDenied", 403)


@pytest.mark.parametrize(
    "subresource", ["publicAccessBlock", "ownershipControls", "policyStatus", "attributes"]
)
def test_a_v2_url_names_its_operation(subresource: str) -> None:
    """A URL presigned for one operation (ListObjects, DeleteBucket) is never another by an
    added sub-resource (DeletePublicAccessBlock...): those operations are SigV4-only, as on
    AWS (InvalidRequest whatever the signature), and their sub-resources are signed too."""
    client = boto3.client(
        "s3", endpoint_url="http://localhost:9000", aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET, region_name="us-east-1",
        config=botocore.config.Config(signature_version="s3", s3={"addressing_style": "path"}),
    )  # fmt: skip
    signed = [
        ("GET", "list_objects", {"Bucket": "b"}),
        ("DELETE", "delete_bucket", {"Bucket": "b"}),
        ("GET", "get_object", {"Bucket": "b", "Key": "k"}),
    ]
    for method, operation, named in signed:
        raw_path, query = split(client.generate_presigned_url(operation, Params=named))
        v2 = presign_v2.parse_v2(query)
        assert v2 is not None
        check = functools.partial(
            presign_v2.verify_v2, v2, SECRET, method=method, raw_path=raw_path, headers={},
            now=time.time(),
        )  # fmt: skip
        check(query=query)  # as signed
        with pytest.raises(s3errors.S3Error) as caught:
            check(query={subresource: "", **query})
        assert (caught.value.code, caught.value.status) == ("InvalidRequest", 400), operation
        assert "AWS4-HMAC-SHA256" in str(caught.value)
    # Signed (defense in depth): a string to sign differs with the sub-resource.
    to_sign = functools.partial(
        presign_v2.string_to_sign, method="GET", time_line="1", raw_path="/b", headers={}
    )
    assert to_sign(query={subresource: ""}) != to_sign(query={})


def test_undecodable_amz_headers_do_not_match() -> None:
    raw_path, query = split(boto_v2_url(3600))
    with pytest.raises(s3errors.S3Error) as caught:
        verify(raw_path, query, time.time(), **{"x-amz-meta-a": "\udcff\udcfe"})
    assert caught.value.code == "SignatureDoesNotMatch"


async def test_the_authenticator_answers_403_for_a_non_ascii_v2_signature() -> None:
    url = urllib.parse.urlsplit(boto_v2_url(3600))
    query = url.query.replace("Signature=", "Signature=%C3%A9%E2%98%83")

    async def lookup(access_key: str) -> tuple[auth.Principal, str] | None:
        return (auth.Principal(access_key, "t", "t"), SECRET) if access_key == ACCESS else None

    request: Any = make_mocked_request("GET", f"{url.path}?{query}", headers={"Host": "h"})
    with pytest.raises(s3errors.S3Error) as caught:
        await auth.Authenticator(lookup).authenticate(request)
    assert (caught.value.code, caught.value.status) == ("SignatureDoesNotMatch", 403)


# --- Authorization: AWS <access key>:<signature> (header-signed V2) ---

NOW = 1767322800.0  # 2026-01-02T03:00:00Z: the Authenticator's clock in these tests


async def lookup_user(access_key: str) -> tuple[auth.Principal, str] | None:
    """The one user of these tests (tenant t), or none."""
    return (auth.Principal(access_key, "t", "t"), SECRET) if access_key == ACCESS else None


def boto_v2_headers(
    method: str = "PUT",
    path: str = "/b/k%20y/%C3%BC",
    query: str = "",
    *,
    secret: str = SECRET,
    date: str = email.utils.formatdate(NOW, usegmt=True),
    **extra: str,
) -> dict[str, str]:
    """The headers of a request signed by botocore's own V2 signer ("s3"), dated date."""
    url = f"http://localhost:9000{path}" + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, data=b"body", headers=extra)
    signer = botocore.auth.HmacV1Auth(Credentials(ACCESS, secret))
    with mock.patch.object(signer, "_get_date", return_value=date):
        signer.add_auth(request)
    return {"Host": "localhost:9000", **dict(request.headers.items())}


async def authenticate_v2(
    headers: dict[str, str], method: str = "PUT", target: str = "/b/k%20y/%C3%BC", now: float = NOW
) -> auth.Principal:
    request: Any = make_mocked_request(method, target, headers=headers)
    principal, _ = await auth.Authenticator(lookup_user, clock=lambda: now).authenticate(request)
    return principal


async def refused_v2(code: str, status: int, headers: dict[str, str], **kw: Any) -> str:
    with pytest.raises(s3errors.S3Error) as caught:
        await authenticate_v2(headers, **kw)
    assert (caught.value.code, caught.value.status) == (code, status), caught.value
    return caught.value.message


async def test_boto3_v2_headers_authenticate_as_their_user_and_nothing_else() -> None:
    signed = boto_v2_headers(
        **{"Content-Type": "text/plain", "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==",
           "x-amz-meta-a": "1", "x-amz-acl": "private"},
    )  # fmt: skip
    principal = await authenticate_v2(signed)
    assert (principal.access_key, principal.tenant, principal.anonymous) == (ACCESS, "t", False)
    # A signed sub-resource is part of the resource; any other query parameter is not.
    acl = boto_v2_headers("GET", "/b", "acl")
    assert (await authenticate_v2(acl, "GET", "/b?acl")).tenant == "t"
    await refused_v2("SignatureDoesNotMatch", 403, acl, method="GET", target="/b?versioning")
    # Denials: a wrong secret, an unknown access key, a changed header, another method or path.
    await refused_v2("SignatureDoesNotMatch", 403, boto_v2_headers(secret="not the secret"))
    unknown = {**signed, "Authorization": signed["Authorization"].replace(ACCESS, "AKIDNOBODY")}
    await refused_v2("InvalidAccessKeyId", 403, unknown)
    await refused_v2("SignatureDoesNotMatch", 403, {**signed, "x-amz-meta-a": "2"})
    await refused_v2("SignatureDoesNotMatch", 403, {**signed, "Content-Type": "text/html"})
    await refused_v2("SignatureDoesNotMatch", 403, signed, method="POST")
    await refused_v2("SignatureDoesNotMatch", 403, signed, target="/b/other")
    non_ascii = {**signed, "Authorization": f"AWS {ACCESS}:é☃"}
    await refused_v2("SignatureDoesNotMatch", 403, non_ascii)


async def test_v2_header_time_is_checked_like_v4() -> None:
    signed = boto_v2_headers()
    await authenticate_v2(signed, now=NOW + 14 * 60)
    await refused_v2("RequestTimeTooSkewed", 403, signed, now=NOW + 16 * 60)
    await refused_v2("RequestTimeTooSkewed", 403, signed, now=NOW - 16 * 60)
    for date in ("Tue, 07 Jul 2010 21:53:04 GMT", "Tue, 07 Jul 9999 21:53:04 GMT"):
        await refused_v2("RequestTimeTooSkewed", 403, boto_v2_headers(**{"x-amz-date": date}))
    for date in ("Bad Date", "", "Tue, 07 Jul 1950 21:53:04 GMT"):
        message = await refused_v2("AccessDenied", 403, boto_v2_headers(**{"x-amz-date": date}))
        assert "valid Date or x-amz-date" in message
    undated = {k: v for k, v in signed.items() if k != "Date"}
    await refused_v2("AccessDenied", 403, undated)


async def test_x_amz_date_replaces_date_in_the_string_to_sign() -> None:
    # AWS: with x-amz-date present, the Date line of the string to sign is empty.
    amz_date = email.utils.formatdate(NOW, usegmt=True)
    to_sign = f"GET\n\n\n\nx-amz-date:{amz_date}\n/b/k".encode()
    signature = presign_v2.hmac_sha1(SECRET, to_sign).decode()
    headers = {"Host": "h", "x-amz-date": amz_date, "Date": "whatever the proxy says",
               "Authorization": f"AWS {ACCESS}:{signature}"}  # fmt: skip
    assert (await authenticate_v2(headers, "GET", "/b/k")).tenant == "t"
    with_date = presign_v2.hmac_sha1(SECRET, f"GET\n\n\n{amz_date}\n/b/k".encode()).decode()
    headers = {"Host": "h", "Date": amz_date, "Authorization": f"AWS {ACCESS}:{with_date}"}
    assert (await authenticate_v2(headers, "GET", "/b/k")).tenant == "t"
    headers["x-amz-date"] = amz_date  # now the Date line must be empty: no longer a match
    await refused_v2("SignatureDoesNotMatch", 403, headers, method="GET", target="/b/k")


@pytest.mark.parametrize("value", ["AWS HAHAHA", "AWS :c2ln", f"AWS {ACCESS}:", "AWS "])
async def test_malformed_v2_headers_are_invalid_argument(value: str) -> None:
    headers = {**boto_v2_headers(), "Authorization": value}
    await refused_v2("InvalidArgument", 400, headers)


async def test_a_v2_header_with_a_presigned_query_is_refused() -> None:
    signed = boto_v2_headers("GET", "/b/k")
    for query in ("AWSAccessKeyId=AK&Signature=c2ln&Expires=1", "X-Amz-Algorithm=AWS4-HMAC-SHA256"):
        await refused_v2("InvalidArgument", 400, signed, method="GET", target=f"/b/k?{query}")


async def test_a_bucket_request_may_sign_its_bucket_with_a_trailing_slash() -> None:
    # botocore signs CreateBucket on path /b as "/b/" (its auth_path): the same bucket, no key.
    date = email.utils.formatdate(NOW, usegmt=True)
    for resource in ("/b", "/b/"):
        signature = presign_v2.hmac_sha1(SECRET, f"PUT\n\n\n{date}\n{resource}".encode())
        headers = {"Host": "h", "Date": date, "Authorization": f"AWS {ACCESS}:{signature.decode()}"}
        assert (await authenticate_v2(headers, "PUT", "/b")).tenant == "t"
        for other in ("/b/k", "/", "/b2", "/b//"):
            await refused_v2("SignatureDoesNotMatch", 403, headers, target=other)
