"""Who may do what on a bucket that is not the caller's own: the ACL gate of every S3 request,
and GetBucketAcl, PutBucketAcl, GetObjectAcl and PutObjectAcl.

The gate (`admit`) runs once a request is authenticated (or found to carry no credential: an
anonymous request), before its handler, and again in `S3Server.expect` before `100 Continue`:

- `x-amz-expected-bucket-owner` other than the bucket's tenant: AccessDenied, for everyone.
- The bucket's tenant's users and admins: nothing to admit, the object front checks them as
  it always did (`ObjectFront.bucket_for`).
- Anyone else (another tenant's user, an anonymous request) may only do the operations of
  `GRANTED`, when the ACL grants them the permission: the bucket's ACL for listing, writing
  and the bucket's ACL, the object's own ACL for reading an object or its ACL. The request is
  then admitted (`front.Admission`) to that bucket for that scope alone; everything else
  (deleting the bucket, its configuration, multipart listings...) stays AccessDenied, as
  does any request on a KV bucket or on the KV tier's internal bucket: KV buckets have no
  ACLs (a non-private ACL on one is NotImplemented).
- A bucket policy's Allow admits them to the operations of `GRANTED` whatever the ACLs say,
  and to those of `POLICY_ONLY` and `POLICY_UPLOADS` (ListParts), which no ACL grant admits
  (S3's ACL permissions do not map to their actions); its Deny refuses anyone. A condition
  on the object's existing tags has them read here (`_existing_tags`), only when a statement
  needs them.
- Anonymous requests never reach service-level operations (ListBuckets) or CreateBucket.
- A bucket whose Object Ownership is BucketOwnerEnforced (`ownership`) has ACLs disabled: no
  grant admits anyone (`_effective`), its tenant owns every object, and an admitted request
  that sets an ACL other than the owner-only one is AccessControlListNotSupported.

Objects another tenant's user writes (through a WRITE grant or a policy) belong to its tenant
(S3's ObjectWriter ownership, `acl.writer`): their own ACL, relative to it, alone decides who
reads them or their ACL, the bucket's tenant included, whatever the bucket's policy allows
(`_writer_owned`). A copy reads its source as a GetObject of the caller's would, from any
bucket whose policy or the source version's ACL lets it (`_copy_source_admission`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDictProxy

from kvtier import errors, names
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import front as front_mod
from services.gateway.s3 import (
    acl,
    auth,
    bucket_policy,
    cors,
    ownership,
    policy_ops,
    public_access,
    s3errors,
    s3request,
    versioning_ops,
)

#: Operations an ACL grant may admit another tenant's user or an anonymous request to:
#: (scope of the admission, the permission needed). Scope "object": the object's own ACL
#: decides; the others: the bucket's.
GRANTED: dict[str, tuple[str, acl.Permission]] = {
    "ListObjects": ("read", acl.READ),
    # S3 maps a bucket's READ to s3:ListBucketVersions and s3:ListBucketMultipartUploads too.
    "ListObjectVersions": ("read", acl.READ),
    "ListMultipartUploads": ("read", acl.READ),
    "HeadBucket": ("read", acl.READ),
    "GetObject": ("object", acl.READ),
    "HeadObject": ("object", acl.READ),
    "GetObjectAttributes": ("object", acl.READ),  # as HeadObject (S3's s3:GetObject)
    "PutObject": ("write", acl.WRITE),
    "PostObject": ("write", acl.WRITE),
    "DeleteObject": ("write", acl.WRITE),
    "DeleteObjects": ("write", acl.WRITE),
    "CreateMultipartUpload": ("write", acl.WRITE),
    "UploadPart": ("write", acl.WRITE),
    "CompleteMultipartUpload": ("write", acl.WRITE),
    "AbortMultipartUpload": ("write", acl.WRITE),
    "GetBucketAcl": ("read_acp", acl.READ_ACP),
    "PutBucketAcl": ("write_acp", acl.WRITE_ACP),
    "GetObjectAcl": ("object", acl.READ_ACP),
    "PutObjectAcl": ("object", acl.WRITE_ACP),
}
#: Operations a bucket policy's Allow alone may admit another tenant's user or an anonymous
#: request to (no ACL permission grants their IAM actions), scope "object": the policy
#: decided on that object, the version's ACL adds nothing.
POLICY_ONLY = frozenset({"GetObjectTagging", "PutObjectTagging", "DeleteObjectTagging"})
#: Operations on an upload in progress a bucket policy's Allow alone may admit others to, scope
#: "write" (S3's ACL permissions grant no s3:ListMultipartUploadParts).
POLICY_UPLOADS = frozenset({"ListParts"})
#: Operations on no bucket, or on one that need not exist yet: never anonymous. KVScore
#: (`kv_score`, on no bucket) checks its tenant itself.
_NO_BUCKET_YET = frozenset({"ListBuckets", "CreateBucket", "KVScore"})
#: Not gated: a CORS preflight is never signed and reads only the bucket's CORS rules. (A POST
#: form is: once `post_object.authenticate` found its user in its fields, or none, anonymous,
#: it is admitted as a PutObject of that user would be.)
_UNGATED = frozenset({cors.PREFLIGHT})
#: Operations whose x-amz-acl / x-amz-grant-* headers set an ACL on the bucket or an object of
#: it: refused when public and the bucket blocks public ACLs (`public_access`; a Put*Acl body
#: is checked by its handler, a POST form's acl field by post_object).
_SETS_ACL = frozenset({"PutObject", "CreateMultipartUpload", "PutBucketAcl", "PutObjectAcl"})
#: The largest AccessControlPolicy body read (S3's 100 grants fit many times).
MAX_POLICY_BYTES = 256 << 10
XML = "application/xml"


#: Operations whose x-amz-grant-* headers may name a tenant (CopyObject is a PutObject).
_GRANTS_NAMED = frozenset({"CreateBucket", *_SETS_ACL})


async def check_grantees(
    authenticator: auth.Authenticator, wanted: acl_pb2.Acl, *exempt: str
) -> None:
    """400 InvalidArgument "Invalid id" when a grant names a tenant that has no user (S3
    refuses a grant to an unknown canonical id), as far as this gateway's user watch knows
    (`Authenticator.known_tenant`); exempt: the resource's owners, which need no user."""
    for grant in wanted.grants:
        if grant.grantee_type != acl_pb2.GRANTEE_TYPE_TENANT or grant.tenant in exempt:
            continue
        if not await authenticator.known_tenant(grant.tenant):
            raise s3errors.S3Error("InvalidArgument", "Invalid id")


