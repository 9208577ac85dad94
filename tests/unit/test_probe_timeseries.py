"""Sans-IO tests of livemig.probes.timeseries: examples first, then properties."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.probes.timeseries import (
    NS_PER_MS,
    NS_PER_S,
    Gap,
    bucketize,
    count_lost,
    distribution,
    interarrival,
    longest_gap,
    service_impact,
    throughput_per_s,
)

MS = NS_PER_MS

# Times on a monotonic clock in ns: non-negative and far below int64 overflow even after
# differences and sums.
times_lists = st.lists(st.integers(min_value=0, max_value=10**15), max_size=200)


# --- longest_gap ---------------------------------------------------------------------


def test_longest_gap_finds_the_gap_and_its_ends() -> None:
    gap = longest_gap([0, 10, 15, 40, 41])
    assert gap == Gap(start_ns=15, end_ns=40)
    assert gap.length_ns == 25


def test_longest_gap_ignores_recording_order() -> None:
    assert longest_gap([41, 15, 0, 40, 10]) == Gap(start_ns=15, end_ns=40)


def test_longest_gap_ties_go_to_the_earliest() -> None:
    assert longest_gap([0, 5, 10, 15]) == Gap(start_ns=0, end_ns=5)


def test_longest_gap_needs_two_events() -> None:
    assert longest_gap([]) is None
    assert longest_gap([7]) is None


def test_longest_gap_in_ms() -> None:
    gap = longest_gap([0, 250 * MS])
    assert gap is not None
    assert gap.length_ms == 250.0


def test_longest_gap_counts_silence_at_the_end_when_bounded() -> None:
    # Replies every ms, then nothing: unbounded, the gap is 1 ms; bounded by the end of
    # the run, the silence is the gap.
    times = np.arange(0, 100 * MS, MS)
    unbounded = longest_gap(times)
    assert unbounded is not None
    assert unbounded.length_ns == MS
    assert longest_gap(times, end_ns=500 * MS) == Gap(start_ns=99 * MS, end_ns=500 * MS)


def test_longest_gap_counts_silence_at_the_start_when_bounded() -> None:
    assert longest_gap([300, 310], start_ns=0) == Gap(start_ns=0, end_ns=300)
    # Events before the start are outside the observation.
    assert longest_gap([-50, 300, 310], start_ns=0) == Gap(start_ns=0, end_ns=300)
    assert longest_gap([], start_ns=0, end_ns=10) == Gap(start_ns=0, end_ns=10)


def test_longest_gap_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        longest_gap([1, 2], start_ns=10, end_ns=5)
    with pytest.raises(ValueError):
        longest_gap([[1, 2], [3, 4]])


@given(times_lists)
def test_longest_gap_is_at_least_every_consecutive_difference(times: list[int]) -> None:
    gap = longest_gap(times)
    if len(times) < 2:
        assert gap is None
        return
    assert gap is not None
    ordered = sorted(times)
    diffs = [b - a for a, b in pairwise(ordered)]
    assert all(gap.length_ns >= d for d in diffs)
    assert gap.length_ns == max(diffs)
    # The gap is bounded by two events that are neighbours in time.
    assert gap.start_ns in times
    assert gap.end_ns in times
    assert not any(gap.start_ns < t < gap.end_ns for t in times)


@given(times_lists, st.integers(min_value=0, max_value=10**15), st.integers(0, 10**15))
def test_bounded_longest_gap_covers_the_bounds(times: list[int], a: int, b: int) -> None:
    start, end = min(a, b), max(a, b)
    gap = longest_gap(times, start_ns=start, end_ns=end)
    assert gap is not None
    assert start <= gap.start_ns <= gap.end_ns <= end
    inside = sorted(t for t in times if start <= t <= end)
    points = [start, *inside, end]
    assert gap.length_ns == max(b - a for a, b in pairwise(points))


# --- count_lost ----------------------------------------------------------------------


def test_count_lost_counts_distinct_missing_sequence_numbers() -> None:
    # 1 is duplicated, 20 and -1 are strays: 3 of 10 came back.
    assert count_lost(10, [0, 1, 1, 5, 20, -1]) == 7
    assert count_lost(0, []) == 0
    assert count_lost(3, [2, 1, 0]) == 0


def test_count_lost_rejects_negative_sent() -> None:
    with pytest.raises(ValueError):
        count_lost(-1, [])


@given(st.integers(0, 500), st.lists(st.integers(-10, 600), max_size=300))
def test_count_lost_is_sent_minus_distinct_answers(sent: int, seqs: list[int]) -> None:
    lost = count_lost(sent, seqs)
    assert 0 <= lost <= sent
    assert lost == sent - len({s for s in seqs if 0 <= s < sent})


# --- bucketize -----------------------------------------------------------------------


def test_bucketize_counts_and_sums_per_window() -> None:
    b = bucketize(
        [0, 50, 99, 100, 250, 299, 300],
        start_ns=0,
        end_ns=300,
        width_ns=100,
        weights=[1, 2, 3, 4, 5, 6, 7],
    )
    assert b.counts.tolist() == [3, 1, 2]  # 300 is at the (open) end: left out
    assert b.totals.tolist() == [6, 4, 11]
    assert b.starts_ns().tolist() == [0, 100, 200]


def test_bucketize_unweighted_totals_equal_counts() -> None:
    b = bucketize([5, 6, 150], start_ns=0, end_ns=200, width_ns=100)
    assert b.totals.tolist() == b.counts.tolist() == [2, 1]


def test_bucketize_short_last_window_keeps_rates_right() -> None:
    # 250 ms at 100 ms windows: 3 windows, the last one 50 ms long.
    times = np.arange(0, 250 * MS, MS)  # 1000 events/s
    b = bucketize(times, start_ns=0, end_ns=250 * MS, width_ns=100 * MS)
    assert len(b) == 3
    assert b.durations_s().tolist() == pytest.approx([0.1, 0.1, 0.05])
    assert b.count_rates_per_s().tolist() == pytest.approx([1000.0, 1000.0, 1000.0])


def test_bucketize_empty_interval_and_bad_width() -> None:
    assert len(bucketize([1, 2], start_ns=5, end_ns=5, width_ns=10)) == 0
    with pytest.raises(ValueError):
        bucketize([1], start_ns=0, end_ns=10, width_ns=0)
    with pytest.raises(ValueError):
        bucketize([1], start_ns=10, end_ns=0, width_ns=1)
    with pytest.raises(ValueError):
        bucketize([1, 2], start_ns=0, end_ns=10, width_ns=1, weights=[1])


def test_bucketize_totals_are_exact_beyond_float_precision() -> None:
    big = 2**53 + 1
    b = bucketize([0, 1], start_ns=0, end_ns=10, width_ns=10, weights=[big, big])
    assert int(b.totals[0]) == 2 * big


@given(
    st.lists(st.tuples(st.integers(-1000, 20_000), st.integers(0, 10**6)), max_size=300),
    st.integers(0, 5000),
    st.integers(0, 15_000),
    st.integers(1, 3000),
)
def test_bucketize_conserves_counts_and_weights(
    events: list[tuple[int, int]], start: int, length: int, width: int
) -> None:
    times = [t for t, _ in events]
    weights = [w for _, w in events]
    end = start + length
    b = bucketize(times, start_ns=start, end_ns=end, width_ns=width, weights=weights)
    inside = [(t, w) for t, w in events if start <= t < end]
    assert int(b.counts.sum()) == len(inside)
    assert int(b.totals.sum()) == sum(w for _, w in inside)
    assert len(b) == -(-length // width)
    # Every event lands in the window that contains it.
    for t, _ in inside:
        i = (t - start) // width
        assert b.starts_ns()[i] <= t < b.starts_ns()[i] + width
    if len(b):
        assert float(b.durations_s().sum()) == pytest.approx(length / NS_PER_S)


# --- distribution and interarrival ---------------------------------------------------


def test_interarrival_of_a_regular_series() -> None:
    stats = interarrival(np.arange(0, 1000 * MS, 50 * MS))
    assert stats is not None
    assert stats.count == 19
    assert stats.median_ms == stats.p99_ms == stats.max_ms == 50.0


def test_interarrival_shows_a_hole_in_max_not_median() -> None:
    times = [*range(0, 1000 * MS, 50 * MS), 1250 * MS, 1300 * MS]
    stats = interarrival(times)
    assert stats is not None
    assert stats.median_ms == 50.0
    assert stats.max_ms == 300.0
    assert stats.to_json() == {
        "count": stats.count,
        "median_ms": 50.0,
        "p99_ms": stats.p99_ms,
        "max_ms": 300.0,
    }


def test_distribution_of_nothing_is_none() -> None:
    assert distribution([]) is None
    assert interarrival([5]) is None


@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=200))
def test_distribution_is_ordered(values: list[int]) -> None:
    d = distribution(values)
    assert d is not None
    assert d.count == len(values)
    assert min(values) / MS <= d.median_ms <= d.p99_ms <= d.max_ms
    assert d.max_ms == max(values) / MS


# --- throughput and service impact ---------------------------------------------------


def test_service_impact_of_a_halved_rate() -> None:
    before = np.arange(0, NS_PER_S, 10 * MS)  # 100/s for 1 s
    during = np.arange(NS_PER_S, 2 * NS_PER_S, 20 * MS)  # 50/s for 1 s
    impact = service_impact(
        np.concatenate((before, during)),
        before_start_ns=0,
        during_start_ns=NS_PER_S,
        during_end_ns=2 * NS_PER_S,
    )
    assert impact.before_per_s == pytest.approx(100.0)
    assert impact.during_per_s == pytest.approx(50.0)
    assert impact.ratio == pytest.approx(0.5)
    assert impact.to_json()["ratio"] == pytest.approx(0.5)


def test_service_impact_by_weight() -> None:
    impact = service_impact(
        [100, 200, 1100],
        weights=[1000, 1000, 500],
        before_start_ns=0,
        during_start_ns=1000,
        during_end_ns=2000,
    )
    assert impact.ratio == pytest.approx(0.25)


def test_service_impact_without_baseline_has_no_ratio() -> None:
    impact = service_impact([1500], before_start_ns=0, during_start_ns=1000, during_end_ns=2000)
    assert impact.before_per_s == 0.0
    assert impact.ratio is None


def test_throughput_rejects_empty_window() -> None:
    with pytest.raises(ValueError):
        throughput_per_s([1], start_ns=5, end_ns=5)


@given(
    st.lists(st.integers(0, 10_000), max_size=200),
    st.integers(1, 5000),
    st.integers(1, 5000),
)
def test_service_impact_ratio_matches_counts(times: list[int], before: int, during: int) -> None:
    a, b = before, before + during
    impact = service_impact(times, before_start_ns=0, during_start_ns=a, during_end_ns=b)
    n_before = sum(1 for t in times if 0 <= t < a)
    n_during = sum(1 for t in times if a <= t < b)
    assert impact.before_per_s == pytest.approx(n_before * NS_PER_S / a)
    assert impact.during_per_s == pytest.approx(n_during * NS_PER_S / during)
    if n_before == 0:
        assert impact.ratio is None
    else:
        assert impact.ratio == pytest.approx((n_during / during) / (n_before / a))
