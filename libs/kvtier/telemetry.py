"""Logging, request ids and Prometheus metrics shared by every process.

Logging is configured once, in a service's `__main__`, through `configure_logging`. Each log
record carries the request id of the RPC being served (set by the interceptor in `kvtier.rpc`)
and, inside a sampled trace, its trace and span ids (`kvtier.tracing`).
Metrics live in the default Prometheus registry and are served by `start_metrics_server`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client

from kvtier import tracing

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("kvtier_request_id", default="-")

RPC_SECONDS = prometheus_client.Histogram(
    "kvtier_rpc_server_seconds",
    "Server-side latency of gRPC calls",
    ["service", "method", "code"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
MAP_EPOCH = prometheus_client.Gauge(
    "kvtier_cluster_map_epoch", "Newest cluster-map epoch this process has seen"
)
ETCD_RECONNECTS = prometheus_client.Counter(
    "kvtier_etcd_reconnects_total", "Times this process re-established its etcd session"
)
NODE_INFO = prometheus_client.Info("kvtier_node", "Identity of this kvtier process")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        ids = tracing.log_ids()  # None at once while tracing is off
        record.trace_id, record.span_id = ids if ids is not None else ("", "")
        record.trace = f" trace={ids[0]}" if ids is not None else ""
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:  # the sampled trace the record was logged in (docs/operations.md, Traces)
            entry["trace_id"], entry["span_id"] = trace_id, getattr(record, "span_id", "")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(level: str, fmt: str, *, node_id: str = "") -> None:
    """Send log records to stderr as text or JSON lines. Call once, from `__main__`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        who = f" {node_id}" if node_id else ""
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)-7s{who} %(name)s [%(request_id)s%(trace)s] %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's and etcd's own chatter stays at warning unless asked for.
    for noisy in ("grpc", "aetcd"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))


class MetricsServer:
    """The Prometheus endpoint of a process (a small threaded HTTP server).

    With `tls` = (CA file, certificate file, key file) it serves HTTPS and requires a client
    certificate of the cluster CA (Prometheus scrapes with one: docs/security.md), because the
    series name tenants and namespaces.
    """

    def __init__(self, host: str, port: int, tls: tuple[str, str, str] | None = None) -> None:
        self._server: WSGIServer | None = None
        self._host = host
        self._port = port
        self._tls = tls

    def start(self) -> int:
        """Start serving; returns the bound port."""
        if self._tls is None:
            server, _thread = prometheus_client.start_http_server(self._port, addr=self._host)
        else:
            ca, cert, key = self._tls
            server, _thread = prometheus_client.start_http_server(
                self._port,
                addr=self._host,
                certfile=cert,
                keyfile=key,
                client_cafile=ca,
                client_auth_required=True,
            )
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
