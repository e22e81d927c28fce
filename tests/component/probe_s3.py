"""Probing S3: every operation of the gateway's route table (`s3.server._routes`, so a new
route is probed without a line here) on tenant A's buckets (its object bucket and its KV bucket),
objects and upload, plus the copies that read A's objects into B's own bucket and upload, sent
over HTTPS (the test CA) with each credential mode of `MODES`, signed by botocore. PostObject
carries its credentials in a form: a form with none, or one whose policy botocore signed (V4, or
V2 for the SigV2 mode) with the mode's credentials."""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import json
import urllib.parse

import aiohttp
import boto3
import botocore.auth
import botocore.awsrequest
import botocore.credentials
import yarl
from botocore.config import Config

from kvtier import names
from services.gateway.s3 import acl, kv_score
from services.gateway.s3 import cors as s3_cors
from services.gateway.s3 import server as s3_server
from tests.component import probe_cluster


class Mode(enum.Enum):
    """How a probe request is signed."""

    UNSIGNED = "no signature"
    WRONG_SECRET = "A's access key, a wrong secret (SigV4 header)"
    B_HEADER = "tenant B, valid SigV4 header"
    B_PRESIGNED_V4 = "tenant B, valid SigV4 presigned URL"
    B_PRESIGNED_V2 = "tenant B, valid SigV2 presigned URL"


@dataclasses.dataclass(frozen=True)
class Request:
    """One S3 request of a probe."""

    op: str
    method: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    #: A's resource named as the target (else: only as a copy source, or nothing: ListBuckets).
    targets_a: bool = True


_VERSIONED_OPS = (
    "GetObject", "HeadObject", "DeleteObject", "GetObjectTagging", "PutObjectTagging",
    "DeleteObjectTagging", "GetObjectAcl", "PutObjectAcl",
)  # fmt: skip
#: Variants one route serves: ListObjects V2 is ListObjects with list-type=2.
EXTRA_QUERIES: dict[str, list[tuple[tuple[str, str], ...]]] = {
    "ListObjects": [(("list-type", "2"),)],
    # One version of A's object (its objects are unversioned: their version is "null").
    **{op: [(("versionId", "null"),)] for op in _VERSIONED_OPS},
    "ListObjectVersions": [(("key-marker", "a"), ("version-id-marker", "null"))],
}


def routes() -> list[tuple[str, str, tuple[str, ...], str]]:
    """(method, level, query keys it needs, op) of every S3 route."""
    return [(m, level, needs, op) for (m, level, needs), (op, _) in s3_server._routes()]


def _query(needs: tuple[str, ...], upload_id: str) -> tuple[tuple[str, str], ...]:
    values = {"uploadId": upload_id, "partNumber": "1"}
    return tuple((n, values.get(n, "")) for n in needs)


def _body(op: str, keys: list[str], etag: str) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    if op in ("PutObject", "UploadPart"):
        return b"forged by the probe", ()
    if op == "GetObjectAttributes":  # a valid request: refused (or granted) as HeadObject
        return b"", (("x-amz-object-attributes", "ETag,ObjectSize"),)
    if op == "DeleteObjects":  # each key, and each key's version "null" for good
        objects = "".join(f"<Object><Key>{k}</Key></Object>" for k in keys)
        objects += "".join(
            f"<Object><Key>{k}</Key><VersionId>null</VersionId></Object>" for k in keys
        )
        body = f"<Delete>{objects}</Delete>".encode()
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        return body, (("Content-MD5", md5),)
    if op == "PutBucketCors":  # a valid configuration allowing every origin: refused all the same
        rule = "<AllowedOrigin>*</AllowedOrigin><AllowedMethod>GET</AllowedMethod>"
        body = f"<CORSConfiguration><CORSRule>{rule}</CORSRule></CORSConfiguration>".encode()
        return body, (("Content-MD5", base64.b64encode(hashlib.md5(body).digest()).decode()),)
    if op == s3_cors.PREFLIGHT:  # a complete preflight: A's buckets have no CORS rules (403)
        return b"", (("Origin", "https://probe.example"), ("Access-Control-Request-Method", "GET"))
    if op in ("PutBucketAcl", "PutObjectAcl"):  # a valid ACL opening everything to everyone
        return b"", (("x-amz-grant-full-control", f'uri="{acl.ALL_USERS_URI}"'),)
    if op == "PutBucketLifecycleConfiguration":  # valid, expiring everything: refused the same
        rule = "<ID>x</ID><Filter/><Status>Enabled</Status><Expiration><Days>1</Days></Expiration>"
        body = f"<LifecycleConfiguration><Rule>{rule}</Rule></LifecycleConfiguration>".encode()
        return body, (("Content-MD5", base64.b64encode(hashlib.md5(body).digest()).decode()),)
    if op == "PutBucketVersioning":  # valid, turning it on: refused all the same
        body = b"<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>"
        return body, (("Content-MD5", base64.b64encode(hashlib.md5(body).digest()).decode()),)
    if op in ("PutObjectTagging", "PutBucketTagging"):  # a valid tag set: refused all the same
        body = b"<Tagging><TagSet><Tag><Key>probe</Key><Value>1</Value></Tag></TagSet></Tagging>"
        return body, (("Content-MD5", base64.b64encode(hashlib.md5(body).digest()).decode()),)
    if op == "PutBucketOwnershipControls":  # valid, ACLs enabled: refused all the same
        rule = "<Rule><ObjectOwnership>ObjectWriter</ObjectOwnership></Rule>"
        body = f"<OwnershipControls>{rule}</OwnershipControls>".encode()
        return body, (("Content-MD5", base64.b64encode(hashlib.md5(body).digest()).decode()),)
    if op == "CompleteMultipartUpload":
        part = f"<Part><PartNumber>1</PartNumber><ETag>&quot;{etag}&quot;</ETag></Part>"
        return f"<CompleteMultipartUpload>{part}</CompleteMultipartUpload>".encode(), ()
    return b"", ()


