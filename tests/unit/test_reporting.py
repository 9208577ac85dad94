"""The operator's progress line and report say what their numbers are."""

from __future__ import annotations

import msgspec
from test_messages import a_report

from livemig.reporting import progress_line, report_text
from livemig.wire.messages import Progress


def test_the_progress_line_gives_percent_eta_link_and_the_downtime_against_its_target() -> None:
    update = Progress(stage="iterative pre-copy", round=3, pages_left=2304,
                      rate_mbps=412.0, dirty_rate_mbps=120.5, bytes_sent=1 << 27,
                      elapsed_s=4.2, percent=61.25, eta_s=1.5, link_mbps=941.3,
                      predicted_downtime_ms=84.4, downtime_target_ms=100.0)
    line = progress_line(update)
    assert "round  3" in line and " 61.2 %" in line and "ETA   1.5 s" in line
    assert "link    941 Mbit/s" in line and "dirty  120.5 Mbit/s" in line
    assert "downtime now ≈    84 ms (target 100)" in line
    assert "STALLED" not in line


def test_a_stalled_migration_says_so_and_no_prediction_means_none_shown() -> None:
    update = Progress(stage="iterative pre-copy", round=9, pages_left=0, rate_mbps=0.0,
                      dirty_rate_mbps=900.0, bytes_sent=0, elapsed_s=12.0, stalled=True)
    line = progress_line(update)
    assert "STALLED" in line
    assert "downtime" not in line and "ETA" not in line and "link" not in line


def test_the_report_puts_the_prediction_beside_the_actual_downtime_and_the_target() -> None:
    report = a_report(downtime_ms=48.0, predicted_downtime_ms=40.0, switchover_cost_ms=30.0,
        link_mbps=940.0, downtime_over_predicted=1.2, downtime_target_ms=50.0)
    text = report_text(report)
    assert "predicted          40.0 ms (switchover 30 ms + last pages at 940 Mbit/s" in text
    assert "actual/predicted 1.20" in text
    assert "target             50 ms: kept" in text
    missed = report_text(msgspec.structs.replace(report, downtime_ms=51.0,
                                                 switchover_forced=True))
    assert "50 ms: MISSED (out of reach: switched over as --on-timeout said)" in missed
