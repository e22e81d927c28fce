"""A real OTLP/gRPC trace receiver in this process (opentelemetry-proto's TraceService on
127.0.0.1, port 0) that keeps every span it is sent. Shared by tests/integration/test_tracing.py
and bench/trace_figure.py."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent, flattened with its
    resource's attributes (`service.name`, `service.instance.id`) and its times (ns)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[dict[str, Any]] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        rows = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    rows.append(
                        {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "name": span.name,
                            "service": resource.get("service.name", ""),
                            "node": resource.get("service.instance.id", ""),
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "attributes": {a.key: a.value for a in span.attributes},
                        }
                    )
        with self._lock:
            self._spans.extend(rows)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._spans)

    def trace_of(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans() if s["trace_id"] == trace_id]


@contextlib.contextmanager
def serve() -> Iterator[tuple[Receiver, str]]:
    """A started receiver and its endpoint (http://127.0.0.1:<port>: plaintext gRPC); stopped
    on exit."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    servicer = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
