"""SigV4 verification against the real signers (botocore, boto3, minio) and AWS's examples.

Requests are built by the clients themselves (boto3 and minio with their HTTP layer replaced by
a capture, botocore's signers called directly), then verified exactly as the server receives
them: the raw path, the raw query and the headers.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.crt.auth
import minio
import minio.credentials.credentials
import minio.signer
import minio.time
import pytest
import urllib3
from awscrt import auth as crt_auth
from awscrt import http as crt_http

from services.gateway.s3 import sigv4

ACCESS = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EXAMPLE_NOW = 1369353600.0  # 20130524T000000Z, the time of AWS's examples
CLOCK = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
NOW = CLOCK.timestamp()
EMPTY = hashlib.sha256(b"").hexdigest()
HOSTILE_KEY = "dir/a b+c~d=e&f%g!*'();:@$,ü€/../x//y/./z"
MINIO_KEY = HOSTILE_KEY.replace("/../", "/").replace("/./", "/")  # minio refuses dot segments
HOSTILE_VALUE = "a b+c~d=e&f%2Fg/ü*!'()"


@dataclasses.dataclass(frozen=True)
class Sent:
    """A request as the server receives it."""

    method: str
    raw_path: str
    raw_query: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    @classmethod
    def of(cls, method: str, url: str, headers: Any, body: bytes = b"") -> Sent:
        parts = urllib.parse.urlsplit(url)
        pairs = [
            (name, value.decode() if isinstance(value, bytes) else value)
            for name, value in headers.items()
        ]
        if not any(name.lower() == "host" for name, _ in pairs):
            pairs.append(("Host", parts.netloc))
        return cls(method, parts.path, parts.query, pairs, body)

    def replace_header(self, name: str, value: str) -> Sent:
        kept = [(n, v) for n, v in self.headers if n.lower() != name.lower()]
        return dataclasses.replace(self, headers=[*kept, (name, value)])


def parse(sent: Sent, region: str = "us-east-1") -> sigv4.AuthRequest:
    auth = sigv4.parse(
        method=sent.method,
        raw_path=sent.raw_path,
        raw_query=sent.raw_query,
        headers=sent.headers,
        region=region,
    )
    assert auth is not None
    return auth


def verify(sent: Sent, secret: str = SECRET, now: float = NOW) -> sigv4.Verified:
    return sigv4.verify(parse(sent), secret, now=now)


def refused(code: str, call: Callable[[], object]) -> sigv4.S3AuthError:
    with pytest.raises(sigv4.S3AuthError) as caught:
        call()
    assert caught.value.code == code, caught.value
    return caught.value


# --- AWS's published examples (Amazon S3 API reference, "Authenticating Requests (SigV4)") ---


def example(method: str, target: str, headers: dict[str, str], signed: str, signature: str) -> Sent:
    path, _, query = target.partition("?")
    credential = f"{ACCESS}/20130524/us-east-1/s3/aws4_request"
    authorization = f"AWS4-HMAC-SHA256 Credential={credential},SignedHeaders={signed},Signature="
    pairs = [("x-amz-date", "20130524T000000Z"), *headers.items()]
    return Sent(method, path, query, [*pairs, ("Authorization", authorization + signature)])


EXAMPLES = {
    "GET Object": example(
        "GET",
        "/test.txt",
        {
            "Host": "examplebucket.s3.amazonaws.com",
            "Range": "bytes=0-9",
            "x-amz-content-sha256": EMPTY,
        },
        "host;range;x-amz-content-sha256;x-amz-date",
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    ),
    "PUT Object": example(  # the path is sent with '$' and signed as %24
        "PUT",
        "/test$file.text",
        {
            "Host": "examplebucket.s3.amazonaws.com",
            "Date": "Fri, 24 May 2013 00:00:00 GMT",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "x-amz-content-sha256": hashlib.sha256(b"Welcome to Amazon S3.").hexdigest(),
        },
        "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    ),
    "GET Bucket Lifecycle": example(
        "GET",
        "/?lifecycle",
        {"Host": "examplebucket.s3.amazonaws.com", "x-amz-content-sha256": EMPTY},
        "host;x-amz-content-sha256;x-amz-date",
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
    ),
    "Get Bucket (List Objects)": example(
        "GET",
        "/?max-keys=2&prefix=J",
        {"Host": "examplebucket.s3.amazonaws.com", "x-amz-content-sha256": EMPTY},
        "host;x-amz-content-sha256;x-amz-date",
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    ),
    "PUT Object, chunked (seed)": example(
        "PUT",
        "/examplebucket/chunkObject.txt",
        {
            "Host": "s3.amazonaws.com",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
            "Content-Length": "66824",
        },
        "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
        "x-amz-decoded-content-length;x-amz-storage-class",
        "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
    ),
    "PUT Object, chunked with trailer (seed)": example(
        "PUT",
        "/examplebucket/chunkObject.txt",
        {
            "Host": "s3.amazonaws.com",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
            "x-amz-trailer": "x-amz-checksum-crc32c",
        },
        "content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
        "x-amz-storage-class;x-amz-trailer",
        "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e",
    ),
}
PRESIGNED_EXAMPLE = Sent(
    "GET",
    "/test.txt",
    "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2F"
    "us-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&"
    "X-Amz-SignedHeaders=host&X-Amz-Signature="
    "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404",
    [("Host", "examplebucket.s3.amazonaws.com")],
)


@pytest.mark.parametrize("name", EXAMPLES)
def test_aws_examples_verify(name: str) -> None:
    verified = verify(EXAMPLES[name], now=EXAMPLE_NOW)
    assert verified.request.access_key == ACCESS
    assert verified.request.scope == "20130524/us-east-1/s3/aws4_request"


def test_aws_get_object_example_canonical_request() -> None:
    auth = parse(EXAMPLES["GET Object"])
    assert auth.canonical_request == (
        f"GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
        f"x-amz-content-sha256:{EMPTY}\nx-amz-date:20130524T000000Z\n\n"
        f"host;range;x-amz-content-sha256;x-amz-date\n{EMPTY}"
    )
    assert auth.string_to_sign.endswith(
        "\n7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
    )
    assert auth.payload_mode is sigv4.PayloadMode.SHA256
    assert auth.expected_sha256 == EMPTY


def test_aws_presigned_example_verifies_until_it_expires() -> None:
    auth = parse(PRESIGNED_EXAMPLE)
    assert (auth.presigned, auth.expires_s) == (True, 86400)
    assert auth.payload_mode is sigv4.PayloadMode.UNSIGNED
    sigv4.verify(auth, SECRET, now=EXAMPLE_NOW + 86400)
    error = refused("AccessDenied", lambda: sigv4.verify(auth, SECRET, now=EXAMPLE_NOW + 86401))
    assert (error.status, error.message) == (403, "Request has expired")


def test_aws_example_streaming_modes() -> None:
    seed = parse(EXAMPLES["PUT Object, chunked (seed)"])
    assert seed.payload_mode is sigv4.PayloadMode.STREAMING_SIGNED
    assert (seed.decoded_content_length, seed.trailer_names) == (66560, ())
    trailer = parse(EXAMPLES["PUT Object, chunked with trailer (seed)"])
    assert trailer.payload_mode is sigv4.PayloadMode.STREAMING_SIGNED_TRAILER
    assert trailer.trailer_names == ("x-amz-checksum-crc32c",)
    assert trailer.payload_mode.chunked
    assert trailer.payload_mode.signed_chunks
    assert trailer.payload_digest() is None


# --- canonical forms ---


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("", "/"),
        ("/test$file.text", "/test%24file.text"),
        ("/a%20b/c%2Bd", "/a%20b/c%2Bd"),
        ("/a+b", "/a%2Bb"),  # '+' in a path is a plus
        ("/%7e%41", "/~A"),
        ("/ü", "/%C3%BC"),
        ("/a/../b//c/./d/", "/a/../b//c/./d/"),  # S3 does not normalize segments
        ("/100%25", "/100%25"),
    ],
)
def test_canonical_uri(raw: str, canonical: str) -> None:
    assert sigv4.canonical_uri(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("", ""),
        ("uploads", "uploads="),
        ("b=2&a=x+y&a=%2B&c=", "a=%2B&a=x%20y&b=2&c="),
        ("a-b=1&a=2", "a=2&a-b=1"),  # sorted by name, then value
        ("k=a=b&&x", "k=a%3Db&x="),
        ("prefix=%7e~%41", "prefix=~~A"),
        ("k=€&k=%E2%82%AC", "k=%E2%82%AC&k=%E2%82%AC"),
        ("delimiter=/&list-type=2", "delimiter=%2F&list-type=2"),
    ],
)
def test_canonical_query(raw: str, canonical: str) -> None:
    assert sigv4.canonical_query(raw) == canonical


def test_canonical_query_of_presigned_urls_leaves_the_signature_out() -> None:
    raw = "X-Amz-Signature=abc&x=1&X-Amz-Date=2"
    assert sigv4.canonical_query(raw, presigned=True) == "X-Amz-Date=2&x=1"
    assert sigv4.canonical_query(raw) == "X-Amz-Date=2&X-Amz-Signature=abc&x=1"


# --- boto3, the whole client: what it really sends ---


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore and minio sign at CLOCK."""

    def now(remove_tzinfo: bool = True) -> datetime.datetime:
        return CLOCK.replace(tzinfo=None) if remove_tzinfo else CLOCK

    monkeypatch.setattr(botocore.auth, "get_current_datetime", now)
    monkeypatch.setattr(botocore.crt.auth, "get_current_datetime", now)  # with awscrt installed
    monkeypatch.setattr(minio.time, "utcnow", lambda: CLOCK)


