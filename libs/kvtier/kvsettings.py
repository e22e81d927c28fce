"""Operator settings of the KV tier, kept in etcd so that every kvcache node has them and a
restarted node gets them back: tenant quotas, namespace default TTLs and namespace durability
(`SetQuota`, `SetNamespaceTTL`, `SetNamespacePolicy`; `kvtier admin kv ...`).

`<prefix>/kv-settings/quota/<tenant>`, `.../ttl/<tenant>/<namespace hex>` and
`.../policy/<tenant>/<namespace hex>` each hold the serialized request that set them (the
namespace name is hex: any bytes, never another key). The node that serves the RPC checks the
request, stores it here, then applies it; every node watches the prefix and applies what it
finds, at start and after each change. A setting back to its default (quota 0, TTL 0,
durability NONE) is stored like any other: it must override a node's configured one.

`KVSettingsStore` runs every operation through an `EtcdMembership` session (errors.Unavailable
when etcd is away).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from kvtier import membership
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import dataplane

#: What a setting is: the request that set it.
Setting = pb.SetQuotaRequest | pb.SetNamespaceTTLRequest | pb.SetNamespacePolicyRequest

_KINDS: dict[str, type[Setting]] = {
    "quota": pb.SetQuotaRequest,
    "ttl": pb.SetNamespaceTTLRequest,
    "policy": pb.SetNamespacePolicyRequest,
}


def settings_prefix(prefix: str) -> bytes:
    """Key prefix under which the KV settings live."""
    return f"{prefix}/kv-settings/".encode()


def setting_key(prefix: str, setting: Setting) -> bytes:
    """The key of one setting (InvalidArgument for a tenant that is not a valid name)."""
    base = settings_prefix(prefix).decode()
    if isinstance(setting, pb.SetQuotaRequest):
        return f"{base}quota/{dataplane.check_tenant(setting.tenant)}".encode()
    kind = "ttl" if isinstance(setting, pb.SetNamespaceTTLRequest) else "policy"
    tenant = dataplane.check_tenant(setting.namespace.tenant)
    return f"{base}{kind}/{tenant}/{setting.namespace.name.encode().hex()}".encode()


def _decode(prefix: str, key: bytes, value: bytes) -> Setting | None:
    kind = key[len(settings_prefix(prefix)) :].decode(errors="replace").split("/", 1)[0]
    cls = _KINDS.get(kind)
    if cls is None:
        return None
    setting = cls()
    setting.ParseFromString(value)
    return setting


class KVSettingsStore:
    """The KV settings of one cluster, over an EtcdMembership session."""

    def __init__(self, etcd: membership.EtcdMembership) -> None:
        self._etcd = etcd

    async def save(self, setting: Setting) -> None:
        """Store a setting (replacing the one of the same tenant / namespace and kind)."""
        key, value = setting_key(self._etcd.prefix, setting), setting.SerializeToString()
        await self._etcd.call(lambda client: client.put(key, value))

    async def siblings(
        self, setting: pb.SetNamespaceTTLRequest | pb.SetNamespacePolicyRequest
    ) -> tuple[int, bool]:
        """How many namespace settings of setting's kind its tenant has stored, and whether
        setting's own key is one of them (keys only: no values read)."""
        key = setting_key(self._etcd.prefix, setting)
        tenant_prefix = key[: key.rfind(b"/") + 1]
        found = await self._etcd.call(
            lambda client: client.get_prefix(tenant_prefix, keys_only=True)
        )
        keys = {bytes(kv.key) for kv in found}
        return len(keys), key in keys

    async def load(self) -> list[Setting]:
        """Every setting, in key order (quotas, then policies, then TTLs)."""
        prefix = settings_prefix(self._etcd.prefix)
        found = await self._etcd.call(lambda client: client.get_prefix(prefix))
        pairs = sorted((bytes(kv.key), bytes(kv.value)) for kv in found)
        settings = (_decode(self._etcd.prefix, k, v) for k, v in pairs)
        return [s for s in settings if s is not None]

    async def watch(self) -> AsyncGenerator[list[Setting], None]:
        """Every setting, now and after every change; survives etcd outages."""
        prefix = settings_prefix(self._etcd.prefix)
        async for snapshot in self._etcd.watch_changes(prefix, True, self.load):
            yield snapshot
