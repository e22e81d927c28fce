"""POST Object: browser-form uploads (`POST /<bucket>` with a multipart/form-data body) signed
by a POST policy (`post_policy`), as boto3's `generate_presigned_post` and HTML forms make them.

The form is read as it streams (aiohttp's multipart reader): the fields before the part named
`file` (20 KiB at most, MaxPostPreDataLengthExceeded past that), then the file, which streams
into the object engine like a PutObject body of unknown length (`object_ops.receive`: staging
slot by slot, never whole in memory, the write aborted on any error so nothing is stored).
Fields after the file are ignored, as S3 does. `S3Server` authenticates a PostObject here
(`authenticate`: its credentials are fields, not headers), binds the user, admits the request
through the ACL gate as a PutObject of that user (`acl_ops.GRANTED`: the bucket's owner, or
a WRITE grant of the bucket, or a bucket policy's Allow that may match: the gate sees neither
the key nor the fields), then calls `post_object`, which checks the POST policy's conditions,
decides the bucket policy as on that user's PutObject of the key with the form's `acl` and
`tagging` as its headers (`_check_bucket_policy`), and stores the file, owned as that
PutObject would own it (`_owner`: another tenant's signer owns what it writes, but as the
bucket's Object Ownership says).

Fields: key (`${filename}` is the file part's filename), policy, x-amz-algorithm /
x-amz-credential / x-amz-date / x-amz-signature (V4) or AWSAccessKeyId / signature (V2),
Content-Type, Content-Encoding, Content-Disposition, Content-Language, Cache-Control, Expires,
x-amz-meta-*, x-amz-checksum-* (checked like a PUT's headers: BadDigest, before the file is
read for a value that is no base64 digest of its algorithm; like any field, a condition must
name it), tagging (a Tagging document, `tags.parse_xml`), success_action_status,
success_action_redirect (or redirect), acl (a canned ACL, as PutObject's x-amz-acl);
x-amz-storage-class and other x-amz-* fields are accepted (a condition must still name them)
and not applied, as their headers are not on PutObject. A form without signature fields and
without a policy is anonymous, as S3 has it ("requests without a security policy are
considered anonymous and will succeed only on publicly writable buckets"): the ACL gate admits
it where an anonymous PutObject is (a WRITE grant to AllUsers), else AccessDenied; a policy
without a signature is InvalidArgument (S3 requires AWSAccessKeyId with a policy). KV
buckets answer NotImplemented (their PUT needs the size up front).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import typing
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from aiohttp import http_exceptions, multipart, streams, web
from multidict import CIMultiDict, CIMultiDictProxy

from kvtier import checksums
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import versions
from services.gateway.s3 import (
    acl,
    auth,
    body,
    bucket_policy,
    object_ops,
    ownership,
    policy_ops,
    post_policy,
    public_access,
    s3errors,
    s3request,
    tags,
    versioning_ops,
    xmlio,
)

#: Where `authenticate` leaves the form for `post_object`.
FORM_KEY = "kvtier.s3.post_form"
#: The bytes of the fields before the file, as S3 bounds them.
MAX_PRE_FILE_BYTES = 20480
#: Seconds the fields before the file may take to arrive (RequestTimeout after).
FIELDS_TIMEOUT_S = 20.0
_READ_BYTES = 256 << 10
_V4_FIELDS = ("x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-signature")
_V2_FIELDS = ("awsaccesskeyid", "signature")
_NAMES = {
    "x-amz-algorithm": "X-Amz-Algorithm", "x-amz-credential": "X-Amz-Credential",
    "x-amz-date": "X-Amz-Date", "x-amz-signature": "X-Amz-Signature",
    "awsaccesskeyid": "AWSAccessKeyId", "signature": "Signature", "policy": "Policy",
    "key": "key",
}  # fmt: skip
_HEADERS = {
    "content-type": "content_type", "content-encoding": "content_encoding",
    "content-disposition": "content_disposition", "content-language": "content_language",
    "cache-control": "cache_control", "expires": "expires",
}  # fmt: skip
_STATUSES = {"200": 200, "201": 201, "204": 204}


@dataclasses.dataclass(slots=True)
class Form:
    """A POST form up to its file part, its signature checked."""

    fields: dict[str, str]  #: lowercase name -> value
    sent: list[str]  #: the names as sent, in order
    file: multipart.BodyPartReader
    policy: post_policy.Policy | None  #: None: an anonymous form (no policy, no signature)


def _malformed() -> s3errors.S3Error:
    return s3errors.S3Error(
        "MalformedPOSTRequest",
        "The body of your POST request is not well-formed multipart/form-data.",
    )


def _missing(name: str) -> s3errors.S3Error:
    return post_policy.argument(
        f"Bucket POST must contain a field named '{_NAMES.get(name, name)}'.  If it is "
        "specified, please check the order of the fields."
    )


class _PartStream:
    """The file part as `body.Payload` reads a stream. A read given up (the payload's timeouts
    cancel it) goes on in its task and the next read takes its bytes: the multipart reader
    loses data when a read is cancelled half-way."""

    def __init__(self, part: multipart.BodyPartReader) -> None:
        self._part = part
        self._next: asyncio.Task[bytes] | None = None

    async def readany(self) -> bytes:
        if self._next is None:
            self._next = asyncio.ensure_future(self._part.read_chunk(_READ_BYTES))
            self._next.add_done_callback(_retrieve)
        chunk = await asyncio.shield(self._next)
        self._next = None
        return chunk

    def close(self) -> None:
        """Give up a read still going on (the request is over)."""
        if self._next is not None:
            self._next.cancel()


def _retrieve(task: asyncio.Task[bytes]) -> None:
    """Mark a read's failure seen (its reader reports it, or the request ended before)."""
    if not task.cancelled():
        task.exception()