class _Raw:
    def stream(self, *_: object, **__: object) -> Iterator[bytes]:
        yield b""


def boto_client(endpoint: str = "https://localhost:9000", style: str = "path") -> Any:
    session = boto3.session.Session(
        aws_access_key_id=ACCESS, aws_secret_access_key=SECRET, region_name="us-east-1"
    )
    config = botocore.config.Config(
        signature_version="s3v4",
        s3={"addressing_style": style},
        request_checksum_calculation="when_supported",
        retries={"max_attempts": 1},
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def capture(client: Any, call: Callable[[Any], object]) -> Sent:
    """The last request the client sends while running call."""
    sent: list[Sent] = []

    def before_send(request: Any, **_: object) -> botocore.awsrequest.AWSResponse:
        body = request.body
        data = body.read() if hasattr(body, "read") else (body or b"")
        sent.append(Sent.of(request.method, request.url, request.headers, data))
        return botocore.awsrequest.AWSResponse(request.url, 200, {}, _Raw())

    client.meta.events.register("before-send", before_send)
    call(client)
    return sent[-1]


BOTO_CALLS: dict[str, Callable[[Any], object]] = {
    "put, hostile key": lambda c: c.put_object(Bucket="b", Key=HOSTILE_KEY, Body=b"hello"),
    "put, metadata with spaces": lambda c: c.put_object(
        Bucket="b", Key="k", Body=b"x", Metadata={"note": "  two   spaces  "}, ContentType="a/b"
    ),
    "put, trailing crc32": lambda c: c.put_object(
        Bucket="b", Key="k", Body=io.BytesIO(b"x" * 100_000), ChecksumAlgorithm="CRC32"
    ),
    "get, range and response params": lambda c: c.get_object(
        Bucket="b",
        Key=HOSTILE_KEY,
        Range="bytes=0-9",
        VersionId="v+1/=",
        ResponseContentDisposition='attachment; filename="a b.txt"',
    ),
    "list v2, hostile params": lambda c: c.list_objects_v2(
        Bucket="b", Prefix=HOSTILE_VALUE, StartAfter="~x", Delimiter="/", ContinuationToken="a+b="
    ),
    "create multipart": lambda c: c.create_multipart_upload(Bucket="b", Key="k"),
    "upload part": lambda c: c.upload_part(
        Bucket="b", Key="k", PartNumber=3, UploadId="Zm9v+YmFy/ä=", Body=b"p" * 10
    ),
    "copy": lambda c: c.copy_object(
        Bucket="b", Key="k", CopySource={"Bucket": "s", "Key": HOSTILE_KEY}
    ),
    "delete objects": lambda c: c.delete_objects(
        Bucket="b", Delete={"Objects": [{"Key": "a"}, {"Key": HOSTILE_KEY}]}
    ),
    "head bucket": lambda c: c.head_bucket(Bucket="b"),
}


@pytest.mark.usefixtures("fixed_clock")
@pytest.mark.parametrize("endpoint", ["https://localhost:9000", "http://127.0.0.1:8080"])
@pytest.mark.parametrize("call", BOTO_CALLS)
def test_boto3_requests_verify(endpoint: str, call: str) -> None:
    sent = capture(boto_client(endpoint), BOTO_CALLS[call])
    verified = verify(sent)
    auth = verified.request
    assert (auth.access_key, auth.amz_date, auth.presigned) == (ACCESS, "20260102T030405Z", False)
    digest = auth.payload_digest()
    if digest is not None:  # the signed body hash is the body's
        digest.update(sent.body)
        digest.verify()
    refused("SignatureDoesNotMatch", lambda: verify(sent, secret=SECRET + "x"))


@pytest.mark.usefixtures("fixed_clock")
def test_boto3_virtual_host_addressing() -> None:
    client = boto_client("https://s3.example.com:8443", style="virtual")
    sent = capture(client, lambda c: c.get_object(Bucket="bucket", Key=HOSTILE_KEY))
    assert dict(sent.headers)["host"] == "bucket.s3.example.com:8443"
    verify(sent)


@pytest.mark.usefixtures("fixed_clock")
def test_boto3_streaming_upload_declares_its_body() -> None:
    sent = capture(boto_client(), BOTO_CALLS["put, trailing crc32"])
    auth = verify(sent).request
    assert auth.payload_mode is sigv4.PayloadMode.STREAMING_UNSIGNED_TRAILER
    assert (auth.decoded_content_length, auth.trailer_names) == (100_000, ("x-amz-checksum-crc32",))


@pytest.mark.usefixtures("fixed_clock")
def test_boto3_http_upload_signs_its_body_hash() -> None:
    sent = capture(boto_client("http://localhost:9000"), BOTO_CALLS["put, hostile key"])
    digest = parse(sent).payload_digest()
    assert digest is not None
    digest.update(b"hellO")
    error = refused("XAmzContentSHA256Mismatch", digest.verify)
    assert error.status == 400


@pytest.mark.usefixtures("fixed_clock")
@pytest.mark.parametrize(
    ("operation", "params"),
    [
        ("get_object", {"Key": HOSTILE_KEY}),
        ("get_object", {"Key": "k", "ResponseContentType": "text/plain; charset=utf-8"}),
        ("put_object", {"Key": HOSTILE_KEY}),
        ("list_objects_v2", {"Prefix": HOSTILE_VALUE}),
    ],
)
def test_boto3_presigned_urls_verify(operation: str, params: dict[str, str]) -> None:
    client = boto_client()
    url = client.generate_presigned_url(operation, Params={"Bucket": "b", **params}, ExpiresIn=600)
    method = "PUT" if operation.startswith("put") else "GET"
    sent = Sent.of(method, url, {})
    auth = verify(sent).request
    assert (auth.presigned, auth.expires_s, auth.payload_mode.value) == (
        True,
        600,
        "UNSIGNED-PAYLOAD",
    )
    refused("AccessDenied", lambda: verify(sent, now=NOW + 601))
    refused("SignatureDoesNotMatch", lambda: verify(sent, secret="other"))


@pytest.mark.usefixtures("fixed_clock")
def test_boto3_presigned_put_binds_its_signed_content_type() -> None:
    url = boto_client().generate_presigned_url(
        "put_object", Params={"Bucket": "b", "Key": "k", "ContentType": "image/png"}
    )
    sent = Sent.of("PUT", url, {"Content-Type": "image/png"})
    assert parse(sent).signed_headers == ("content-type", "host")
    verify(sent)
    refused("SignatureDoesNotMatch", lambda: verify(sent.replace_header("Content-Type", "a/b")))


# --- botocore's signers, called directly ---


def botocore_signed(
    method: str, url: str, headers: list[tuple[str, str]], body: bytes = b""
) -> Sent:
    request = botocore.awsrequest.AWSRequest(method=method, url=url, data=body)
    for name, value in headers:
        request.headers[name] = value  # a repeated name adds a value (HTTPHeaders)
    credentials = botocore.credentials.Credentials(ACCESS, SECRET)
    botocore.auth.S3SigV4Auth(credentials, "s3", "us-east-1").add_auth(request)
    return Sent.of(method, request.url, request.headers, body)


@pytest.mark.usefixtures("fixed_clock")
def test_botocore_repeated_and_spaced_headers() -> None:
    sent = botocore_signed(
        "PUT",
        "https://h:1/b/k",
        [("x-amz-meta-a", " 1 "), ("X-Amz-Meta-A", "two  words"), ("Cache-Control", "a,\tb")],
    )
    auth = parse(sent)
    assert "x-amz-meta-a:1,two words\n" in auth.canonical_request
    assert "cache-control:a, b\n" in auth.canonical_request
    sigv4.verify(auth, SECRET, now=NOW)


@pytest.mark.usefixtures("fixed_clock")
def test_botocore_date_header_instead_of_x_amz_date() -> None:
    sent = botocore_signed("GET", "https://h/b/k", [("Date", "Thu, 01 Jan 1970 00:00:00 GMT")])
    assert not any(name.lower() == "x-amz-date" for name, _ in sent.headers)
    auth = verify(sent).request
    assert auth.amz_date == "20260102T030405Z"


@pytest.mark.usefixtures("fixed_clock")
def test_botocore_query_signer() -> None:
    request = botocore.awsrequest.AWSRequest(method="GET", url="https://h/b/x?acl&prefix=a%20b")
    credentials = botocore.credentials.Credentials(ACCESS, SECRET)
    botocore.auth.S3SigV4QueryAuth(credentials, "s3", "us-east-1", expires=60).add_auth(request)
    sent = Sent.of("GET", request.url, {})
    assert verify(sent).request.expires_s == 60


# --- awscrt: AWS's C signer (what the CRT-based SDKs use) ---


@pytest.mark.parametrize("presign", [False, True])
def test_awscrt_signer(presign: bool) -> None:
    path = "/b/" + urllib.parse.quote(HOSTILE_KEY, safe="/~")
    query = "prefix=" + urllib.parse.quote(HOSTILE_VALUE, safe="-_.~") + "&uploads="
    headers = crt_http.HttpHeaders([("Host", "h:1"), ("x-amz-meta-x", " a  b ")])
    request = crt_http.HttpRequest("GET", f"{path}?{query}", headers=headers)
    config = crt_auth.AwsSigningConfig(
        signature_type=crt_auth.AwsSignatureType.HTTP_REQUEST_QUERY_PARAMS
        if presign
        else crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        credentials_provider=crt_auth.AwsCredentialsProvider.new_static(ACCESS, SECRET),
        region="us-east-1",
        service="s3",
        date=CLOCK,
        use_double_uri_encode=False,
        should_normalize_uri_path=False,
        signed_body_value=crt_auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.NONE
        if presign
        else crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
        expiration_in_seconds=300 if presign else None,
    )
    crt_auth.aws_sign_request(request, config).result()
    raw_path, _, raw_query = request.path.partition("?")
    sent = Sent("GET", raw_path, raw_query, list(request.headers))
    auth = verify(sent).request
    assert (auth.presigned, auth.payload_mode) == (presign, sigv4.PayloadMode.UNSIGNED)
    refused("SignatureDoesNotMatch", lambda: verify(sent, secret="x"))


# --- minio-py: the whole client and its signer ---


class MinioCapture(urllib3.PoolManager):
    """minio.Minio's HTTP client, recording requests and answering 200 without a network."""

    LISTING = (
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<Name>bkt</Name><IsTruncated>false</IsTruncated></ListBucketResult>"
    )

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Sent] = []

    def urlopen(  # type: ignore[override]
        self, method: str, url: str, body: Any = None, headers: Any = None, **_: Any
    ) -> urllib3.HTTPResponse:
        data = body if isinstance(body, bytes) else b""
        self.sent.append(Sent.of(method, url, headers or {}, data))
        return urllib3.HTTPResponse(
            body=self.LISTING,
            status=200,
            headers={"ETag": '"e"', "Content-Type": "application/xml"},
            preload_content=True,
        )


