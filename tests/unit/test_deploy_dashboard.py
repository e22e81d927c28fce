"""The Grafana dashboard (deploy/grafana/kvtier.json) checked against the code.

Every PromQL expression in it may name only series the services export: the names are collected
from the prometheus_client metric definitions in services/ and libs/kvtier (the first argument of
each Counter, Gauge, Histogram, Summary, Info and Enum), with the suffixes prometheus_client adds
(_total, _created, _bucket, _sum, _count, _info). A metric renamed in the code fails here.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kvtier.json"
SOURCES = (ROOT / "services", ROOT / "libs" / "kvtier")
_METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
# PromQL functions, aggregations and keywords the dashboard may use (Grafana's label_values too).
PROMQL_WORDS = {
    "sum", "count", "max", "min", "avg", "topk", "bottomk", "quantile", "rate", "irate",
    "increase", "delta", "histogram_quantile", "clamp_min", "clamp_max", "abs", "time",
    "label_values", "and", "or", "unless", "bool", "offset", "vector", "scalar",
}  # fmt: skip


def _suffixed(kind: str, name: str) -> set[str]:
    """The series names prometheus_client exposes for a metric defined with `name`."""
    if kind == "Counter":
        base = name.removesuffix("_total")
        return {f"{base}_total", f"{base}_created"}
    if kind == "Histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    if kind == "Summary":
        return {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
    if kind == "Info":
        return {f"{name}_info"}
    return {name}


def _metric_definition(node: ast.Call) -> tuple[str, str] | None:
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        if func.value.id != "prometheus_client":
            return None
        kind = func.attr
    elif isinstance(func, ast.Name):
        kind = func.id
    else:
        return None
    if kind not in _METRIC_TYPES:
        return None
    keywords = {k.arg: k.value for k in node.keywords}
    name_node = node.args[0] if node.args else keywords.get("name")
    if not isinstance(name_node, ast.Constant) or not isinstance(name_node.value, str):
        return None
    parts = [
        str(value.value)
        for key in ("namespace", "subsystem")
        if isinstance(value := keywords.get(key), ast.Constant) and value.value
    ]
    return kind, "_".join([*parts, name_node.value])


@functools.cache
def exported_series() -> frozenset[str]:
    """Every series name the kvtier code can export."""
    series: set[str] = set()
    for root in SOURCES:
        for path in root.rglob("*.py"):
            if "proto" in path.relative_to(root).parts:
                continue
            source = path.read_text()
            if "prometheus_client" not in source:
                continue
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Call) and (found := _metric_definition(node)):
                    series |= _suffixed(*found)
    return frozenset(series)


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(series names, function and keyword names) an expression uses."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    # Grafana's label_values(metric, label): the label is no series.
    text = re.sub(r"\blabel_values\s*\(([^,()]*),\s*\w+\s*\)", r"label_values(\1)", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    series: set[str] = set()
    words: set[str] = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        (words if match.group(2) or match.group(1) in PROMQL_WORDS else series).add(match.group(1))
    return series, words


def _expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"${variable['name']}", variable["query"]["query"]))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_the_code_exports_the_metrics_the_scan_finds() -> None:
    """The scan sees definitions of every kind (a scan that finds nothing proves nothing)."""
    series = exported_series()
    assert {
        "kvtier_gateway_s3_requests_total",
        "kvtier_gateway_s3_request_seconds_bucket",
    } <= series
    assert {"kvtier_kvcache_fill_ratio", "kvtier_node_info"} <= series
    assert "kvtier_gateway_s3_requests" not in series  # a counter's samples end in _total


def test_every_expression_names_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_series()
    for title, expr in _expressions(dashboard):
        series, words = promql_names(expr)
        assert series, f"{title}: {expr} names no metric"
        assert series <= exported, f"{title}: not exported by kvtier: {series - exported}"
        assert words <= PROMQL_WORDS, f"{title}: unknown function {words - PROMQL_WORDS}"


def test_the_checker_catches_a_wrong_name_or_suffix() -> None:
    exported = exported_series()
    wrong = [
        "sum(rate(kvtier_kvcache_hit_total[5m]))",  # a typo
        "rate(kvtier_gateway_s3_requests_total_bucket[5m])",  # a counter has no buckets
        # a counter has no histogram series
        'histogram_quantile(0.9, sum(rate(kvtier_gateway_object_bytes_bucket{op="g"}[5m])))',
    ]
    for expr in wrong:
        series, _ = promql_names(expr)
        assert not series <= exported, expr
    series, words = promql_names(
        "sum by (op, le) "
        '(rate(kvtier_gateway_s3_request_seconds_bucket{op=~"Get.*"}[$__rate_interval]))'
    )
    assert series == {"kvtier_gateway_s3_request_seconds_bucket"}
    assert words == {"sum", "rate"}


def test_the_dashboard_covers_every_tier(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for _, expr in _expressions(dashboard):
        used |= promql_names(expr)[0]
    for prefix in ("kvtier_gateway_s3_", "kvtier_gateway_heal_", "kvtier_datanode_"):
        assert any(name.startswith(prefix) for name in used), prefix
    for prefix in ("kvtier_kvcache_hits", "kvtier_kvcache_spill", "kvtier_rpc_server_seconds"):
        assert any(name.startswith(prefix) for name in used), prefix


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"]
    assert dashboard["title"] == "kvtier"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
