"""Signature Version 2 presigned URLs (services/gateway/s3/presign_v2.py): boto3's own URLs
verify; expired URLs, URLs valid for more than 7 days and foreign signatures are refused with
403s, never a 500."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import boto3
import botocore.config
import pytest
from aiohttp.test_utils import make_mocked_request

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