async def check_header_grantees(
    authenticator: auth.Authenticator,
    op: str,
    who: auth.Principal,
    headers: CIMultiDictProxy[str],
    bucket_owner: str,
) -> None:
    """check_grantees on the x-amz-grant-* headers of a request that sets an ACL with them
    (malformed ones are left to its handler, which refuses them)."""
    if op not in _GRANTS_NAMED or not any(name in headers for name in acl.GRANT_HEADERS):
        return
    try:
        wanted = acl.from_headers(headers, bucket_owner)
    except s3errors.S3Error:
        return
    if wanted is not None:
        await check_grantees(authenticator, wanted, bucket_owner, who.tenant)


def _effective(info: metadata_pb2.BucketInfo, acl_: acl_pb2.Acl) -> acl_pb2.Acl:
    """The ACL (the bucket's or one of its objects') the gate evaluates: none (the owner's
    rights alone) where the bucket's Object Ownership disables ACLs (BucketOwnerEnforced),
    else `public_access.effective`'s."""
    if ownership.enforced(info):
        return acl_pb2.Acl()
    return public_access.effective(info, acl_)


def _denied(message: str = "Access Denied") -> s3errors.S3Error:
    return s3errors.S3Error("AccessDenied", message)


async def admit(
    front: front_mod.ObjectFront,
    op: str,
    bucket: str,
    who: auth.Principal,
    headers: CIMultiDictProxy[str],
    *,
    key: str,
    query: Mapping[str, str],
    remote: str,
) -> tuple[front_mod.Admission | None, metadata_pb2.BucketInfo | None]:
    """The gate: `_admit_bucket`'s answer for the request's bucket, where an object's writer
    owns it (`_writer_owned`), its admission carrying a copy's source (`Admission.source`,
    `_copy_source_admission`; a request of the bucket's owner: scope `OWN`)."""
    admission, info = await _admit_bucket(
        front, op, bucket, who, headers, key=key, query=query, remote=remote
    )
    if info is not None and op in _SETS_ACL:  # once admitted: ACLs the bucket does not allow
        ownership.check_write(ownership.mode(info), headers, info.tenant)
    if info is None or info.kind == metadata_pb2.BUCKET_KIND_KV:
        return admission, info  # KV buckets: their tenant's objects only, never a copy's
    if op in _OWNER_CHECKED and admission is None:  # the bucket's owner (or an admin)
        admission = front_mod.Admission(info.name, "object", may_list=True)
    if admission is not None and admission.scope == "object":
        permission = GRANTED[op][1] if op in GRANTED else acl.FULL_CONTROL
        admission = _writer_owned(admission, info, who, permission)
    source = await _copy_source_admission(front, op, who, headers, remote)
    if source is None:
        return admission, info
    if admission is None:
        admission = front_mod.Admission(bucket, front_mod.OWN)
    return dataclasses.replace(admission, source=source), info


