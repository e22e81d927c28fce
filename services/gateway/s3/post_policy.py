"""The POST policy of a browser-form upload (POST Object): its signature, its document and its
conditions, as S3 checks them. Pure logic; the form itself is read by `post_object`.

- Signature Version 4: `x-amz-signature` is the hex HMAC-SHA256 of the base64 policy *as sent*
  under the signing key of `x-amz-credential`'s day and region (`sigv4.signing_key`), checked
  before the policy is decoded. Version 2: `signature` is the base64 HMAC-SHA1 of it
  (`presign_v2.hmac_sha1`).
- The document is strict JSON: an object holding exactly `expiration` (ISO 8601 UTC, e.g.
  `2026-12-06T12:00:00.000Z`) and `conditions` (a list), names case-sensitive. Anything else is
  400 InvalidPolicyDocument ("Invalid Policy: ..."); so is base64 that does not decode.
- Conditions: `{"field": "value"}` (exactly one property), `["eq", "$field", value]`,
  `["starts-with", "$field", prefix]` (a Content-Type holding commas is a list: each entry must
  start with the prefix) and `["content-length-range", min, max]` (inclusive, integers or
  digit strings). Operators and field names are case-insensitive, values case-sensitive. A
  condition on a field the form lacks fails, as on S3. Failures are 403 AccessDenied
  "Invalid according to Policy: ..."; so is an expired policy and a form field no condition
  names (but x-amz-signature, signature, AWSAccessKeyId, policy, file and x-ignore-*).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from services.gateway.s3 import params, presign_v2, s3errors, sigv4

#: Fields no condition needs to name (lowercase).
EXEMPT = frozenset({"x-amz-signature", "signature", "awsaccesskeyid", "policy", "file"})
IGNORED_PREFIX = "x-ignore-"
_EXPIRATION = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z")
_TOP_LEVEL = ("expiration", "conditions")
_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_DAY = re.compile(r"[0-9]{8}")


def invalid(message: str) -> s3errors.S3Error:
    """A policy document S3 cannot read (400)."""
    return s3errors.S3Error("InvalidPolicyDocument", f"Invalid Policy: {message}")


def denied(message: str) -> s3errors.S3Error:
    """A form the policy does not allow (403)."""
    return s3errors.S3Error("AccessDenied", f"Invalid according to Policy: {message}")


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """An `eq` or `starts-with` condition: field is lowercase, without its '$'."""

    op: str  #: "eq" or "starts-with"
    field: str
    value: str
    text: str  #: the condition as S3 reports a failure: ["eq", "$key", "v"]


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """A decoded POST policy."""

    expiration: float  #: seconds since the epoch
    conditions: tuple[Condition, ...]
    min_bytes: int = 0
    max_bytes: int | None = None  #: None: no content-length-range


def parse(policy_b64: str) -> Policy:
    """The policy of a form's `policy` field; InvalidPolicyDocument when it is not one."""
    try:
        raw = base64.b64decode(policy_b64.encode("ascii"), validate=True)
        text = raw.decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        raise invalid("invalid Base64 encoding.") from None
    try:
        document = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise invalid("Invalid JSON.") from None
    if not isinstance(document, dict):
        raise invalid("Invalid JSON.")
    for name in document:
        if name not in _TOP_LEVEL:
            raise invalid(f"Unexpected: '{name.lower()}'")
    if "expiration" not in document:
        raise invalid("Policy missing expiration.")
    expiration = _expiration(document["expiration"])
    conditions = document.get("conditions")
    if conditions is None:
        raise invalid("Policy missing conditions.")
    if not isinstance(conditions, list):
        raise invalid("Invalid 'conditions' value: must be a List.")
    found: list[Condition] = []
    low, high = 0, None
    for entry in conditions:
        if isinstance(entry, list) and entry and str(entry[0]).lower() == "content-length-range":
            low, high = _length_range(entry)
        else:
            found.append(_condition(entry))
    return Policy(expiration, tuple(found), low, high)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _expiration(value: Any) -> float:
    if not isinstance(value, str) or not _EXPIRATION.fullmatch(value):
        raise invalid(f"Invalid 'expiration' value: '{value}'")
    whole = value[:19]
    try:
        stamp = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise invalid(f"Invalid 'expiration' value: '{value}'") from None
    fraction = float("0" + value[19:-1]) if len(value) > 20 else 0.0
    return stamp.replace(tzinfo=datetime.UTC).timestamp() + fraction


