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
  or DeleteObject); on s3:RequestObjectTag/<tag key> (alike), the tag the request sets, and
  on s3:RequestObjectTagKeys, the set of its tag keys, only under IAM's set operators
  (ForAnyValue:<operator> / ForAllValues:<operator>, which no other key takes), both for
  the actions of `REQUEST_TAGGED_ACTIONS` alone (`Request.request_tags`). Policy variables
  (${...}) in a 2012-10-17 policy are refused.

Evaluation (`evaluate`): an explicit Deny of a matching statement wins, else an Allow, else
nothing (the ACLs decide). The object's tags are I/O: the gate reads them only when
`wants_tags` says a statement that could match needs them (`Request.tags`). A request whose
tags are in its body (PutObjectTagging) is decided twice: by the gate before the body is read
(`Request.deferred`: a statement on the request's tags is left out if a Deny and matches on
its other conditions if an Allow, so the gate never refuses what the tags could allow), then
exactly by its handler once it has parsed them, before it changes anything. So is a POST form,
whose key and fields the gate does not see (an Allow that may match admits it for now, a Deny
waits): its handler decides it as the PutObject of its key with its fields.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
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
#: The condition key prefix of a tag the request sets (lower case; the tag key follows), and
#: the key of the set of the keys it sets (multi-valued: under a set operator alone).
REQUEST_TAG = "s3:requestobjecttag/"
REQUEST_TAG_KEYS = "s3:requestobjecttagkeys"
#: The actions whose request context carries them (AWS's service authorization reference):
#: the writes that set an object's tags (PutObject: x-amz-tagging, a POST form's field).
REQUEST_TAGGED_ACTIONS = frozenset(
    {"s3:putobject", "s3:putobjecttagging", "s3:putobjectversiontagging"}
)
#: IAM's set operators ("ForAnyValue:StringEquals"...), on REQUEST_TAG_KEYS alone.
ANY_VALUE, ALL_VALUES = "ForAnyValue", "ForAllValues"
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
    #: The tags the request sets (s3:RequestObjectTag/<key>, s3:RequestObjectTagKeys), for an
    #: action of `REQUEST_TAGGED_ACTIONS`; None or empty: it sets none (the keys absent).
    request_tags: Mapping[str, str] | None = None
    #: What the request sets is in its body, not read yet (the gate's view of a
    #: PutObjectTagging, or of a POST form: module docstring), decided again by its handler:
    #: statements on its tags are decided later (resource None: an Allow that may match
    #: admits for now, a Deny waits).
    deferred: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    operator: str  #: without IfExists
    key: str  #: lower case, but for the tag key of s3:existingobjecttag/<tag key>
    values: tuple[str, ...]
    #: ...IfExists: the condition holds where the request has no such key
    if_exists: bool = False
    #: ANY_VALUE or ALL_VALUES: a set operator (REQUEST_TAG_KEYS alone); "": none
    quantifier: str = ""

    @property
    def tag(self) -> str | None:
        """The tag key of an s3:ExistingObjectTag condition (None: another key)."""
        return self.key[len(EXISTING_TAG) :] if self.key.startswith(EXISTING_TAG) else None

    @property
    def request_tag(self) -> str | None:
        """The tag key of an s3:RequestObjectTag condition (None: another key)."""
        return self.key[len(REQUEST_TAG) :] if self.key.startswith(REQUEST_TAG) else None

    @property
    def on_request_tags(self) -> bool:
        """Whether the condition is on the tags the request sets."""
        return self.key == REQUEST_TAG_KEYS or self.key.startswith(REQUEST_TAG)


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

    @property
    def needs_request_tags(self) -> bool:
        """Whether a condition is on the tags the request sets."""
        return any(condition.on_request_tags for condition in self.conditions)


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    statements: tuple[Statement, ...]
    #: Whether a statement has a condition on the tags the request sets (worked out once:
    #: without one, the gate parses no x-amz-tagging header).
    request_tagged: bool = False


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
    statements = tuple(_statement(item, bucket) for item in items)
    return Policy(statements, any(s.needs_request_tags for s in statements))


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
        quantifier, _, operator = (
            written.rpartition(":") if isinstance(written, str) else ("", "", "")
        )
        if_exists = operator.endswith(IF_EXISTS)
        if if_exists:
            operator = operator[: -len(IF_EXISTS)]
        # Null, Bool, Numeric..., a set operator on anything but a string operator: refused
        if operator not in _OPERATORS or quantifier not in ("", ANY_VALUE, ALL_VALUES):
            raise malformed(f"Unsupported condition operator {written}")
        if not isinstance(block, dict) or not block:
            raise malformed(f"Condition {operator} must map keys to values")
        for key, values in block.items():
            name = key.lower() if isinstance(key, str) else ""
            prefix = next((p for p in (EXISTING_TAG, REQUEST_TAG) if name.startswith(p)), "")
            if prefix and 0 < len(name) - len(prefix) <= _MAX_TAG_KEY:
                name = prefix + key[len(prefix) :]  # S3's tag keys: case-sensitive
            elif name not in _KEYS and name != REQUEST_TAG_KEYS:
                raise malformed(f"Unsupported condition key {key}")
            # The one multi-valued key takes a set operator, and nothing else does (IAM's
            # single-valued operators on it are ambiguous, set ones elsewhere not needed).
            if quantifier and name != REQUEST_TAG_KEYS:
                raise malformed(f"Unsupported condition operator {written} on {key}")
            if not quantifier and name == REQUEST_TAG_KEYS:
                raise malformed(
                    f"Condition key {key} needs a ForAnyValue: or ForAllValues: operator"
                )
            if (name == "aws:sourceip") != (operator in _IP_OPERATORS):
                raise malformed(f"Condition {operator} does not apply to {key}")
            items = _strings(values, f"Condition {key}")
            if operator in _IP_OPERATORS:
                for value in items:
                    try:
                        ipaddress.ip_network(value, strict=False)
                    except ValueError:
                        raise malformed(f"Invalid IP address range {value}") from None
            out.append(Condition(operator, name, tuple(items), if_exists, quantifier))
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
    key is absent where the object has no such tag, or the request no tags (`Request.tags`);
    a request tag's where the request sets no such tag, or none (`Request.request_tags`)."""
    negated = condition.operator.startswith(("StringNot", "NotIp"))
    action = request.action.lower()
    existing = request.tags if action in TAGGED_ACTIONS else None
    sets = request.request_tags if action in REQUEST_TAGGED_ACTIONS else None
    if condition.quantifier:
        return _holds_for_set(condition, sorted(sets or ()), negated)
    tag, request_tag = condition.tag, condition.request_tag
    if tag is not None:
        value = existing.get(tag) if existing is not None else None
    elif request_tag is not None:
        value = sets.get(request_tag) if sets else None
    else:
        value = request.context.get(condition.key)
    if value is None:
        return negated or condition.if_exists
    matched = any(_value_matches(condition.operator, value, w) for w in condition.values)
    return matched != negated