@pytest.mark.usefixtures("fixed_clock")
@pytest.mark.parametrize("secure", [False, True])
def test_minio_client_requests_verify(secure: bool) -> None:
    http = MinioCapture()
    client = minio.Minio(
        "localhost:9000",
        access_key=ACCESS,
        secret_key=SECRET,
        secure=secure,
        region="us-east-1",
        http_client=http,
    )
    client.put_object("bkt", MINIO_KEY, io.BytesIO(b"data"), 4, metadata={"x-amz-meta-n": "v  w"})
    list(client.list_objects("bkt", prefix=HOSTILE_VALUE, start_after="~", recursive=True))
    client.remove_object("bkt", MINIO_KEY, version_id="v+/=")
    assert len(http.sent) == 3
    for sent in http.sent:
        auth = verify(sent).request
        digest = auth.payload_digest()
        if digest is not None:
            digest.update(sent.body)
            digest.verify()
        refused("SignatureDoesNotMatch", lambda sent=sent: verify(sent, secret="nope"))  # type: ignore[misc]


@pytest.mark.usefixtures("fixed_clock")
def test_minio_presigned_urls_verify() -> None:
    client = minio.Minio("localhost:9000", ACCESS, SECRET, secure=False, region="us-east-1")
    url = client.presigned_get_object(
        "bkt",
        MINIO_KEY,
        expires=datetime.timedelta(minutes=5),
        response_headers={"response-content-type": "text/plain; a=b"},
        request_date=CLOCK,
    )
    sent = Sent.of("GET", url, {})
    assert verify(sent).request.expires_s == 300
    refused("AccessDenied", lambda: verify(sent, now=NOW + 301))


