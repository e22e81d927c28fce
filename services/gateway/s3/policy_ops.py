"""PutBucketPolicy, GetBucketPolicy, DeleteBucketPolicy and GetBucketPolicyStatus, and the
bucket policy's part of the S3 gate (`decide`, called by `acl_ops.admit`).

The policy is stored with the bucket's record (`BucketInfo.policy`, SetBucketConfig: the
bucket's tenant's users and admins alone may set it, `ObjectFront.set_bucket_config`) as the
owner sent it, once `bucket_policy.parse` accepted all of it. KV buckets have none
(NotImplemented), as they have no ACLs.

The gate maps each routed S3 operation to its IAM action(s) (`ACTIONS`: every action must be
allowed for an Allow to count, any denied action refuses) and its resource (the bucket's ARN,
or the object's). An operation of no known action is refused whenever a Deny statement names
its caller (it cannot be told apart from a denied one). A copy (x-amz-copy-source) also
reads its source: the source bucket's policy must not deny that read.

A condition on s3:ExistingObjectTag/<key> needs the tags of the object the request names:
the gate reads them (one metadata read, `acl_ops`) only where `wants_tags` says a statement
that may match the request has one, and hands them to `decide`.

s3:RequestObjectTag/<key> and s3:RequestObjectTagKeys see the tags a request sets: its
x-amz-tagging header (`request_tags`: PutObject, a copy's with x-amz-tagging-directive
REPLACE alone, CreateMultipartUpload), read here; a PutObjectTagging's body, which the gate
does not read: `decide` then leaves the statements on them to `tagging_ops`, which decides
again (`decide` with its tags) once it has parsed the body, before it stores them, where
`wants_request_tags` says they may change the outcome. A POST form's key and fields are in its
body too: the gate admits it where an Allow may match (`DECIDED_LATER`), and `post_object`
decides it as the PutObject of its key, its fields as that PutObject's headers.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from multidict import CIMultiDictProxy

from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import (
    auth,
    bucket_policy,
    object_ops,
    public_access,
    s3errors,
    s3request,
    xmlio,
)
from services.gateway.s3 import tags as tags_mod

#: operation -> (IAM actions, IAM actions when it names a versionId). "bucket": its
#: resource is the bucket's ARN; otherwise the object's.
ACTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ListObjects": (("s3:ListBucket",), ("s3:ListBucket",)),
    "HeadBucket": (("s3:ListBucket",), ("s3:ListBucket",)),
    "ListObjectVersions": (("s3:ListBucketVersions",), ("s3:ListBucketVersions",)),
    "ListMultipartUploads": (("s3:ListBucketMultipartUploads",),) * 2,
    "GetBucketLocation": (("s3:GetBucketLocation",),) * 2,
    "GetBucketVersioning": (("s3:GetBucketVersioning",),) * 2,
    "PutBucketVersioning": (("s3:PutBucketVersioning",),) * 2,
    "GetBucketAcl": (("s3:GetBucketAcl",),) * 2,
    "PutBucketAcl": (("s3:PutBucketAcl",),) * 2,
    "GetBucketCors": (("s3:GetBucketCORS",),) * 2,
    "PutBucketCors": (("s3:PutBucketCORS",),) * 2,
    "DeleteBucketCors": (("s3:PutBucketCORS",),) * 2,
    "GetBucketLifecycleConfiguration": (("s3:GetLifecycleConfiguration",),) * 2,
    "PutBucketLifecycleConfiguration": (("s3:PutLifecycleConfiguration",),) * 2,
    "DeleteBucketLifecycle": (("s3:PutLifecycleConfiguration",),) * 2,
    "GetBucketTagging": (("s3:GetBucketTagging",),) * 2,
    "PutBucketTagging": (("s3:PutBucketTagging",),) * 2,
    "DeleteBucketTagging": (("s3:PutBucketTagging",),) * 2,
    "GetPublicAccessBlock": (("s3:GetBucketPublicAccessBlock",),) * 2,
    "PutPublicAccessBlock": (("s3:PutBucketPublicAccessBlock",),) * 2,
    "DeletePublicAccessBlock": (("s3:PutBucketPublicAccessBlock",),) * 2,
    "GetBucketOwnershipControls": (("s3:GetBucketOwnershipControls",),) * 2,
    "PutBucketOwnershipControls": (("s3:PutBucketOwnershipControls",),) * 2,
    "DeleteBucketOwnershipControls": (("s3:PutBucketOwnershipControls",),) * 2,
    "GetBucketPolicy": (("s3:GetBucketPolicy",),) * 2,
    "PutBucketPolicy": (("s3:PutBucketPolicy",),) * 2,
    "DeleteBucketPolicy": (("s3:DeleteBucketPolicy",),) * 2,
    "GetBucketPolicyStatus": (("s3:GetBucketPolicyStatus",),) * 2,
    "DeleteBucket": (("s3:DeleteBucket",),) * 2,
    "DeleteObjects": (("s3:DeleteObject",), ("s3:DeleteObject",)),
    "PostObject": (("s3:PutObject",),) * 2,
    "GetObject": (("s3:GetObject",), ("s3:GetObjectVersion",)),
    "HeadObject": (("s3:GetObject",), ("s3:GetObjectVersion",)),
    "GetObjectAttributes": (
        ("s3:GetObject", "s3:GetObjectAttributes"),
        ("s3:GetObjectVersion", "s3:GetObjectVersionAttributes"),
    ),
    "PutObject": (("s3:PutObject",),) * 2,
    "DeleteObject": (("s3:DeleteObject",), ("s3:DeleteObjectVersion",)),
    "CreateMultipartUpload": (("s3:PutObject",),) * 2,
    "UploadPart": (("s3:PutObject",),) * 2,
    "CompleteMultipartUpload": (("s3:PutObject",),) * 2,
    "AbortMultipartUpload": (("s3:AbortMultipartUpload",),) * 2,
    "ListParts": (("s3:ListMultipartUploadParts",),) * 2,
    "GetObjectAcl": (("s3:GetObjectAcl",), ("s3:GetObjectVersionAcl",)),
    "PutObjectAcl": (("s3:PutObjectAcl",), ("s3:PutObjectVersionAcl",)),
    "GetObjectTagging": (("s3:GetObjectTagging",), ("s3:GetObjectVersionTagging",)),
    "PutObjectTagging": (("s3:PutObjectTagging",), ("s3:PutObjectVersionTagging",)),
    "DeleteObjectTagging": (("s3:DeleteObjectTagging",), ("s3:DeleteObjectVersionTagging",)),
}
#: Whose keys the gate does not see (in the body): `bucket_policy.Request.resource` None.
_UNSEEN_KEYS = frozenset({"DeleteObjects", "PostObject"})
#: The bucket's owner may always manage the policy, whatever it denies (as AWS lets the
#: bucket owner's account, so that a policy cannot lock the owner out).
MANAGE = frozenset({"GetBucketPolicy", "PutBucketPolicy", "DeleteBucketPolicy"})
#: Request headers that are condition keys (s3:<header>).
_HEADER_KEYS = (
    "x-amz-acl", "x-amz-copy-source", "x-amz-metadata-directive", "x-amz-grant-read",
    "x-amz-grant-write", "x-amz-grant-read-acp", "x-amz-grant-write-acp",
    "x-amz-grant-full-control",
)  # fmt: skip
#: Operations whose x-amz-tagging header sets the new object's tags (a copy's: with REPLACE).
_HEADER_TAGGED = frozenset({"PutObject", "CreateMultipartUpload"})
#: Operations whose tags are in their body (`bucket_policy.Request.deferred` in the gate).
BODY_TAGGED = frozenset({"PutObjectTagging"})
#: Operations whose key and fields are in their body, decided by their handler as the
#: PutObject they make (`bucket_policy.Request.deferred`; the gate: an Allow that may match
#: admits for now, a Deny waits): POST forms (`post_object`).
DECIDED_LATER = frozenset({"PostObject"})
#: Read at most this much of a PutBucketPolicy body (larger than the policy limit: the limit
#: is MalformedPolicy's, not MalformedXML's).
_READ_LIMIT = 4 * bucket_policy.MAX_POLICY_BYTES
POLICY_STATUS_NS = xmlio.NS


def policy_of(info: metadata_pb2.BucketInfo) -> bucket_policy.Policy | None:
    """The bucket's policy (None: none). A stored one was checked when stored."""
    if not info.policy.document:
        return None
    return bucket_policy.cached(info.policy.document, info.name)


