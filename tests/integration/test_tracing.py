"""Traces across a real dev cluster (issue 17): every service exports to a real OTLP/gRPC
receiver running in this process (opentelemetry-proto's TraceService on 127.0.0.1, port 0),
configured through its `KVTIER_<SERVICE>_OTLP_ENDPOINT` and `..._TRACE_SAMPLE_RATIO` settings.

One S3 PUT is one trace from the gateway's `S3 PutObject` span to every datanode holding a
shard (data-plane calls carrying the context in their header, gRPC commits in metadata, disk
I/O under them); one KV get is one chain from the SDK's span to the kvcache node's.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk import resources
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import export, sampling

import kvtier
from bench import otlp_receiver
from kvtier import tracing
from tests.integration import s3_cluster
from tests.integration.conftest import (
    dump_logs,
    running_cluster,
    user_security,
)

pytestmark = pytest.mark.integration

SERVICES = ("metadata", "datanode", "kvcache", "gateway")
DATANODES = {f"datanode-{i}" for i in range(1, 7)}


Receiver = otlp_receiver.Receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    """The receiver and its endpoint (http://127.0.0.1:<port>: plaintext gRPC)."""
    with otlp_receiver.serve() as served:
        yield served


@pytest.fixture(scope="module")
def traced_cluster(
    receiver: tuple[Receiver, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """cluster.json of a dev cluster (6 datanodes, 1 kvcache node) whose every service traces
    everything to the receiver."""
    _, endpoint = receiver
    settings = {}
    for service in SERVICES:
        settings[f"KVTIER_{service.upper()}_OTLP_ENDPOINT"] = endpoint
        settings[f"KVTIER_{service.upper()}_TRACE_SAMPLE_RATIO"] = "1.0"
    state = tmp_path_factory.mktemp("traced") / "state"
    # OTEL_BSP_SCHEDULE_DELAY: export within 0.2 s
    with running_cluster(state, **settings, OTEL_BSP_SCHEDULE_DELAY="200") as info:
        yield info


def _wait_for(what: str, found: Any, state: Path, timeout_s: float = 30.0) -> Any:
    """Poll found() until it returns something truthy (spans arrive in batches)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = found()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s}s\n{dump_logs(state)}")


def _check_connected(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """One root, every other span's parent in the trace; returns the root."""
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if not s["parent"]]
    assert len(roots) == 1, [(s["name"], s["service"]) for s in roots]
    orphans = [(s["name"], s["service"]) for s in spans if s["parent"] and s["parent"] not in ids]
    assert not orphans, orphans
    return roots[0]


@pytest.mark.timeout(300)
def test_one_s3_put_is_one_trace_across_gateway_and_every_datanode(
    receiver: tuple[Receiver, str], traced_cluster: dict[str, Any]
) -> None:
    spans, state = receiver[0], traced_cluster["state"]
    s3 = s3_cluster.client(traced_cluster)
    s3.create_bucket(Bucket="traced")
    body = os.urandom(3 * 1024 * 1024 + 17)
    put = s3.put_object(Bucket="traced", Key="one/object", Body=body)
    request_id = put["ResponseMetadata"]["RequestId"]

    def put_trace() -> list[dict[str, Any]] | None:
        roots = [
            s for s in spans.spans()
            if s["name"] == "S3 PutObject"
            and s["attributes"].get("aws.request_id", None) is not None
            and s["attributes"]["aws.request_id"].string_value == request_id
        ]  # fmt: skip
        if not roots:
            return None
        trace = spans.trace_of(roots[0]["trace_id"])
        on_datanodes = {s["node"] for s in trace if s["service"] == "kvtier-datanode"}
        return trace if on_datanodes >= DATANODES else None

    trace = _wait_for("trace of the PUT reaching every datanode", put_trace, state)
    time.sleep(1.0)  # the last batches (disk spans end after the calls they serve)
    trace = spans.trace_of(trace[0]["trace_id"])
    root = _check_connected(trace)
    assert (root["name"], root["service"]) == ("S3 PutObject", "kvtier-gateway")
    assert root["attributes"]["aws.s3.bucket"].string_value == "traced"
    assert root["attributes"]["http.response.status_code"].int_value == 200
    # Every datanode holds a shard of the 8+4 set (2 drives each): each continued the trace
    # on the data plane (the context in the call header), committed over gRPC (the context in
    # the metadata) and wrote to disk under those spans.
    for node in sorted(DATANODES):
        names = {s["name"] for s in trace if s["node"] == node}
        assert "datanode WRITE_SHARD" in names, (node, names)
        assert "kvtier.datanode.v1.ShardService/CommitWrite" in names, (node, names)
        assert any(name.startswith("datanode.disk ") for name in names), (node, names)
    got = s3.get_object(Bucket="traced", Key="one/object")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


@pytest.mark.timeout(300)
def test_one_kv_get_is_one_span_chain_from_the_sdk_to_kvcache(
    receiver: tuple[Receiver, str], traced_cluster: dict[str, Any]
) -> None:
    spans, endpoint = receiver
    state = traced_cluster["state"]
    provider = sdk_trace.TracerProvider(
        resource=resources.Resource.create({"service.name": "kvtier-test-sdk"}),
        sampler=sampling.ParentBased(sampling.ALWAYS_ON),
    )
    provider.add_span_processor(export.SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    block = os.urandom(64 * 1024)
    try:
        with (
            kvtier.KVClient.connect(
                metadata=traced_cluster["metadata_client"], namespace="traced",
                security=user_security(state),
            ) as kv,
            tracing.using(provider),
        ):  # fmt: skip
            assert kv.put(b"traced-key", block)
            out = bytearray(len(block))
            assert kv.get(b"traced-key", out) == len(block)
            assert out == block
    finally:
        provider.shutdown()

    def get_chain() -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        sdk = [s for s in spans.spans() if s["name"] == "kvtier.kv get_batch"]
        if not sdk:
            return None
        trace = spans.trace_of(sdk[-1]["trace_id"])
        served = [s for s in trace if s["service"] == "kvtier-kvcache"]
        return (sdk[-1], trace) if served else None

    sdk_span, trace = _wait_for("trace of the KV get reaching kvcache", get_chain, state)
    assert _check_connected(trace) == sdk_span
    assert sdk_span["service"] == "kvtier-test-sdk"
    served = [s for s in trace if s["service"] == "kvtier-kvcache"]
    assert [(s["name"], s["parent"], s["node"]) for s in served] == [
        ("kvcache BATCH_GET", sdk_span["span_id"], "kvcache-1")
    ]