@pytest.mark.parametrize("content", [EMPTY, "UNSIGNED-PAYLOAD"])
def test_minio_signer(content: str) -> None:
    url = urllib.parse.urlsplit(
        "http://localhost:9000/b/"
        + urllib.parse.quote(HOSTILE_KEY)
        + "?uploadId="
        + urllib.parse.quote("a+b/c=", safe="")
    )
    headers = {
        "Host": url.netloc,
        "x-amz-content-sha256": content,
        "x-amz-date": "20260102T030405Z",
    }
    signed = minio.signer.sign_v4_s3(
        method="DELETE",
        url=url,
        region="us-east-1",
        headers=headers,  # type: ignore[arg-type]
        credentials=minio.credentials.credentials.Credentials(ACCESS, SECRET),
        content_sha256=content,
        date=CLOCK,
    )
    verify(Sent.of("DELETE", urllib.parse.urlunsplit(url), signed))


def test_minio_presign_signer() -> None:
    url = urllib.parse.urlsplit("https://s3.local/b/" + urllib.parse.quote("k ü+"))
    signed = minio.signer.presign_v4(
        method="PUT",
        url=url,
        region="us-east-1",
        credentials=minio.credentials.credentials.Credentials(ACCESS, SECRET),
        date=CLOCK,
        expires=42,
    )
    verify(Sent.of("PUT", urllib.parse.urlunsplit(signed), {}))