#: Operations on an object that, for the bucket's own tenant too, the object's ACL decides
#: where another tenant wrote (and owns) it (`_writer_owned`; its tagging stays the bucket
#: owner's, as does deleting it, which S3 also lets a bucket owner do).
_OWNER_CHECKED = frozenset(
    {"GetObject", "HeadObject", "GetObjectAttributes", "GetObjectAcl", "PutObjectAcl"}
)


def _writer_owned(
    admission: front_mod.Admission,
    info: metadata_pb2.BucketInfo,
    who: auth.Principal,
    permission: acl.Permission,
) -> front_mod.Admission:
    """admission ("object" scope) with its check of a version that another tenant wrote (its
    ACL's `owner`: S3's ObjectWriter ownership) replaced: that version's own ACL, relative to
    its writer, alone decides, for the bucket's tenant too, whatever the bucket's policy
    allows (S3: a bucket policy covers the bucket owner's objects only, and a bucket owner
    has no implicit right on another account's objects but deleting them). Versions of the
    bucket's tenant keep admission's own check (none: the owner's request)."""
    inner = admission.check_object

    def check(object_acl: acl_pb2.Acl) -> None:
        holder = ownership.holder(info, object_acl)
        if holder == info.tenant:
            if inner is not None:
                inner(object_acl)
        elif not acl.allows(_effective(info, object_acl), holder, who, permission):
            raise errors.PermissionDenied(
                "the object's ACL does not allow it", reason="AccessDenied"
            )

    return dataclasses.replace(admission, check_object=check)


