"""Client of kvtier.metadata.v1.MetadataService."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from kvtier import errors, rpc
from kvtier.clients import base
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.metadata.v1 import metadata_pb2, metadata_pb2_grpc


class MetadataClient(base.BaseClient):
    """The control plane: the cluster map."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = metadata_pb2_grpc.MetadataServiceStub(self.channel)

    async def get_cluster_map(self, known_epoch: int = 0) -> common_pb2.ClusterMap | None:
        """The current map, or None when its epoch equals known_epoch."""
        reply = await self._unary(
            self._stub.GetClusterMap, metadata_pb2.GetClusterMapRequest(known_epoch=known_epoch)
        )
        return None if reply.unchanged else reply.map

    async def watch_cluster_map(
        self, after_epoch: int = 0
    ) -> AsyncGenerator[common_pb2.ClusterMap, None]:
        """Every map newer than after_epoch, as it is committed (runs until cancelled)."""
        call = self._stub.WatchClusterMap(
            metadata_pb2.WatchClusterMapRequest(after_epoch=after_epoch),
            metadata=rpc.call_metadata(),
        )
        try:
            async for reply in call:
                yield reply.map
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc) from None
        finally:
            call.cancel()
