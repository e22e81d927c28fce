"""Draws deploy/grafana/kvtier.json as one PNG from Prometheus's answers (bench/dashboard_prom.py):
each panel at its gridPos (24 columns; a grid row is drawn 0.25 inch high), rows as headings,
time series as lines over the run with their legends at the left (the 12 highest), stat
panels as their last value per series, in the panel's unit. This is matplotlib, not Grafana:
it shows what the expressions return, not Grafana's exact look.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

from bench import dashboard_prom

WIDTH_IN = 16.0
ROW_IN = 0.25  # one gridPos height unit
GAP = 0.003  # between panels, as a fraction of the figure
MAX_LEGEND = 12
LEFT = 0.37  # of a panel's width: its legend, then the y tick labels
COLORS = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9",
          "#705da0", "#508642", "#cca300")  # fmt: skip
SCALES = {
    "bytes": (1024.0, ("B", "KiB", "MiB", "GiB", "TiB")),
    "Bps": (1024.0, ("B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s")),
}


def fmt(value: float, unit: str) -> str:
    """value in a Grafana unit (short, s, ops, reqps, bytes, Bps, percentunit)."""
    if not math.isfinite(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit in SCALES:
        base, names = SCALES[unit]
        i = 0
        while abs(value) >= base and i < len(names) - 1:
            value, i = value / base, i + 1
        return f"{value:.3g} {names[i]}"
    if unit == "s":
        if value == 0:
            return "0 s"
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    suffix = {"ops": " ops/s", "reqps": " req/s"}.get(unit, "")
    return f"{value:.3g}{suffix}"


def _frame(fig: Any, pos: dict[str, int], total_h: int) -> tuple[float, float, float, float]:
    """(left, bottom, width, height) of a gridPos in figure fractions, less a gap."""
    row = 1 / total_h
    left, width = pos["x"] / 24 + GAP, pos["w"] / 24 - 2 * GAP
    top, height = 1 - pos["y"] * row - GAP, pos["h"] * row - 2 * GAP
    return left, top - height, width, height


def _inner(
    frame: tuple[float, float, float, float], total_h: int
) -> tuple[float, float, float, float]:
    """The plot area inside a panel frame: room for the title, tick labels and the legend."""
    left, bottom, width, height = frame
    row = 1 / total_h
    return (left + LEFT * width, bottom + 0.9 * row, (0.98 - LEFT) * width, height - 2.1 * row)


def _timeseries(ax: Any, targets: list[dashboard_prom.Target], unit: str,
                span: tuple[float, float]) -> None:  # fmt: skip
    import matplotlib.dates as mdates
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    lines = [(name, points) for t in targets for name, points in t.series]
    # The legend shows the MAX_LEGEND series with the highest peaks (Grafana's would scroll).
    lines.sort(key=lambda line: -max((v for _, v in line[1] if math.isfinite(v)), default=0))
    for i, (name, points) in enumerate(lines):
        when = [datetime.datetime.fromtimestamp(t, datetime.UTC) for t, _ in points]
        label = name[:28] if i < MAX_LEGEND else None
        ax.plot(when, [v for _, v in points], color=COLORS[i % len(COLORS)], lw=1.1, label=label)
    lo, hi = (datetime.datetime.fromtimestamp(t, datetime.UTC) for t in span)
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(mdates.SecondLocator(bysecond=(0, 30)))  # type: ignore[no-untyped-call]
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt(v, unit)))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.25)
    more = f"+{len(lines) - MAX_LEGEND} more" if len(lines) > MAX_LEGEND else None
    handles, labels = ax.get_legend_handles_labels()
    if more:
        handles.append(ax.plot([], [], alpha=0)[0])
        labels.append(more)
    at = -(LEFT - 0.005) / (0.98 - LEFT)  # the panel's left edge, in axes fractions
    ax.legend(handles, labels, fontsize=5.5, loc="upper left", bbox_to_anchor=(at, 1.0),
              frameon=False, handlelength=1.2, borderaxespad=0)  # fmt: skip


def _stat(ax: Any, targets: list[dashboard_prom.Target], unit: str) -> None:
    """The last finite value of each series (Grafana's default reducer, "Last *")."""
    values = []
    for target in targets:
        for name, points in target.series:
            finite = [v for _, v in points if math.isfinite(v)]
            if finite:
                values.append((name, finite[-1]))
    ax.set_axis_off()
    for k, (name, value) in enumerate(values):
        x = (k + 0.5) / len(values)
        ax.text(x, 0.5, fmt(value, unit), ha="center", va="center", fontsize=20,
                color="#3d8c40", weight="bold", transform=ax.transAxes)  # fmt: skip
        ax.text(x, 0.2, name, ha="center", va="center", fontsize=8, transform=ax.transAxes)


def render(board: dict[str, Any], targets: list[dashboard_prom.Target], path: Path,
           note: str, span: tuple[float, float]) -> None:  # fmt: skip
    """Draw every panel of board with its evaluated targets (over span, Unix seconds) into
    path (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = board["panels"]
    total_h = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) + 2  # + header
    fig = plt.figure(figsize=(WIDTH_IN, total_h * ROW_IN))
    fig.text(0.01, 1 - 1 / total_h, f"{board['title']}  ({note})", fontsize=11,
             weight="bold", va="center")  # fmt: skip
    by_panel: dict[str, list[dashboard_prom.Target]] = {}
    for target in targets:
        by_panel.setdefault(target.panel, []).append(target)
    for panel in panels:
        pos = dict(panel["gridPos"], y=panel["gridPos"]["y"] + 2)
        if panel["type"] == "row":
            fig.text(pos["x"] / 24 + GAP, 1 - (pos["y"] + 0.5) / total_h, panel["title"],
                     fontsize=11, weight="bold", va="center", color="#1f60c4")  # fmt: skip
            continue
        frame = _frame(fig, pos, total_h)
        fig.add_artist(Rectangle(frame[:2], frame[2], frame[3], transform=fig.transFigure,
                                 fill=True, facecolor="#f7f8fa", edgecolor="#c7d0d9", lw=0.8,
                                 zorder=-1))  # fmt: skip
        fig.text(frame[0] + 0.004, frame[1] + frame[3] - 0.45 / total_h, panel["title"],
                 fontsize=8.5, weight="bold", va="center")  # fmt: skip
        mine = by_panel.get(panel["title"], [])
        unit = str(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"))
        if not any(t.has_data for t in mine):
            fig.text(frame[0] + frame[2] / 2, frame[1] + frame[3] / 2, "No data",
                     ha="center", va="center", fontsize=10, color="#888888")  # fmt: skip
        elif panel["type"] == "stat":
            _stat(fig.add_axes(frame), mine, unit)
        else:
            _timeseries(fig.add_axes(_inner(frame, total_h)), mine, unit, span)
    fig.savefig(path, dpi=80)
    plt.close(fig)
