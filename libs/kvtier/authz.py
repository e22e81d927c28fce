"""The one authorization table: which callers may call which RPC.

The table is written in the protos, as the `kvtier.common.v1.access` option of every RPC
(protos/kvtier/common/v1/access.proto), and read here from the generated descriptors, so the
rule sits next to the RPC it guards and an RPC without one fails CI (tests/unit/test_authz.py)
and is refused at run time. The standard health service is public (liveness probes; it reveals
only SERVING or NOT_SERVING); reflection needs an authenticated caller.

`check(method, who)` is called by the one server interceptor (`kvtier.rpc`) before any servicer
runs. It only says whether this kind of caller may call this RPC at all; which tenant's data a
call may touch is decided by the service (`Principal.acting_tenant`, `may_use`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Iterator

from google.protobuf import descriptor

from kvtier import errors, principal
from kvtier.proto.common.v1 import access_pb2


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """Who may call one RPC."""

    services: frozenset[str] = frozenset()
    admin: bool = False
    tenant: bool = False
    public: bool = False

    def allows(self, who: principal.Principal) -> bool:
        """Whether who may call it."""
        if self.public or who.kind is principal.Kind.INSECURE:
            return True
        if who.kind is principal.Kind.SERVICE:
            return who.role in self.services
        if who.is_admin:  # operators and admin users
            return self.admin or self.tenant
        return who.kind is principal.Kind.USER and self.tenant


_HEALTH = Rule(public=True)
_ANY_AUTHENTICATED = Rule(services=frozenset(principal.SERVICE_ROLES), admin=True, tenant=True)
#: RPCs of services that are not ours (no option can be written in their protos).
BUILTIN: dict[str, Rule] = {
    "/grpc.health.v1.Health/Check": _HEALTH,
    "/grpc.health.v1.Health/Watch": _HEALTH,
    "/grpc.health.v1.Health/List": _HEALTH,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _ANY_AUTHENTICATED,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _ANY_AUTHENTICATED,
}


def _proto_modules() -> Iterator[object]:
    import kvtier.proto

    for info in pkgutil.walk_packages(kvtier.proto.__path__, "kvtier.proto."):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(info.name)


def methods() -> Iterator[descriptor.MethodDescriptor]:
    """Every RPC of every kvtier service."""
    for module in _proto_modules():
        file_desc: descriptor.FileDescriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
        for service in file_desc.services_by_name.values():
            yield from service.methods


def path(method: descriptor.MethodDescriptor) -> str:
    """The gRPC path of a method: /package.Service/Method."""
    return f"/{method.containing_service.full_name}/{method.name}"


def rule_of(method: descriptor.MethodDescriptor) -> Rule | None:
    """The method's rule from its access option (None when it has none)."""
    options = method.GetOptions()
    if not options.HasExtension(access_pb2.access):
        return None
    access = options.Extensions[access_pb2.access]
    unknown = set(access.services) - set(principal.SERVICE_ROLES)
    if unknown:
        raise ValueError(f"{path(method)}: unknown service roles {sorted(unknown)}")
    return Rule(
        services=frozenset(access.services),
        admin=access.admin,
        tenant=access.tenant,
        public=access.public,
    )


@functools.cache
def table() -> dict[str, Rule]:
    """RPC path -> rule, for every RPC with a rule (and the built-in services)."""
    rules = dict(BUILTIN)
    for method in methods():
        rule = rule_of(method)
        if rule is not None:
            rules[path(method)] = rule
    return rules


def check(method_path: str, who: principal.Principal) -> None:
    """Raise unless who may call method_path: Unauthenticated for an anonymous caller of a
    non-public RPC, PermissionDenied otherwise (also for an RPC without a rule)."""
    if who.kind is principal.Kind.INSECURE:
        return  # a cluster run without authentication (every caller has every right)
    rule = table().get(method_path)
    if rule is None:
        raise errors.PermissionDenied(f"{method_path} has no authorization rule")
    if rule.allows(who):
        return
    if not who.authenticated:
        raise errors.Unauthenticated(f"{method_path} needs credentials")
    raise errors.PermissionDenied(f"{who.describe()} may not call {method_path}")