def _holds_for_set(condition: Condition, values: list[str], negated: bool) -> bool:
    """IAM's set operators on the request's values: each value matches when one of the
    condition's does (a negated operator: when none does); ForAllValues holds when every value
    matches, and where there are none; ForAnyValue when one does (none: with ...IfExists)."""
    if not values:
        return condition.quantifier == ALL_VALUES or condition.if_exists
    each = [
        any(_value_matches(condition.operator, value, w) for w in condition.values) != negated
        for value in values
    ]
    return all(each) if condition.quantifier == ALL_VALUES else any(each)


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
        # (unless the handler decides again, seeing them: then an Allow may admit for now)
        return statement.effect is (Decision.ALLOW if request.deferred else Decision.DENY)
    conditions = statement.conditions
    if request.deferred and statement.needs_request_tags:  # decided once the tags are read
        if statement.effect is Decision.DENY:
            return False
        conditions = tuple(c for c in conditions if not c.on_request_tags)
    return all(_holds(condition, request) for condition in conditions)


def wants_tags(policy: Policy, request: Request, *, deny_only: bool) -> bool:
    """Whether evaluating request needs the object's tags: some statement with a condition on
    them may match it (a Deny alone when deny_only: an Allow would change nothing). Never
    for an action without s3:ExistingObjectTag, nor a request naming no single object."""
    return _wants(policy, request, TAGGED_ACTIONS, lambda s: s.needs_tags, deny_only)


def wants_request_tags(policy: Policy, request: Request, *, deny_only: bool) -> bool:
    """Whether the tags the request sets could change its decision: some statement with a
    condition on them may match it (a Deny alone when deny_only). Never for an action without
    s3:RequestObjectTag, nor a request naming no single object."""
    return _wants(
        policy, request, REQUEST_TAGGED_ACTIONS, lambda s: s.needs_request_tags, deny_only
    )


def _wants(
    policy: Policy,
    request: Request,
    actions: frozenset[str],
    needs: Callable[[Statement], bool],
    deny_only: bool,
) -> bool:
    """Whether a statement that needs (tags) may match request, an action of actions naming
    one object (a Deny alone when deny_only)."""
    if request.resource is None or request.action.lower() not in actions:
        return False
    return any(
        needs(statement)
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