# --- what is refused ---


@pytest.fixture
def good(fixed_clock: None) -> Sent:
    """A GET signed by botocore at CLOCK."""
    url = "https://h:9/b/k%20y?list-type=2&prefix=p"
    return botocore_signed("GET", url, [("Range", "bytes=1-2")])


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: dataclasses.replace(s, raw_path="/b/k%20z"),
        lambda s: dataclasses.replace(s, raw_path="/b/k+y"),
        lambda s: dataclasses.replace(s, raw_query="list-type=2&prefix=q"),
        lambda s: dataclasses.replace(s, raw_query=s.raw_query + "&extra=1"),
        lambda s: dataclasses.replace(s, method="DELETE"),
        lambda s: s.replace_header("Range", "bytes=0-2"),
        lambda s: s.replace_header("Host", "other:9"),
    ],
)
def test_tampered_requests_do_not_match(good: Sent, tamper: Callable[[Sent], Sent]) -> None:
    verify(good)
    error = refused("SignatureDoesNotMatch", lambda: verify(tamper(good)))
    assert error.status == 403


def test_equivalent_encodings_still_match(good: Sent) -> None:
    verify(dataclasses.replace(good, raw_path="/b/k y", raw_query="prefix=p&list-type=2"))


def test_unsigned_amz_headers_are_refused(good: Sent) -> None:
    error = refused("AccessDenied", lambda: verify(good.replace_header("x-amz-acl", "public")))
    assert error.details == {"HeadersNotSigned": "x-amz-acl"}
    assert error.message == "There were headers present in the request which were not signed"
    # S3 tolerates an unsigned x-amz-content-sha256 (and then signs what it says).
    presigned = Sent.of(
        "GET",
        boto_client().generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"}),
        {},
    )
    refused("AccessDenied", lambda: parse(presigned.replace_header("x-amz-meta-a", "b")))
    parse(presigned.replace_header("x-amz-content-sha256", EMPTY))


