"""Figures of traces and simulations, in the manner of Clark et al.'s Figures 2-6."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display here, and none needed
import matplotlib.pyplot as plt
import numpy as np

from livemig.analysis.trace import Trace
from livemig.analysis.wws import DowntimeCurves

ROUND_COLOURS = ("#c0504d", "#e8a33d", "#4878a8", "#5a9e55")
WINDOW_COLOURS = ("#4878a8", "#5a9e55", "#e8a33d", "#c0504d", "#8064a2", "#4bacc6")


def wws_figure(
    path: Path,
    trace: Trace,
    curves: DowntimeCurves,
    sizes: np.ndarray[Any, Any],
    windows: list[int],
    hot_pages: int,
    *,
    looped: bool = False,
) -> Path:
    """Top: the writable working set over time for each window length (Figure 2).
    Below, one panel per rate: expected downtime after 1..4 rounds for a migration
    starting at each point of the trace (Figures 3-6), with the hot set's floor."""
    meta = trace.meta
    rates = curves.rates_bps
    fig, axes = plt.subplots(1 + len(rates), 1, figsize=(12, 3.0 * (1 + len(rates))),
                             squeeze=False)
    ax = axes[0][0]
    starts = trace.times[:-1]
    interval_ms = meta.interval_s * 1000
    for w, m in enumerate(windows):
        ax.step(starts, sizes[w] * meta.page_size / 2**20, where="post",
                color=WINDOW_COLOURS[w % len(WINDOW_COLOURS)], linewidth=1,
                label=f"{m} x {interval_ms:g} ms window")
    ax.axhline(hot_pages * meta.page_size / 2**20, color="black", linestyle=":",
               linewidth=1, label=f"hot set ({hot_pages} pages)")
    ax.set_xlabel("elapsed time of the trace (s)")
    ax.set_ylabel("distinct pages written (MiB)")
    ax.set_title(f"Writable working set of {meta.vm} ({meta.workload}, "
                 f"{meta.ram_bytes >> 20} MiB RAM, {meta.tracker} tracker)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_xlim(float(trace.times[0]), float(trace.times[-1]))
    ax.set_ylim(bottom=0)

    for r, rate in enumerate(rates):
        ax = axes[r + 1][0]
        mbps = rate / 1e6
        for k in range(curves.downtime_s.shape[2]):
            ax.plot(curves.starts_s, curves.downtime_s[r, :, k] * 1000,
                    color=ROUND_COLOURS[k % len(ROUND_COLOURS)], linewidth=1.2,
                    label=f"after {k + 1} round{'s' if k else ''}")
        floor_ms = hot_pages * meta.page_size * 8 / rate * 1000
        ax.axhline(floor_ms, color="black", linestyle=":", linewidth=1,
                   label=f"hot-set floor {floor_ms:.1f} ms")
        ax.set_xlim(float(trace.times[0]), float(trace.times[-1]))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("migration start time within the trace (s)")
        ax.set_ylabel("expected downtime (ms)")
        first_round = meta.ram_bytes * 8 / rate
        repeated = ", the trace repeated after its end" if looped else ""
        ax.set_title(f"Expected downtime at {mbps:g} Mbit/s (round 1 takes {first_round:.1f} s"
                     f"{repeated})")
        if np.all(np.isnan(curves.downtime_s[r])):
            ax.text(0.5, 0.5, "the trace is shorter than round 1 at this rate",
                    transform=ax.transAxes, ha="center", va="center")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_figure(path: Path, cells: list[dict[str, Any]], title: str) -> Path:
    """Two heat maps over (min rate, max rate): predicted downtime and total time."""
    lows = sorted({c["min_rate_mbps"] for c in cells})
    highs = sorted({c["max_rate_mbps"] for c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label, fmt in (
        (axes[0], "downtime_ms", "predicted downtime (ms)", "{:.0f}"),
        (axes[1], "total_time_s", "predicted total time (s)", "{:.1f}"),
    ):
        grid = np.full((len(lows), len(highs)), np.nan)
        for c in cells:
            grid[lows.index(c["min_rate_mbps"]), highs.index(c["max_rate_mbps"])] = c[key]
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r")
        fig.colorbar(image, ax=ax, label=label)
        lo, hi = np.nanmin(grid), np.nanmax(grid)
        for i in range(len(lows)):
            for j in range(len(highs)):
                value = grid[i, j]
                if np.isnan(value):
                    ax.text(j, i, "min > max", ha="center", va="center", fontsize=7,
                            color="grey")
                    continue
                # Dark text on the light (low) end of the colour map, light on the dark.
                light = hi == lo or (value - lo) / (hi - lo) < 0.5
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                        color="black" if light else "white")
        ax.set_xticks(range(len(highs)), [f"{h:g}" for h in highs])
        ax.set_yticks(range(len(lows)), [f"{lo:g}" for lo in lows])
        ax.set_xlabel("maximum rate (Mbit/s)")
        ax.set_ylabel("minimum rate (Mbit/s)")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