def who(principal: auth.Principal) -> bucket_policy.Who:
    """The caller as Principal elements name it."""
    if principal.anonymous:
        return bucket_policy.Who()
    return bucket_policy.Who(tenant=principal.tenant, user=principal.access_key)


def context(headers: Mapping[str, str], query: Mapping[str, str], remote: str) -> dict[str, str]:
    """The condition keys a request carries (absent ones absent: IAM tells them apart)."""
    out = {f"s3:{name}": headers[name] for name in _HEADER_KEYS if name in headers}
    if "s3:x-amz-copy-source" in out:  # AWS compares the decoded bucket/key
        out["s3:x-amz-copy-source"] = urllib.parse.unquote(out["s3:x-amz-copy-source"]).lstrip("/")
    for name in ("prefix", "delimiter"):
        if name in query:
            out[f"s3:{name}"] = query[name]
    if remote:
        out["aws:sourceip"] = remote
    for header, key in (("Referer", "aws:referer"), ("User-Agent", "aws:useragent")):
        if header in headers:
            out[key] = headers[header]
    return out


def request_tags(
    policy: bucket_policy.Policy, op: str, headers: Mapping[str, str]
) -> dict[str, str] | None:
    """The tags a request's x-amz-tagging sets (`_HEADER_TAGGED`; a copy's only with
    x-amz-tagging-directive REPLACE, else it sets the source's), where a statement has a
    condition on them; None otherwise, without the header, and where it is malformed (the
    handler refuses it with its error, InvalidTag..., if the policy lets it that far)."""
    if op not in _HEADER_TAGGED or not policy.request_tagged:
        return None
    copy = "x-amz-copy-source" in headers
    if copy and (headers.get("x-amz-tagging-directive") or "COPY").upper() != "REPLACE":
        return None
    try:
        return tags_mod.parse_header(headers.get("x-amz-tagging", "")) or None
    except s3errors.S3Error:
        return None