def test_host_must_be_signed() -> None:
    sent = EXAMPLES["GET Object"]
    headers = [
        (n, v.replace("host;", "")) if n == "Authorization" else (n, v) for n, v in sent.headers
    ]
    error = refused("AccessDenied", lambda: parse(dataclasses.replace(sent, headers=headers)))
    assert error.details == {"HeadersNotSigned": "host"}


@pytest.mark.parametrize(
    ("offset_s", "code"),
    [
        (0, None),
        (900, None),
        (-900, None),
        (901, "RequestTimeTooSkewed"),
        (-3600, "RequestTimeTooSkewed"),
    ],
)
def test_clock_skew(good: Sent, offset_s: int, code: str | None) -> None:
    if code is None:
        verify(good, now=NOW + offset_s)
        return
    error = refused(code, lambda: verify(good, now=NOW + offset_s))
    assert error.status == 403
    assert error.details["RequestTime"] == "20260102T030405Z"


def test_presigned_urls_from_the_future_are_refused() -> None:
    refused("AccessDenied", lambda: verify(PRESIGNED_EXAMPLE, now=EXAMPLE_NOW - 901))
    verify(PRESIGNED_EXAMPLE, now=EXAMPLE_NOW - 600)


def _with_authorization(sent: Sent, old: str, new: str) -> Sent:
    headers = [(n, v.replace(old, new) if n == "Authorization" else v) for n, v in sent.headers]
    return dataclasses.replace(sent, headers=headers)


@pytest.mark.parametrize(
    ("old", "new", "code", "fragment"),
    [
        ("/us-east-1/", "/eu-west-1/", "AuthorizationHeaderMalformed", "region 'eu-west-1'"),
        ("/s3/", "/s4/", "AuthorizationHeaderMalformed", 'service "s4"'),
        ("aws4_request", "aws4_reques", "AuthorizationHeaderMalformed", "terminal"),
        ("/20130524/", "/20130525/", "AuthorizationHeaderMalformed", "credential date"),
        ("/20130524/", "/2013-05-24/", "AuthorizationHeaderMalformed", "mal-formed"),
        (f"{ACCESS}/", "", "AuthorizationHeaderMalformed", "mal-formed"),
        ("SignedHeaders=", "Signed=", "AuthorizationHeaderMalformed", "SignedHeaders="),
        ("AWS4-HMAC-SHA256 ", "AWS4-ECDSA-P256-SHA256 ", "InvalidRequest", "not supported"),
    ],
)
def test_bad_authorization_headers(old: str, new: str, code: str, fragment: str) -> None:
    sent = _with_authorization(EXAMPLES["GET Object"], old, new)
    error = refused(code, lambda: parse(sent))
    assert error.status == 400
    assert fragment in error.message