class FilePayload(body.Payload):
    """The file part as an open-ended body: EntityTooSmall at its end when shorter than the
    policy's content-length-range (the bound above is `object_ops.receive`'s)."""

    def __init__(self, part: multipart.BodyPartReader, *, min_bytes: int) -> None:
        self._part_stream = _PartStream(part)
        super().__init__(typing.cast(streams.StreamReader, self._part_stream), size=-1)
        self._min_bytes = min_bytes

    def close(self) -> None:
        """End any read of the file still going on (after a timeout), so that nothing reads
        the connection beside aiohttp once the request is over."""
        self._part_stream.close()

    async def finish(self) -> dict[str, str]:
        trailers = await super().finish()
        if self.read < self._min_bytes:
            raise s3errors.S3Error(
                "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size"
            )
        return trailers


async def read_fields(
    http: web.Request,
) -> tuple[dict[str, str], list[str], multipart.BodyPartReader]:
    """(fields by lowercase name, names as sent, the file part) of a form: 412 unless the
    body is multipart/form-data, MalformedPOSTRequest, MaxPostPreDataLengthExceeded, and
    InvalidArgument without a file part, RequestTimeout when they take FIELDS_TIMEOUT_S."""
    if http.content_type != "multipart/form-data":
        raise s3errors.S3Error(
            "PreconditionFailed", "Bucket POST must be of the enclosure-type multipart/form-data"
        )
    try:
        async with asyncio.timeout(FIELDS_TIMEOUT_S):
            return await _read_fields(http)
    except TimeoutError:
        raise s3errors.S3Error(
            "RequestTimeout",
            "Your socket connection to the server was not read from or written to within the "
            "timeout period. Idle connections will be closed.",
        ) from None


async def _read_fields(
    http: web.Request,
) -> tuple[dict[str, str], list[str], multipart.BodyPartReader]:
    fields: dict[str, str] = {}
    sent: list[str] = []
    budget = MAX_PRE_FILE_BYTES
    try:
        reader = await http.multipart()
        while True:
            part = await reader.next()
            if part is None:
                raise post_policy.argument("POST requires exactly one file upload per request.")
            if not isinstance(part, multipart.BodyPartReader) or not part.name:
                raise _malformed()
            if part.name.lower() == "file":
                return fields, sent, part
            budget -= len(part.name)
            raw = await _field(part, budget)
            budget -= len(raw)
            try:
                fields[part.name.lower()] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise post_policy.argument(f"the field {part.name} is not UTF-8") from None
            sent.append(part.name)
    # aiohttp's multipart reader: no boundary, a malformed part, a bad or too long header.
    except (ValueError, http_exceptions.HttpProcessingError):
        raise _malformed() from None


