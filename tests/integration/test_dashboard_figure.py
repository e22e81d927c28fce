"""`make dashboard` end to end (bench/dashboard_figure.py): a dev cluster, a short workload and
Debian's prometheus scraping every node; every expression of deploy/grafana/kvtier.json must be
valid PromQL and answer with data, except the targets EXPECTED_EMPTY explains, and the board is
drawn. About 2 minutes on 2 vCPUs: behind the `slow` marker (`pytest -m slow`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import dashboard_figure


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dashboard_expressions_answer_on_a_dev_cluster(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus is not installed (`make dashboard` installs it)")
    out = tmp_path / "dashboard.png"
    assert dashboard_figure.main(["--out", str(out), "--workload-s", "45"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