def requests(world: probe_cluster.World) -> list[Request]:
    """Every route on each of A's buckets, and the copies of A's objects into B's own."""
    out: list[Request] = []
    object_keys = [k for k, v in world.objects.items() if v]
    buckets = {
        world.bucket: (object_keys[0], object_keys),
        world.kv_bucket: (next(iter(world.kv_bucket_objects)), list(world.kv_bucket_objects)),
        # Every tenant's spilled KV blocks live here: nobody's over S3.
        names.KV_DURABLE_BUCKET: ("a-block-0", ["a-block-0"]),
    }
    for method, level, needs, op in routes():
        if level == "service":
            out.append(Request(op, method, "/", _query(needs, ""), targets_a=False))
            continue
        for bucket, (key, keys) in buckets.items():
            target = world.upload_key if "uploadId" in needs else key
            path = f"/{bucket}" if level == "bucket" else f"/{bucket}/{_quote(target)}"
            body, headers = _body(op, keys, world.part_etag)
            query = _query(needs, world.upload_id)
            out.append(Request(op, method, path, query, body, headers))
            for extra in EXTRA_QUERIES.get(op, ()):
                out.append(Request(op, method, path, query + extra, body, headers))
    for bucket, (key, _) in buckets.items():
        source = (("x-amz-copy-source", f"/{bucket}/{_quote(key)}"),)
        out.append(
            Request(
                "CopyObject", "PUT", f"/{world.b_bucket}/copied", headers=source, targets_a=False
            )
        )
        out.append(
            Request(
                "UploadPartCopy",
                "PUT",
                f"/{world.b_bucket}/{world.b_upload_key}",
                _query(("partNumber", "uploadId"), world.b_upload_id),
                headers=source,
                targets_a=False,
            )
        )
    # Score over HTTP (on no bucket, so in no route table row): A's chain, naming A's tenant.
    out.append(Request(kv_score.OP, "POST", kv_score.PATH, body=score_body(world)))
    return out


def score_body(world: probe_cluster.World, *, tenant: str | None = None) -> bytes:
    """A Score request for A's blocks in A's namespace, naming tenant (default: A's)."""
    keys = [base64.b64encode(key).decode() for key in world.blocks]
    doc = {"tenant": world.a.tenant if tenant is None else tenant, "namespace": world.namespace}
    return json.dumps({**doc, "keys": keys}).encode()


#: What S3's public-read grants anyone on a bucket and on a public-read object: listing the
#: bucket's objects, versions and uploads (S3 maps a bucket's READ to s3:ListBucket,
#: s3:ListBucketVersions and s3:ListBucketMultipartUploads), HeadBucket, and reading the object
#: or its attributes (its own ACL decides). Nothing else.
PUBLIC_READ_BUCKET_OPS = frozenset(
    {"ListObjects", "ListObjectVersions", "ListMultipartUploads", "HeadBucket"}
)
PUBLIC_READ_OBJECT_OPS = frozenset({"GetObject", "HeadObject", "GetObjectAttributes"})