def _actions(op: str, query: Mapping[str, str]) -> tuple[str, ...] | None:
    """The IAM actions of op (None: an operation of no known action)."""
    known = ACTIONS.get(op)
    if known is None:
        return None
    return known[1] if query.get("versionId") else known[0]


def _resource(op: str, bucket: str, key: str) -> str | None:
    """The ARN a request names (None: keys the gate does not see)."""
    if op in _UNSEEN_KEYS:
        return None
    arn = bucket_policy.ARN_PREFIX + bucket
    return f"{arn}/{key}" if key else arn


def wants_tags(
    policy: bucket_policy.Policy,
    op: str,
    principal: auth.Principal,
    bucket: str,
    key: str,
    query: Mapping[str, str],
    *,
    deny_only: bool,
) -> bool:
    """Whether `decide` needs the tags of the object the request names (`bucket_policy.
    wants_tags`; deny_only: only a Deny can change the outcome, for the bucket's owner)."""
    if not any(s.needs_tags for s in policy.statements):
        return False  # the common case: no condition on tags, nothing more to look at
    return _wants(bucket_policy.wants_tags, policy, op, principal, bucket, key, query, deny_only)


def wants_request_tags(
    policy: bucket_policy.Policy,
    op: str,
    principal: auth.Principal,
    bucket: str,
    key: str,
    query: Mapping[str, str],
    *,
    deny_only: bool,
) -> bool:
    """Whether the tags the request sets may change `decide`'s outcome (`bucket_policy.
    wants_request_tags`; deny_only: only a Deny can, for the bucket's owner)."""
    if not policy.request_tagged:
        return False
    return _wants(
        bucket_policy.wants_request_tags, policy, op, principal, bucket, key, query, deny_only
    )