def test_a_wrong_region_names_the_right_one() -> None:
    error = refused(
        "AuthorizationHeaderMalformed", lambda: parse(EXAMPLES["GET Object"], "eu-west-1")
    )
    assert error.details == {"Region": "eu-west-1"}
    error = refused("AuthorizationQueryParametersError", lambda: parse(PRESIGNED_EXAMPLE, "eu-1"))
    assert error.details == {"Region": "eu-1"}


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("X-Amz-Expires=86400", "X-Amz-Expires=604801", "less than a week"),
        ("X-Amz-Expires=86400", "X-Amz-Expires=-7", "non-negative"),
        ("X-Amz-Expires=86400", "X-Amz-Expires=-1000", "non-negative"),
        ("X-Amz-Expires=86400", "X-Amz-Expires=1e3", "number"),
        ("X-Amz-Expires=86400&", "", "requires"),
        ("X-Amz-Date=20130524T000000Z", "X-Amz-Date=2013-05-24", "ISO8601"),
        ("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1", "only supports"),
        ("%2Fs3%2F", "%2Fs4%2F", "service"),
        ("X-Amz-Date=20130524T000000Z", "X-Amz-Date=20130525T000000Z", "credential date"),
    ],
)
def test_bad_presigned_urls(old: str, new: str, fragment: str) -> None:
    sent = dataclasses.replace(
        PRESIGNED_EXAMPLE, raw_query=PRESIGNED_EXAMPLE.raw_query.replace(old, new)
    )
    error = refused("AuthorizationQueryParametersError", lambda: parse(sent))
    assert fragment in error.message


def test_x_amz_expires_zero_is_well_formed_and_expired() -> None:
    # S3 parses X-Amz-Expires=0 and answers 403 "Request has expired" (a negative value or
    # more than a week is its 400 AuthorizationQueryParametersError: test_bad_presigned_urls).
    auth = parse(_presigned_with("X-Amz-Expires=86400", "X-Amz-Expires=0"))
    assert auth.expires_s == 0
    error = refused("AccessDenied", lambda: sigv4.verify(auth, SECRET, now=EXAMPLE_NOW + 1))
    assert (error.status, error.message) == (403, "Request has expired")


def test_one_auth_mechanism_at_a_time() -> None:
    both = PRESIGNED_EXAMPLE.replace_header("Authorization", "AWS4-HMAC-SHA256 Credential=x")
    assert refused("InvalidArgument", lambda: parse(both)).status == 400


def test_unsigned_and_v2_requests_are_not_sigv4() -> None:
    for query in ("", "AWSAccessKeyId=AK&Expires=1&Signature=abc%3D"):
        assert (
            sigv4.parse(method="GET", raw_path="/b", raw_query=query, headers={"Host": "h"}) is None
        )
    v2 = Sent("GET", "/b", "", [("Host", "h"), ("Authorization", "AWS AK:c2lnbmF0dXJl")])
    refused("InvalidRequest", lambda: parse(v2))


def test_content_sha256_is_required_and_checked(good: Sent) -> None:
    without = dataclasses.replace(
        good, headers=[(n, v) for n, v in good.headers if n.lower() != "x-amz-content-sha256"]
    )
    assert "x-amz-content-sha256" in refused("InvalidRequest", lambda: parse(without)).message
    refused("InvalidArgument", lambda: parse(good.replace_header("x-amz-content-sha256", "abc")))


def test_a_date_is_required(good: Sent) -> None:
    without = dataclasses.replace(
        good, headers=[(n, v) for n, v in good.headers if n != "X-Amz-Date"]
    )
    assert refused("AccessDenied", lambda: parse(without)).status == 403
    refused("AccessDenied", lambda: parse(good.replace_header("X-Amz-Date", "yesterday")))


def test_amz_dates_parse_as_strptime_takes_them() -> None:
    """The fast x-amz-date parser gives strptime's times (and refusals) for AWS's format."""
    for text in [
        "20261207T103000Z", "19700101T000000Z", "20240229T235959Z", "99991231T235959Z",
        "20261207t103000z", "20230229T000000Z", "20261307T103000Z", "20261207T103060Z",
        "20261207T246000Z", "20261207T103000", "20261207 103000Z", "20261207T103000Z ",
        "\uff120261207T103000Z", "00001231T235959Z", "", "x",
    ]:  # fmt: skip
        try:
            when = datetime.datetime.strptime(text, sigv4.AMZ_DATE_FORMAT)
            want: float | None = when.replace(tzinfo=datetime.UTC).timestamp()
        except ValueError:
            want = None
        if not text.isascii():
            want = None
        assert sigv4._parse_amz_date(text) == want, text


