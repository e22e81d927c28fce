"""S3 bucket policies: the JSON document's check (PutBucketPolicy), its evaluation for one
request, and whether it makes the bucket public (GetBucketPolicyStatus). Pure: no I/O (the
gate that applies it is `acl_ops.admit`, the ?policy operations `policy_ops`).

An authorization document: what it cannot evaluate exactly it refuses when stored
(MalformedPolicy) rather than ignore later. Supported:

- Version 2012-10-17 or 2008-10-17 (absent: 2008-10-17), Id, Statement (one or a list);
- per statement Sid, Effect (Allow | Deny), Principal, Action or NotAction, Resource and
  Condition; NotPrincipal and NotResource are refused;
- Principal "*" or {"AWS": one or a list of "*", a tenant, "arn:aws:iam::<tenant>:root" (any
  user of the tenant) or "arn:aws:iam::<tenant>:user/<access key>" (that user alone);
  anonymous requests match "*" alone;
- Action / NotAction: "*" or s3:<action> with * and ? wildcards (case-insensitive);
- Resource: arn:aws:s3:::<bucket>[/<key>] with * and ? wildcards, each one able to match
  this bucket or its objects;
- Condition: the operators of `_OPERATORS`, each also as ...IfExists (holding where the
  request has no such key), on the keys of `_KEYS` (case-insensitive), several
  operators, keys and values as IAM combines them (operators and keys: all; values: any);
  the string operators also on s3:ExistingObjectTag/<tag key> (the prefix case-insensitive,
  the tag key as S3's are: case-sensitive), which holds the tag of the object the request
  names, for the actions of `TAGGED_ACTIONS` alone (as S3 supplies it: never for PutObject
  or DeleteObject). Policy variables (${...}) in a 2012-10-17 policy are refused.

Evaluation (`evaluate`): an explicit Deny of a matching statement wins, else an Allow, else
nothing (the ACLs decide). The object's tags are I/O: the gate reads them only when
`wants_tags` says a statement that could match needs them (`Request.tags`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any

from kvtier import errors, principal
from services.gateway.s3 import s3errors

#: AWS's limit on a bucket policy's size.
MAX_POLICY_BYTES = 20 * 1024
VERSIONS = ("2012-10-17", "2008-10-17")
ARN_PREFIX = "arn:aws:s3:::"
_IAM = re.compile(r"arn:aws:iam::([^:]+):(root|user/(.+))")
_TOP = frozenset({"Version", "Id", "Statement"})
_STATEMENT = frozenset(
    {"Sid", "Effect", "Principal", "Action", "NotAction", "Resource", "Condition"}
)
#: Condition keys a request context may carry (lower case: IAM keys are case-insensitive).
_KEYS = frozenset(
    {
        "aws:sourceip", "aws:referer", "aws:useragent", "s3:prefix", "s3:delimiter",
        "s3:x-amz-acl", "s3:x-amz-copy-source",
        "s3:x-amz-metadata-directive", "s3:x-amz-grant-read", "s3:x-amz-grant-write",
        "s3:x-amz-grant-read-acp", "s3:x-amz-grant-write-acp", "s3:x-amz-grant-full-control",
    }
)  # fmt: skip
#: The condition key prefix of an existing object's tag (lower case; the tag key follows).
EXISTING_TAG = "s3:existingobjecttag/"
#: S3's longest tag key.
_MAX_TAG_KEY = 128
#: The actions whose request context carries s3:ExistingObjectTag/<key> (AWS's service
#: authorization reference; lower case): object reads, and changes of an existing object's
#: ACL or tags. Not PutObject nor DeleteObject (S3: "not supported" there).
TAGGED_ACTIONS = frozenset(
    {
        "s3:getobject", "s3:getobjectversion", "s3:getobjectattributes",
        "s3:getobjectversionattributes", "s3:getobjectacl", "s3:getobjectversionacl",
        "s3:putobjectacl", "s3:putobjectversionacl", "s3:getobjecttagging",
        "s3:getobjectversiontagging", "s3:putobjecttagging", "s3:putobjectversiontagging",
        "s3:deleteobjecttagging", "s3:deleteobjectversiontagging",
    }
)  # fmt: skip
_STRING_OPERATORS = frozenset(
    {
        "StringEquals", "StringNotEquals", "StringEqualsIgnoreCase",
        "StringNotEqualsIgnoreCase", "StringLike", "StringNotLike",
    }
)  # fmt: skip
_IP_OPERATORS = frozenset({"IpAddress", "NotIpAddress"})
_OPERATORS = _STRING_OPERATORS | _IP_OPERATORS
#: IAM's suffix of an operator that also holds where the request has no such key.
IF_EXISTS = "IfExists"


class Decision(enum.Enum):
    """What a policy says of one request."""

    NONE = "none"  #: no statement matches: the ACLs decide
    ALLOW = "allow"
    DENY = "deny"


@dataclasses.dataclass(frozen=True, slots=True)
class Who:
    """The caller as a policy's Principal sees it (anonymous: tenant and user empty)."""

    tenant: str = ""
    user: str = ""  #: the access key

    @property
    def anonymous(self) -> bool:
        return not self.tenant


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """The request context a statement is matched against. `resource` None: any object of the
    bucket (a multi-object request whose keys the gate does not see): a Deny that may match
    one of them matches it, an Allow never does."""

    who: Who
    action: str  #: s3:GetObject...
    bucket: str
    resource: str | None
    #: Condition keys present in the request (lower-case names).
    context: Mapping[str, str]
    #: The tags of the object (version) the request names, for an action of
    #: `TAGGED_ACTIONS`; None where s3:ExistingObjectTag is absent (another action, no such
    #: object, or not read: `wants_tags` said no statement needs them).
    tags: Mapping[str, str] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    operator: str  #: without IfExists
    key: str  #: lower case, but for the tag key of s3:existingobjecttag/<tag key>
    values: tuple[str, ...]
    #: ...IfExists: the condition holds where the request has no such key
    if_exists: bool = False

    @property
    def tag(self) -> str | None:
        """The tag key of an s3:ExistingObjectTag condition (None: another key)."""
        return self.key[len(EXISTING_TAG) :] if self.key.startswith(EXISTING_TAG) else None