async def _copy_source_admission(
    front: front_mod.ObjectFront,
    op: str,
    who: auth.Principal,
    headers: CIMultiDictProxy[str],
    remote: str,
) -> front_mod.Admission | None:
    """A copy (CopyObject, UploadPartCopy) reads its source as the caller's GetObject of it
    would (S3 asks s3:GetObject on the source): the admission to read it, as `_decide` makes
    a GetObject's (its Deny for the bucket's own tenant: `_check_copy_source`): the source
    bucket's policy allowing it, or the version's own ACL granting READ, checked by the front
    on the version copied, relative to its writer (`_writer_owned`; the bucket's tenant:
    only for a version another tenant wrote). None: no copy, the KV tier's internal bucket
    (the front's), a missing bucket (the handler answers NoSuchBucket), the tenant's own KV
    bucket. AccessDenied: another tenant's KV bucket, a policy's Deny,
    x-amz-source-expected-bucket-owner naming another tenant."""
    source = policy_ops.copy_source(headers) if op in ("PutObject", "UploadPart") else None
    if source is None or source[0] == names.KV_DURABLE_BUCKET:
        return None
    bucket, key, version = source
    try:
        info = await front.bucket_info(bucket)
    except errors.NotFound:
        return None
    expected = headers.get("x-amz-source-expected-bucket-owner")
    if expected is not None and expected != info.tenant:
        raise _denied("The source bucket is not owned by the expected owner")
    owned = who.may_use(info.tenant)
    if info.kind == metadata_pb2.BUCKET_KIND_KV:
        if owned:
            return None
        raise _denied()
    admission = front_mod.Admission(info.name, "object", may_list=True)
    policy = policy_ops.policy_of(info)
    if policy is not None and not owned:
        decision = await _source_read(
            front, info, policy, who, (bucket, key, version), headers, remote, deny_only=False
        )
        if decision is bucket_policy.Decision.DENY:
            raise _denied()
        if decision is bucket_policy.Decision.ALLOW:
            if not policy_ops.allow_admits(info, policy, decision):
                raise _denied()
            listed = policy_ops.may_list(policy, who, bucket, remote)
            admission = _policy_admission(info, who, "object", listed, remote)
        else:
            admission = _object_admission(info, who, acl.READ, remote)
    elif not owned:
        admission = _object_admission(info, who, acl.READ, remote)
    return _writer_owned(admission, info, who, acl.READ)


async def _admit_bucket(
    front: front_mod.ObjectFront,
    op: str,
    bucket: str,
    who: auth.Principal,
    headers: CIMultiDictProxy[str],
    *,
    key: str,
    query: Mapping[str, str],
    remote: str,
) -> tuple[front_mod.Admission | None, metadata_pb2.BucketInfo | None]:
    """The gate (see the module docstring): (the admission of a request the bucket's owner
    did not make, None for the owner's; the bucket's record, None when not looked up).
    key, query and remote (the client's address) are what the bucket policy's conditions
    see. AccessDenied, NoSuchBucket (the front's NotFound), NotImplemented."""
    seen = _Seen(key, query, remote)
    if op in _UNGATED:
        return None, None
    if not bucket or op in _NO_BUCKET_YET:
        if who.anonymous:
            raise _denied()
        return None, None
    if bucket == names.KV_DURABLE_BUCKET:
        if who.anonymous:
            raise _denied()
        return None, None  # the front lets kvcache nodes alone in (never an S3 user)
    await _check_copy_source(front, op, who, headers, remote)
    # A WRITE_ACP grant is checked on a fresh record; others on the cached one (a change made
    # through another gateway is seen within bucket_cache_s), but a signed caller is denied on
    # a fresh one only (the cached one may be another incarnation's). Anonymous ones are denied
    # on the cached record: an unsigned flood costs the metadata service nothing more.
    fresh = op == "PutBucketAcl"
    info = await front.bucket_info(bucket, fresh=fresh)
    try:
        tags = await _existing_tags(front, op, who, info, seen)
        return _decide(op, who, headers, info, seen, tags), info
    except s3errors.S3Error as exc:
        if fresh or who.anonymous or exc.code != "AccessDenied":
            raise
    info = await front.bucket_info(bucket, fresh=True)
    tags = await _existing_tags(front, op, who, info, seen)
    return _decide(op, who, headers, info, seen, tags), info


@dataclasses.dataclass(frozen=True, slots=True)
class _Seen:
    """What of a request the bucket policy's resource and conditions see, besides headers."""

    key: str
    query: Mapping[str, str]
    remote: str