def public_requests(world: probe_cluster.World) -> list[tuple[Request, bool]]:
    """Every route on A's public-read bucket, on its public-read object and on its private
    one, with whether a public-read ACL grants it to anyone (request, granted)."""
    open_key, closed_key = next(iter(world.public_open)), next(iter(world.public_closed))
    keys = [open_key, closed_key]
    out: list[tuple[Request, bool]] = []
    for method, level, needs, op in routes():
        if level == "service":
            continue
        for key in [""] if level == "bucket" else keys:
            path = f"/{world.public_bucket}" + (f"/{_quote(key)}" if key else "")
            body, headers = _body(op, keys, world.part_etag)
            query = _query(needs, "no-such-upload")
            granted = op in PUBLIC_READ_BUCKET_OPS or (
                op in PUBLIC_READ_OBJECT_OPS and key == open_key
            )
            out.append((Request(op, method, path, query, body, headers), granted))
            extras = list(EXTRA_QUERIES.get(op, ()))
            if key == closed_key and method in ("GET", "HEAD"):
                extras.append((("versionId", "null"),))  # a version, as private as the object
            for extra in extras:
                out.append((Request(op, method, path, query + extra, body, headers), granted))
    return out


def _quote(key: str) -> str:
    return urllib.parse.quote(key, safe="/-_.~")


def _credentials(world: probe_cluster.World, mode: Mode) -> botocore.credentials.Credentials:
    if mode is Mode.WRONG_SECRET:
        return botocore.credentials.Credentials(world.a.access_key, "not-the-secret-of-a-at-all")
    return world.b.credentials()


def prepare(world: probe_cluster.World, request: Request, mode: Mode) -> tuple[str, dict[str, str]]:
    """(URL, headers) of request signed as mode says."""
    # Sub-resources without a value go bare (`?uploads`), as S3 clients send them.
    query = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" if v else k for k, v in request.query)
    url = f"{world.cluster.s3_url}{request.path}" + (f"?{query}" if query else "")
    presigned = mode in (Mode.B_PRESIGNED_V4, Mode.B_PRESIGNED_V2)
    aws = botocore.awsrequest.AWSRequest(
        method=request.method,
        url=url,
        data=b"" if presigned else request.body,  # a presigned URL signs no body
        # Explicit, so the HTTP client adds none after signing (SigV2 signs Content-Type).
        headers={"Content-Type": "application/octet-stream", **dict(request.headers)},
    )
    if mode is Mode.UNSIGNED:
        return url, dict(aws.headers)
    creds = _credentials(world, mode)
    if mode in (Mode.WRONG_SECRET, Mode.B_HEADER):
        aws.headers["x-amz-content-sha256"] = hashlib.sha256(request.body).hexdigest()
        botocore.auth.S3SigV4Auth(creds, "s3", probe_cluster.REGION).add_auth(aws)
    elif mode is Mode.B_PRESIGNED_V4:
        botocore.auth.S3SigV4QueryAuth(creds, "s3", probe_cluster.REGION, expires=300).add_auth(aws)
    else:
        botocore.auth.HmacV1QueryAuth(creds, expires=300).add_auth(aws)
    prepared = aws.prepare()
    return prepared.url, dict(prepared.headers)


async def send(
    http: aiohttp.ClientSession, world: probe_cluster.World, request: Request, mode: Mode
) -> tuple[int, bytes]:
    """The status and body of request sent as mode says."""
    if request.op == "PostObject":
        url = f"{world.cluster.s3_url}{request.path}"
        form = _post_form(world, request.path.strip("/"), mode)
        async with http.post(url, data=form, ssl=probe_cluster.tls_context()) as response:
            return response.status, await response.read()
    url, headers = prepare(world, request, mode)
    async with http.request(
        request.method,
        yarl.URL(url, encoded=True),
        data=request.body or None,
        headers=headers,
        ssl=probe_cluster.tls_context(),
    ) as response:
        return response.status, await response.read()


def _post_form(world: probe_cluster.World, bucket: str, mode: Mode) -> aiohttp.FormData:
    """A POST Object form for bucket: no credentials (UNSIGNED), else a policy signed with the
    mode's credentials."""
    fields = {"key": "forged-by-the-probe"}
    if mode is not Mode.UNSIGNED:
        creds = _credentials(world, mode)
        client = boto3.client(
            "s3", endpoint_url=world.cluster.s3_url, region_name=probe_cluster.REGION,
            aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key,
            config=Config(
                signature_version="s3" if mode is Mode.B_PRESIGNED_V2 else "s3v4",
                s3={"addressing_style": "path"},
            ),
        )  # fmt: skip
        fields = client.generate_presigned_post(bucket, fields["key"], ExpiresIn=300)["fields"]
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", b"forged by the probe", filename="probe.bin")
    return form
