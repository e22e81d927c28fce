"""Where the KV SDK reads the cluster map: one or more endpoints, tried in order.

`AsyncKVClient.connect(metadata=...)` takes one address or several (a sequence, or one string
with commas). Each is a metadata node's or a gateway's port: both serve the map (metadata
`MetadataService.GetClusterMap`, read from etcd; a gateway `GatewayService.GetClusterMap`, its
watched copy), so a client started while every metadata node is down still finds the kvcache
nodes through a gateway. Which service an address belongs to is found on first contact (a
server that does not serve `MetadataService` says so: `rpc` raises InvalidArgument
"WrongService", and the gateway's RPC is tried on that address) and remembered.

A user's session tokens come from the issuers `token_issuers` lists: `token_address` (when
set) and then every map endpoint, since metadata nodes and gateways both issue tokens that
every node accepts. A user whose issuers are all metadata nodes cannot start during a metadata
outage (the error says so); certificate holders need no token.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from kvtier import errors
from kvtier import security as security_mod
from kvtier.clients import base
from kvtier.clients import gateway as gateway_client
from kvtier.clients import metadata as metadata_client
from kvtier.proto.common.v1 import common_pb2

log = logging.getLogger(__name__)

#: Failures after which the next endpoint is tried: the endpoint cannot answer now, or is
#: not a service that serves the map ("WrongService").
_TRY_NEXT = (errors.Unavailable, errors.DeadlineExceeded, errors.Overloaded, OSError)


def endpoints(metadata: str | Sequence[str]) -> list[str]:
    """The addresses of a `metadata` argument, in order, each once (a string may hold several,
    separated by commas)."""
    parts = metadata.split(",") if isinstance(metadata, str) else list(metadata)
    found: list[str] = []
    for part in parts:
        address = part.strip()
        if address and address not in found:
            found.append(address)
    return found


def token_issuers(token_address: str, map_endpoints: Sequence[str]) -> str:
    """Where a user's session tokens come from, in order, as one comma-separated string (what
    `security.TokenSource` takes): `token_address`'s addresses, then the map endpoints."""
    return ",".join(endpoints([*endpoints(token_address), *map_endpoints]))


def user_tokens(
    security: security_mod.ClientSecurity, map_endpoints: Sequence[str]
) -> security_mod.TokenSource | None:
    """The process's shared token source of a user (None for certificate holders and insecure
    clients, and when there is no issuer: fixed nodes without `token_address`)."""
    issuers = token_issuers(security.token_address, map_endpoints)
    if not security.has_user or not issuers:
        return None
    return security_mod.token_source(dataclasses.replace(security, token_address=issuers), issuers)


class MapSources:
    """The cluster map from the first of several endpoints that answers (see the module).

    Raises Unavailable naming every endpoint that failed and why; a failure that is not the
    endpoint's (Unauthenticated, PermissionDenied) is raised at once.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout_s: float,
        security: security_mod.ClientSecurity,
        tokens: security_mod.TokenSource | None,
    ) -> None:
        if not addresses:
            raise errors.InvalidArgument("no metadata or gateway address to read the map from")
        self.addresses = list(addresses)
        self._timeout_s = timeout_s
        self._security = security
        self._tokens = tokens
        self._clients: dict[str, base.BaseClient] = {}
        #: The endpoint that answered last: tried first next time.
        self._preferred = 0

    async def close(self) -> None:
        """Close every channel; idempotent."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def cluster_map(self, known_epoch: int = 0) -> common_pb2.ClusterMap | None:
        """The map from the first endpoint that answers, the last one that did first; None
        when its epoch is known_epoch (the caller's: the map is not sent again, which at
        10^5 clients refreshing every 2 s is most of the metadata service's traffic:
        docs/scaling.md)."""
        if self._tokens is not None:
            await _token(self._tokens)  # the issuers' error, once, not one per endpoint
        count = len(self.addresses)
        order = [(self._preferred + i) % count for i in range(count)]
        failures: list[str] = []
        for index in order:
            address = self.addresses[index]
            try:
                cmap = await self._from(address, known_epoch)
            except _TRY_NEXT as exc:
                failures.append(f"{address}: {_reason(exc)}")
                continue
            except errors.InvalidArgument as exc:
                if exc.reason != "WrongService":
                    raise
                failures.append(f"{address}: serves neither the metadata nor the gateway API")
                continue
            if index != self._preferred:
                log.warning("cluster map from %s; skipped %s", address, "; ".join(failures))
                self._preferred = index
            return cmap
        raise errors.Unavailable(
            f"no endpoint gave the cluster map ({count} tried): {'; '.join(failures)}"
        )

    async def _from(self, address: str, known_epoch: int) -> common_pb2.ClusterMap | None:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._metadata(address)
        if isinstance(client, metadata_client.MetadataClient):
            try:
                cmap = await client.get_cluster_map(known_epoch)
            except errors.InvalidArgument as exc:
                if exc.reason != "WrongService":
                    raise
                # Not a metadata node: a gateway's port? Asked as one from now on.
                await client.close()
                gateway = self._gateway(address)
                self._clients[address] = gateway
                cmap = await gateway.get_cluster_map(known_epoch)
        else:
            assert isinstance(client, gateway_client.GatewayClient)
            cmap = await client.get_cluster_map(known_epoch)
        return cmap

    def _metadata(self, address: str) -> metadata_client.MetadataClient:
        return metadata_client.MetadataClient(
            address, timeout_s=self._timeout_s, security=self._security, tokens=self._tokens
        )

    def _gateway(self, address: str) -> gateway_client.GatewayClient:
        return gateway_client.GatewayClient(
            address, timeout_s=self._timeout_s, security=self._security, tokens=self._tokens
        )


async def _token(tokens: security_mod.TokenSource) -> None:
    """A session token, or Unavailable saying which issuers failed and what a user can do."""
    try:
        await tokens.token()
    except (errors.Unavailable, errors.DeadlineExceeded) as exc:
        raise errors.Unavailable(
            f"no session token for this access key from {tokens.issuer_address}: {exc.message}. "
            "A client authenticated by access key starts only when a token issuer answers: "
            "list a gateway among the endpoints, or use a certificate"
        ) from None


def _reason(exc: BaseException) -> str:
    """One line for an endpoint's failure."""
    text = exc.message if isinstance(exc, errors.KVTierError) else str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