async def _existing_tags(
    front: front_mod.ObjectFront,
    op: str,
    who: auth.Principal,
    info: metadata_pb2.BucketInfo,
    seen: _Seen,
) -> dict[str, str] | None:
    """The tags of the object the request names, where a statement of the bucket's policy
    that may match it has a condition on them (for the bucket's tenant a Deny only: an Allow
    changes nothing for it); None otherwise, and where there is no such object."""
    policy = policy_ops.policy_of(info)
    if policy is None or not policy_ops.wants_tags(
        policy, op, who, info.name, seen.key, seen.query, deny_only=who.may_use(info.tenant)
    ):
        return None
    return await tags_of(front, info, seen.key, seen.query.get("versionId", ""))


async def tags_of(
    front: front_mod.ObjectFront, info: metadata_pb2.BucketInfo, key: str, version: str
) -> dict[str, str] | None:
    """The tags of key's current version (version's) in bucket info: one metadata read, the
    gate's own, whoever the caller (its outcome alone shows, as in S3); None when there is
    no such object or version (a delete marker included) or the key or version id is not
    valid (the handler answers that)."""
    try:
        found = await front.engine.resolve(front_mod.storage(info), key, version_id=version)
    except (errors.NotFound, errors.InvalidArgument):
        return None
    return dict(found.meta.tags)


async def _check_copy_source(
    front: front_mod.ObjectFront,
    op: str,
    who: auth.Principal,
    headers: CIMultiDictProxy[str],
    remote: str,
) -> None:
    """A copy reads its source: AccessDenied when the source bucket's policy denies that
    read (its owner included: the front admits only the owner's tenant to a source)."""
    source = policy_ops.copy_source(headers) if op in ("PutObject", "UploadPart") else None
    if source is None or source[0] == names.KV_DURABLE_BUCKET:
        return
    bucket, key, version = source
    try:
        info = await front.bucket_info(bucket)
    except errors.NotFound:
        return  # the handler answers NoSuchBucket
    policy = policy_ops.policy_of(info)
    if policy is None:
        return
    decision = await _source_read(
        front, info, policy, who, (bucket, key, version), headers, remote, deny_only=True
    )
    if decision is bucket_policy.Decision.DENY:
        raise _denied()


async def _source_read(
    front: front_mod.ObjectFront,
    info: metadata_pb2.BucketInfo,
    policy: bucket_policy.Policy,
    who: auth.Principal,
    source: tuple[str, str, str],
    headers: CIMultiDictProxy[str],
    remote: str,
    *,
    deny_only: bool,
) -> bucket_policy.Decision:
    """The source bucket's policy on a copy's read of source ((bucket, key, version)), as on
    a GetObject of it, its tags read where a statement needs them (deny_only: the bucket's own
    tenant, for whom only a Deny counts)."""
    bucket, key, version = source
    query = {"versionId": version} if version else {}
    tags = None
    if policy_ops.wants_tags(policy, "GetObject", who, bucket, key, query, deny_only=deny_only):
        tags = await tags_of(front, info, key, version)
    return policy_ops.decide(
        policy, "GetObject", who, bucket, key, query, headers, remote, tags=tags
    )


