"""gRPC surface of the metadata service (thin: decode, call core, encode)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kvtier import clustermap
from kvtier.proto.metadata.v1 import metadata_pb2, metadata_pb2_grpc

_WATCH_POLL_S = 30.0


class MetadataServicer(metadata_pb2_grpc.MetadataServiceServicer):
    """Serves the cluster map from this process's watched copy."""

    def __init__(self, view: clustermap.MapView) -> None:
        self._view = view

    async def GetClusterMap(
        self, request: metadata_pb2.GetClusterMapRequest, context: grpc.aio.ServicerContext
    ) -> metadata_pb2.GetClusterMapResponse:
        current = self._view.current
        if request.known_epoch and request.known_epoch == current.epoch:
            return metadata_pb2.GetClusterMapResponse(unchanged=True)
        return metadata_pb2.GetClusterMapResponse(map=current)

    async def WatchClusterMap(
        self, request: metadata_pb2.WatchClusterMapRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[metadata_pb2.WatchClusterMapResponse]:
        sent = request.after_epoch
        while True:
            try:
                current = await self._view.wait_for(lambda m: m.epoch > sent, _WATCH_POLL_S)
            except TimeoutError:
                continue
            sent = current.epoch
            yield metadata_pb2.WatchClusterMapResponse(map=current)
