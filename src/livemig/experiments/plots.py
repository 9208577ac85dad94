"""Figures of a migration: rounds in the style of the paper's Figures 8-10, and what the
client saw, with the stages marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display here, and none needed
import matplotlib.pyplot as plt
import numpy as np

STAGE_COLOURS = {
    "iterative pre-copy": "#dbe9f6",
    "stop-and-copy": "#f6d5d5",
    "commitment": "#f6ecd5",
    "activation": "#dff2dc",
}


def _rounds_axes(ax: Any, report: dict[str, Any]) -> None:
    """Transfer rate of each round over elapsed time, with the dirty rate beside it."""
    t = 0.0
    for r in report["rounds"]:
        width = max(r["duration_s"], 1e-3)
        ax.bar(t, r["rate_bps"] / 1e6, width=width, align="edge", color="#4878a8",
               edgecolor="white", linewidth=0.5)
        ax.hlines(r["dirty_rate_bps"] / 1e6, t, t + width, colors="#c0504d", linewidth=2)
        ax.text(t + width / 2, r["rate_bps"] / 1e6, f"{r['number']}", ha="center",
                va="bottom", fontsize=7)
        t += width
    downtime_s = report["downtime_ms"] / 1000
    ax.bar(t, 0, width=0)  # keeps the axis honest when there were no rounds
    ax.axvspan(t, t + max(downtime_s, 1e-3), color="#c0504d", alpha=0.3,
               label=f"stop-and-copy + activation: {report['downtime_ms']:.0f} ms")
    ax.set_xlabel("elapsed time of the pre-copy (s)")
    ax.set_ylabel("Mbit/s")
    ax.set_title(
        f"{report['vm']}: {len(report['rounds'])} rounds, {report['data_sent_ratio']:.2f} x RAM "
        f"sent, engine downtime {report['downtime_ms']:.0f} ms"
    )
    ax.plot([], [], color="#4878a8", linewidth=6, label="transfer rate of the round")
    ax.plot([], [], color="#c0504d", linewidth=2, label="dirty rate during the round")
    ax.legend(loc="upper right", fontsize=8)


def _mark_stages(ax: Any, stages: list[tuple[str, float]], t0_s: float, end_s: float) -> None:
    for (name, start), (_, stop) in zip(stages, [*stages[1:], ("", end_s - t0_s)], strict=True):
        if name in STAGE_COLOURS:
            ax.axvspan(t0_s + start, t0_s + stop, color=STAGE_COLOURS[name], zorder=0,
                       label=name)


def migration_figure(
    path: Path,
    report: dict[str, Any],
    *,
    echo: dict[str, Any] | None = None,
    throughput: tuple[str, np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None,
    migration_started_s: float | None = None,
) -> Path:
    """One PNG: the rounds on top; below, the echo probe's round-trip times (gaps are
    downtime) and the service's throughput over time, with the stages shaded.

    ``throughput`` is (label, times in s, values); times are on the probes' clock, in s
    from the echo probe's start, as is ``migration_started_s``.
    """
    rows = 1 + (echo is not None) + (throughput is not None)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3.2 * rows), squeeze=False)
    _rounds_axes(axes[0][0], report)
    row = 1
    end_s = 0.0
    if echo is not None:
        ax = axes[row][0]
        replies = np.asarray(echo["replies"], dtype=np.int64).reshape(-1, 3)
        t0 = echo["started_ns"]
        if len(replies):
            sent = (replies[:, 1] - t0) / 1e9
            rtt = (replies[:, 2] - replies[:, 1]) / 1e6
            ax.plot(sent, rtt, ".", markersize=1.5, color="#4878a8")
            end_s = float(sent.max())
        summary = echo["summary"]
        if summary.get("gap_start_ns"):
            gap_a = (summary["gap_start_ns"] - t0) / 1e9
            gap_b = (summary["gap_end_ns"] - t0) / 1e9
            ax.axvspan(gap_a, gap_b, color="#c0504d", alpha=0.5,
                       label=f"longest gap: {summary['downtime_ms']:.0f} ms")
        if migration_started_s is not None:
            _mark_stages(ax, report["stages"], migration_started_s,
                         migration_started_s + report["total_time_s"] + 0.01)
        ax.set_yscale("log")
        ax.set_ylabel("echo RTT (ms)")
        ax.set_xlabel("time (s)")
        ax.set_title("UDP echo from the client every 1 ms")
        ax.legend(loc="upper left", fontsize=8)
        row += 1
    if throughput is not None:
        ax = axes[row][0]
        label, times, values = throughput
        ax.step(times, values, where="post", color="#4878a8")
        if migration_started_s is not None:
            _mark_stages(ax, report["stages"], migration_started_s,
                         migration_started_s + report["total_time_s"] + 0.01)
            ax.legend(loc="lower left", fontsize=8)
        ax.set_ylabel(label)
        ax.set_xlabel("time (s)")
        ax.set_title("service throughput (100 ms buckets)")
        ax.set_xlim(left=0, right=max(end_s, float(times.max()) if len(times) else 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
