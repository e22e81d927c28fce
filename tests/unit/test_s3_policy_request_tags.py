"""Bucket-policy conditions on the tags a request sets (s3:RequestObjectTag/<key>,
s3:RequestObjectTagKeys under ForAnyValue: / ForAllValues:): x-amz-tagging read by the gate
(policy_ops.decide) for PutObject, CreateMultipartUpload and a REPLACE copy; a
PutObjectTagging's body tags deferred by the gate and decided by its handler
(tagging_ops._check_policy) before anything is stored; a POST form decided by its handler as
the PutObject of its key and fields (post_object._check_bucket_policy)."""

from __future__ import annotations

import json
import types
from typing import Any, cast

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import (
    acl,
    acl_ops,
    auth,
    bucket_policy,
    policy_ops,
    post_object,
    s3errors,
    s3request,
    tagging_ops,
)

D = bucket_policy.Decision
BUCKET = "pb"
ARN = f"arn:aws:s3:::{BUCKET}"
ALICE = auth.Principal("AKALICE", "acme", "alice")  # the bucket's tenant
EVE = auth.Principal("AKEVE", "evil", "eve")
PUBLIC = {"StringEquals": {"s3:RequestObjectTag/security": "public"}}


def _doc(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def _st(effect: str = "Allow", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Effect": effect, "Principal": "*", "Action": "s3:PutObject", "Resource": f"{ARN}/*",
    }  # fmt: skip
    base.update(fields)
    return base


def _decide(
    document: str,
    op: str,
    who: auth.Principal = EVE,
    headers: dict[str, str] | None = None,
    *,
    body_tags: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
) -> bucket_policy.Decision:
    policy = bucket_policy.parse(document, BUCKET)
    proxy = CIMultiDictProxy(CIMultiDict(headers or {}))
    return policy_ops.decide(
        policy, op, who, BUCKET, "k", query or {}, proxy, "10.1.2.3", body_tags=body_tags
    )


def _tagging(value: str, **more: str) -> dict[str, str]:
    return {"x-amz-tagging": value, **more}


def test_request_object_tag_from_x_amz_tagging() -> None:
    doc = _doc(_st(Condition=PUBLIC))
    for op in ("PutObject", "CreateMultipartUpload"):
        assert _decide(doc, op, headers=_tagging("security=public")) is D.ALLOW, op
        assert _decide(doc, op, headers=_tagging("a=1&security=public")) is D.ALLOW, op
    # Denials: no header, an empty one, another value, another key (S3's tag keys are
    # case-sensitive), a malformed header (absent here; the handler answers InvalidTag).
    assert _decide(doc, "PutObject") is D.NONE
    assert _decide(doc, "PutObject", headers=_tagging("")) is D.NONE
    assert _decide(doc, "PutObject", headers=_tagging("security=private")) is D.NONE
    assert _decide(doc, "PutObject", headers=_tagging("Security=public")) is D.NONE
    assert _decide(doc, "PutObject", headers=_tagging("security=public&aws:x=1")) is D.NONE
    # A copy sets the source's tags unless x-amz-tagging-directive is REPLACE.
    copy = {"x-amz-copy-source": "src/key", **_tagging("security=public")}
    assert _decide(doc, "PutObject", headers=copy) is D.NONE
    assert _decide(doc, "PutObject", headers={**copy, "x-amz-tagging-directive": "COPY"}) is D.NONE
    for directive in ("REPLACE", "replace"):
        replaced = {**copy, "x-amz-tagging-directive": directive}
        assert _decide(doc, "PutObject", headers=replaced) is D.ALLOW
    # Parts and completions carry no tags (IAM: the key absent, as in S3).
    assert _decide(doc, "UploadPart", headers=_tagging("security=public")) is D.NONE
    # An action that carries no request tags: the key is absent whatever the headers say.
    anything = _doc(_st(Action="s3:*", Condition=PUBLIC))
    assert _decide(anything, "GetObject", headers=_tagging("security=public")) is D.NONE
    # A negated operator holds where the key is absent; a Deny on it refuses the owner too.
    deny = _doc(
        _st(Action="s3:*"),
        _st("Deny", Condition={"StringNotEquals": {"s3:RequestObjectTag/security": "public"}}),
    )
    assert _decide(deny, "PutObject", ALICE) is D.DENY
    assert _decide(deny, "PutObject", ALICE, _tagging("security=private")) is D.DENY
    assert _decide(deny, "PutObject", ALICE, _tagging("security=public")) is D.ALLOW
    # The prefix is case-insensitive as every IAM key; StringLike's wildcards.
    like = _doc(_st(Condition={"StringLike": {"S3:requestObjectTag/security": "pub*"}}))
    assert _decide(like, "PutObject", headers=_tagging("security=publicly")) is D.ALLOW


@pytest.mark.parametrize(
    ("operator", "values", "tags", "holds"),
    [
        ("ForAllValues:StringEquals", ["security", "team"], "security=a&team=b", True),
        ("ForAllValues:StringEquals", ["security", "team"], "security=a&other=b", False),
        ("ForAllValues:StringEquals", ["security"], "", True),  # no keys: holds (IAM)
        ("ForAnyValue:StringEquals", ["security"], "security=a&other=b", True),
        ("ForAnyValue:StringEquals", ["security"], "other=b", False),
        ("ForAnyValue:StringEquals", ["security"], "", False),  # no keys: fails (IAM)
        ("ForAnyValue:StringEqualsIfExists", ["security"], "", True),
        ("ForAnyValue:StringLike", ["sec*"], "secret=1", True),
        ("ForAllValues:StringNotEquals", ["secret"], "a=1&b=2", True),
        ("ForAllValues:StringNotEquals", ["secret"], "a=1&secret=2", False),
        ("ForAnyValue:StringNotEquals", ["secret"], "secret=2", False),
        ("ForAnyValue:StringNotEquals", ["secret"], "a=1&secret=2", True),
        ("forallvalues:StringEquals", ["a"], "a=1", None),  # IAM's operators: case-sensitive
    ],
)
def test_request_object_tag_keys_set_operators(
    operator: str, values: list[str], tags: str, holds: bool | None
) -> None:
    condition = {operator: {"s3:RequestObjectTagKeys": values}}
    if holds is None:
        with pytest.raises(s3errors.S3Error, match="operator"):
            bucket_policy.parse(_doc(_st(Condition=condition)), BUCKET)
        return
    doc = _doc(_st(Action=["s3:PutObject", "s3:PutObjectTagging"], Condition=condition))
    expected = D.ALLOW if holds else D.NONE
    headers = _tagging(tags) if tags else None
    assert _decide(doc, "PutObject", headers=headers) is expected
    body = dict(pair.split("=") for pair in tags.split("&")) if tags else {}
    assert _decide(doc, "PutObjectTagging", body_tags=body) is expected


def test_put_object_tagging_is_deferred_then_decided_with_its_body() -> None:
    deny_public = _doc(
        _st(Action="s3:*"), _st("Deny", Action="s3:PutObject*Tagging", Condition=PUBLIC)
    )
    # The gate (no body yet) leaves the Deny out; the handler decides it with the tags.
    assert _decide(deny_public, "PutObjectTagging", ALICE) is D.ALLOW
    assert (
        _decide(deny_public, "PutObjectTagging", ALICE, body_tags={"security": "public"}) is D.DENY
    )
    assert _decide(deny_public, "PutObjectTagging", EVE, body_tags={"security": "x"}) is D.ALLOW
    assert _decide(deny_public, "PutObjectTagging", EVE, body_tags={}) is D.ALLOW
    versioned = {"versionId": "v1"}  # s3:PutObjectVersionTagging carries the key too
    assert (
        _decide(deny_public, "PutObjectTagging", EVE, body_tags={"security": "public"},
                query=versioned)
        is D.DENY
    )  # fmt: skip
    # A negated Deny: its absent key would hold, but the gate does not know the tags yet.
    not_public = {"StringNotEquals": {"s3:RequestObjectTag/security": "public"}}
    deny_others = _doc(_st(Action="s3:*"), _st("Deny", Action="s3:*", Condition=not_public))
    assert _decide(deny_others, "PutObjectTagging", ALICE) is D.ALLOW
    assert _decide(deny_others, "PutObjectTagging", ALICE, body_tags={}) is D.DENY
    # An Allow on the tags admits at the gate when its other conditions hold, exactly after.
    allow = _doc(_st(Action="s3:PutObjectTagging", Condition=PUBLIC))
    assert _decide(allow, "PutObjectTagging") is D.ALLOW
    assert _decide(allow, "PutObjectTagging", body_tags={"security": "public"}) is D.ALLOW
    assert _decide(allow, "PutObjectTagging", body_tags={"security": "private"}) is D.NONE
    elsewhere = {**PUBLIC, "IpAddress": {"aws:SourceIp": "192.0.2.0/24"}}
    allow_far = _doc(_st(Action="s3:PutObjectTagging", Condition=elsewhere))
    assert _decide(allow_far, "PutObjectTagging") is D.NONE


def _wants(document: str, op: str, who: auth.Principal, *, deny_only: bool) -> bool:
    policy = bucket_policy.parse(document, BUCKET)
    return policy_ops.wants_request_tags(policy, op, who, BUCKET, "k", {}, deny_only=deny_only)


def test_wants_request_tags() -> None:
    allow = _doc(_st(Action="s3:PutObjectTagging", Principal={"AWS": "evil"}, Condition=PUBLIC))
    assert _wants(allow, "PutObjectTagging", EVE, deny_only=False)
    assert not _wants(allow, "PutObjectTagging", EVE, deny_only=True)  # the owner: Deny only
    assert not _wants(allow, "PutObjectTagging", ALICE, deny_only=False)  # another principal
    assert not _wants(allow, "GetObjectTagging", EVE, deny_only=False)  # another action
    assert not _wants(_doc(_st(Action="s3:*")), "PutObjectTagging", EVE, deny_only=False)
    deny = _doc(_st("Deny", Action="s3:PutObjectTagging", Condition=PUBLIC))
    assert _wants(deny, "PutObjectTagging", ALICE, deny_only=True)


def _info(document: str) -> metadata_pb2.BucketInfo:
    info = metadata_pb2.BucketInfo(name=BUCKET, tenant="acme", acl=acl.canned("private", "acme"))
    info.policy.document = document
    return info


def test_the_gate_admits_others_on_an_allow_the_body_may_satisfy() -> None:
    seen = acl_ops._Seen("k", {}, "10.1.2.3")
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    allow = _info(_doc(_st(Action="s3:PutObjectTagging", Condition=PUBLIC)))
    assert acl_ops._decide("PutObjectTagging", EVE, headers, allow, seen) is not None
    with pytest.raises(s3errors.S3Error, match="Access Denied"):  # another action
        acl_ops._decide("DeleteObjectTagging", EVE, headers, allow, seen)


class _Front:
    """The bucket record (counted reads, fresh or not) and objects' tags."""

    def __init__(self, info: metadata_pb2.BucketInfo) -> None:
        self.info, self.engine = info, self
        self.reads: list[bool] = []

    async def bucket_info(self, name: str, fresh: bool = False) -> metadata_pb2.BucketInfo:
        self.reads.append(fresh)
        return self.info

    async def resolve(self, stored: str, key: str, version_id: str = "") -> Any:
        return types.SimpleNamespace(meta=types.SimpleNamespace(tags={"old": "1"}))


async def _check(front: _Front, who: auth.Principal, tags: dict[str, str]) -> str:
    door = cast(s3request.Door, types.SimpleNamespace(front=front))
    http = types.SimpleNamespace(headers=CIMultiDictProxy(CIMultiDict()), remote="10.1.2.3")
    req = cast(
        s3request.S3Request,
        types.SimpleNamespace(principal=who, op="PutObjectTagging", key="k", query={}, http=http,
                              bucket=BUCKET),
    )  # fmt: skip
    try:
        await tagging_ops._check_policy(door, req, tags)
    except s3errors.S3Error as exc:
        return exc.code
    return "ok"


async def test_the_handler_decides_with_the_body_tags() -> None:
    deny = _Front(_info(_doc(_st(Action="s3:*"), _st("Deny", Action="s3:*", Condition=PUBLIC))))
    assert await _check(deny, ALICE, {"security": "private"}) == "ok"
    assert await _check(deny, ALICE, {"security": "public"}) == "AccessDenied"
    assert deny.reads == [False, False, True]  # a signed caller denied: again, fresh
    assert await _check(deny, EVE, {"security": "public"}) == "AccessDenied"
    assert await _check(deny, EVE, {"a": "b"}) == "ok"
    allow = _Front(_info(_doc(_st(Action="s3:PutObjectTagging", Condition=PUBLIC))))
    assert await _check(allow, EVE, {"security": "public"}) == "ok"
    assert await _check(allow, EVE, {"security": "private"}) == "AccessDenied"
    assert await _check(allow, auth.ANONYMOUS, {}) == "AccessDenied"
    assert await _check(allow, ALICE, {}) == "ok"  # the owner: an Allow adds nothing
    # A public Allow where the bucket restricts public policies admits no other tenant.
    block = allow.info.public_access_block
    block.configured = block.restrict_public_buckets = True
    assert await _check(allow, EVE, {"security": "public"}) == "AccessDenied"
    plain = _Front(_info(_doc(_st(Action="s3:*"))))
    assert await _check(plain, EVE, {"security": "public"}) == "ok"
    # No policy now (the gate admitted on an older record's Allow): no Allow, no tagging.
    assert await _check(_Front(_info("")), EVE, {"a": "b"}) == "AccessDenied"
    assert await _check(_Front(_info("")), ALICE, {"a": "b"}) == "ok"
    # An existing-tag condition beside it sees the object's tags (read for it alone).
    both = {**PUBLIC, "StringEquals": {"s3:RequestObjectTag/security": "public",
                                        "s3:ExistingObjectTag/old": "1"}}  # fmt: skip
    tagged = _Front(_info(_doc(_st(Action="s3:PutObjectTagging", Condition=both))))
    assert await _check(tagged, EVE, {"security": "public"}) == "ok"


async def _post(
    front: _Front,
    who: auth.Principal,
    key: str = "up/k",
    fields: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> str:
    door = cast(s3request.Door, types.SimpleNamespace(front=front))
    http = types.SimpleNamespace(headers=CIMultiDictProxy(CIMultiDict(headers or {})), remote="")
    req = types.SimpleNamespace(principal=who, bucket=BUCKET, http=http)
    try:
        await post_object._check_bucket_policy(
            door, cast(s3request.S3Request, req), key, fields or {}, tags or {}
        )
    except s3errors.S3Error as exc:
        return exc.code
    return "ok"


async def test_post_forms_are_decided_as_the_put_object_of_their_key_and_fields() -> None:
    allow = _Front(_info(_doc(_st(Principal={"AWS": "evil"}, Condition=PUBLIC))))
    assert await _post(allow, EVE, tags={"security": "public"}) == "ok"
    assert await _post(allow, EVE, tags={"security": "private"}) == "AccessDenied"
    assert await _post(allow, EVE) == "AccessDenied"
    assert await _post(allow, auth.ANONYMOUS, tags={"security": "public"}) == "AccessDenied"
    assert await _post(allow, ALICE) == "ok"  # the bucket's own tenant
    deny = _Front(_info(_doc(_st("Deny", Resource=f"{ARN}/up/*", Condition=PUBLIC))))
    assert await _post(deny, ALICE, tags={"security": "public"}) == "AccessDenied"
    assert await _post(deny, ALICE, "down/k", tags={"security": "public"}) == "ok"  # resource
    assert await _post(deny, ALICE, tags={"a": "b"}) == "ok"
    # The form's acl field is the PutObject's x-amz-acl; the POST's own x-amz-* headers are not.
    on_acl = {"StringEquals": {"s3:x-amz-acl": "public-read"}}
    acl_only = _Front(_info(_doc(_st(Condition=on_acl))))
    assert await _post(acl_only, EVE, fields={"acl": "public-read"}) == "ok"
    sent = {"x-amz-acl": "public-read"}
    assert await _post(acl_only, EVE, headers=sent) == "AccessDenied"
    # Without an Allow another tenant needs the bucket's WRITE grant, which
    # BucketOwnerEnforced disables.
    granted = _Front(_info(_doc(_st(Action="s3:GetObject"))))
    granted.info.acl.CopyFrom(acl.canned("public-read-write", "acme"))
    assert await _post(granted, EVE) == "ok"
    granted.info.ownership_controls.object_ownership = (
        metadata_pb2.OBJECT_OWNERSHIP_BUCKET_OWNER_ENFORCED
    )
    assert await _post(granted, EVE) == "AccessDenied"
    # No policy (the gate may have admitted on an older record's Allow): the ACLs alone.
    assert await _post(_Front(_info("")), EVE) == "AccessDenied"
    assert await _post(_Front(_info("")), ALICE) == "ok"
