"""The bucket policy evaluator (services/gateway/s3/bucket_policy.py) and the gate's use of it
(policy_ops.decide): what a policy refuses at PUT, how Allow and Deny statements match a
request (principal, action, resource, conditions), and IsPublic."""

from __future__ import annotations

import json
import types
from typing import Any, cast

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from kvtier import errors
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import front as front_mod
from services.gateway.s3 import (
    acl,
    acl_ops,
    auth,
    bucket_policy,
    cors,
    policy_ops,
    s3errors,
    server,
)

D = bucket_policy.Decision
BUCKET = "pb"
ARN = f"arn:aws:s3:::{BUCKET}"
ALICE = auth.Principal("AKALICE", "acme", "alice")
BOB = auth.Principal("AKBOB", "acme", "bob")
EVE = auth.Principal("AKEVE", "evil", "eve")


def _doc(*statements: dict[str, Any], version: str = "2012-10-17") -> str:
    return json.dumps({"Version": version, "Statement": list(statements)})


def _st(effect: str = "Allow", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Effect": effect, "Principal": "*", "Action": "s3:GetObject", "Resource": f"{ARN}/*",
    }  # fmt: skip
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def _decide(
    document: str,
    op: str,
    who: auth.Principal,
    key: str = "k",
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    remote: str = "10.1.2.3",
    tags: dict[str, str] | None = None,
) -> bucket_policy.Decision:
    policy = bucket_policy.parse(document, BUCKET)
    proxy = CIMultiDictProxy(CIMultiDict(headers or {}))
    return policy_ops.decide(policy, op, who, BUCKET, key, query or {}, proxy, remote, tags=tags)


@pytest.mark.parametrize(
    ("document", "why"),
    [
        ("{not json", "invalid Json"),
        (_doc(_st(), version="2099-01-01"), "version"),
        (json.dumps({"Version": "2012-10-17"}), "Statement"),
        (_doc(_st(Principal=None)), "Principal"),
        (_doc(_st(Principal=None, NotPrincipal={"AWS": "acme"})), "NotPrincipal"),
        (_doc(_st(Resource=None, NotResource=f"{ARN}/*")), "NotResource"),
        (_doc(_st(Effect="Maybe")), "Effect"),
        (_doc(_st(NotAction="s3:PutObject")), "Action"),
        (_doc(_st(Action="ec2:RunInstances")), "action"),
        (_doc(_st(Resource="arn:aws:s3:::other-bucket/*")), "resource"),
        (_doc(_st(Principal={"CanonicalUser": "x"})), "principal"),
        (_doc(_st(Principal={"AWS": "not a tenant!"})), "principal"),
        (_doc(_st(Condition={"NumericLessThanIfExists": {"s3:prefix": "1"}})), "operator"),
        (_doc(_st(Condition={"ForAnyValue:StringLike": {"s3:prefix": "a"}})), "operator"),
        (_doc(_st(Condition={"StringEquals": {"s3:x-amz-server-side-encryption": "y"}})), "key"),
        (_doc(_st(Condition={"StringEquals": {"s3:RequestObjectTag/": "y"}})), "key"),
        (_doc(_st(Condition={"StringEquals": {"s3:RequestObjectTagKeys": "y"}})), "ForAnyValue"),
        (_doc(_st(Condition={"ForAllValues:StringEquals": {"s3:x-amz-acl": "y"}})), "operator"),
        (
            _doc(_st(Condition={"ForSomeValues:StringLike": {"s3:RequestObjectTagKeys": "y"}})),
            "operator",
        ),
        (_doc(_st(Condition={"ForAnyValue:IpAddress": {"s3:RequestObjectTagKeys": "y"}})), "apply"),
        (_doc(_st(Condition={"StringEquals": {"s3:ExistingObjectTag/": "y"}})), "key"),
        (_doc(_st(Condition={"StringEquals": {f"s3:ExistingObjectTag/{'k' * 129}": "y"}})), "key"),
        (_doc(_st(Condition={"IpAddress": {"s3:ExistingObjectTag/x": "10.0.0.1"}})), "apply"),
        (_doc(_st(Condition={"StringEquals": {"aws:SourceIp": "10.0.0.1"}})), "apply"),
        (_doc(_st(Condition={"IpAddress": {"aws:SourceIp": "nowhere"}})), "IP"),
        (_doc(_st(Resource=f"{ARN}/${{aws:username}}/*")), "variables"),
        (_doc(_st(Sid="x" * (21 << 10))), "20480 bytes"),
    ],
)
def test_malformed_policies_are_refused(document: str, why: str) -> None:
    with pytest.raises(s3errors.S3Error) as refused:
        bucket_policy.parse(document, BUCKET)
    assert refused.value.code == "MalformedPolicy"
    assert refused.value.status == 400
    assert why.lower() in refused.value.message.lower()


def test_wildcard_resources_that_may_match_the_bucket_are_accepted() -> None:
    for resource in ("arn:aws:s3:::*", "arn:aws:s3:::*/*", "arn:aws:s3:::p?", f"{ARN}/a/*"):
        bucket_policy.parse(_doc(_st(Resource=resource)), BUCKET)


def test_allow_another_tenant_get_object_only() -> None:
    doc = _doc(_st(Principal={"AWS": "arn:aws:iam::evil:root"}, Resource=f"{ARN}/pub/*"))
    assert _decide(doc, "GetObject", EVE, "pub/x") is D.ALLOW
    assert _decide(doc, "HeadObject", EVE, "pub/x") is D.ALLOW
    assert _decide(doc, "GetObject", EVE, "priv/x") is D.NONE  # resource
    assert _decide(doc, "PutObject", EVE, "pub/x") is D.NONE  # action
    assert _decide(doc, "GetObject", ALICE, "pub/x") is D.NONE  # principal
    assert _decide(doc, "GetObject", auth.ANONYMOUS, "pub/x") is D.NONE
    # A versionId needs s3:GetObjectVersion.
    assert _decide(doc, "GetObject", EVE, "pub/x", {"versionId": "v"}) is D.NONE


def test_user_principals_name_one_access_key() -> None:
    doc = _doc(_st(Principal={"AWS": ["arn:aws:iam::acme:user/AKBOB"]}))
    assert _decide(doc, "GetObject", BOB) is D.ALLOW
    assert _decide(doc, "GetObject", ALICE) is D.NONE
    assert _decide(_doc(_st(Principal={"AWS": "acme"})), "GetObject", ALICE) is D.ALLOW


def test_anonymous_matches_star_only() -> None:
    assert _decide(_doc(_st()), "GetObject", auth.ANONYMOUS) is D.ALLOW
    assert _decide(_doc(_st(Principal={"AWS": "*"})), "GetObject", auth.ANONYMOUS) is D.ALLOW


def test_explicit_deny_wins_over_allow() -> None:
    doc = _doc(_st(Action="s3:*"), _st("Deny", Principal={"AWS": "acme"}, Resource=f"{ARN}/k"))
    assert _decide(doc, "GetObject", ALICE) is D.DENY
    assert _decide(doc, "GetObject", EVE) is D.ALLOW
    assert _decide(doc, "GetObject", ALICE, "other") is D.ALLOW


def test_not_action_and_action_wildcards() -> None:
    doc = _doc(_st("Deny", Action=None, NotAction=["s3:Get*", "s3:List*"], Resource=f"{ARN}*"))
    assert _decide(doc, "PutObject", ALICE) is D.DENY
    assert _decide(doc, "DeleteBucket", ALICE, "") is D.DENY
    assert _decide(doc, "GetObject", ALICE) is D.NONE
    assert _decide(doc, "ListObjects", ALICE, "") is D.NONE
    star = _doc(_st(Action="*", Resource=[ARN, f"{ARN}/*"]))
    assert _decide(star, "CompleteMultipartUpload", EVE) is D.ALLOW


def test_prefix_condition_on_list_bucket() -> None:
    cond = {"StringEquals": {"s3:prefix": "pub/"}}
    doc = _doc(_st(Action="s3:ListBucket", Resource=ARN, Condition=cond))
    assert _decide(doc, "ListObjects", EVE, "", {"prefix": "pub/"}) is D.ALLOW
    assert _decide(doc, "ListObjects", EVE, "", {"prefix": "priv/"}) is D.NONE
    assert _decide(doc, "ListObjects", EVE, "", {}) is D.NONE  # absent: a positive test fails
    neg = _doc(_st("Deny", Action="s3:ListBucket", Resource=ARN,
                   Condition={"StringNotLike": {"s3:prefix": "pub/*"}}))  # fmt: skip
    assert _decide(neg, "ListObjects", ALICE, "", {}) is D.DENY  # absent: a negated one holds
    assert _decide(neg, "ListObjects", ALICE, "", {"prefix": "pub/a"}) is D.NONE


def test_header_and_address_conditions() -> None:
    public = {"StringLike": {"s3:x-amz-acl": "public*"}}
    acl_deny = _doc(
        _st(Action="s3:PutObject"), _st("Deny", Action="s3:PutObject", Condition=public)
    )
    assert _decide(acl_deny, "PutObject", EVE) is D.ALLOW
    assert _decide(acl_deny, "PutObject", EVE, headers={"x-amz-acl": "public-read"}) is D.DENY
    source = {"StringLike": {"s3:x-amz-copy-source": "src/public/*"}}
    copy = _doc(_st(Action="s3:PutObject", Condition=source))
    assert (
        _decide(copy, "PutObject", EVE, headers={"x-amz-copy-source": "/src/public/a%20b"})
        is D.ALLOW
    )
    assert _decide(copy, "PutObject", EVE, headers={"x-amz-copy-source": "src/private/a"}) is D.NONE
    ip = _doc(_st(Condition={"IpAddress": {"aws:SourceIp": ["10.1.0.0/16"]}}))
    assert _decide(ip, "GetObject", EVE, remote="10.1.9.9") is D.ALLOW
    assert _decide(ip, "GetObject", EVE, remote="10.2.0.1") is D.NONE
    assert _decide(ip, "GetObject", EVE, remote="") is D.NONE


def test_if_exists_operators_hold_where_the_key_is_absent() -> None:
    """...IfExists: as the operator where the request has the key, true where it has none
    (IAM); aws:Referer and aws:UserAgent come from the request's headers."""
    referer = {"StringLikeIfExists": {"aws:Referer": "http://www.example.com/*"}}
    doc = _doc(_st(Condition=referer))
    site = {"Referer": "http://www.example.com/index.html"}
    assert _decide(doc, "GetObject", EVE, headers=site) is D.ALLOW
    assert _decide(doc, "GetObject", EVE, headers={"Referer": "http://evil.example/"}) is D.NONE
    assert _decide(doc, "GetObject", EVE) is D.ALLOW  # no Referer: holds
    plain = _doc(_st(Condition={"StringLike": {"aws:Referer": "http://www.example.com/*"}}))
    assert _decide(plain, "GetObject", EVE) is D.NONE  # without IfExists: fails
    agent = {"StringNotEqualsIfExists": {"aws:UserAgent": "curl/8"}}
    deny = _doc(_st(Action="s3:*"), _st("Deny", Condition=agent))
    assert _decide(deny, "GetObject", EVE, headers={"User-Agent": "curl/8"}) is D.ALLOW
    assert _decide(deny, "GetObject", EVE, headers={"User-Agent": "boto3"}) is D.DENY
    assert _decide(deny, "GetObject", EVE) is D.DENY  # no User-Agent: the Deny holds


def test_multi_object_requests_deny_when_any_key_may_be_denied() -> None:
    doc = _doc(_st(Action="s3:*", Resource=f"{ARN}/*"),
               _st("Deny", Action="s3:DeleteObject", Resource=f"{ARN}/keep/*",
                   Condition={"StringEquals": {"s3:x-amz-acl": "never-sent"}}))  # fmt: skip
    assert _decide(doc, "DeleteObjects", ALICE, "") is D.DENY  # keys unseen: conditions too
    assert _decide(_doc(_st(Action="s3:*")), "DeleteObjects", EVE, "") is D.NONE  # never Allow
    # A POST form's key and fields are unseen too, but its handler decides it again, seeing
    # them (post_object): the gate admits where an Allow may match and leaves a Deny to it.
    post = _doc(_st(Action="s3:PutObject"))
    assert _decide(post, "PostObject", EVE, "") is D.ALLOW
    assert _decide(_doc(_st(Action="s3:GetObject")), "PostObject", EVE, "") is D.NONE
    assert _decide(_doc(_st("Deny", Action="s3:*")), "PostObject", ALICE, "") is D.NONE


def test_unknown_operations_are_refused_where_a_deny_names_the_caller() -> None:
    doc = _doc(_st("Deny", Principal={"AWS": "acme"}, Action="s3:PutObject"))
    assert _decide(doc, "SomeFutureOp", ALICE) is D.DENY
    assert _decide(doc, "SomeFutureOp", EVE) is D.NONE


def test_existing_object_tag_conditions_need_the_tag_with_a_matching_value() -> None:
    public = {"StringEquals": {"s3:ExistingObjectTag/security": "public"}}
    doc = _doc(_st(Action=["s3:GetObject", "s3:GetObjectTagging"], Condition=public))
    assert _decide(doc, "GetObject", EVE, tags={"security": "public", "foo": "bar"}) is D.ALLOW
    assert _decide(doc, "GetObjectTagging", EVE, tags={"security": "public"}) is D.ALLOW
    # Denials: a wrong value, a missing tag (another key, another case: S3's tag keys are
    # case-sensitive), no tags or no object, another action.
    assert _decide(doc, "GetObject", EVE, tags={"security": "private"}) is D.NONE
    assert _decide(doc, "GetObject", EVE, tags={"security1": "public"}) is D.NONE
    assert _decide(doc, "GetObject", EVE, tags={"Security": "public"}) is D.NONE
    assert _decide(doc, "GetObject", EVE, tags={}) is D.NONE
    assert _decide(doc, "GetObject", EVE, tags=None) is D.NONE
    assert _decide(doc, "GetObjectAcl", EVE, tags={"security": "public"}) is D.NONE
    # The condition key's prefix is case-insensitive, as every IAM key; StringLike's wildcards.
    like = {"StringLike": {"S3:existingObjectTag/security": ["pub*", "open"]}}
    liked = _doc(_st(Action="s3:*", Condition=like))
    assert _decide(liked, "GetObject", EVE, tags={"security": "public"}) is D.ALLOW
    assert _decide(liked, "PutObjectTagging", EVE, tags={"security": "open"}) is D.ALLOW
    assert _decide(liked, "GetObject", EVE, tags={"security": "closed"}) is D.NONE
    # S3 never supplies the key for PutObject or DeleteObject: a positive test fails there,
    # whatever tags the caller hands over.
    assert _decide(liked, "PutObject", EVE, tags={"security": "public"}) is D.NONE
    assert _decide(liked, "DeleteObject", EVE, tags={"security": "public"}) is D.NONE


def test_existing_object_tag_deny_and_negated_operators() -> None:
    not_public = {"StringNotEquals": {"s3:ExistingObjectTag/security": "public"}}
    doc = _doc(_st(Action="s3:*"), _st("Deny", Action="s3:GetObject*", Condition=not_public))
    assert _decide(doc, "GetObject", ALICE, tags={"security": "public"}) is D.ALLOW
    assert _decide(doc, "GetObject", ALICE, tags={"security": "private"}) is D.DENY
    assert _decide(doc, "GetObject", ALICE, tags={}) is D.DENY  # absent: a negated test holds
    assert _decide(doc, "GetObjectTagging", ALICE, tags=None) is D.DENY
    assert _decide(doc, "GetObject", ALICE, "k", {"versionId": "v"}, tags={}) is D.DENY
    assert _decide(doc, "PutObjectTagging", ALICE, tags={}) is D.ALLOW  # not s3:GetObject*


def test_tags_are_read_only_where_a_statement_may_need_them() -> None:
    tagged = {"StringEquals": {"s3:ExistingObjectTag/t": "v"}}

    def wants(document: str, op: str, who: auth.Principal, key: str = "k") -> bool:
        policy = bucket_policy.parse(document, BUCKET)
        return policy_ops.wants_tags(policy, op, who, BUCKET, key, {}, deny_only=False)

    allow_eve = _doc(_st(Principal={"AWS": "evil"}, Condition=tagged))
    assert wants(allow_eve, "GetObject", EVE)
    assert not wants(allow_eve, "GetObject", ALICE)  # another principal
    assert not wants(allow_eve, "GetObjectAcl", EVE)  # another action
    assert not wants(_doc(_st(Action="s3:*", Condition=tagged)), "PutObject", EVE)  # no key
    assert not wants(_doc(_st(Action="s3:*", Condition=tagged)), "ListObjects", EVE, "")
    assert not wants(_doc(_st()), "GetObject", EVE)  # no tag condition
    policy = bucket_policy.parse(allow_eve, BUCKET)
    # For the bucket's owner only a Deny counts: an Allow adds nothing to what it may do.
    assert not policy_ops.wants_tags(policy, "GetObject", EVE, BUCKET, "k", {}, deny_only=True)
    deny = bucket_policy.parse(_doc(_st("Deny", Condition=tagged)), BUCKET)
    assert policy_ops.wants_tags(deny, "GetObject", ALICE, BUCKET, "k", {}, deny_only=True)


def _info(document: str) -> metadata_pb2.BucketInfo:
    """A bucket of ALICE's tenant whose ACL lets anyone read and write (no ACL grant reaches
    object tagging: S3's ACL permissions do not map to its actions)."""
    info = metadata_pb2.BucketInfo(
        name=BUCKET, tenant="acme", acl=acl.canned("public-read-write", "acme")
    )
    info.policy.document = document
    return info


def _scope(admission: front_mod.Admission | None) -> str:
    """The admission as a word: owner (none), policy (an object admission that a private
    object's ACL does not refuse: the policy's), acl (an object admission the object's ACL
    decides), or the admission's scope."""
    if admission is None:
        return "owner"
    if admission.scope != "object":
        return admission.scope
    assert admission.check_object is not None
    try:
        admission.check_object(acl.canned("private", "acme"))
    except errors.PermissionDenied:
        return "acl"
    return "policy"


def _gate(
    op: str, who: auth.Principal, info: metadata_pb2.BucketInfo, tags: dict[str, str] | None
) -> str:
    """The gate's decision on op on key k: `_scope`, or the error code."""
    seen = acl_ops._Seen("k", {}, "10.1.2.3")
    try:
        return _scope(acl_ops._decide(op, who, NO_HEADERS, info, seen, tags))
    except s3errors.S3Error as exc:
        return exc.code


NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
TAGGING = sorted(acl_ops.POLICY_ONLY)


def test_only_a_policy_allow_admits_others_to_object_tagging() -> None:
    for op in TAGGING:
        for who in (EVE, auth.ANONYMOUS):
            assert _gate(op, who, _info(""), None) == "AccessDenied", op
            assert _gate(op, who, _info(_doc(_st(Action="s3:*Object"))), None) == "AccessDenied"
        assert _gate(op, ALICE, _info(""), None) == "owner"
    get_tags = _info(_doc(_st(Action="s3:GetObjectTagging")))
    assert _gate("GetObjectTagging", EVE, get_tags, None) == "policy"
    assert _gate("GetObjectTagging", auth.ANONYMOUS, get_tags, None) == "policy"
    assert _gate("PutObjectTagging", EVE, get_tags, None) == "AccessDenied"  # another action
    assert _gate("DeleteObjectTagging", EVE, get_tags, None) == "AccessDenied"
    assert _gate("GetObject", EVE, get_tags, None) == "acl"  # the object's ACL, as before
    on_public = {"StringEquals": {"s3:ExistingObjectTag/security": "public"}}
    put_tags = _info(_doc(_st(Action="s3:PutObjectTagging", Condition=on_public)))
    assert _gate("PutObjectTagging", EVE, put_tags, {"security": "public"}) == "policy"
    assert _gate("PutObjectTagging", EVE, put_tags, {"security": "private"}) == "AccessDenied"
    assert _gate("PutObjectTagging", EVE, put_tags, None) == "AccessDenied"
    # A Deny still refuses everyone, the owner included.
    deny = _info(_doc(_st(Action="s3:*"), _st("Deny", Action="s3:DeleteObjectTagging")))
    assert _gate("DeleteObjectTagging", EVE, deny, None) == "AccessDenied"
    assert _gate("DeleteObjectTagging", ALICE, deny, None) == "AccessDenied"
    assert _gate("GetObjectTagging", EVE, deny, None) == "policy"


class _Front:
    """The object front as the gate sees it: a bucket record, and objects' tags (one
    resolve per object read, counted)."""

    def __init__(self, info: metadata_pb2.BucketInfo, tags: dict[str, str] | None) -> None:
        self.info, self.tags, self.engine = info, tags, self
        self.reads: list[tuple[str, str]] = []

    async def bucket_info(self, name: str, fresh: bool = False) -> metadata_pb2.BucketInfo:
        return self.info

    async def resolve(self, stored: str, key: str, version_id: str = "") -> Any:
        self.reads.append((key, version_id))
        if self.tags is None:
            raise errors.NotFound(f"{key} is not there")
        return types.SimpleNamespace(meta=types.SimpleNamespace(tags=self.tags))


async def _admit(
    fake: _Front, op: str, who: auth.Principal, query: dict[str, str] | None = None
) -> str:
    try:
        admission, _ = await acl_ops.admit(
            cast(front_mod.ObjectFront, fake), op, BUCKET, who, NO_HEADERS,
            key="k", query=query or {}, remote="10.1.2.3",
        )  # fmt: skip
    except s3errors.S3Error as exc:
        return exc.code
    return _scope(admission)


async def test_the_gate_reads_tags_only_for_a_statement_that_needs_them() -> None:
    public = {"StringEquals": {"s3:ExistingObjectTag/security": "public"}}
    doc = _doc(_st(Condition=public))
    fake = _Front(_info(doc), {"security": "public"})
    assert await _admit(fake, "GetObject", EVE) == "policy"
    assert fake.reads == [("k", "")]
    assert await _admit(fake, "GetObject", EVE, {"versionId": "v1"}) == "acl"
    assert ("k", "v1") not in fake.reads  # s3:GetObjectVersion: no statement, no read
    fake.reads.clear()
    assert await _admit(fake, "GetObject", ALICE) != "AccessDenied"  # an Allow adds nothing
    assert await _admit(fake, "PutObject", EVE) == "write"  # the ACL's; no tags for PutObject
    untagged = _Front(_info(_doc(_st())), {})
    assert await _admit(untagged, "GetObject", EVE) == "policy"
    assert fake.reads == untagged.reads == []
    for tags in ({"security": "private"}, {"security1": "public"}, None):
        assert await _admit(_Front(_info(doc), tags), "GetObject", EVE) == "acl"  # not "policy"
    deny = _doc(_st("Deny", Action="s3:GetObjectVersion", Condition=public))
    fake = _Front(_info(deny), {"security": "public"})
    assert await _admit(fake, "GetObject", ALICE, {"versionId": "v1"}) == "AccessDenied"
    assert fake.reads == [("k", "v1"), ("k", "v1")]  # the version's tags; again on a fresh record
    assert await _admit(fake, "GetObject", ALICE) != "AccessDenied"  # s3:GetObject: no Deny


def test_every_routed_bucket_operation_has_actions() -> None:
    ops = {op for _, (op, _) in server._routes()}
    assert ops - set(policy_ops.ACTIONS) <= {"ListBuckets", "CreateBucket", cors.PREFLIGHT}


def test_is_public() -> None:
    assert bucket_policy.is_public(bucket_policy.parse(_doc(_st()), BUCKET))
    ip = {"IpAddress": {"aws:SourceIp": "10.0.0.0/32"}}
    assert not bucket_policy.is_public(bucket_policy.parse(_doc(_st(Condition=ip)), BUCKET))
    tenant = _doc(_st(Principal={"AWS": "arn:aws:iam::acme:root"}))
    assert not bucket_policy.is_public(bucket_policy.parse(tenant, BUCKET))
    assert not bucket_policy.is_public(bucket_policy.parse(_doc(_st("Deny")), BUCKET))
