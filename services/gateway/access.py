"""Who may use what in the gateway's object front (`front.ObjectFront`): a bucket's tenant, the
callers acting for it, the owner of a begun write, and the ACL admission of the S3 request
being served (`Admission`: only the S3 front admits, after its grant check)."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable

from kvtier import errors, principal
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.metadata.v1 import metadata_pb2

#: The service role that may use the durable KV bucket.
KV_ROLE = "kvcache"


def denied(what: str) -> errors.PermissionDenied:
    """PermissionDenied with S3's AccessDenied."""
    return errors.PermissionDenied(what, reason="AccessDenied")


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """What an ACL grant lets the request being served do in one bucket that its caller may
    not use otherwise (an anonymous caller, another tenant's user). Only the S3 front admits,
    once it checked the grant for the request's operation (`s3.acl_ops`); gRPC callers never
    are. Scopes: "read" (list the objects), "write" (put, delete and multipart-upload
    objects), "object" (read an object or its ACL, or set its ACL: `check_object` decides on
    the version's own ACL), "read_acp" / "write_acp" (the bucket's ACL), `OWN` (nothing: the
    caller's own bucket, admitted for `source` alone)."""

    bucket: str
    scope: str
    #: For scope "object": raises PermissionDenied unless the version's ACL allows.
    check_object: Callable[[acl_pb2.Acl], None] | None = None
    #: Whether a missing object may be told apart (NoSuchKey) from a refusal (AccessDenied):
    #: the caller may list the bucket.
    may_list: bool = False
    #: A copy's source bucket, when the caller may not use it (CopyObject, UploadPartCopy): an
    #: "object" admission there, which only the front's copy-source reads honour.
    source: Admission | None = None


#: The scope of an admission to the caller's own bucket (it carries a copy's `source` only).
OWN = "own"


_admission: contextvars.ContextVar[Admission | None] = contextvars.ContextVar(
    "kvtier_gateway_admission", default=None
)


def admit(admission: Admission) -> contextvars.Token[Admission | None]:
    """Admit the request being served (the S3 front, after its ACL check)."""
    return _admission.set(admission)


def unadmit(token: contextvars.Token[Admission | None]) -> None:
    """Undo an admit()."""
    _admission.reset(token)


def current() -> Admission | None:
    """The admission of the request being served (None: not admitted)."""
    return _admission.get()


def is_kv_node(caller: principal.Principal) -> bool:
    """Whether caller is a kvcache node: privileged, but here only for the durable KV bucket
    (docs/security.md), so that a kvcache certificate reaches no tenant's bucket or object."""
    return caller.kind is principal.Kind.SERVICE and caller.role == KV_ROLE


def may_use(caller: principal.Principal, tenant: str) -> bool:
    """Whether caller may use a resource of tenant ("": a resource of no tenant, privileged
    callers only). A kvcache node only the resources of no tenant (its own writes into the
    durable KV bucket), never a tenant's."""
    if is_kv_node(caller):
        return not tenant
    return caller.privileged or (bool(tenant) and caller.may_use(tenant))


def may_use_durable(caller: principal.Principal) -> bool:
    """Whether caller may use the durable KV bucket: kvcache nodes (or an insecure cluster)."""
    return caller.kind is principal.Kind.INSECURE or is_kv_node(caller)


def owner_of(caller: principal.Principal) -> str:
    """The tenant a write begun by caller belongs to ("" for callers acting for no tenant)."""
    return caller.tenant if caller.kind is principal.Kind.USER else ""


def writer_of(caller: principal.Principal, tenant: str) -> str:
    """The tenant recorded as the author of what caller writes into a bucket of tenant (S3's
    initiator of an upload, owner of a delete marker): caller's own tenant when it is a user
    of another one (admitted by a grant or a policy); "" (the bucket's) for the bucket's
    tenant's users and for callers of no tenant (anonymous, services)."""
    return "" if may_use(caller, tenant) else owner_of(caller)


def marker_owner(caller: principal.Principal, info: metadata_pb2.BucketInfo) -> str:
    """The tenant recorded as the owner of a delete marker caller writes into the bucket (S3:
    its deleter, `writer_of`); "" (the bucket's tenant) where BucketOwnerEnforced gives the
    bucket's tenant everything in it."""
    enforced = metadata_pb2.OBJECT_OWNERSHIP_BUCKET_OWNER_ENFORCED
    if info.ownership_controls.object_ownership == enforced:
        return ""
    return writer_of(caller, info.tenant)
