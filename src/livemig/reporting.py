"""Human-readable migration progress and reports, shared by the CLI and the experiments."""

from __future__ import annotations

from livemig.units import MBIT
from livemig.wire.messages import MigrationReport, Progress


def progress_line(update: Progress) -> str:
    """One line: where it is, how far, how long still, and the downtime it would have."""
    parts = [f"{update.stage:<18}", f"round {update.round:>2}", f"{update.percent:5.1f} %"]
    if update.eta_s is not None:
        parts.append(f"ETA {update.eta_s:5.1f} s")
    if update.link_mbps is not None:
        parts.append(f"link {update.link_mbps:6.0f} Mbit/s")
    parts.append(f"dirty {update.dirty_rate_mbps:6.1f} Mbit/s")
    if update.predicted_downtime_ms is not None:
        target = ("" if update.downtime_target_ms is None
                  else f" (target {update.downtime_target_ms:g})")
        parts.append(f"downtime now ≈ {update.predicted_downtime_ms:5.0f} ms{target}")
    if update.held_pages:
        parts.append(f"{update.held_pages} hot pages held back")
    if update.stalled:
        parts.append("STALLED: the last rounds came no closer")
    return "  ".join(parts)


def report_text(report: MigrationReport) -> str:
    verified = report.verified
    lines = [
        f"migrated {report.vm} from {report.source} to {report.target} "
        f"({report.mode}, {report.tracker} tracker)",
        f"  downtime (engine)  {report.downtime_ms:.1f} ms   (device state "
        f"{report.device_state_ms:.1f} ms, verification {report.verify_ms:.1f} ms, "
        f"{report.final_pages} final pages)",
        *_downtime_lines(report),
        f"  total time         {report.total_time_s:.2f} s",
        f"  data sent          {report.bytes_sent:,} bytes = "
        f"{report.data_sent_ratio:.3f} x RAM ({report.ram_bytes >> 20} MiB)",
        f"  pre-copy ended     {report.stop_reason}",
        *([f"  aids               {', '.join(report.aids)}"] if report.aids else []),
        f"  verified           {'yes' if verified else 'NO' if verified is False else 'skipped'}"
        f" (source {report.source_checksum}, destination {report.destination_checksum})",
        f"  {'round':>5} {'sent':>8} {'skipped':>8} {'dirtied':>8} {'held':>6} "
        f"{'Mbit/s':>8} {'dirty Mbit/s':>12} {'seconds':>8}",
    ]
    for r in report.rounds:
        lines.append(
            f"  {r.number:>5} {r.pages_sent:>8} {r.pages_skipped:>8} "
            f"{r.pages_dirtied:>8} {r.pages_held:>6} {r.rate_bps / MBIT:>8.1f} "
            f"{r.dirty_rate_bps / MBIT:>12.1f} {r.duration_s:>8.3f}"
        )
    return "\n".join(lines)


def _downtime_lines(report: MigrationReport) -> list[str]:
    """The prediction against what happened, and the target, when there was one."""
    if report.predicted_downtime_ms is None:
        return []
    line = (f"  predicted          {report.predicted_downtime_ms:.1f} ms (switchover "
            f"{report.switchover_cost_ms or 0:.0f} ms + last pages at "
            f"{report.link_mbps or 0:.0f} Mbit/s measured); actual/predicted "
            f"{report.downtime_over_predicted or 0:.2f}")
    lines = [line]
    if report.downtime_target_ms is not None:
        kept = report.downtime_ms <= report.downtime_target_ms
        lines.append(f"  target             {report.downtime_target_ms:g} ms: "
                     + ("kept" if kept else "MISSED")
                     + (" (out of reach: switched over as --on-timeout said)"
                        if report.switchover_forced else ""))
    return lines
