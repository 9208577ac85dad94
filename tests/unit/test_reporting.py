"""The operator's progress line says what its numbers are."""

from __future__ import annotations

from livemig.reporting import progress_line
from livemig.wire.messages import Progress


def test_the_progress_line_gives_the_pages_left_at_the_max_rate_not_a_downtime() -> None:
    # What the daemon sends. 2304 pages at 1 Gbit/s: 75.5 ms.
    update = Progress(stage="iterative pre-copy", round=3, pages_left=2304,
                      rate_mbps=412.0, dirty_rate_mbps=120.5,
                      pages_left_at_max_rate_ms=75.497472, bytes_sent=1 << 27, elapsed_s=4.2)
    line = progress_line(update)
    assert "left:    2304 pages, ≥   75.5 ms at the max rate" in line
    assert "downtime" not in line  # nothing predicts it yet
    assert "round  3" in line and "412.0 Mbit/s" in line and "dirty   120.5 Mbit/s" in line
