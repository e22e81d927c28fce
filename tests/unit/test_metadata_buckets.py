"""The metadata service's CreateBucket acts for its caller: a user's own tenant, the tenant a
gateway or an admin names (kvtier.principal), never one a user names for someone else."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import errors, principal
from kvtier.proto.metadata.v1 import metadata_pb2 as pb
from services.metadata import buckets


class _Store:
    """A BucketStore that keeps what it is asked to create."""

    def __init__(self) -> None:
        self.created: list[pb.BucketInfo] = []

    async def create(self, name: str, tenant: str, created_ms: int, kind: Any) -> pb.BucketInfo:
        info = pb.BucketInfo(name=name, tenant=tenant, created_at_unix_ms=created_ms, kind=kind)
        self.created.append(info)
        return info


async def _create(who: principal.Principal, tenant: str) -> str:
    service = buckets.BucketService(_Store(), clock=lambda: 1.0)  # type: ignore[arg-type]
    token = principal.bind(who)
    try:
        reply = await service.create_bucket(pb.CreateBucketRequest(name="bkt", tenant=tenant))
    finally:
        principal.unbind(token)
    return reply.bucket.tenant


USER = principal.user("AK", "team-a", is_admin=False, shm_trusted=False)
ADMIN = principal.user("AKADMIN", "ops", is_admin=True, shm_trusted=False)
GATEWAY = principal.service("gateway", "gateway-1")


@pytest.mark.parametrize(
    ("who", "tenant", "owner"),
    [
        (GATEWAY, "team-b", "team-b"),
        (GATEWAY, "", "default"),
        (ADMIN, "team-b", "team-b"),
        (ADMIN, "", "ops"),
        (USER, "", "team-a"),
        (USER, "team-a", "team-a"),
        (principal.INSECURE, "", "default"),
    ],
)
async def test_buckets_are_created_for_the_tenant_the_caller_acts_for(
    who: principal.Principal, tenant: str, owner: str
) -> None:
    assert await _create(who, tenant) == owner


async def test_a_user_may_not_create_for_another_tenant_and_nobody_anonymously() -> None:
    with pytest.raises(errors.PermissionDenied):
        await _create(USER, "team-b")
    with pytest.raises(errors.Unauthenticated):
        await _create(principal.ANONYMOUS, "team-b")
    with pytest.raises(errors.InvalidArgument):
        await _create(GATEWAY, "bad/tenant")
