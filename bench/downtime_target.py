"""The downtime promise, kept or not: ours and QEMU 10 at the same targets, same VMs, run.

For each workload (idle, web, specweb, game) and each target (30, 100, 300 ms), ours
migrates with ``--downtime`` set to the target and no rate, and QEMU 10 with its
``downtime-limit`` set to the same, engines interleaved run by run on one VM (the
machinery of ``livemig experiment paper``). Per cell and engine it prints:

- the paused time over the target (median and worst run): the VM's STOP event on the
  source to its RESUME event on the target, measured alike for both engines;
- ours: the predicted downtime over the actual one;
- total time, data sent (x RAM), service impact (throughput during over before) and
  client downtime (the longest echo gap across the switchover);
- runs that did not complete: ours aborts when the target is out of reach (that is the
  promise: never overshoot silently), QEMU gives up when it does not converge.

    .venv/bin/python bench/downtime_target.py [--runs 5] [--out bench-results/downtime]
        [--workloads idle,web,specweb,game] [--link 1gbit]

Writes downtime-target.json, downtime-target.md and downtime-target.png (actual against
target, both engines) beside the experiment's own results. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError
from livemig.experiments import paper

TARGETS_MS = (30, 100, 300)
# Per target: our engine and QEMU's at that downtime-limit (paper.ENGINES' keys).
ENGINES = {30: ("ours-30", "qemu-precopy-30"), 100: ("ours", "qemu-precopy-100"),
           300: ("ours-300", "qemu-precopy")}
WORKLOADS = ("idle", "web", "specweb", "game")


def _median_worst(values: list[float], worst: Any = max) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.median(values), worst(values)


def cell(rows: list[dict[str, Any]], target_ms: float) -> dict[str, Any]:
    """One engine at one target on one workload, from its runs' rows."""
    done = [r for r in rows if r["status"] == "ok" and r.get("paused_ms") is not None]
    over = [r["paused_ms"] / target_ms for r in done]
    predicted = [r["predicted_downtime_ms"] / r["paused_ms"] for r in done
                 if r.get("predicted_downtime_ms") and r["paused_ms"]]
    impact = [r["service_impact"] for r in done if r.get("service_impact") is not None]

    def col(key: str) -> list[float]:
        return [r[key] for r in done if r.get(key) is not None]

    return {
        "runs": len(rows), "completed": len(done),
        "not_completed": [r.get("error") or r["status"] for r in rows if r not in done],
        "actual_over_target": _median_worst(over),
        "predicted_over_actual": _median_worst(predicted, worst=min),
        "paused_ms": _median_worst(col("paused_ms")),
        "total_time_s": _median_worst(col("total_time_s")),
        "data_sent_ratio": _median_worst(col("data_sent_ratio")),
        "service_impact": _median_worst(impact, worst=min),
        "client_downtime_ms": _median_worst(col("client_downtime_ms")),
    }


def table(results: dict[str, Any]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for workload, data in results["workloads"].items():
        for target, keys in ENGINES.items():
            for key in keys:
                rows = data["runs"].get(key, [])
                cells[f"{workload}/{target}/{key}"] = {
                    "workload": workload, "target_ms": target, "engine": key,
                    **cell(rows, target)}
    return cells


def _fmt(pair: tuple[float | None, float | None], spec: str) -> str:
    median, worst = pair
    if median is None:
        return "-"
    return f"{median:{spec}} ({worst:{spec}})"


def markdown(cells: dict[str, Any]) -> str:
    heads = ["workload", "target", "engine", "actual/target", "predicted/actual",
             "paused ms", "total s", "sent x RAM", "service", "client downtime ms",
             "done"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for c in cells.values():
        done = f"{c['completed']}/{c['runs']}"
        lines.append("| " + " | ".join([
            c["workload"], f"{c['target_ms']} ms", c["engine"],
            _fmt(c["actual_over_target"], ".2f"), _fmt(c["predicted_over_actual"], ".2f"),
            _fmt(c["paused_ms"], ".0f"), _fmt(c["total_time_s"], ".2f"),
            _fmt(c["data_sent_ratio"], ".2f"), _fmt(c["service_impact"], ".2f"),
            _fmt(c["client_downtime_ms"], ".0f"), done]) + " |")
    return "\n".join(lines) + (
        "\n\nCells: median (worst run). actual/target and client downtime: worst is the "
        "highest; predicted/actual and service: the lowest. Paused: the source's STOP "
        "event to the target's RESUME event.\n")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for side, colour, offset in (("ours", "#1f5fa0", 0.97), ("qemu", "#d62728", 1.03)):
        for target, keys in ENGINES.items():
            key = keys[0] if side == "ours" else keys[1]
            paused = [r["paused_ms"] for data in results["workloads"].values()
                      for r in data["runs"].get(key, [])
                      if r["status"] == "ok" and r.get("paused_ms") is not None]
            ax.scatter([target * offset] * len(paused), paused, s=12, alpha=0.6,
                       color=colour, label=("ours" if side == "ours" else "QEMU 10")
                       if target == TARGETS_MS[0] else None)
            # Runs that did not complete have no paused time: say how many, not nothing.
            missing = sum(1 for data in results["workloads"].values()
                          for r in data["runs"].get(key, []) if r["status"] != "ok")
            if missing:
                ax.annotate(f"{missing} not done", (target * offset, 0.03),
                            xycoords=("data", "axes fraction"), color=colour, fontsize=8,
                            ha="center", va="bottom", rotation=90)
    ax.plot(TARGETS_MS, TARGETS_MS, "--", color="#444444", label="target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(TARGETS_MS, [str(t) for t in TARGETS_MS])
    ax.set_xlabel("downtime target (ms)")
    ax.set_ylabel("VM paused (ms), every run")
    ax.set_title("The downtime asked for and the downtime had")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--out", type=Path, default=Path("bench-results/downtime"))
    paper.add_link_argument(parser)
    args = parser.parse_args()
    engines = ",".join(key for keys in ENGINES.values() for key in keys)
    settings = dataclasses.replace(
        paper.Settings(), baseline_s=3.0, after_s=1.5, qemu_timeout_s=30.0, link=args.link,
    ).choose(args.runs, args.workloads, engines)
    try:
        results = paper.run(settings, args.out)
    except LivemigError as exc:
        print(f"bench/downtime_target.py: {exc}", file=sys.stderr)
        return 1
    cells = table(results)
    (args.out / "downtime-target.json").write_text(json.dumps(cells, indent=2) + "\n")
    text = markdown(cells)
    (args.out / "downtime-target.md").write_text(text)
    plot(results, args.out / "downtime-target.png")
    print(text)
    print(f"results: {args.out / 'downtime-target.md'}, {args.out / 'downtime-target.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
