"""Human-readable migration progress and reports, shared by the CLI and the experiments."""

from __future__ import annotations

from livemig.units import MBIT
from livemig.wire.messages import MigrationReport, Progress


def progress_line(update: Progress) -> str:
    return (
        f"{update.stage:<18} round {update.round:>2}  "
        f"{update.rate_mbps:7.1f} Mbit/s  dirty {update.dirty_rate_mbps:7.1f} Mbit/s  "
        # What it is, not a downtime: the switchover's fixed costs and the pages dirtied
        # meanwhile come on top (9 ms shown here, 77 ms measured, in one demo).
        f"left: {update.pages_left:>7} pages, "
        f"≥ {update.pages_left_at_max_rate_ms:6.1f} ms at the max rate"
    )


def report_text(report: MigrationReport) -> str:
    verified = report.verified
    lines = [
        f"migrated {report.vm} from {report.source} to {report.target} "
        f"({report.mode}, {report.tracker} tracker)",
        f"  downtime (engine)  {report.downtime_ms:.1f} ms   (device state "
        f"{report.device_state_ms:.1f} ms, verification {report.verify_ms:.1f} ms, "
        f"{report.final_pages} final pages)",
        f"  total time         {report.total_time_s:.2f} s",
        f"  data sent          {report.bytes_sent:,} bytes = "
        f"{report.data_sent_ratio:.3f} x RAM ({report.ram_bytes >> 20} MiB)",
        f"  pre-copy ended     {report.stop_reason}",
        f"  verified           {'yes' if verified else 'NO' if verified is False else 'skipped'}"
        f" (source {report.source_checksum}, destination {report.destination_checksum})",
        f"  {'round':>5} {'sent':>8} {'skipped':>8} {'dirtied':>8} {'Mbit/s':>8} "
        f"{'dirty Mbit/s':>12} {'seconds':>8}",
    ]
    for r in report.rounds:
        lines.append(
            f"  {r.number:>5} {r.pages_sent:>8} {r.pages_skipped:>8} "
            f"{r.pages_dirtied:>8} {r.rate_bps / MBIT:>8.1f} "
            f"{r.dirty_rate_bps / MBIT:>12.1f} {r.duration_s:>8.3f}"
        )
    return "\n".join(lines)