def _condition(entry: Any) -> Condition:
    if isinstance(entry, dict):
        if len(entry) != 1:
            raise invalid(
                "Invalid Simple-Condition: Simple-Conditions must have exactly one property "
                "specified."
            )
        ((name, value),) = entry.items()
        if not isinstance(value, str):
            raise invalid("Invalid Simple-Condition: value must be a string.")
        return Condition("eq", name.lower(), value, json.dumps(["eq", f"${name}", value]))
    if not isinstance(entry, list):
        raise invalid("Invalid condition test: must be a List or Object.")
    if not entry or not isinstance(entry[0], str):
        raise invalid("Invalid Condition: missing operation identifier.")
    op = entry[0].lower()
    if op not in ("eq", "starts-with"):
        raise invalid(f"Invalid Condition: unknown operation '{entry[0]}'.")
    if len(entry) != 3:
        raise invalid(f"Invalid {entry[0]}: wrong number of arguments.")
    if not all(isinstance(item, str) for item in entry[1:]):
        raise invalid("Invalid JSON.")
    reference, value = entry[1], entry[2]
    # A reference without its '$' names no field: the condition can only fail (as on S3).
    field = reference[1:].lower() if reference.startswith("$") else "\x00" + reference
    return Condition(op, field, value, json.dumps(entry))


def _length_range(entry: list[Any]) -> tuple[int, int]:
    if len(entry) != 3:
        raise invalid(f"Invalid {entry[0]}: wrong number of arguments.")
    bounds: list[int] = []
    for item in entry[1:]:
        if isinstance(item, bool | float):
            raise invalid("Invalid JSON.")
        if isinstance(item, int):
            if item < 0:
                raise invalid(f"Invalid {entry[0]}: the bounds may not be negative.")
            bounds.append(item)
            continue
        number = params.uint(item) if isinstance(item, str) else None
        if number is None:  # S3 answers a bound that is not a number as a failed condition
            raise denied(f"Policy Condition failed: {json.dumps(entry)}")
        bounds.append(number)
    return bounds[0], bounds[1]


def check(policy: Policy, fields: Mapping[str, str], sent: Sequence[str], *, now: float) -> None:
    """AccessDenied unless the policy is current, every condition holds for fields (lowercase
    names; `bucket` is the request's) and some condition names each field sent (names as sent,
    in order)."""
    if now > policy.expiration:
        raise denied("Policy expired.")
    for condition in policy.conditions:
        if not _holds(condition, fields.get(condition.field)):
            raise denied(f"Policy Condition failed: {condition.text}")
    named = {c.field for c in policy.conditions}
    extra = [
        name
        for name in sent
        if (lower := name.lower()) not in EXEMPT
        and not lower.startswith(IGNORED_PREFIX)
        and lower not in named
    ]
    if extra:
        raise denied(f"Extra input fields: {', '.join(extra)}")


def _holds(condition: Condition, value: str | None) -> bool:
    if value is None:
        return False
    if condition.op == "eq":
        return value == condition.value
    if condition.field == "content-type":
        return all(v.strip().startswith(condition.value) for v in value.split(","))
    return value.startswith(condition.value)


def argument(message: str) -> s3errors.S3Error:
    """A form field S3 refuses (400 InvalidArgument)."""
    return s3errors.S3Error("InvalidArgument", message)


def credential(text: str, amz_date: str, algorithm: str, *, region: str) -> tuple[str, str]:
    """(access key, day) of a V4 form's x-amz-credential `AK/YYYYMMDD/region/s3/aws4_request`,
    its x-amz-date and x-amz-algorithm checked for form (InvalidArgument)."""
    if algorithm != sigv4.ALGORITHM:
        raise argument(f'X-Amz-Algorithm only supports "{sigv4.ALGORITHM}"')
    if not _AMZ_DATE.fullmatch(amz_date):
        raise argument("X-Amz-Date must be formated via ISO8601 Long format")
    parts = text.split("/")
    if len(parts) != 5 or not _DAY.fullmatch(parts[1]):
        raise argument(
            'the Credential is mal-formed; expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/'
            'aws4_request".'
        )
    access_key, day, scope_region, service, terminal = parts
    if not access_key:
        raise argument("a non-empty Access Key (AKID) must be provided in the credential.")
    if scope_region != region:
        raise argument(f"the region '{scope_region}' is wrong; expecting '{region}'")
    if service != sigv4.SERVICE:
        raise argument(f'incorrect service "{service}". This endpoint belongs to "s3".')
    if terminal != sigv4.TERMINAL:
        raise argument(f'incorrect terminal "{terminal}". This endpoint uses "aws4_request".')
    return access_key, day


def _mismatch() -> s3errors.S3Error:
    return s3errors.S3Error(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    )


def verify_v4(policy_b64: str, signature: str, secret: str, *, day: str, region: str) -> None:
    """SignatureDoesNotMatch unless signature is the V4 signature of the policy as sent."""
    expected = sigv4.sign(sigv4.signing_key(secret, day, region), policy_b64).encode()
    if not hmac.compare_digest(expected, sigv4.signature_bytes(signature)):
        raise _mismatch()


def verify_v2(policy_b64: str, signature: str, secret: str) -> None:
    """SignatureDoesNotMatch unless signature is the V2 signature of the policy as sent."""
    expected = presign_v2.hmac_sha1(secret, policy_b64.encode())
    if not hmac.compare_digest(expected, sigv4.signature_bytes(signature)):
        raise _mismatch()
