"""A real Prometheus (Debian's `prometheus` package) scraping a dev cluster, and the Grafana
board's expressions evaluated through its HTTP API: what bench/dashboard_figure.py draws.

`Prometheus` writes a config with one target per node of the cluster map (`kvtier status
--json`; HTTPS with the cluster CA and the operator's client certificate from cluster.json, as
the metrics ports require; `instance` is the node id), starts the binary on a free port with
its own TSDB directory and stops it on every path.
`panel_queries` turns deploy/grafana/kvtier.json into (panel, target, PromQL) with the Grafana
variables substituted the way Grafana does for this scrape interval.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import secure

ROOT = Path(__file__).resolve().parent.parent
BOARD = ROOT / "deploy" / "grafana" / "kvtier.json"
SCRAPE_INTERVAL_S = 5
#: Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval), with
#: $__interval = the query step (SCRAPE_INTERVAL_S here).
RATE_INTERVAL = f"{max(2 * SCRAPE_INTERVAL_S, 4 * SCRAPE_INTERVAL_S)}s"
#: The `tenant` variable's "All" (its allValue in the board).
ALL_TENANTS = ".*"


@dataclass
class Target:
    """One panel target: its expression as in the board, as sent, and Prometheus's answer."""

    panel: str
    ref: str
    expr: str
    query: str
    legend: str
    error: str = ""
    series: list[tuple[str, list[tuple[float, float]]]] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        """At least one series with a finite value (what Grafana would draw)."""
        return any(math.isfinite(v) for _, points in self.series for _, v in points)


def substitute(expr: str, *, step_s: int, tenant: str = ALL_TENANTS) -> str:
    """expr with the Grafana variables the board uses replaced (longest names first)."""
    values = {
        "$__rate_interval": RATE_INTERVAL,
        "$__interval": f"{step_s}s",
        "${tenant}": tenant,
        "$tenant": tenant,
    }
    for name, value in values.items():
        expr = expr.replace(name, value)
    if "$" in expr:
        raise ValueError(f"unsubstituted Grafana variable in {expr!r}")
    return expr


def load_board(path: Path = BOARD) -> dict[str, Any]:
    """The dashboard JSON."""
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def panel_queries(board: dict[str, Any], *, step_s: int) -> list[Target]:
    """Every target of every panel (rows have none), in board order."""
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = str(target["expr"])
            out.append(
                Target(
                    panel=str(panel["title"]),
                    ref=str(target.get("refId", "")),
                    expr=expr,
                    query=substitute(expr, step_s=step_s),
                    legend=str(target.get("legendFormat", "")),
                )
            )
    return out


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' label value."""
    text = fmt
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_targets(state: Path) -> dict[str, str]:
    """node id -> metrics address of every node in the cluster map (`kvtier status --json`:
    what an operator's service discovery reads; it exits 1 on a degraded cluster, still
    listing every node)."""
    done = subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", "status", "--json", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, check=False, env=secure.cli_env(),
    )  # fmt: skip
    try:
        nodes = json.loads(done.stdout)["nodes"]
    except (ValueError, KeyError):
        raise RuntimeError(
            f"kvtier status --json: {done.stdout[-300:]}{done.stderr[-300:]}"
        ) from None
    return {n["node_id"]: n["metrics"] for n in nodes if n.get("metrics")}


def scrape_config(info: dict[str, Any], targets: dict[str, str]) -> str:
    """prometheus.yml (JSON is YAML): one target per node (`instance` = its node id), over
    HTTPS with the cluster CA and the operator's client certificate from cluster.json."""
    job: dict[str, Any] = {
        "job_name": "kvtier",
        "scheme": "http" if info.get("insecure") else "https",
        "static_configs": [
            {"targets": [address], "labels": {"instance": node}}
            for node, address in sorted(targets.items())
        ],
    }
    if not info.get("insecure"):
        job["tls_config"] = {
            "ca_file": info["ca_file"],
            "cert_file": info["operator_cert"],
            "key_file": info["operator_key"],
        }
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S - 1}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "scrape_configs": [job],
    }
    return json.dumps(config, indent=1)


class Prometheus:
    """Debian's prometheus scraping one dev cluster; a context manager that stops it."""

    def __init__(
        self, work: Path, info: dict[str, Any], targets: dict[str, str], binary: str = "prometheus"
    ) -> None:
        found = shutil.which(binary)
        if found is None:
            raise RuntimeError(f"no {binary} binary: `apt-get install prometheus` (Debian)")
        self.binary = found
        self.work = work
        self.info = info
        self.targets = targets
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "prometheus.yml"
        config.write_text(scrape_config(self.info, self.targets))
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = (self.work / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        try:
            self._wait("ready", lambda: self._get("/-/ready") is not None, 60)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        """The end of prometheus.log."""
        path = self.work / "prometheus.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait(self, what: str, done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            if done():
                return
            time.sleep(0.5)
        raise RuntimeError(f"prometheus: not {what} within {timeout_s:g}s\n{self.log_tail()}")

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET path: the JSON body (or text for non-API paths); None when unreachable.
        An API error (400/422: a bad expression) comes back as its JSON body."""
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as reply:
                body = reply.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if not path.startswith("/api/"):
                return None
        except OSError:
            return None
        return json.loads(body) if path.startswith("/api/") else body.decode()

    def wait_scraped(self, scrapes: int = 2, timeout_s: float = 90) -> list[dict[str, Any]]:
        """Wait until every target is up and has been scraped `scrapes` times; the targets."""
        first: dict[str, float] = {}

        def ready() -> bool:
            reply = self._get("/api/v1/targets")
            targets = (reply or {}).get("data", {}).get("activeTargets", [])
            if len(targets) < len(self.targets) or any(t["health"] != "up" for t in targets):
                return False
            now = time.time()
            for t in targets:
                first.setdefault(t["labels"]["instance"], now)
            return now - min(first.values()) >= scrapes * SCRAPE_INTERVAL_S

        self._wait("scraping every node", ready, timeout_s)
        reply = self._get("/api/v1/targets")
        return list(reply["data"]["activeTargets"])

    def targets_down(self) -> list[str]:
        """Targets whose last scrape failed, with the error."""
        reply = self._get("/api/v1/targets") or {}
        return [
            f"{t['labels']['instance']}: {t.get('lastError', '')}"
            for t in reply.get("data", {}).get("activeTargets", [])
            if t["health"] != "up"
        ]

    def query_range(self, target: Target, start: float, end: float, step_s: int) -> None:
        """Evaluate target.query over [start, end]: fills target.series or target.error."""
        params = {"query": target.query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                  "step": f"{step_s}s"}  # fmt: skip
        reply = self._get("/api/v1/query_range", params)
        if reply is None:
            target.error = "prometheus unreachable"
            return
        if reply.get("status") != "success":
            target.error = f"{reply.get('errorType')}: {reply.get('error')}"
            return
        for item in reply["data"]["result"]:
            labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
            points = [(float(t), float(v)) for t, v in item["values"]]
            target.series.append((legend(target.legend, labels), points))

    def label_values(self, label: str, metric: str) -> list[str]:
        """Grafana's label_values(metric, label), as the `tenant` variable asks it."""
        reply = self._get(f"/api/v1/label/{label}/values", {"match[]": metric}) or {}
        return list(reply.get("data", []))
