"""The console's calls to the cluster, always as the logged-in user.

`login()` exchanges an access key and secret for the cluster's session token at a metadata
node (the same signed request as the SDK's); `UserCluster` then calls every node with that
token on the nodes' users' ports (server-authenticated TLS, the cluster CA), so each call is
authenticated and authorized by the cluster itself, exactly as the user's own SDK call would
be. The console has no certificate and no etcd access: it cannot do more than its user.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import grpc

from kvtier import clustermap, errors, objects, rpc, security, tokens
from kvtier.cli import admin as admin_cmd
from kvtier.cli import healqueue, kvadmin
from kvtier.cli import status as status_cmd
from kvtier.clients import gateway as gateway_client
from kvtier.clients import kvcache, metadata
from kvtier.console import config, sessions
from kvtier.proto.auth.v1 import auth_pb2, auth_pb2_grpc
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2


class SessionToken(security.TokenSource):
    """A token obtained at login: sent as is, never renewed (the console forgot the secret;
    the console session ends before the token does)."""

    def __init__(self, token: str) -> None:  # no super().__init__: nothing to sign with
        self._token = token
        self.issuer_address = ""

    def invalidate(self) -> None:
        """Nothing to renew: a refused token stays refused (the user logs in again)."""

    async def token(self) -> str:
        """The login's token."""
        return self._token


def client_security(cfg: config.ConsoleConfig) -> security.ClientSecurity:
    """TLS that trusts the cluster CA and presents no certificate."""
    return security.ClientSecurity(ca_file=cfg.ca_file)


async def login(
    cfg: config.ConsoleConfig, access_key: str, secret: str
) -> auth_pb2.GetSessionTokenResponse:
    """The cluster's session token for these credentials, valid a little longer than a console
    session. Unauthenticated for a wrong key or secret, Unavailable when no metadata node
    answers."""
    duration = max(tokens.MIN_DURATION_S, math.ceil(cfg.session_ttl_s) + 60)
    duration = min(duration, tokens.MAX_DURATION_S)
    request = tokens.sign_request(access_key, secret, duration_s=duration)
    async with rpc.open_channel(cfg.metadata_address, security=client_security(cfg)) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        try:
            reply: auth_pb2.GetSessionTokenResponse = await stub.GetSessionToken(
                request, timeout=cfg.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc) from None
    return reply


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BucketRow:
    """A bucket as the buckets page shows it."""

    name: str
    tenant: str
    kind: str
    created_at_unix_ms: int