@dataclasses.dataclass(frozen=True, slots=True)
class Statement:
    effect: Decision
    anyone: bool  #: Principal "*"
    tenants: frozenset[str]  #: every user of these tenants
    users: frozenset[tuple[str, str]]  #: (tenant, access key)
    actions: tuple[re.Pattern[str], ...]
    negated_actions: bool  #: NotAction
    resources: tuple[re.Pattern[str], ...]
    raw_resources: tuple[str, ...]  #: as written (`_may_name_an_object`)
    conditions: tuple[Condition, ...]

    @property
    def needs_tags(self) -> bool:
        """Whether a condition is on the object's existing tags."""
        return any(condition.tag is not None for condition in self.conditions)


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    statements: tuple[Statement, ...]


def malformed(message: str) -> s3errors.S3Error:
    """MalformedPolicy (400)."""
    return s3errors.S3Error("MalformedPolicy", message, status=400)


def _wildcard(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """IAM's * (any run, '/' included) and ? (one character); nothing else is special."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _strings(value: Any, what: str) -> list[str]:
    """A string or a non-empty list of strings."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item for item in items):
        raise malformed(f"{what} must be a string or a list of strings")
    return items


def parse(document: str, bucket: str) -> Policy:
    """The policy of a document for bucket: MalformedPolicy unless it is valid and all of it
    can be evaluated (see the module docstring)."""
    if len(document.encode()) > MAX_POLICY_BYTES:
        raise malformed(f"Policies must be at most {MAX_POLICY_BYTES} bytes")
    try:
        doc = json.loads(document)
    except ValueError:
        raise malformed("This policy contains invalid Json") from None
    if not isinstance(doc, dict):
        raise malformed("This policy contains invalid Json")
    if set(doc) - _TOP:
        raise malformed(f"Unknown field {sorted(set(doc) - _TOP)[0]}")
    version = doc.get("Version", "2008-10-17")
    if version not in VERSIONS:
        raise malformed("The policy must contain a valid version string")
    raw = doc.get("Statement")
    items = raw if isinstance(raw, list) else [raw] if isinstance(raw, dict) else None
    if not items or not all(isinstance(item, dict) for item in items):
        raise malformed("Missing required field Statement")
    if version == "2012-10-17" and "${" in document:
        raise malformed("Policy variables are not supported")
    return Policy(tuple(_statement(item, bucket) for item in items))


def _statement(raw: dict[str, Any], bucket: str) -> Statement:
    unknown = set(raw) - _STATEMENT
    if unknown:  # NotPrincipal, NotResource, anything else: refused, never ignored
        raise malformed(f"Unsupported field {sorted(unknown)[0]}")
    effect = {"Allow": Decision.ALLOW, "Deny": Decision.DENY}.get(raw.get("Effect", ""))
    if effect is None:
        raise malformed("Effect must be Allow or Deny")
    if "Principal" not in raw:
        raise malformed("Missing required field Principal")
    anyone, tenants, users = _principal(raw["Principal"])
    if ("Action" in raw) == ("NotAction" in raw):
        raise malformed("A statement needs exactly one of Action and NotAction")
    actions = _strings(raw.get("Action", raw.get("NotAction")), "Action")
    for action in actions:
        if action != "*" and not re.fullmatch(r"s3:[A-Za-z*?]+", action):
            raise malformed(f"Policy has invalid action: {action}")
    if "Resource" not in raw:
        raise malformed("Missing required field Resource")
    raw_resources = _strings(raw["Resource"], "Resource")
    resources = [_resource(item, bucket) for item in raw_resources]
    return Statement(
        effect=effect,
        anyone=anyone,
        tenants=tenants,
        users=users,
        actions=tuple(_wildcard(action, ignore_case=True) for action in actions),
        negated_actions="NotAction" in raw,
        resources=tuple(resources),
        raw_resources=tuple(raw_resources),
        conditions=_conditions(raw.get("Condition", {})),
    )


def _principal(raw: Any) -> tuple[bool, frozenset[str], frozenset[tuple[str, str]]]:
    """(anyone, tenants, users) of a Principal element."""
    if raw == "*":
        return True, frozenset(), frozenset()
    if not isinstance(raw, dict) or set(raw) != {"AWS"}:
        raise malformed('Invalid principal in policy: "*" or {"AWS": ...} only')
    anyone, tenants, users = False, set(), set()
    for item in _strings(raw["AWS"], "Principal"):
        match = _IAM.fullmatch(item)
        tenant = match.group(1) if match else item
        if item == "*":
            anyone = True
            continue
        try:
            principal.check_tenant(tenant)
        except errors.InvalidArgument:
            raise malformed(f"Invalid principal in policy: {item}") from None
        if match and match.group(3) is not None:
            users.add((tenant, match.group(3)))
        else:
            tenants.add(tenant)
    return anyone, frozenset(tenants), frozenset(users)


def _resource(item: str, bucket: str) -> re.Pattern[str]:
    """A Resource pattern that may match the bucket or its objects (else MalformedPolicy)."""
    if not item.startswith(ARN_PREFIX):
        raise malformed(f"Policy has invalid resource: {item}")
    bucket_part = item[len(ARN_PREFIX) :].split("/", 1)[0]
    pattern = _wildcard(item)
    if not (pattern.fullmatch(ARN_PREFIX + bucket) or _wildcard(bucket_part).fullmatch(bucket)):
        raise malformed(f"Policy has invalid resource: {item}")
    return pattern


def _conditions(raw: Any) -> tuple[Condition, ...]:
    if not isinstance(raw, dict):
        raise malformed("Condition must be an object")
    out = []
    for written, block in raw.items():
        operator = written
        if_exists = isinstance(written, str) and written.endswith(IF_EXISTS)
        if if_exists:
            operator = written[: -len(IF_EXISTS)]
        if operator not in _OPERATORS:  # ForAllValues:..., Null, Bool, Numeric...: refused
            raise malformed(f"Unsupported condition operator {written}")
        if not isinstance(block, dict) or not block:
            raise malformed(f"Condition {operator} must map keys to values")
        for key, values in block.items():
            name = key.lower() if isinstance(key, str) else ""
            if name.startswith(EXISTING_TAG) and 0 < len(name) - len(EXISTING_TAG) <= _MAX_TAG_KEY:
                name = EXISTING_TAG + key[len(EXISTING_TAG) :]  # S3's tag keys: case-sensitive
            elif name not in _KEYS:
                raise malformed(f"Unsupported condition key {key}")
            if (name == "aws:sourceip") != (operator in _IP_OPERATORS):
                raise malformed(f"Condition {operator} does not apply to {key}")
            items = _strings(values, f"Condition {key}")
            if operator in _IP_OPERATORS:
                for value in items:
                    try:
                        ipaddress.ip_network(value, strict=False)
                    except ValueError:
                        raise malformed(f"Invalid IP address range {value}") from None
            out.append(Condition(operator, name, tuple(items), if_exists))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def cached(document: str, bucket: str) -> Policy:
    """parse, memoised: the gate evaluates the bucket record's policy on every request."""
    return parse(document, bucket)


def _value_matches(operator: str, value: str, wanted: str) -> bool:
    base = operator.replace("Not", "", 1)
    if base == "StringEquals":
        return value == wanted
    if base == "StringEqualsIgnoreCase":
        return value.lower() == wanted.lower()
    if base == "StringLike":
        return _wildcard(wanted).fullmatch(value) is not None
    try:  # IpAddress
        return ipaddress.ip_address(value) in ipaddress.ip_network(wanted, strict=False)
    except ValueError:  # not an address (a unix socket): matches no range
        return False


def _holds(condition: Condition, request: Request) -> bool:
    """IAM: any value matches; a negated operator holds when none does, and when the key is
    absent (a positive one then fails; either holds then with ...IfExists). An existing tag's
    key is absent where the object has no such tag, or the request no tags (`Request.tags`)."""
    negated = condition.operator.startswith(("StringNot", "NotIp"))
    tag = condition.tag
    if tag is None:
        value = request.context.get(condition.key)
    elif request.tags is not None and request.action.lower() in TAGGED_ACTIONS:
        value = request.tags.get(tag)
    else:
        value = None
    if value is None:
        return negated or condition.if_exists
    matched = any(_value_matches(condition.operator, value, w) for w in condition.values)
    return matched != negated


def principal_matches(statement: Statement, who: Who) -> bool:
    if statement.anyone:
        return True
    if who.anonymous:
        return False
    return who.tenant in statement.tenants or (who.tenant, who.user) in statement.users


def _resource_matches(statement: Statement, request: Request) -> bool:
    if request.resource is not None:
        return any(p.fullmatch(request.resource) for p in statement.resources)
    some_object = f"{ARN_PREFIX}{request.bucket}/"
    return any(_may_start_with(raw, some_object) for raw in statement.raw_resources)


def _may_start_with(glob: str, prefix: str) -> bool:
    """Whether glob (* and ?) matches some string that starts with prefix."""
    for i, char in enumerate(prefix):
        if i >= len(glob):
            return False
        if glob[i] == "*":
            return True
        if glob[i] != "?" and glob[i] != char:
            return False
    return True


def _may_match(statement: Statement, request: Request) -> bool:
    """Whether the statement's principal, action and resource match (conditions aside)."""
    if not principal_matches(statement, request.who):
        return False
    named = any(p.fullmatch(request.action) for p in statement.actions)
    return named != statement.negated_actions and _resource_matches(statement, request)


def _matches(statement: Statement, request: Request) -> bool:
    if not _may_match(statement, request):
        return False
    if request.resource is None:  # unseen keys: only a Deny may match, whatever its conditions
        return statement.effect is Decision.DENY
    return all(_holds(condition, request) for condition in statement.conditions)


def wants_tags(policy: Policy, request: Request, *, deny_only: bool) -> bool:
    """Whether evaluating request needs the object's tags: some statement with a condition on
    them may match it (a Deny alone when deny_only: an Allow would change nothing). Never
    for an action without s3:ExistingObjectTag, nor a request naming no single object."""
    if request.resource is None or request.action.lower() not in TAGGED_ACTIONS:
        return False
    return any(
        statement.needs_tags
        and (statement.effect is Decision.DENY or not deny_only)
        and _may_match(statement, request)
        for statement in policy.statements
    )


def evaluate(policy: Policy, request: Request) -> Decision:
    """An explicit Deny of a matching statement, else an Allow, else NONE."""
    decision = Decision.NONE
    for statement in policy.statements:
        if _matches(statement, request):
            if statement.effect is Decision.DENY:
                return Decision.DENY
            decision = Decision.ALLOW
    return decision


def is_public(policy: Policy) -> bool:
    """GetBucketPolicyStatus's IsPublic: an Allow to "*" not restricted to a fixed address
    range (aws:SourceIp under IpAddress, none of them 0.0.0.0/0 or ::/0). Other conditions do
    not restrict who the caller is."""
    for statement in policy.statements:
        if statement.effect is not Decision.ALLOW or not statement.anyone:
            continue
        ranges = [
            ipaddress.ip_network(value, strict=False)
            for c in statement.conditions
            if c.operator == "IpAddress" and not c.if_exists  # (IfExists: no restriction)
            for value in c.values
        ]
        if not ranges or any(r.prefixlen == 0 for r in ranges):
            return True
    return False