async def _field(part: multipart.BodyPartReader, budget: int) -> bytes:
    value = bytearray()
    while chunk := await part.read_chunk(_READ_BYTES):
        value += chunk
        if len(value) > budget:
            raise s3errors.S3Error(
                "MaxPostPreDataLengthExceeded",
                "Your POST request fields preceeding the upload file was too large.",
            )
    return bytes(value)


async def authenticate(
    s3: s3request.Door, http: web.Request
) -> tuple[auth.Principal, body.Payload]:
    """The user of a POST form (V4 or V2 signature of its policy, checked before the policy
    is decoded) and its file as the request's body; the form is left at FORM_KEY."""
    fields, sent, part = await read_fields(http)
    if "key" not in fields:
        raise _missing("key")
    if any(name in fields for name in _V4_FIELDS):
        for name in (*_V4_FIELDS, "policy"):
            if name not in fields:
                raise _missing(name)
        access_key, day = post_policy.credential(
            fields["x-amz-credential"], fields["x-amz-date"], fields["x-amz-algorithm"],
            region=s3.region,
        )  # fmt: skip
        principal, secret = await s3.auth.user(access_key)
        post_policy.verify_v4(
            fields["policy"], fields["x-amz-signature"], secret, day=day, region=s3.region
        )
    elif any(name in fields for name in _V2_FIELDS):
        for name in (*_V2_FIELDS, "policy"):
            if name not in fields:
                raise _missing(name)
        principal, secret = await s3.auth.user(fields["awsaccesskeyid"])
        post_policy.verify_v2(fields["policy"], fields["signature"], secret)
    elif "policy" in fields:
        raise _missing("awsaccesskeyid")
    else:
        # Anonymous: the ACL gate decides, as for an anonymous PutObject.
        http[FORM_KEY] = Form(fields, sent, part, None)
        return auth.ANONYMOUS, FilePayload(part, min_bytes=0)
    policy = post_policy.parse(fields["policy"])
    http[FORM_KEY] = Form(fields, sent, part, policy)
    return principal, FilePayload(part, min_bytes=policy.min_bytes)


