"""The trace pictures in docs/operations.md (issue 17): a dev cluster whose every service
traces everything (ratio 1.0) to a real OTLP/gRPC receiver in this process
(bench/otlp_receiver.py; `kvtier up --insecure`, as bench/tracing_bench.py runs it), one S3
PUT of 3 MiB through boto3 and one KV get through the SDK; the spans the receiver got for each
are drawn as a waterfall (one bar per span, indented under its parent, time in ms from the
trace's first span).

Usage: python -m bench.trace_figure
Writes docs/img/trace-s3-put.png and docs/img/trace-kv-get.png. Stops the cluster and the
receiver on every path.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk import resources
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import export, sampling

from bench import object_bench, otlp_receiver, s3_bench

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
SERVICES = ("metadata", "datanode", "kvcache", "gateway")
SETTLE_S = 1.5  # the last batches: disk spans end after the calls they serve
COLORS = {
    "kvtier-gateway": "#4c72b0",
    "kvtier-datanode": "#55a868",
    "kvtier-metadata": "#c44e52",
    "kvtier-kvcache": "#8172b2",
    "kvtier-sdk": "#dd8452",
}


def _wait_for(what: str, found: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = found()
        if result:
            return result
        time.sleep(0.2)
    raise RuntimeError(f"no {what} within {timeout_s}s")


def _ordered(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, span) depth-first from the root, children by start time."""
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        children.setdefault(s["parent"], []).append(s)
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if not s["parent"] or s["parent"] not in ids]
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        out.append((depth, span))
        for child in sorted(children.get(span["span_id"], []), key=lambda c: c["start_ns"]):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda r: r["start_ns"]):
        walk(root, 0)
    return out


def _who(span: dict[str, Any]) -> str:
    """The node when it names the service (`datanode-3`), else the service (`sdk`)."""
    service, node = str(span["service"]).removeprefix("kvtier-"), str(span["node"])
    return node if node.startswith(service) else service


def render(spans: list[dict[str, Any]], title: str, path: Path) -> None:
    """One horizontal bar per span, labelled `service (node): name`, indented by depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import transforms

    rows = _ordered(spans)
    t0 = min(s["start_ns"] for s in spans)
    fig, ax = plt.subplots(figsize=(13, 0.9 + 0.24 * len(rows)))
    labels = transforms.blended_transform_factory(fig.transFigure, ax.transData)
    for y, (depth, s) in enumerate(rows):
        start, width = (s["start_ns"] - t0) / 1e6, (s["end_ns"] - s["start_ns"]) / 1e6
        ax.barh(y, max(width, 0.02), left=start, height=0.7,
                color=COLORS.get(s["service"], "#8c8c8c"))  # fmt: skip
        ax.text(0.01 + 0.012 * depth, y, f"{_who(s)}: {s['name']}", ha="left", va="center",
                fontsize=7, family="monospace", transform=labels)  # fmt: skip
    ax.set_yticks([])
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_xlabel("ms from the trace's first span")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(left=0.36, right=0.98, top=1 - 0.45 / fig.get_figheight(),
                        bottom=0.5 / fig.get_figheight())  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _put_trace(receiver: otlp_receiver.Receiver, info: dict[str, Any]) -> list[dict[str, Any]]:
    s3 = s3_bench._client(
        info["gateway_s3"], info["s3_access_key"], info["s3_secret_key"], info.get("ca_file", "")
    )
    s3.create_bucket(Bucket="traced")
    request_id = s3.put_object(Bucket="traced", Key="one/object", Body=os.urandom(3 << 20))[
        "ResponseMetadata"
    ]["RequestId"]

    def root() -> dict[str, Any] | None:
        for s in receiver.spans():
            rid = s["attributes"].get("aws.request_id")
            if s["name"] == "S3 PutObject" and rid is not None and rid.string_value == request_id:
                return s
        return None

    trace_id = _wait_for("S3 PutObject span", root)["trace_id"]
    _wait_for("datanode spans", lambda: any(
        s["service"] == "kvtier-datanode" for s in receiver.trace_of(trace_id)
    ))  # fmt: skip
    time.sleep(SETTLE_S)
    return receiver.trace_of(trace_id)


def _get_trace(
    receiver: otlp_receiver.Receiver, endpoint: str, cluster: object_bench.DevCluster
) -> list[dict[str, Any]]:
    import kvtier
    from kvtier import tracing

    provider = sdk_trace.TracerProvider(
        resource=resources.Resource.create({"service.name": "kvtier-sdk"}),
        sampler=sampling.ParentBased(sampling.ALWAYS_ON),
    )
    provider.add_span_processor(export.SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    block = os.urandom(64 * 1024)
    try:
        with kvtier.KVClient.connect(
            metadata=cluster.info["metadata_client"], namespace="traced",
            security=cluster.user.security(),
        ) as kv:  # fmt: skip
            assert kv.put(b"traced-key", block)
            with tracing.using(provider):
                out = bytearray(len(block))
                assert kv.get(b"traced-key", out) == len(block)
    finally:
        provider.shutdown()
    sdk = _wait_for("KV get span", lambda: [
        s for s in receiver.spans() if s["service"] == "kvtier-sdk" and "get" in s["name"]
    ])  # fmt: skip
    trace_id = sdk[-1]["trace_id"]
    _wait_for("kvcache span", lambda: any(
        s["service"] == "kvtier-kvcache" for s in receiver.trace_of(trace_id)
    ))  # fmt: skip
    time.sleep(SETTLE_S)
    return receiver.trace_of(trace_id)


def main() -> int:
    IMG.mkdir(parents=True, exist_ok=True)
    with otlp_receiver.serve() as (receiver, endpoint), tempfile.TemporaryDirectory() as work:
        settings = {"OTEL_BSP_SCHEDULE_DELAY": "200"}
        for service in SERVICES:
            settings[f"KVTIER_{service.upper()}_OTLP_ENDPOINT"] = endpoint
            settings[f"KVTIER_{service.upper()}_TRACE_SAMPLE_RATIO"] = "1.0"
        os.environ.update(settings)  # the services inherit them
        cluster = object_bench.DevCluster(
            Path(work) / "state", "--insecure", "--kvcache-nodes", "1"
        )
        try:
            info = cluster.start()
            put = _put_trace(receiver, info)
            get = _get_trace(receiver, endpoint, cluster)
        finally:
            cluster.stop()
            for key in settings:
                os.environ.pop(key, None)
    render(put, f"One S3 PUT of 3 MiB: {len(put)} spans in one trace", IMG / "trace-s3-put.png")
    render(get, f"One KV get (64 KiB): {len(get)} spans in one trace", IMG / "trace-kv-get.png")
    print(f"put: {len(put)} spans, get: {len(get)} spans -> {IMG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