def _wants(
    check: Callable[..., bool],
    policy: bucket_policy.Policy,
    op: str,
    principal: auth.Principal,
    bucket: str,
    key: str,
    query: Mapping[str, str],
    deny_only: bool,
) -> bool:
    """check (`bucket_policy.wants_tags` or `wants_request_tags`) for any IAM action of op
    on key (none: False)."""
    actions = _actions(op, query)
    if actions is None or not key:
        return False
    caller, resource = who(principal), _resource(op, bucket, key)
    return any(
        check(
            policy, bucket_policy.Request(caller, action, bucket, resource, {}),
            deny_only=deny_only,
        )
        for action in actions
    )  # fmt: skip


def decide(
    policy: bucket_policy.Policy,
    op: str,
    principal: auth.Principal,
    bucket: str,
    key: str,
    query: Mapping[str, str],
    headers: CIMultiDictProxy[str],
    remote: str,
    *,
    tags: Mapping[str, str] | None = None,
    body_tags: Mapping[str, str] | None = None,
) -> bucket_policy.Decision:
    """The policy's word on one request: DENY if any of its actions is denied, ALLOW if all
    are allowed, else NONE. tags: the named object's (None: absent, `wants_tags`); body_tags:
    the tags a `BODY_TAGGED` request's body sets, once parsed (None: not yet, the statements
    on them deferred; {}: none set)."""
    caller = who(principal)
    known = _actions(op, query)
    if known is None:  # an operation of no known action: refused where a Deny may name it
        named = any(
            s.effect is bucket_policy.Decision.DENY and bucket_policy.principal_matches(s, caller)
            for s in policy.statements
        )
        return bucket_policy.Decision.DENY if named else bucket_policy.Decision.NONE
    resource = _resource(op, bucket, key)
    ctx = context(headers, query, remote)
    deferred = (op in BODY_TAGGED and body_tags is None) or op in DECIDED_LATER
    setting = body_tags if op in BODY_TAGGED else request_tags(policy, op, headers)
    decisions = [
        bucket_policy.evaluate(
            policy,
            bucket_policy.Request(
                caller, action, bucket, resource, ctx, tags, setting, deferred=deferred
            ),
        )
        for action in known
    ]
    if bucket_policy.Decision.DENY in decisions:
        return bucket_policy.Decision.DENY
    if all(d is bucket_policy.Decision.ALLOW for d in decisions):
        return bucket_policy.Decision.ALLOW
    return bucket_policy.Decision.NONE


def allow_admits(
    info: metadata_pb2.BucketInfo,
    policy: bucket_policy.Policy | None,
    decision: bucket_policy.Decision,
) -> bool:
    """Whether the policy's decision admits a caller outside the bucket's tenant: an Allow,
    but not of a public policy where the bucket restricts public buckets
    (RestrictPublicBuckets: a public policy admits no one outside the owner's tenant)."""
    return (
        decision is bucket_policy.Decision.ALLOW
        and policy is not None
        and not (public_access.restricts_public_buckets(info) and bucket_policy.is_public(policy))
    )


async def decide_again(
    info_of: Callable[[bool], Awaitable[metadata_pb2.BucketInfo]],
    principal: auth.Principal,
    admits: Callable[[metadata_pb2.BucketInfo], Awaitable[bool]],
) -> None:
    """A handler's own decision on what the gate could not see (`BODY_TAGGED`,
    `DECIDED_LATER`): admits on the cached bucket record (info_of(False)), and for a signed
    caller it refuses, again on a fresh one (info_of(True)), as the gate decides denials;
    AccessDenied where neither admits."""
    for fresh in (False, True):
        if await admits(await info_of(fresh)):
            return
        if principal.anonymous:
            break
    raise s3errors.S3Error("AccessDenied", "Access Denied")