def _decide(
    op: str,
    who: auth.Principal,
    headers: CIMultiDictProxy[str],
    info: metadata_pb2.BucketInfo,
    seen: _Seen,
    tags: Mapping[str, str] | None = None,
) -> front_mod.Admission | None:
    """admit's decision on a bucket's record (None: the owner's request); tags: the named
    object's, where the policy needs them (`_existing_tags`)."""
    expected = headers.get("x-amz-expected-bucket-owner")
    if expected is not None and expected != info.tenant:
        raise _denied("The bucket is not owned by the expected owner")
    # The bucket policy: an explicit Deny refuses anyone (but the owner managing the policy),
    # an Allow admits below what the ACLs would not.
    policy = policy_ops.policy_of(info)
    decision = bucket_policy.Decision.NONE
    if policy is not None:
        decision = policy_ops.decide(
            policy, op, who, info.name, seen.key, seen.query, headers, seen.remote, tags=tags
        )
        if decision is bucket_policy.Decision.DENY and not (
            op in policy_ops.MANAGE and who.may_use(info.tenant)
        ):
            raise _denied()
    if op in _SETS_ACL and public_access.blocks_public_acls(info):
        try:
            wanted = acl.from_headers(headers, info.tenant)
        except s3errors.S3Error:
            wanted = None  # malformed ACL headers: the handler's error, as before
        public_access.check_acl(info, wanted)
    if who.may_use(info.tenant):
        if info.kind == metadata_pb2.BUCKET_KIND_KV:
            wanted = acl.from_headers(headers, info.tenant)
            if wanted is not None and not acl.is_private(wanted, info.tenant):
                raise s3errors.S3Error("NotImplemented", "KV buckets have no ACLs: private only")
        return None
    policy_only = op in POLICY_ONLY or op in POLICY_UPLOADS
    if info.kind == metadata_pb2.BUCKET_KIND_KV or (op not in GRANTED and not policy_only):
        raise _denied()
    if decision is bucket_policy.Decision.ALLOW:
        assert policy is not None
        if not policy_ops.allow_admits(info, policy, decision):  # RestrictPublicBuckets
            raise _denied()
        scope = GRANTED[op][0] if op in GRANTED else "object"
        if op in POLICY_UPLOADS:
            scope = "write"
        listed = policy_ops.may_list(policy, who, info.name, seen.remote)
        return _policy_admission(info, who, scope, listed, seen.remote)
    if op not in GRANTED or ownership.enforced(info):  # policy only, or ACLs disabled
        raise _denied()
    # S3 maps a bucket's WRITE grant to s3:DeleteObjectVersion for the bucket's owner alone:
    # no grant lets anyone else delete a version for good (a DeleteObjects entry with a
    # versionId: `policy_ops.delete_objects`), only a policy's Allow does.
    if op == "DeleteObject" and "versionId" in seen.query:
        raise _denied()
    scope, permission = GRANTED[op]
    if scope == "object":
        return _object_admission(info, who, permission, seen.remote)
    if not acl.allows(_effective(info, info.acl), info.tenant, who, permission):
        raise _denied()
    return front_mod.Admission(info.name, scope)


def _policy_admission(
    info: metadata_pb2.BucketInfo,
    who: auth.Principal,
    scope: str,
    listed: bool,
    remote: str = "",
) -> front_mod.Admission:
    """The admission of a request the bucket policy allows: its operation's scope, whatever
    the ACLs say (an object's own ACL included); listed: the policy allows ListBucket."""
    if scope != "object":
        return front_mod.Admission(info.name, scope)

    def check(object_acl: acl_pb2.Acl) -> None:
        pass  # the policy allowed this object's operation: its ACL adds nothing

    may_list = listed or _acl_lists(info, who, remote)
    return front_mod.Admission(info.name, "object", check_object=check, may_list=may_list)


def _object_admission(
    info: metadata_pb2.BucketInfo,
    who: auth.Principal,
    permission: acl.Permission,
    remote: str = "",
) -> front_mod.Admission:
    def check(object_acl: acl_pb2.Acl) -> None:
        # Relative to the version's owner: its writer, where another tenant's (`acl.writer`),
        # but where the bucket's Object Ownership disables ACLs.
        holder = ownership.holder(info, object_acl)
        if not acl.allows(_effective(info, object_acl), holder, who, permission):
            raise errors.PermissionDenied(
                "the object's ACL does not allow it", reason="AccessDenied"
            )

    return front_mod.Admission(
        info.name, "object", check_object=check, may_list=_acl_lists(info, who, remote)
    )


def _acl_lists(info: metadata_pb2.BucketInfo, who: auth.Principal, remote: str) -> bool:
    """Whether the bucket's ACL lets the caller list it (READ), so that a missing object is
    NoSuchKey, not AccessDenied: not where the bucket's policy denies it s3:ListBucket."""
    return acl.allows(
        _effective(info, info.acl), info.tenant, who, acl.READ
    ) and not policy_ops.list_denied(info, who, remote)


