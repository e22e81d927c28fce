"""gRPC surface of the metadata service (thin: decode, call core, encode)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from kvtier import clustermap, rpc
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.metadata.v1 import metadata_pb2, metadata_pb2_grpc

_WATCH_POLL_S = 30.0


class MetadataServicer(metadata_pb2_grpc.MetadataServiceServicer):
    """Serves the cluster map from this process's watched copy."""

    def __init__(self, view: clustermap.MapView) -> None:
        self._view = view

    async def GetClusterMap(
        self, request: metadata_pb2.GetClusterMapRequest, context: rpc.ServicerContext
    ) -> metadata_pb2.GetClusterMapResponse:
        current = self._view.newer_than(request.known_epoch)
        if current is None:
            return metadata_pb2.GetClusterMapResponse(unchanged=True)
        return metadata_pb2.GetClusterMapResponse(map=current)

    async def WatchClusterMap(
        self, request: metadata_pb2.WatchClusterMapRequest, context: rpc.ServicerContext
    ) -> AsyncIterator[metadata_pb2.WatchClusterMapResponse]:
        sent = request.after_epoch

        def newer(cmap: common_pb2.ClusterMap) -> bool:
            return cmap.epoch > sent

        while True:
            try:
                current = await self._view.wait_for(newer, _WATCH_POLL_S)
            except TimeoutError:
                continue
            sent = current.epoch
            yield metadata_pb2.WatchClusterMapResponse(map=current)