async def delete_objects(s3: s3request.Door, req: s3request.S3Request) -> web.StreamResponse:
    """DeleteObjects (`object_ops.delete_objects`), each entry decided as S3 decides it: as
    the DeleteObject of its key (s3:DeleteObjectVersion with a versionId) that the gate could
    not see (`_UNSEEN_KEYS`). An entry is AccessDenied where the bucket's policy denies it, or
    where a caller outside the bucket's tenant deletes a version without the policy's Allow
    (no ACL grant deletes versions: `acl_ops._decide`); by `decide_again`'s rules (a signed
    caller refused on the cached record is decided on a fresh one)."""
    who, remote = req.principal, req.http.remote or ""
    infos: dict[bool, metadata_pb2.BucketInfo] = {}

    async def info_of(fresh: bool) -> metadata_pb2.BucketInfo:
        if fresh not in infos:  # once per request, not per entry
            infos[fresh] = await s3.front.bucket_info(req.bucket, fresh=fresh)
        return infos[fresh]

    async def admits(info: metadata_pb2.BucketInfo, key: str, version: str) -> bool:
        policy = policy_of(info)
        decision = bucket_policy.Decision.NONE
        if policy is not None:
            query = {"versionId": version} if version else {}
            headers = req.http.headers
            decision = decide(policy, "DeleteObject", who, info.name, key, query, headers, remote)
        if decision is bucket_policy.Decision.DENY:
            return False
        return not version or who.may_use(info.tenant) or allow_admits(info, policy, decision)

    async def allowed(key: str, version: str) -> bool:
        try:
            await decide_again(info_of, who, lambda info: admits(info, key, version))
        except s3errors.S3Error:
            return False
        return True

    # The bucket's owner or an admission first (AccessDenied, NoSuchBucket: as the layer's).
    infos[False] = cached = await s3.owned_bucket(req)
    if cached.policy.document or not who.may_use(cached.tenant):
        return await object_ops.delete_objects(s3, req, allowed=allowed)
    return await object_ops.delete_objects(s3, req)  # the owner's, no policy: every entry


def may_list(
    policy: bucket_policy.Policy, principal: auth.Principal, bucket: str, remote: str
) -> bool:
    """Whether the policy allows the caller s3:ListBucket (a missing object is then NoSuchKey,
    not AccessDenied)."""
    return _listing(policy, principal, bucket, remote) is bucket_policy.Decision.ALLOW


def list_denied(info: metadata_pb2.BucketInfo, principal: auth.Principal, remote: str) -> bool:
    """Whether the bucket's policy denies the caller s3:ListBucket: a missing object is then
    AccessDenied, not NoSuchKey, whatever an ACL grants (S3 answers 404 to a caller with
    s3:ListBucket alone, which an explicit Deny takes away)."""
    policy = policy_of(info)
    if policy is None:
        return False
    return _listing(policy, principal, info.name, remote) is bucket_policy.Decision.DENY


def _listing(
    policy: bucket_policy.Policy, principal: auth.Principal, bucket: str, remote: str
) -> bucket_policy.Decision:
    """The policy's word on the caller's s3:ListBucket of the bucket (no prefix)."""
    request = bucket_policy.Request(
        who(principal),
        "s3:ListBucket",
        bucket,
        bucket_policy.ARN_PREFIX + bucket,
        {"aws:sourceip": remote} if remote else {},
    )
    return bucket_policy.evaluate(policy, request)


def copy_source(headers: CIMultiDictProxy[str]) -> tuple[str, str, str] | None:
    """(bucket, key, versionId) a copy reads, None when it is no copy (or the handler will
    refuse its header)."""
    raw = headers.get("x-amz-copy-source")
    if not raw:
        return None
    path, _, query = raw.partition("?")
    version = urllib.parse.parse_qs(query).get("versionId", [""])[0]
    bucket, _, key = urllib.parse.unquote(path).lstrip("/").partition("/")
    return (bucket, key, version) if bucket and key else None