def test_streaming_needs_the_decoded_length() -> None:
    sent = EXAMPLES["PUT Object, chunked (seed)"]
    without = dataclasses.replace(
        sent, headers=[(n, v) for n, v in sent.headers if n != "x-amz-decoded-content-length"]
    )
    assert refused("MissingContentLength", lambda: parse(without)).status == 411


@pytest.mark.parametrize("signature", ["", "F0E8BDB8", "é" * 64, "\udcff", "0" * 64])
def test_malformed_signatures_just_do_not_match(signature: str) -> None:
    sent = EXAMPLES["GET Object"]
    real = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    bad = _with_authorization(sent, real, signature)
    refused("SignatureDoesNotMatch", lambda: verify(bad, now=EXAMPLE_NOW))


def test_secrets_stay_out_of_errors_and_reprs(good: Sent) -> None:
    verified = verify(good)
    assert SECRET not in repr(verified)
    assert verified.signing_key.hex() not in repr(verified)
    assert repr(verified.signing_key) not in repr(verified)
    error = refused("SignatureDoesNotMatch", lambda: verify(good, secret=SECRET[::-1]))
    text = f"{error} {error.message} {error.details}"
    assert SECRET[::-1] not in text
    assert SECRET not in text
    assert error.details["AWSAccessKeyId"] == ACCESS


def test_signing_keys_are_cached(good: Sent) -> None:
    sigv4.signing_key.cache_clear()
    verify(good)
    verify(good)
    info = sigv4.signing_key.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_unknown_access_keys() -> None:
    error = sigv4.invalid_access_key()
    assert (error.code, error.status) == ("InvalidAccessKeyId", 403)


def test_headers_as_a_multidict() -> None:
    multidict = pytest.importorskip("multidict")
    sent = EXAMPLES["GET Object"]
    headers = multidict.CIMultiDictProxy(multidict.CIMultiDict(sent.headers))
    auth = sigv4.parse(method="GET", raw_path="/test.txt", raw_query="", headers=headers)
    assert auth is not None
    sigv4.verify(auth, SECRET, now=EXAMPLE_NOW)


# --- found by fuzzing (tests/fuzz/test_sigv4_fuzz.py): refusals, never a 500 ---

_EXAMPLE_SIGNATURE = "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"


def _presigned_with(old: str, new: str) -> Sent:
    return dataclasses.replace(
        PRESIGNED_EXAMPLE, raw_query=PRESIGNED_EXAMPLE.raw_query.replace(old, new)
    )


@pytest.mark.parametrize(
    "signature", ["%C3%A9" * 32, "é" * 64, "%FF" * 32, "\udcff" * 64, "%E2%98%83", ""]
)
def test_a_non_ascii_presigned_signature_is_a_403(signature: str) -> None:
    sent = _presigned_with(_EXAMPLE_SIGNATURE, signature)
    error = refused("SignatureDoesNotMatch", lambda: verify(sent, now=EXAMPLE_NOW))
    assert error.status == 403


def test_undecodable_paths_and_queries_are_signed_as_their_bytes() -> None:
    # aiohttp hands over bytes that are not UTF-8 as surrogate escapes.
    assert sigv4.canonical_uri("/b/\udcff%41") == "/b/%FFA"
    assert sigv4.canonical_query("k=\udcff&\udcfe=v") == "%FE=v&k=%FF"
    sent = dataclasses.replace(
        PRESIGNED_EXAMPLE, raw_path="/t\udcff", raw_query=PRESIGNED_EXAMPLE.raw_query + "&\udcff"
    )
    refused("SignatureDoesNotMatch", lambda: verify(sent, now=EXAMPLE_NOW))


@pytest.mark.parametrize("expires", ["²", "٣", "1_000", "+5", " 5", "9" * 5000])
def test_x_amz_expires_is_ascii_digits(expires: str) -> None:
    sent = _presigned_with("X-Amz-Expires=86400", f"X-Amz-Expires={expires}")
    assert "number" in refused("AuthorizationQueryParametersError", lambda: parse(sent)).message


@pytest.mark.parametrize("length", ["²", "٣", "-1", "9" * 5000])
def test_decoded_content_length_is_ascii_digits(length: str) -> None:
    sent = EXAMPLES["PUT Object, chunked (seed)"].replace_header(
        "x-amz-decoded-content-length", length
    )
    refused("InvalidArgument", lambda: parse(sent))


@pytest.mark.parametrize(
    "date",
    ["Fri, 31 Dec 9999 23:59:59 -2359", "1 Jan 99999999999 00:00:00 GMT", "Mon, 1 Jan 1"],
)
def test_dates_datetime_cannot_hold_are_refused(good: Sent, date: str) -> None:
    without = dataclasses.replace(
        good, headers=[(n, v) for n, v in good.headers if n != "X-Amz-Date"]
    )
    assert (
        refused("AccessDenied", lambda: parse(without.replace_header("Date", date))).status == 403
    )
