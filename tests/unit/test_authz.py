"""The authorization table: every RPC of every kvtier service has a rule, and the rules mean
what docs/security.md says."""

from __future__ import annotations

import pytest

from kvtier import authz, errors, principal
from kvtier.proto.common.v1 import access_pb2

USER = principal.user("AK", "team-a", is_admin=False, shm_trusted=False)
ADMIN = principal.user("ADM", "default", is_admin=True, shm_trusted=False)
OPERATOR = principal.service("operator", "alice")


def test_every_rpc_has_an_access_rule() -> None:
    """A new RPC without `option (kvtier.common.v1.access)` fails here (and is refused at run
    time): the table is complete by construction."""
    missing = [authz.path(m) for m in authz.methods() if authz.rule_of(m) is None]
    assert missing == []
    assert len(list(authz.methods())) >= 50  # every service's RPCs were found


def test_rules_name_only_known_roles_and_public_only_for_the_token_exchange() -> None:
    public = [path for path, rule in authz.table().items() if rule.public]
    assert sorted(public) == sorted(
        [
            "/kvtier.auth.v1.AuthService/GetSessionToken",
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.health.v1.Health/List",
        ]
    )
    for method in authz.methods():
        access = method.GetOptions().Extensions[access_pb2.access]
        assert set(access.services) <= set(principal.SERVICE_ROLES), authz.path(method)


@pytest.mark.parametrize(
    "path",
    [
        "/kvtier.metadata.v1.MetadataService/CreateUser",
        "/kvtier.metadata.v1.MetadataService/DeleteUser",
        "/kvtier.metadata.v1.MetadataService/ListUsers",
        "/kvtier.gateway.v1.AdminService/Heal",
        "/kvtier.gateway.v1.AdminService/DrainPool",
        "/kvtier.gateway.v1.AdminService/RemovePool",
        "/kvtier.gateway.v1.AdminService/ListHealQueue",
        "/kvtier.kvcache.v1.KVCacheService/SetQuota",
        "/kvtier.kvcache.v1.KVCacheService/SetNamespacePolicy",
        "/kvtier.kvcache.v1.KVCacheService/ListSettings",
        "/kvtier.kvcache.v1.KVCacheService/AuthorizeEventsSubscriber",
    ],
)
def test_admin_rpcs_refuse_tenant_users_and_services(path: str) -> None:
    with pytest.raises(errors.PermissionDenied):
        authz.check(path, USER)
    with pytest.raises(errors.PermissionDenied):
        authz.check(path, principal.service("gateway", "gw"))
    authz.check(path, ADMIN)
    authz.check(path, OPERATOR)


@pytest.mark.parametrize(
    "path",
    [
        "/kvtier.datanode.v1.ShardService/CommitWrite",
        "/kvtier.datanode.v1.ShardService/DeleteShard",
        "/kvtier.metadata.v1.MetadataService/DeleteBucket",
        "/kvtier.metadata.v1.MetadataService/CreateBucket",
        "/kvtier.metadata.v1.MetadataService/SetPoolState",
    ],
)
def test_service_rpcs_refuse_tenant_users(path: str) -> None:
    with pytest.raises(errors.PermissionDenied):
        authz.check(path, USER)
    authz.check(path, principal.service("gateway", "gw"))
    with pytest.raises(errors.PermissionDenied):
        authz.check(path, principal.service("kvcache", "kv"))


def test_anonymous_callers_are_unauthenticated_except_for_public_rpcs() -> None:
    with pytest.raises(errors.Unauthenticated):
        authz.check("/kvtier.kvcache.v1.KVCacheService/BatchGet", principal.ANONYMOUS)
    authz.check("/grpc.health.v1.Health/Check", principal.ANONYMOUS)
    authz.check("/kvtier.auth.v1.AuthService/GetSessionToken", principal.ANONYMOUS)


def test_unknown_rpc_is_refused() -> None:
    with pytest.raises(errors.PermissionDenied, match="no authorization rule"):
        authz.check("/kvtier.made.up.v1.Nope/Do", OPERATOR)
    authz.check("/kvtier.made.up.v1.Nope/Do", principal.INSECURE)  # no authentication at all


def test_insecure_principal_may_call_everything() -> None:
    for path in authz.table():
        authz.check(path, principal.INSECURE)


def test_acting_tenant() -> None:
    assert USER.acting_tenant("") == "team-a"
    assert USER.acting_tenant("team-a") == "team-a"
    with pytest.raises(errors.PermissionDenied):
        USER.acting_tenant("team-b")
    assert ADMIN.acting_tenant("team-b") == "team-b"
    assert ADMIN.acting_tenant("") == "default"
    assert OPERATOR.acting_tenant("team-b") == "team-b"
    with pytest.raises(errors.Unauthenticated):
        principal.ANONYMOUS.acting_tenant("")
    with pytest.raises(errors.InvalidArgument):
        OPERATOR.acting_tenant("a/b")
    assert USER.may_use("team-a")
    assert not USER.may_use("team-b")
    with pytest.raises(errors.PermissionDenied):
        principal.service("etcd", "e")


def test_pool_states_are_set_by_gateways_only() -> None:
    """An operator drains and removes through the gateway (which moves the objects first);
    setting a pool's state at the metadata service directly could retire a pool with data."""
    path = "/kvtier.metadata.v1.MetadataService/SetPoolState"
    for who in (USER, ADMIN, OPERATOR):
        with pytest.raises(errors.PermissionDenied):
            authz.check(path, who)
