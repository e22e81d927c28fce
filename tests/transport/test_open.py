"""OpenDataPlane: who may open a session, the principal minted for it, the transport it gets."""

from __future__ import annotations

import pytest

from kvtier import errors, principal
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import dataplane, grants, registry

USER = principal.user("AKID1", "acme", is_admin=False, shm_trusted=False)
TRUSTED_USER = principal.user("AKID2", "acme", is_admin=False, shm_trusted=True)
ADMIN = principal.user("ROOT", "ops", is_admin=True, shm_trusted=False)
GATEWAY = principal.service("gateway", "gw-1")
OPERATOR = principal.service("operator", "alice")


def _plane(**kwargs: object) -> dataplane.DataPlane:
    """A data plane that offers tcp and shm (nothing listens: open() only negotiates)."""
    plane = dataplane.DataPlane("n1", ["tcp", "shm"], registry.ServerSettings(), **kwargs)  # type: ignore[arg-type]
    for name in ("tcp", "shm"):
        plane.capabilities.endpoints.append(common_pb2.TransportEndpoint(name=name, address="x"))
    return plane


def _open(
    plane: dataplane.DataPlane, caller: principal.Principal, tenant: str = "", *allowed: str
) -> common_pb2.OpenDataPlaneResponse:
    request = common_pb2.OpenDataPlaneRequest(
        client_id="host:42", tenant=tenant, allowed=allowed,
        client=registry.client_capabilities(["tcp", "shm"]),
    )  # fmt: skip
    return plane.open(request, caller)


def _head(reply: common_pb2.OpenDataPlaneResponse) -> str:
    """The principal without its random suffix."""
    head, _, suffix = reply.principal.rpartition("/")
    assert len(suffix) == 16
    return head


@pytest.mark.parametrize(
    ("caller", "tenant", "expected"),
    [
        (USER, "", "acme/AKID1"),
        (USER, "acme", "acme/AKID1"),
        (ADMIN, "", "ops/ROOT"),
        (ADMIN, "acme", "acme/admin:ROOT"),
        (GATEWAY, "", "@gateway/gw-1"),
        (GATEWAY, "acme", "acme/gateway:gw-1"),
        (OPERATOR, "", "@operator/alice"),
        (principal.INSECURE, "", "default/host:42"),
        (principal.INSECURE, "acme", "acme/host:42"),
    ],
)
def test_the_session_principal_is_minted_from_the_caller(
    caller: principal.Principal, tenant: str, expected: str
) -> None:
    plane = _plane()
    reply = _open(plane, caller, tenant)
    assert _head(reply) == expected
    assert dataplane.tenant_of(reply.principal) == expected.split("/")[0]
    assert plane.issuer.check_token(reply.token, reply.transport) == reply.principal
    assert _open(plane, caller, tenant).principal != reply.principal  # a fresh suffix each time


def test_callers_that_may_not_open_are_refused() -> None:
    plane = _plane()
    with pytest.raises(errors.Unauthenticated):
        _open(plane, principal.ANONYMOUS)
    with pytest.raises(errors.PermissionDenied, match="may not act for tenant other"):
        _open(plane, USER, "other")
    with pytest.raises(errors.InvalidArgument):
        _open(plane, GATEWAY, "no/slashes")
    with pytest.raises(errors.InvalidArgument, match="client_id"):
        plane.open(common_pb2.OpenDataPlaneRequest(), principal.INSECURE)
    gateways_only = _plane(may_open=lambda p: p.role in ("gateway", "operator"))
    assert _open(gateways_only, GATEWAY).transport == "shm"
    with pytest.raises(errors.PermissionDenied, match=r"user AKID1 .* may not open"):
        _open(gateways_only, USER)


def test_shm_only_for_trusted_callers_and_tokens_bound_to_their_transport() -> None:
    plane = _plane()
    untrusted = _open(plane, USER)
    assert untrusted.transport == "tcp"  # shm is offered and preferred, but not to this caller
    with pytest.raises(errors.PermissionDenied, match="trusted for shared memory"):
        _open(plane, USER, "", "shm")
    for caller in (TRUSTED_USER, GATEWAY, OPERATOR, principal.INSECURE):
        trusted = _open(plane, caller)
        assert trusted.transport == "shm"
        with pytest.raises(errors.PermissionDenied, match="issued for shm, not tcp"):
            plane.issuer.check_token(trusted.token, "tcp")
    with pytest.raises(errors.PermissionDenied, match="issued for tcp, not shm"):
        plane.issuer.check_token(untrusted.token, "shm")


def test_caller_names_cannot_add_principal_parts() -> None:
    plane = _plane()
    sneaky = principal.user("AK/other-tenant", "acme", is_admin=False, shm_trusted=False)
    reply = _open(plane, sneaky)
    assert _head(reply) == "acme/AK_other-tenant"
    assert grants.identity_of(reply.principal) == "acme/AK_other-tenant"
    request = common_pb2.OpenDataPlaneRequest(
        client_id="a/b\n" + "x" * 500, client=registry.client_capabilities(["tcp"])
    )
    head = _head(plane.open(request, principal.INSECURE))
    assert head.count("/") == 1
    assert "\n" not in head
    assert len(head) < 200
