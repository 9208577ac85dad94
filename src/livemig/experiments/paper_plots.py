"""The figures of ``livemig experiment paper``, drawn from results.json alone.

- ``rounds-WORKLOAD.png``: our pre-copy, rate per round over elapsed time, in the style
  of the paper's Figures 8-10, with the stop-and-copy marked;
- ``throughput-WORKLOAD.png``: the service's throughput over time for every engine, with
  the stages marked (pre-copy start, stop-and-copy, activation) and the client's outage;
- ``game-interarrival.png``: the game's snapshot inter-arrival times around the
  migration, as the paper's Quake 3 figure, one panel per engine;
- ``downtime.png``: client-observed downtime of every engine on every workload.

Everything is drawn from the figure data in results.json, so a figure can be redrawn
from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display here, and none needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

ENGINE_COLOURS = {  # every engine has its own colour: the legend must tell them apart
    "ours": "#1f5fa0",
    "ours-paper": "#17becf",
    "stop-and-copy": "#8c564b",
    "qemu-precopy": "#d62728",
    "qemu-precopy-30": "#ff7f0e",
    "qemu-multifd": "#9467bd",
    "qemu-autoconverge": "#e377c2",
    "qemu-postcopy": "#2ca02c",
    "floor": "#7f7f7f",
    "ours-30": "#6baed6",
    "ours-300": "#08306b",
    "qemu-precopy-100": "#fd8d3c",
}
MARKERS = (  # stage name in our report -> label and style of its line
    ("iterative pre-copy", "pre-copy starts", "#1f77b4", "--"),
    ("stop-and-copy", "stop-and-copy", "#d62728", "-"),
    ("activation", "activation", "#2ca02c", "-"),
)
OUR_ENGINES = ("ours", "ours-paper", "stop-and-copy", "ours-30", "ours-300")
DPI = 110


def _label(results: dict[str, Any], engine: str) -> str:
    return str(results["engine_labels"].get(engine, engine))


def _num(value: float | None, spec: str) -> str:
    """A figure for a title; a run that did not produce it says so."""
    return "n/a" if value is None else format(value, spec)


def _in_table_order(results: dict[str, Any], figures: dict[str, Any]
                    ) -> list[tuple[str, Any]]:
    """The engines' figure series in the tables' order, not the order they ran in."""
    order = list(results["engines"])
    return sorted(figures.items(), key=lambda item: (
        order.index(item[0]) if item[0] in order else len(order)))


def _save(fig: Any, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def _draw_rounds(ax: Any, data: dict[str, Any], max_rate: float, *, labels: bool) -> float:
    """Bars of the rounds and of the stop-and-copy on ``ax``; returns the top rate."""
    rounds = data["rounds"]
    end = 0.0
    for r in rounds:
        width = max(r["duration_s"], 1e-3)
        ax.bar(r["start_s"], r["transfer_mbps"], width=width, align="edge", color="#4878a8",
               edgecolor="white", linewidth=0.8)
        ax.hlines(r["dirty_mbps"], r["start_s"], r["start_s"] + width, colors="#c0504d",
                  linewidth=2.2)
        ax.hlines(r["limit_mbps"], r["start_s"], r["start_s"] + width, colors="black",
                  linewidth=1, linestyles=":")
        end = r["start_s"] + width
    stop = data["stop_and_copy"]
    downtime_s = stop["downtime_ms"] / 1e3
    # The last pages go at the maximum rate; what shows the cost is the bar's width.
    ax.bar(stop["start_s"], max_rate, width=max(downtime_s, 1e-3), align="edge",
           color="#d62728", alpha=0.85)
    top = max([r["transfer_mbps"] for r in rounds] + [r["limit_mbps"] for r in rounds]
              + [r["dirty_mbps"] for r in rounds] + [max_rate])
    if labels:
        span = max(stop["start_s"] + downtime_s, end)
        for r in rounds:  # numbered where a label fits; narrow rounds go unlabelled
            if r["duration_s"] >= 0.05 * span:
                ax.text(r["start_s"] + r["duration_s"] / 2, r["transfer_mbps"] + top * 0.02,
                        f"round {r['number']}\n{r['mb_sent']:.0f} MB", ha="center",
                        va="bottom", fontsize=8)
    return float(top)


def rounds_figure(results: dict[str, Any], key: str, out: Path) -> str | None:
    workload = results["workloads"][key]
    series = workload["figures"].get("ours")
    if not series or not series.get("rounds"):
        return None
    data = series["rounds"]
    ratio = series.get("data_sent_ratio", workload["table"]["ours"]["data_sent_ratio"])
    max_rate = float(results["settings"]["max_rate_mbps"])
    rounds = data["rounds"]
    stop = data["stop_and_copy"]
    fig, ax = plt.subplots(figsize=(10, 5))
    top = _draw_rounds(ax, data, max_rate, labels=True)
    end = stop["start_s"] + stop["downtime_ms"] / 1e3
    ax.set_ylim(0, top * 1.45)
    ax.set_xlim(0, end * 1.03)
    # Round 1 dominates the time axis; the later rounds and the stop-and-copy, which
    # decide the downtime, get an enlarged view of their own.
    if len(rounds) > 1 and end - rounds[1]["start_s"] < 0.15 * end:
        inset = ax.inset_axes((0.06, 0.42, 0.42, 0.4))
        _draw_rounds(inset, data, max_rate, labels=False)
        first = rounds[1]["start_s"]
        margin = 0.05 * (end - first)
        inset.set_xlim(first - margin, end + margin)
        inset.set_ylim(0, top * 1.1)
        for later in rounds[1:]:
            if later["duration_s"] >= 0.12 * (end - first):
                inset.text(later["start_s"] + later["duration_s"] / 2, top * 0.02,
                           str(later["number"]), ha="center", va="bottom", fontsize=7,
                           color="white")
        later = "round 2" if len(rounds) == 2 else f"rounds 2-{len(rounds)}"
        inset.set_title(f"{later} and the stop-and-copy, enlarged", fontsize=8)
        inset.tick_params(labelsize=7)
        ax.indicate_inset_zoom(inset, edgecolor="#555555")
    ax.set_xlabel("elapsed time since the migration began (s)")
    ax.set_ylabel("rate (Mbit/s)")
    ax.set_title(f"{key}: {workload['title']}\nour pre-copy, rate per round: "
                 f"{len(rounds)} rounds, {_num(ratio, '.2f')} x RAM sent, "
                 f"stop-and-copy of {stop['mb_sent']:.1f} MB in {stop['downtime_ms']:.0f} ms "
                 f"(pre-copy ended: {data['stop_reason']})", fontsize=10)
    ax.plot([], [], color="#4878a8", linewidth=8, label="transfer rate of the round "
            "(area: data sent)")
    ax.plot([], [], color="#c0504d", linewidth=2.2, label="dirty rate during the round")
    ax.plot([], [], color="black", linewidth=1, linestyle=":", label="rate limit of the round")
    ax.plot([], [], color="#d62728", linewidth=8, label="stop-and-copy (VM paused; width "
            "= engine downtime)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out, f"rounds-{key}.png")


def _mark(ax: Any, series: dict[str, Any], engine: str) -> None:
    """Stage lines on a time axis (s from the migration's start) and the client outage."""
    ymax = ax.get_ylim()[1]
    ours = engine in OUR_ENGINES
    if ours:
        stages = {s["name"]: s["t_s"] for s in series["stages"]}
        for name, label, colour, style in MARKERS:
            # In stop-and-copy mode the pre-copy stage is passed through without a round.
            if name in stages and not (engine == "stop-and-copy" and name == MARKERS[0][0]):
                ax.axvline(stages[name], color=colour, linestyle=style, linewidth=1.2,
                           label=label)
    else:
        ax.axvline(0.0, color="#1f77b4", linestyle="--", linewidth=1.2,
                   label="migration starts")
        switch = series.get("switchover")
        if switch:  # as our stages: the VM stops, then runs on the target
            ax.axvline(switch["stop_s"], color="#d62728", linewidth=1.2, label="VM stopped")
            ax.axvline(switch["running_s"], color="#2ca02c", linewidth=1.2,
                       label="VM runs on the target")
    ax.axvline(series["total_time_s"], color="black", linestyle=":", linewidth=1.2,
               label="source released" if ours else "QEMU: completed")
    gap = series.get("client_gap")
    if gap:
        ax.axvspan(gap["start_s"], gap["end_s"], color="#d62728", alpha=0.25,
                   label=f"client outage {gap['ms']:.0f} ms")
    ax.set_ylim(top=ymax)


def throughput_figure(results: dict[str, Any], key: str, out: Path) -> str | None:
    workload = results["workloads"][key]
    shown = [(e, s) for e, s in _in_table_order(results, workload["figures"])
             if s.get("throughput")]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(11, 2.3 * len(shown) + 0.9),
                             sharex=True, squeeze=False)
    unit = shown[0][1]["throughput"]["unit"]
    width = shown[0][1]["throughput"]["bucket_s"]
    right = max(max(s["throughput"]["t_s"] or [0.0]) for _, s in shown)
    left = min(min(s["throughput"]["t_s"] or [0.0]) for _, s in shown)
    for ax, (engine, s) in zip(axes[:, 0], shown, strict=True):
        t = np.asarray(s["throughput"]["t_s"])
        v = np.asarray(s["throughput"]["values"])
        ax.step(t, v, where="post", color=ENGINE_COLOURS.get(engine, "#444444"), linewidth=1.2)
        ax.set_ylim(0, max(float(v.max()) if v.size else 1.0, 1e-9) * 1.15)
        _mark(ax, s, engine)
        # The figures of the run drawn here, which the table's medians need not be.
        gap = s.get("client_gap") or {}
        ax.set_title(f"{_label(results, engine)}: client downtime "
                     f"{_num(gap.get('ms'), '.0f')} ms, total "
                     f"{_num(s.get('total_time_s'), '.1f')} s", fontsize=9, loc="left")
        ax.set_ylabel(unit)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlim(left, right)
    axes[-1, 0].set_xlabel("time since the migration began (s)")
    missing = [_label(results, e) for e, r in workload["table"].items()
               if e not in workload["figures"]]
    note = f"\nnot shown, did not complete: {', '.join(missing)}" if missing else ""
    runs = results["settings"]["runs"]
    which = "" if runs == 1 else f" (the first of {runs} runs)"
    fig.suptitle(f"{key}: {workload['title']}\nservice throughput ({width * 1000:.0f} ms "
                 f"buckets) during each engine's migration{which}{note}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, f"throughput-{key}.png")


def game_figure(results: dict[str, Any], out: Path) -> str | None:
    workload = results["workloads"].get("game")
    if workload is None:
        return None
    shown = [(e, s) for e, s in _in_table_order(results, workload["figures"])
             if s.get("game_interarrival")]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 2.2 * len(shown) + 0.9), sharex=True,
                             squeeze=False)
    for ax, (engine, s) in zip(axes[:, 0], shown, strict=True):
        data = s["game_interarrival"]
        t = np.asarray(data["t_s"])
        gap = np.asarray(data["gap_ms"])
        ax.plot(t, gap, ".", markersize=2.5, color=ENGINE_COLOURS.get(engine, "#444444"),
                label="snapshot inter-arrival (any player)")
        ax.set_ylim(0, max(float(gap.max()) if gap.size else 100.0, 100.0) * 1.15)
        _mark(ax, s, engine)
        worst = float(gap.max()) if gap.size else float("nan")
        ax.set_title(f"{_label(results, engine)}: longest gap a player saw {worst:.0f} ms "
                     f"(normal: 50 ms at 20 Hz)", fontsize=9, loc="left")
        ax.set_ylabel("inter-arrival (ms)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("time since the migration began (s)")
    players = shown[0][1]["game_interarrival"]["players"]
    fig.suptitle(f"game server, {players} players: packet inter-arrival times around the "
                 f"migration", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "game-interarrival.png")


def downtime_figure(results: dict[str, Any], out: Path) -> str | None:
    workloads = list(results["workloads"])
    engines = list(results["engines"])
    if not workloads or not engines:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.6))
    width = 0.8 / len(engines)
    x = np.arange(len(workloads))
    top = 1.0
    handles: list[Any] = []
    for i, engine in enumerate(engines):
        for j, key in enumerate(workloads):
            row = results["workloads"][key]["table"].get(engine)
            value = None if row is None else row["client_downtime_ms"]
            xpos = x[j] - 0.4 + (i + 0.5) * width
            if row is None:
                continue
            if value is None:
                ax.text(xpos, 1.5, "did not\ncomplete" if row["status"] != "ok" else "n/a",
                        rotation=90, ha="center", va="bottom", fontsize=7, color="#666666")
                continue
            ax.bar(xpos, value, width=width * 0.92,
                   color=ENGINE_COLOURS.get(engine, "#444444"))
            top = max(top, value)
            floor = row.get("echo_gap_before_ms")
            if floor:
                ax.hlines(floor, xpos - width * 0.46, xpos + width * 0.46, colors="black",
                          linewidth=1.5)
        handles.append(Patch(color=ENGINE_COLOURS.get(engine, "#444444"),
                             label=_label(results, engine)))
    ax.set_yscale("log")
    ax.set_ylim(1, top * 3)
    ax.set_xlim(-0.5, len(workloads) - 0.5)
    ax.set_xticks(x, workloads)
    ax.set_ylabel("client-observed downtime (ms, log scale)")
    ax.set_title("longest gap in a 1 ms UDP echo across the migration, per workload and engine",
                 fontsize=10)
    handles.append(Line2D([], [], color="black", linewidth=1.5,
                          label="longest echo gap before the migration (noise floor)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, out, "downtime.png")


def draw_all(results: dict[str, Any], out: Path) -> list[str]:
    """Every figure into ``out``; returns the file names."""
    names: list[str | None] = []
    for key in results["workloads"]:
        names.append(rounds_figure(results, key, out))
        names.append(throughput_figure(results, key, out))
    names.append(game_figure(results, out))
    names.append(downtime_figure(results, out))
    return [n for n in names if n is not None]