async def _wanted_acl(req: s3request.S3Request, owner: str, bucket_owner: str = "") -> acl_pb2.Acl:
    """The ACL a Put*Acl request sets on a resource of owner (in a bucket of bucket_owner:
    `acl.canned`): its headers, or its AccessControlPolicy body (both: UnexpectedContent;
    neither: MalformedACLError)."""
    body = await req.payload.read_all(MAX_POLICY_BYTES)
    wanted = acl.from_headers(req.http.headers, owner, bucket_owner)
    if wanted is not None:
        if body:
            raise s3errors.S3Error(
                "UnexpectedContent", "This request does not support content with ACL headers"
            )
        return wanted
    if not body:
        raise s3errors.S3Error(
            "MalformedACLError", "An ACL needs x-amz-acl, x-amz-grant-* or an XML body"
        )
    return acl.parse_policy(body, owner)


def _xml(data: bytes) -> web.Response:
    return web.Response(body=data, content_type=XML)


async def get_bucket_acl(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """The bucket's AccessControlPolicy (owner: its tenant)."""
    info = await s3.owned_bucket(req)
    return _xml(acl.policy_xml(info.acl, info.tenant))


async def put_bucket_acl(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """Replace the bucket's ACL (canned, grant headers or an AccessControlPolicy body)."""
    info = await s3.owned_bucket(req)
    wanted = await _wanted_acl(req, info.tenant)
    ownership.check_acl(ownership.mode(info), wanted, info.tenant)
    await check_grantees(s3.auth, wanted, info.tenant, req.principal.tenant)
    public_access.check_acl(info, wanted)
    await s3.front.set_bucket_config(req.bucket, metadata_pb2.SetBucketConfigRequest(acl=wanted))
    return web.Response(status=200)


async def get_object_acl(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """The AccessControlPolicy of the current version, or of versionId's (owner: the bucket's
    tenant, or the version's writer: `acl.writer`), through the bucket's object layer
    (`head`); x-amz-version-id in a versioned bucket. A missing version is NoSuchVersion, a
    delete marker's id 405 MethodNotAllowed."""
    info = await s3.owned_bucket(req)
    version = versioning_ops.requested(req)
    layer = await s3.layer(req)
    try:
        found = await layer.head(req.bucket, req.key, version)
    except errors.NotFound as exc:
        raise versioning_ops.not_found(exc, version) from None
    owner = ownership.holder(info, found.headers.acl)
    response = _xml(acl.policy_xml(ownership.shown_acl(info, found.headers.acl), owner))
    await versioning_ops.stamp_info(s3, req.bucket, response, found)
    return response


async def put_object_acl(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """Replace the ACL of the current version, or of versionId's (current or not), in place
    (no new version, same ETag), through the bucket's object layer (`set_acl`). The version
    keeps its owner (its writer's tenant, where another's): the new ACL is relative to it."""
    info = await s3.owned_bucket(req)
    version = versioning_ops.requested(req)
    layer = await s3.layer(req)
    try:
        found = await layer.head(req.bucket, req.key, version)  # refused before the body is read
        owner = ownership.holder(info, found.headers.acl)
        wanted = await _wanted_acl(req, owner, info.tenant)
        ownership.check_acl(ownership.mode(info), wanted, info.tenant)
        await check_grantees(s3.auth, wanted, owner, info.tenant, req.principal.tenant)
        if owner != info.tenant:
            wanted.owner = owner
        public_access.check_acl(info, wanted)
        found = await layer.set_acl(req.bucket, req.key, wanted, version)
    except errors.NotFound as exc:
        raise versioning_ops.not_found(exc, version) from None
    response = web.Response(status=200)
    await versioning_ops.stamp_info(s3, req.bucket, response, found)
    return response
