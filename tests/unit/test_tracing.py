"""kvtier.tracing without a cluster: settings, where spans go, sampling of SDK operations, W3C
context in gRPC metadata, and trace ids in log lines (tests/integration/test_tracing.py runs
it across a dev cluster; tests/transport/test_call_tracing.py on data-plane calls)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import export, sampling
from opentelemetry.sdk.trace.export import in_memory_span_exporter

from kvtier import config, rpc, telemetry, tracing
from services.datanode import config as datanode_config


def _load(argv: list[str], env: dict[str, str] | None = None) -> datanode_config.DatanodeConfig:
    return config.load(
        datanode_config.DatanodeConfig,
        service="datanode",
        argv=["--insecure=true", *argv],
        environ=env or {},
    )


def test_settings_default_to_off_and_a_low_ratio() -> None:
    cfg = _load([])
    assert (cfg.otlp_endpoint, cfg.trace_sample_ratio) == ("", 0.01)
    assert tracing.endpoint_from(cfg.otlp_endpoint, {}) == ""


def test_settings_come_from_flags_and_env() -> None:
    env = {"KVTIER_DATANODE_OTLP_ENDPOINT": "http://collector:4317"}
    cfg = _load(["--trace-sample-ratio", "1"], env)
    assert (cfg.otlp_endpoint, cfg.trace_sample_ratio) == ("http://collector:4317", 1.0)
    assert _load(["--otlp-endpoint", "https://c:4317"]).otlp_endpoint == "https://c:4317"


@pytest.mark.parametrize("ratio", ["-0.1", "1.5", "nan"])
def test_a_ratio_outside_0_1_is_a_config_error(ratio: str) -> None:
    with pytest.raises(config.ConfigError, match="trace_sample_ratio"):
        _load(["--trace-sample-ratio", ratio])


def test_the_standard_otel_variables_name_the_collector_when_no_setting_does() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://standard:4317"}
    assert tracing.endpoint_from("", env) == "http://standard:4317"
    assert tracing.endpoint_from("http://ours:4317", env) == "http://ours:4317"
    traces = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317"}
    assert tracing.endpoint_from("", traces) == "http://traces:4317"
    assert tracing.endpoint_from("http://ours:4317", {"OTEL_SDK_DISABLED": "true"}) == ""


def test_no_endpoint_configures_nothing() -> None:
    assert not tracing.configure(service="datanode", node_id="d", endpoint="", sample_ratio=1.0,
                                 environ={})  # fmt: skip
    assert not tracing.enabled()
    assert tracing.span("x") is tracing.op_span("y") is tracing.child_span("z")  # one no-op
    assert tracing.wire_context() == b""
    assert tracing.inject() == []
    assert tracing.log_ids() is None


@pytest.fixture
def exporter() -> Iterator[in_memory_span_exporter.InMemorySpanExporter]:
    """kvtier's own sampler (`root_sampler`) at ratio 0: every new trace is left out."""
    spans = in_memory_span_exporter.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider(sampler=sampling.ParentBased(tracing.root_sampler(0.0)))
    provider.add_span_processor(export.SimpleSpanProcessor(spans))
    with tracing.using(provider, sample_ratio=0.0):
        yield spans
    provider.shutdown()


def test_an_sdk_operation_left_out_makes_no_span_and_sends_no_context(
    exporter: in_memory_span_exporter.InMemorySpanExporter,
) -> None:
    for _ in range(100):
        with tracing.op_span("kvtier.kv get_batch") as span:
            assert span is None
            assert tracing.wire_context() == b""
    assert exporter.get_finished_spans() == ()


def test_an_sdk_operation_inside_a_trace_is_its_child_once(
    exporter: in_memory_span_exporter.InMemorySpanExporter,
) -> None:
    with (
        tracing.tracer().start_as_current_span("app", attributes={tracing._PREDRAWN: True}),
        tracing.op_span("kvtier.kv get_batch"),
        tracing.op_span("kvtier.kv get_batch"),
    ):
        assert len(tracing.wire_context()) == tracing.WIRE_BYTES
    app, op = sorted(exporter.get_finished_spans(), key=lambda s: s.name)
    assert (app.name, op.name) == ("app", "kvtier.kv get_batch")  # the nested one adds none
    assert op.parent is not None
    assert op.parent.span_id == app.context.span_id
    assert tracing._PREDRAWN not in (app.attributes or {})  # the marker is not recorded


def test_grpc_metadata_carries_the_w3c_traceparent(
    exporter: in_memory_span_exporter.InMemorySpanExporter,
) -> None:
    assert [k for k, _ in rpc.call_metadata()] == [rpc.REQUEST_ID_KEY]  # no trace: nothing
    with tracing.tracer().start_as_current_span("app", attributes={tracing._PREDRAWN: True}):
        meta = dict(rpc.call_metadata(epoch=3))
        ctx = trace.get_current_span().get_span_context()
    version, trace_id, span_id, flags = meta[tracing.TRACEPARENT].split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
    parent = trace.get_current_span(tracing.extract_pairs(meta.items())).get_span_context()
    assert (parent.trace_id, parent.span_id) == (ctx.trace_id, ctx.span_id)


def test_json_log_lines_carry_the_trace_id_inside_a_sampled_span(
    exporter: in_memory_span_exporter.InMemorySpanExporter,
) -> None:
    def line() -> dict[str, str]:
        record = logging.LogRecord("kvtier.x", logging.INFO, __file__, 1, "hello %s", ("a",), None)
        telemetry._ContextFilter().filter(record)
        return dict(json.loads(telemetry._JsonFormatter().format(record)))

    assert "trace_id" not in line()
    with tracing.tracer().start_as_current_span("app", attributes={tracing._PREDRAWN: True}):
        ctx = trace.get_current_span().get_span_context()
        entry = line()
    assert (entry["trace_id"], entry["span_id"]) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert entry["msg"] == "hello a"