async def post_object(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """Store the form's file under its key once the policy allows the form (AccessDenied);
    an anonymous form has no policy, the ACL gate admitted it."""
    form: Form = req.http[FORM_KEY]
    info = await s3.owned_bucket(req)
    key = form.fields["key"]
    if form.file.filename is not None:
        key = key.replace("${filename}", form.file.filename)
    bound = object_ops.MAX_PUT_BYTES
    if form.policy is not None:
        values = {**form.fields, "key": key, "bucket": req.bucket}
        # The bucket is a field of every form: a policy must name it (so it holds for one
        # bucket).
        sent = form.sent if "bucket" in form.fields else [*form.sent, "bucket"]
        post_policy.check(form.policy, values, sent, now=s3.auth.now())
        if form.policy.max_bytes is not None:
            bound = min(bound, form.policy.max_bytes)
    object_ops.check_key(key)
    wanted, expected = _checksums(form.fields)
    headers = _headers(form.fields, _owner(req, form.fields), req.bucket_owner)
    await _check_bucket_policy(s3, req, key, form.fields, headers.tags)
    public_access.check_acl(info, headers.acl)  # the `acl` field: BlockPublicAcls
    # ... and Object Ownership's BucketOwnerEnforced
    ownership.check_write(ownership.mode(info), _acl_header(form.fields), info.tenant)
    begun = await s3.front.begin_put(
        pb.BeginPutRequest(
            bucket=req.bucket, key=key, size=bound, headers=headers,
            checksum_algorithms=wanted, expected_checksums=expected,
        )
    )  # fmt: skip
    try:
        meta = await object_ops.receive(s3, req, begun.upload_id, bound)
    finally:
        if isinstance(req.payload, FilePayload):
            req.payload.close()
    response = _answer(req, form, key, meta, wanted + list(expected))
    versioning_ops.stamp(response, versions.info(meta), False)
    return response


async def _check_bucket_policy(
    s3: s3request.Door,
    req: s3request.S3Request,
    key: str,
    fields: dict[str, str],
    tag_set: Mapping[str, str],
) -> None:
    """The bucket policy's decision on the form as on its user's PutObject of key whose
    x-amz-acl and x-amz-tagging are its `acl` and `tagging` fields (the gate, which sees
    neither, admitted it where an Allow may match: `policy_ops.DECIDED_LATER`), by the gate's
    rules: a Deny refuses anyone; another tenant's user or an anonymous form needs an Allow
    (not a public one where the bucket restricts public policies) or the bucket's WRITE grant
    (ACLs enabled). A signed user denied on the cached record is decided on a fresh one."""
    who = req.principal
    headers = CIMultiDict(
        (name, value) for name, value in req.http.headers.items()
        if not name.lower().startswith("x-amz-")  # the form's, not the POST's, are the PUT's
    )  # fmt: skip
    if fields.get("acl"):
        headers["x-amz-acl"] = fields["acl"]
    if tag_set:
        headers["x-amz-tagging"] = urllib.parse.urlencode(sorted(tag_set.items()))
    put = CIMultiDictProxy(headers)

    async def admits(info: metadata_pb2.BucketInfo) -> bool:
        policy = policy_ops.policy_of(info)
        # No policy: the ACLs decide, again (the gate may have admitted the form on an Allow
        # of an older record).
        decision = bucket_policy.Decision.NONE
        if policy is not None:
            decision = policy_ops.decide(
                policy, "PutObject", who, info.name, key, {}, put, req.http.remote or ""
            )
        return decision is not bucket_policy.Decision.DENY and _admitted(
            info, policy, decision, who
        )

    await policy_ops.decide_again(
        lambda fresh: s3.front.bucket_info(req.bucket, fresh=fresh), who, admits
    )


def _admitted(
    info: metadata_pb2.BucketInfo,
    policy: bucket_policy.Policy | None,
    decision: bucket_policy.Decision,
    who: auth.Principal,
) -> bool:
    """Whether a form that no Deny refuses is admitted (`_check_bucket_policy`)."""
    if who.may_use(info.tenant):
        return True
    if decision is bucket_policy.Decision.ALLOW:
        return policy_ops.allow_admits(info, policy, decision)
    bucket_acl = public_access.effective(info, info.acl)
    return not ownership.enforced(info) and acl.allows(bucket_acl, info.tenant, who, acl.WRITE)


def _owner(req: s3request.S3Request, fields: dict[str, str]) -> str:
    """The tenant owning the object, by PutObject's rules (`object_ops.request_headers`): the
    form's signer (`acl.writer`: its own tenant where it may not use the bucket, admitted by
    a WRITE grant or a policy), unless the bucket's Object Ownership gives it the bucket's
    tenant (BucketOwnerEnforced; BucketOwnerPreferred with bucket-owner-full-control)."""
    if not req.bucket_owner:
        return ""
    writer = acl.writer(req.principal, req.bucket_owner)
    return ownership.object_owner(
        req.object_ownership, _acl_header(fields), writer, req.bucket_owner
    )


def _acl_header(fields: dict[str, str]) -> dict[str, str]:
    """The form's `acl` field as PutObject's x-amz-acl header (an empty one: none)."""
    return {"x-amz-acl": fields["acl"]} if fields.get("acl") else {}


def _headers(fields: dict[str, str], owner: str, bucket_owner: str) -> pb.ObjectHeaders:
    """The standard headers, x-amz-meta-* (MetadataTooLarge past 2 KB), tags (the `tagging`
    field: a Tagging document, as PutObjectTagging's body) and the ACL of an object of owner
    (`_owner`) in a bucket of bucket_owner (the `acl` field: a canned ACL, as PutObject's
    x-amz-acl; `acl.object_acl`: the owner recorded where it is not the bucket's tenant)."""
    out = pb.ObjectHeaders()
    wanted = acl.object_acl(_acl_header(fields), bucket_owner, owner)
    if wanted is not None:
        out.acl.CopyFrom(wanted)
    for name, attr in _HEADERS.items():
        setattr(out, attr, fields.get(name, ""))
    size = 0
    for name, value in fields.items():
        if name.startswith("x-amz-meta-"):
            out.user_metadata[name[len("x-amz-meta-") :]] = value
            size += len(name) - len("x-amz-meta-") + len(value.encode())
    if size > object_ops.MAX_META_BYTES:
        raise s3errors.S3Error("MetadataTooLarge", f"user metadata is {size} bytes, 2 KB at most")
    if fields.get("tagging"):
        out.tags.update(tags.parse_xml(fields["tagging"].encode()))
    return out


def _checksums(fields: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(algorithms to compute, expected values) of the form's x-amz-checksum-* fields."""
    wanted: list[str] = []
    expected: dict[str, str] = {}
    for name, value in fields.items():
        if name == "x-amz-checksum-algorithm":
            wanted.append(value.upper())
        elif name.startswith(object_ops.CHECKSUM_HEADER) and name != "x-amz-checksum-type":
            expected[name[len(object_ops.CHECKSUM_HEADER) :].upper()] = value
    for algorithm in [*wanted, *expected]:
        if algorithm not in object_ops.ALGORITHMS:
            raise s3errors.S3Error("InvalidRequest", f"unknown checksum algorithm {algorithm}")
    for algorithm, value in expected.items():
        _check_digest(algorithm, value)
    return wanted, expected


def _check_digest(algorithm: str, value: str) -> None:
    """BadDigest (as a PUT answers a checksum that does not match) unless value is the base64
    of a digest of algorithm's size (4 bytes for CRC32, 32 for SHA256...): refused before the
    file is read, as nothing could match it."""
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != checksums.new(algorithm).digest_size:
        name = f"{object_ops.CHECKSUM_HEADER}{algorithm.lower()}"
        raise s3errors.S3Error(
            "BadDigest", f"Value for {name} is invalid: not the base64 of a {algorithm} digest."
        )


def _answer(
    req: s3request.S3Request, form: Form, key: str, meta: datanode_pb2.ShardMeta, sums: list[str]
) -> web.Response:
    """303 to success_action_redirect (an absolute http(s) URL) with bucket, key and etag in
    its query; else success_action_status 200, 201 (a PostResponse document) or 204."""
    etag = xmlio.quoted(meta.etag)
    redirect = form.fields.get("success_action_redirect") or form.fields.get("redirect", "")
    target = urllib.parse.urlsplit(redirect)
    location = _location(req, key)
    if target.scheme in ("http", "https") and target.netloc:
        query = urllib.parse.urlencode({"bucket": req.bucket, "key": key, "etag": etag})
        separator = "&" if target.query else "" if redirect.endswith("?") else "?"
        response = web.Response(status=303)
        response.headers["Location"] = redirect + separator + query
    elif (status := _STATUSES.get(form.fields.get("success_action_status", ""), 204)) == 201:
        root = ET.Element("PostResponse")
        for tag, text in (
            ("Location", location),
            ("Bucket", req.bucket),
            ("Key", key),
            ("ETag", etag),
        ):
            ET.SubElement(root, tag).text = text
        document = b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(
            root, "utf-8", xml_declaration=False
        )
        response = web.Response(status=201, body=document, content_type="application/xml")
        response.headers["Location"] = location
    else:
        response = web.Response(status=status)
        response.headers["Location"] = location
    response.headers["ETag"] = etag
    for name, value in meta.checksums.items():
        if name in sums:
            response.headers[f"{object_ops.CHECKSUM_HEADER}{name.lower()}"] = value
    return response


def _location(req: s3request.S3Request, key: str) -> str:
    """The object's URL, in the addressing style of the request (the key's '/' as %2F)."""
    path_style = bool(req.http.rel_url.raw_path.strip("/"))
    bucket = f"/{urllib.parse.quote(req.bucket, safe='')}" if path_style else ""
    return f"{req.http.url.origin()}{bucket}/{urllib.parse.quote(key, safe='')}"