def _no_policy() -> s3errors.S3Error:
    return s3errors.S3Error("NoSuchBucketPolicy", "The bucket policy does not exist", status=404)


async def _owned(s3: s3request.Door, req: s3request.S3Request) -> metadata_pb2.BucketInfo:
    """The bucket, fresh (what any gateway stored last); KV buckets: NotImplemented."""
    info = await s3.front.bucket_for(req.bucket, fresh=True)
    if info.kind == metadata_pb2.BUCKET_KIND_KV:
        raise s3errors.S3Error("NotImplemented", "KV buckets have no bucket policy")
    return info


async def put_bucket_policy(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutBucketPolicy: the whole document checked (MalformedPolicy), stored as sent; 204.
    A public one (`bucket_policy.is_public`) where the bucket's Public Access Block has
    BlockPublicPolicy: AccessDenied, as in S3."""
    info = await _owned(s3, req)
    try:
        raw = await req.payload.read_all(_READ_LIMIT)
    except s3errors.S3Error as exc:
        if exc.code != "MalformedXML":
            raise
        raise bucket_policy.malformed("Policies must be at most 20 KiB") from None
    try:
        document = raw.decode()
    except UnicodeDecodeError:
        raise bucket_policy.malformed("This policy contains invalid Json") from None
    policy = bucket_policy.parse(document, info.name)
    if public_access.blocks_public_policy(info) and bucket_policy.is_public(policy):
        raise s3errors.S3Error("AccessDenied", "The bucket blocks public policies")
    config = metadata_pb2.SetBucketConfigRequest(
        policy=metadata_pb2.BucketPolicy(document=document)
    )  # the front sets the incarnation: never another one's
    await s3.front.set_bucket_config(req.bucket, config)
    return web.Response(status=204)


async def get_bucket_policy(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetBucketPolicy: the document as stored, or 404 NoSuchBucketPolicy."""
    info = await _owned(s3, req)
    if not info.policy.document:
        raise _no_policy()
    return web.Response(text=info.policy.document, content_type="application/json")


async def delete_bucket_policy(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeleteBucketPolicy: 204, whether or not there was one."""
    await _owned(s3, req)
    config = metadata_pb2.SetBucketConfigRequest(policy=metadata_pb2.BucketPolicy())
    await s3.front.set_bucket_config(req.bucket, config)
    return web.Response(status=204)


async def get_bucket_policy_status(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetBucketPolicyStatus: IsPublic of the policy (`bucket_policy.is_public`; ACLs do not
    count, as in S3), 404 NoSuchBucketPolicy without one (as S3 answers)."""
    info = await _owned(s3, req)
    policy = policy_of(info)
    if policy is None:
        raise _no_policy()
    public = "true" if bucket_policy.is_public(policy) else "false"
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<PolicyStatus xmlns="{POLICY_STATUS_NS}">'
        f"<IsPublic>{public}</IsPublic></PolicyStatus>"
    )
    return web.Response(body=body.encode(), content_type="application/xml")


#: The sub-resources of `ROUTES`, per method, on a bucket (elsewhere: NotImplemented).
SUBRESOURCES = {
    "GET": frozenset({"policy", "policyStatus"}),
    "PUT": frozenset({"policy"}),
    "DELETE": frozenset({"policy"}),
}
ROUTES: list[tuple[str, str, tuple[str, ...], str, s3request.Handler]] = [
    ("GET", "bucket", ("policyStatus",), "GetBucketPolicyStatus", get_bucket_policy_status),
    ("GET", "bucket", ("policy",), "GetBucketPolicy", get_bucket_policy),
    ("PUT", "bucket", ("policy",), "PutBucketPolicy", put_bucket_policy),
    ("DELETE", "bucket", ("policy",), "DeleteBucketPolicy", delete_bucket_policy),
]
