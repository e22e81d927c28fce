"""The bucket policy evaluator (services/gateway/s3/bucket_policy.py) and the gate's use of it
(policy_ops.decide): what a policy refuses at PUT, how Allow and Deny statements match a
request (principal, action, resource, conditions), and IsPublic."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from services.gateway.s3 import auth, bucket_policy, cors, policy_ops, s3errors, server

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
) -> bucket_policy.Decision:
    policy = bucket_policy.parse(document, BUCKET)
    proxy = CIMultiDictProxy(CIMultiDict(headers or {}))
    return policy_ops.decide(policy, op, who, BUCKET, key, query or {}, proxy, remote)


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
        (_doc(_st(Condition={"StringEqualsIfExists": {"s3:prefix": "a"}})), "operator"),
        (_doc(_st(Condition={"ForAnyValue:StringLike": {"s3:prefix": "a"}})), "operator"),
        (_doc(_st(Condition={"StringEquals": {"s3:ExistingObjectTag/x": "y"}})), "key"),
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


def test_multi_object_requests_deny_when_any_key_may_be_denied() -> None:
    doc = _doc(_st(Action="s3:*", Resource=f"{ARN}/*"),
               _st("Deny", Action="s3:DeleteObject", Resource=f"{ARN}/keep/*",
                   Condition={"StringEquals": {"s3:x-amz-acl": "never-sent"}}))  # fmt: skip
    assert _decide(doc, "DeleteObjects", ALICE, "") is D.DENY  # keys unseen: conditions too
    assert _decide(_doc(_st(Action="s3:*")), "DeleteObjects", EVE, "") is D.NONE  # never Allow
    assert _decide(_doc(_st(Action="s3:*")), "PostObject", EVE, "") is D.NONE


def test_unknown_operations_are_refused_where_a_deny_names_the_caller() -> None:
    doc = _doc(_st("Deny", Principal={"AWS": "acme"}, Action="s3:PutObject"))
    assert _decide(doc, "SomeFutureOp", ALICE) is D.DENY
    assert _decide(doc, "SomeFutureOp", EVE) is D.NONE


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
