"""bench/dashboard_figure.py's pieces that need no cluster: every expression of the Grafana
board becomes plain PromQL once its variables are substituted, the scrape config covers every
node with the cluster's client certificate, and Grafana's legend format and units render.
The end-to-end run (a dev cluster, Debian's prometheus) is
tests/integration/test_dashboard_figure.py, behind the `slow` marker."""

from __future__ import annotations

import json

import pytest

from bench import dashboard_figure, dashboard_prom, dashboard_render


def test_every_board_expression_is_substituted() -> None:
    board = dashboard_prom.load_board()
    targets = dashboard_prom.panel_queries(board, step_s=5)
    titles = {p["title"] for p in board["panels"] if p["type"] != "row"}
    assert {t.panel for t in targets} == titles  # every panel has a target
    for target in targets:
        assert "$" not in target.query, target.query
    hit_ratio = next(t for t in targets if t.panel == "Hit ratio ($tenant)")
    assert 'tenant=~".*"' in hit_ratio.query
    assert "[20s]" in hit_ratio.query
    # Targets the script may leave empty exist on the board (a renamed panel must be noticed).
    assert set(dashboard_figure.EXPECTED_EMPTY) <= {(t.panel, t.ref) for t in targets}


def test_an_unknown_variable_is_refused() -> None:
    with pytest.raises(ValueError, match="unsubstituted"):
        dashboard_prom.substitute("rate(x[$__range])", step_s=5)


def test_scrape_config_names_every_node_over_mutual_tls() -> None:
    info = {"ca_file": "/p/ca.crt", "operator_cert": "/p/op.crt", "operator_key": "/p/op.key"}
    targets = {"gateway-1": "127.0.0.1:7050", "datanode-1": "127.0.0.1:7151"}
    job = json.loads(dashboard_prom.scrape_config(info, targets))["scrape_configs"][0]
    assert job["scheme"] == "https"
    assert job["tls_config"] == {"ca_file": "/p/ca.crt", "cert_file": "/p/op.crt",
                                 "key_file": "/p/op.key"}  # fmt: skip
    assert [(c["targets"], c["labels"]["instance"]) for c in job["static_configs"]] == [
        (["127.0.0.1:7151"], "datanode-1"),
        (["127.0.0.1:7050"], "gateway-1"),
    ]


def test_legend_and_units() -> None:
    assert dashboard_prom.legend("{{service}}/{{method}}", {"service": "gw", "method": "Put"}) == (
        "gw/Put"
    )
    assert dashboard_render.fmt(3 * 1024 * 1024, "bytes") == "3 MiB"
    assert dashboard_render.fmt(0.125, "percentunit") == "12.5%"
    assert dashboard_render.fmt(0.004, "s") == "4 ms"
    assert dashboard_render.fmt(float("nan"), "s") == "NaN"
