"""WWS analysis on traces small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from livemig.analysis import wws
from livemig.analysis.trace import Trace, TraceMeta

PAGE_BITS = 4096 * 8


def trace_of(intervals: list[list[int]], npages: int = 100) -> Trace:
    meta = TraceMeta(vm="v", workload="idle", tracker="uffd", npages=npages, interval_s=1.0,
                     started_at=0.0)
    return Trace.from_intervals(meta, np.arange(len(intervals) + 1, dtype=np.float64),
                                [np.array(s, dtype=np.int64) for s in intervals])


def test_wws_sizes_count_distinct_pages_per_window() -> None:
    trace = trace_of([[0, 1, 2], [1, 2], [2, 3], []])
    sizes = wws.wws_sizes(trace, [1, 2, 4])
    assert sizes[0].tolist() == [3, 2, 2, 0]
    assert sizes[1][:3].tolist() == [3, 3, 2] and np.isnan(sizes[1][3])
    assert sizes[2][0] == 4 and np.isnan(sizes[2][1:]).all()


def test_wws_sizes_match_a_brute_force_count() -> None:
    rng = np.random.default_rng(3)
    intervals = [sorted(set(rng.integers(0, 50, rng.integers(0, 30)).tolist()))
                 for _ in range(40)]
    trace = trace_of(intervals, npages=50)
    sizes = wws.wws_sizes(trace, [1, 3, 7])
    for w, m in enumerate([1, 3, 7]):
        for k in range(40 - m + 1):
            expected = len(set().union(*map(set, intervals[k:k + m])))
            assert sizes[w, k] == expected


def test_the_hot_set_is_the_pages_written_in_most_intervals() -> None:
    trace = trace_of([[0, 1, 2], [1, 2], [2, 3], []])
    hot = wws.hot_set(trace, 0.5)
    assert (hot.pages, hot.distinct_pages) == (2, 4)  # pages 1 (2/4) and 2 (3/4)
    assert hot.frequency[2] == 0.75
    assert wws.hot_set(trace, 0.75).pages == 1


def test_expected_downtime_after_each_round_by_hand() -> None:
    # 100 pages at 50 pages/s: round 1 is intervals 0-1 (50 distinct pages, 1 s more),
    # round 2 interval 2 (all 100 pages, 2 s more), round 3 intervals 3-4 (25 pages,
    # 0.5 s more), round 4 half of interval 5, which writes nothing.
    rate = 50 * PAGE_BITS
    intervals = [list(range(40)), list(range(20, 50)), list(range(100)), list(range(10)),
                 list(range(5, 25)), [], [], []]
    curves = wws.expected_downtimes(trace_of(intervals), [rate], rounds=4)
    assert curves.starts_s[0] == 0.0
    assert curves.downtime_s[0, 0].tolist() == pytest.approx([1.0, 2.0, 0.5, 0.0])
    assert curves.round_s[0, 0].tolist() == pytest.approx([2.0, 1.0, 2.0, 0.5])
    # From t = 7 round 1 would end after the trace: nothing is made up...
    assert np.isnan(curves.downtime_s[0, 7]).all()
    # ...unless the trace may repeat: round 1 is then interval 7 and interval 0 again.
    looped = wws.expected_downtimes(trace_of(intervals), [rate], rounds=1, loop=True)
    assert looped.downtime_s[0, 7, 0] == pytest.approx(40 / 50)


def test_a_quiet_trace_stops_at_nothing_left() -> None:
    curves = wws.expected_downtimes(trace_of([[1]] + [[]] * 9), [100 * PAGE_BITS], rounds=4)
    # Round 1 (1 s) sees page 1; round 2 sends it in 0.01 s and sees nothing: done.
    assert curves.downtime_s[0, 0].tolist() == pytest.approx([0.01, 0.0, 0.0, 0.0])


def test_the_summary_carries_the_hot_set_floor_per_rate() -> None:
    trace = trace_of([[0, 1, 2], [1, 2], [2, 3], []] * 5)
    s = wws.summary(trace, [128.0, 512.0], windows=[1, 2])
    assert s["hot_set"]["pages"] == 2
    assert [r["hot_set_floor_ms"] for r in s["rates"]] == pytest.approx(
        [2 * PAGE_BITS / 128e6 * 1000, 2 * PAGE_BITS / 512e6 * 1000], abs=1e-3)
    assert s["distinct_pages"] == 4
    assert s["dirty_pages_per_s"] == pytest.approx(7 * 5 / 20)
    assert s["wws_pages"]["2x1000ms"]["max"] == 3
