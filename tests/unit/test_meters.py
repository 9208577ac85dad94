"""The link and service meters, on a clock of their own."""

from __future__ import annotations

import pytest

from livemig.migration.meters import LinkMeter, WindowedRate, pace_bps
from livemig.units import MBIT


def test_a_windowed_rate_answers_once_per_window_and_forgets_gaps() -> None:
    rate = WindowedRate(window_s=0.1)
    assert rate.sample(0.0, 0) is None  # opens the window
    assert rate.sample(0.05, 500_000) is None  # still open
    assert rate.sample(0.1, 1_250_000) == pytest.approx(100 * MBIT)
    rate.restart()
    assert rate.sample(5.0, 9_000_000) is None  # the gap measured nothing
    assert rate.sample(5.2, 9_000_000) == 0.0
    assert rate.last_bps == 0.0
    assert rate.sample(5.3, 100) is None  # a counter that went back opens a new window


def feed(meter: LinkMeter, mbps: float, paced: float | None, start: float,
         windows: int) -> float:
    """``windows`` windows of 0.125 s (exact in binary) at ``mbps``; returns the clock
    after them."""
    acked = int(start * 1e9)  # any base: only differences count
    meter.sample(start, acked, paced)
    for i in range(1, windows + 1):
        meter.sample(start + i * 0.125, acked + int(i * mbps * MBIT * 0.125 / 8), paced)
    return start + windows * 0.125


def test_unpaced_windows_measure_the_link_and_follow_it_down() -> None:
    meter = LinkMeter()
    clock = feed(meter, 940, None, 0.0, 3)
    assert meter.link_bps == pytest.approx(940 * MBIT, rel=1e-3)
    meter.restart()
    feed(meter, 400, None, clock + 1.0, 10)  # the link got slower: the estimate follows
    assert meter.link_bps is not None and meter.link_bps < 420 * MBIT


def test_a_window_held_back_by_the_pacer_can_raise_the_estimate_but_not_lower_it() -> None:
    meter = LinkMeter()
    clock = feed(meter, 900, None, 0.0, 2)
    meter.restart()
    feed(meter, 500, 500 * MBIT, clock + 1.0, 5)  # paced at 500: says nothing of the link
    assert meter.link_bps == pytest.approx(900 * MBIT, rel=1e-3)


def test_the_pace_leaves_the_service_its_share_and_is_unpaced_until_measured() -> None:
    assert pace_bps(None, 0.0) is None
    assert pace_bps(1000 * MBIT, 10 * MBIT) is None  # a negligible share: no pace
    assert pace_bps(1000 * MBIT, 200 * MBIT) == pytest.approx(800 * MBIT)


def test_a_paced_sender_probes_unpaced_now_and_then_so_a_stall_does_not_stick() -> None:
    meter = LinkMeter()
    clock = feed(meter, 50, None, 0.0, 2)  # a stall measured as the link: 50 Mbit/s
    assert not meter.probing(clock)
    clock = feed(meter, 50, 50 * MBIT, clock, 10)  # paced at it: learns nothing more
    assert meter.probing(clock)  # so the next window goes unpaced
    meter.restart()
    feed(meter, 900, None, clock, 6)
    assert meter.link_bps is not None and meter.link_bps > 800 * MBIT
    assert not meter.probing(clock + 0.75)


def test_no_pace_is_slower_than_a_link_worth_believing() -> None:
    assert pace_bps(2 * MBIT, 1 * MBIT) == pytest.approx(10 * MBIT)