class UserCluster:
    """The cluster as one session's user sees it."""

    def __init__(self, cfg: config.ConsoleConfig, session: sessions.Session) -> None:
        self.cfg = cfg
        self.session = session
        self._security = client_security(cfg)
        self._tokens = SessionToken(session.token)

    def _metadata(self) -> metadata.MetadataClient:
        return metadata.MetadataClient(
            self.cfg.metadata_address,
            timeout_s=self.cfg.rpc_timeout_s,
            security=self._security,
            tokens=self._tokens,
        )

    async def cluster_map(self) -> common_pb2.ClusterMap:
        """The current map (any authenticated user may read it)."""
        async with self._metadata() as client:
            cmap = await client.get_cluster_map()
        if cmap is None:
            raise errors.Unavailable("the metadata service has no cluster map yet")
        return cmap

    async def overview(self) -> dict[str, Any]:
        """`kvtier status`'s state, asked as this user (status_cmd.describe)."""
        cmap = await self.cluster_map()
        return await status_cmd.describe(
            cmap, self.cfg.rpc_timeout_s, self._security, tokens=self._tokens
        )

    # Buckets and objects (the gateway's object API, data plane included).

    async def _gateway(self) -> str:
        cmap = await self.cluster_map()
        gateways = clustermap.nodes_with_role(cmap, common_pb2.NODE_ROLE_GATEWAY)
        if not gateways:
            raise errors.Unavailable("no gateway in the cluster map")
        return str(gateways[0].client_address or gateways[0].grpc_address)

    async def heal(
        self,
        target: str,
        *,
        dry_run: bool,
        limit_s: float,
        on_progress: Callable[[admin_pb2.HealProgress], None] | None = None,
    ) -> str:
        """Run `kvtier admin heal` (admins; the gateway refuses others) for at most limit_s,
        passing each progress message to on_progress; the summary of its counts."""
        bucket, prefix = admin_cmd.split_target(target)
        async with gateway_client.AdminServiceClient(
            await self._gateway(), security=self._security, tokens=self._tokens
        ) as client:
            last = None
            with contextlib.suppress(TimeoutError):  # the heal goes on at the gateway
                async with asyncio.timeout(limit_s):
                    async for progress in client.heal(bucket, prefix, dry_run=dry_run):
                        last = progress
                        if on_progress is not None:
                            on_progress(progress)
        if last is None:
            return "no progress reported"
        text = admin_cmd.summary(last, dry_run=dry_run)
        return text if last.done else f"{text} (still running when the page gave up)"

    async def heal_queue(self, limit: int) -> healqueue.Merged:
        """What every gateway's heal queue holds, merged (`kvtier admin heal queue`; admins:
        the gateways refuse others with PermissionDenied)."""
        gateways = healqueue.gateways_of(await self.cluster_map(), service_port=False)
        if not gateways:
            raise errors.Unavailable("no gateway in the cluster map")
        return await healqueue.collect(
            gateways, limit, self._security, tokens=self._tokens, timeout_s=self.cfg.rpc_timeout_s
        )

    async def _objects(self) -> objects.AsyncObjectClient:
        address = await self._gateway()
        return objects.AsyncObjectClient(
            address, timeout_s=self.cfg.rpc_timeout_s, security=self._security, tokens=self._tokens
        )

    async def buckets(self) -> list[BucketRow]:
        """Admins: every bucket with its tenant and kind (the metadata service). Users: their
        tenant's buckets (the gateway answers for the token's tenant only)."""
        if self.session.is_admin:
            async with self._metadata() as client:
                found = await client.list_buckets()
            return [
                BucketRow(
                    name=b.name,
                    tenant=b.tenant,
                    kind="kv" if b.kind else "objects",
                    created_at_unix_ms=int(b.created_at_unix_ms),
                )
                for b in found
            ]
        async with await self._objects() as obj:
            mine = await obj.list_buckets()
        return [
            BucketRow(
                name=b.name, tenant=self.session.tenant, kind="",
                created_at_unix_ms=int(b.created_at_unix_ms),
            )
            for b in mine
        ]  # fmt: skip

    async def create_bucket(self, name: str) -> None:
        """A bucket of the user's tenant (AlreadyExists, InvalidArgument)."""
        async with await self._objects() as obj:
            await obj.create_bucket(name)

    async def delete_bucket(self, name: str) -> None:
        """Delete an empty bucket (PreconditionFailed when it holds objects, NotFound)."""
        async with await self._objects() as obj:
            await obj.delete_bucket(name)

    async def list_objects(self, bucket: str, prefix: str, start_after: str = "") -> Any:
        """One page (at most 200 keys) of bucket under prefix, folders by '/'."""
        async with await self._objects() as obj:
            return await obj.list_objects(
                bucket, prefix=prefix, delimiter="/", start_after=start_after, max_keys=200
            )

    async def put_object(self, bucket: str, key: str, data: bytes, content_type: str) -> Any:
        """Store a small object; its ObjectInfo."""
        async with await self._objects() as obj:
            return await obj.put_object(bucket, key, data, content_type=content_type)

    async def get_object(self, bucket: str, key: str) -> tuple[Any, bytes]:
        """(ObjectInfo, bytes) of an object no larger than max_upload_bytes (InvalidArgument
        for a larger one: the console is not the way to move big objects)."""
        async with await self._objects() as obj:
            info = await obj.head_object(bucket, key)
            if info.size > self.cfg.max_upload_bytes:
                raise errors.InvalidArgument(
                    f"{key} is {info.size} bytes: download it with an S3 client"
                )
            return info, await obj.get_object(bucket, key)

    async def delete_object(self, bucket: str, key: str) -> None:
        """Delete an object (an absent one is not an error)."""
        async with await self._objects() as obj:
            await obj.delete_object(bucket, key)

    # Users (admins only: the metadata service refuses everyone else).

    async def users(self) -> list[Any]:
        """Every user, without secrets."""
        async with self._metadata() as client:
            return await client.list_users()

    async def create_user(self, tenant: str, display_name: str, is_admin: bool) -> Any:
        """A new user with a generated key and secret (the secret is shown once)."""
        async with self._metadata() as client:
            return await client.create_user(
                tenant=tenant, display_name=display_name, is_admin=is_admin
            )

    async def delete_user(self, access_key: str) -> None:
        """Remove a user (NotFound)."""
        async with self._metadata() as client:
            await client.delete_user(access_key)

    # The KV tier.

    async def _kv_nodes(self) -> list[common_pb2.NodeInfo]:
        return clustermap.nodes_with_role(await self.cluster_map(), common_pb2.NODE_ROLE_KVCACHE)

    def _kv_client(self, node: common_pb2.NodeInfo) -> kvcache.KVCacheClient:
        return kvcache.KVCacheClient(
            node.client_address or node.grpc_address,
            timeout_s=self.cfg.rpc_timeout_s,
            security=self._security,
            tokens=self._tokens,
        )

    async def kv_stats(self) -> list[tuple[str, kvcache_pb2.StatsResponse | str]]:
        """(node id, stats or the error) per kvcache node: the whole node for admins, the
        user's tenant otherwise."""
        tenant = "" if self.session.is_admin else self.session.tenant

        async def one(node: common_pb2.NodeInfo) -> kvcache_pb2.StatsResponse | str:
            async with self._kv_client(node) as client:
                try:
                    return await client.stats(tenant)
                except errors.KVTierError as exc:
                    return str(exc)

        nodes = await self._kv_nodes()
        return list(
            zip([n.node_id for n in nodes], await asyncio.gather(*map(one, nodes)), strict=True)
        )

    async def kv_settings(self) -> kvcache_pb2.ListSettingsResponse:
        """The quota, TTL and durability settings the cluster keeps (admins; every kvcache
        node reads the same store: the first that answers). Unavailable when none does."""
        failures: list[str] = []
        for node in await self._kv_nodes():
            async with self._kv_client(node) as client:
                try:
                    return await client.list_settings()
                except (errors.Unavailable, errors.Overloaded) as exc:
                    failures.append(f"{node.node_id}: {exc}")
        raise errors.Unavailable("; ".join(failures) or "no kvcache node in the cluster map")

    async def kv_setting(self, kind: str, tenant: str, namespace: str, value: str) -> list[str]:
        """Apply quota / ttl / durability on every kvcache node (as `kvtier admin kv`): one
        line per node. InvalidArgument for a bad value; the nodes check who may set what."""
        if kind == "quota":
            quota = kvadmin.byte_count(value)
        elif kind == "ttl":
            ttl = float(value)
            if not 0 <= ttl < float("inf"):
                raise errors.InvalidArgument("a TTL is a finite number of seconds >= 0")
        elif kind == "durability" and value not in kvadmin.DURABILITY:
            raise errors.InvalidArgument(f"durability: one of {', '.join(kvadmin.DURABILITY)}")

        async def one(node: common_pb2.NodeInfo) -> str:
            async with self._kv_client(node) as client:
                try:
                    if kind == "quota":
                        await client.set_quota(tenant, quota)
                    elif kind == "ttl":
                        await client.set_namespace_ttl(tenant, namespace, ttl)
                    else:
                        await client.set_namespace_policy(
                            tenant, namespace, kvadmin.DURABILITY[value]
                        )
                except errors.KVTierError as exc:
                    return f"{node.node_id}: failed: {exc}"
            return f"{node.node_id}: set"

        nodes = await self._kv_nodes()
        if not nodes:
            raise errors.Unavailable("no kvcache node in the cluster map")
        return list(await asyncio.gather(*map(one, nodes)))
