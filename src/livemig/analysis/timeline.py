"""A trace as a stream of write events on a clock, the view that WWS analysis and the
simulator share.

A trace says only in which interval a page was written, not when or how often. Each
(interval, page) entry becomes write events within its interval, by a fixed
pseudo-random draw, so that a window of the clock holds the events whose time falls in
it, and a window aligned on interval boundaries holds exactly those intervals' pages:

- a page written in the interval before and the one after as well is taken to be
  written all the time (a hot page: a network buffer, a counter): one write every
  ``CONTINUOUS_STEP_S`` across the interval, so even a 10 ms window finds it dirty, as
  the last, short pre-copy rounds of a real web server do;
- any other page is written once, at a uniformly drawn time in the interval.

After the end of the trace the stream repeats it, period after period, so that a
migration may outlast what was recorded.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from livemig.analysis.trace import Trace

Floats = npt.NDArray[np.float64]
Int64s = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

EVENT_SEED = 0x11FE  # fixed: the same trace always gives the same events
CONTINUOUS_STEP_S = 0.005  # how often a page written in every interval is taken to be written


class Writes(NamedTuple):
    """Distinct pages written in a window: when first, and whether left all zeros."""

    pages: Int64s
    times: Floats
    zeroed: Bools

    @classmethod
    def none(cls) -> Writes:
        return cls(np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.bool_))


class Timeline:
    """Write events of one period, ``(times[i], pages[i])`` sorted by time, repeated
    forever from ``start_s``. For each event, ``prev`` is the time of the same page's
    previous event in the first period (``-inf`` if none) and ``prev_later`` in any
    later period, where the previous event may lie in the period before."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.start_s = float(trace.times[0])
        self.period_s = trace.duration_s
        ids, pages, where, zeroed = _events(trace)
        times = trace.times[:-1][ids] + where * trace.durations_s[ids]
        order = np.argsort(times, kind="stable")
        self.times: Floats = times[order]
        self.pages: Int64s = pages[order]
        self.zeroed: Bools = zeroed[order]
        self.prev, self.prev_later = _previous_times(self.times, self.pages, self.period_s)

    def _pieces(self, a: float, b: float) -> list[tuple[int, int, int]]:
        """``[a, b)`` cut at period boundaries: (period, lo, hi) event index ranges."""
        if a < self.start_s or b < a:
            raise ValueError(f"window [{a}, {b}) is not on this timeline (from {self.start_s})")
        pieces = []
        first = math.floor((a - self.start_s) / self.period_s)
        last = math.floor((b - self.start_s) / self.period_s)
        for c in range(first, last + 1):
            shift = c * self.period_s
            lo, hi = np.searchsorted(self.times, (a - shift, b - shift), side="left")
            if hi > lo:
                pieces.append((c, int(lo), int(hi)))
        return pieces

    def _is_first(self, a: float, c: int, lo: int, hi: int) -> npt.NDArray[np.bool_]:
        prev = self.prev if c == 0 else self.prev_later
        return prev[lo:hi] < a - c * self.period_s

    def distinct(self, a: float, b: float) -> int:
        """How many distinct pages are written in ``[a, b)``: the events there whose
        page's previous event came before ``a``."""
        return sum(
            int(np.count_nonzero(self._is_first(a, c, lo, hi))) for c, lo, hi in self._pieces(a, b)
        )

    def first_writes(self, a: float, b: float) -> Writes:
        """The distinct pages written in ``[a, b)``, in time order, with the time of each
        one's first write there and whether that write left it all zeros."""
        pages, times, zeroed = [], [], []
        for c, lo, hi in self._pieces(a, b):
            first = self._is_first(a, c, lo, hi)
            pages.append(self.pages[lo:hi][first])
            times.append(self.times[lo:hi][first] + c * self.period_s)
            zeroed.append(self.zeroed[lo:hi][first])
        if not pages:
            return Writes.none()
        return Writes(np.concatenate(pages), np.concatenate(times), np.concatenate(zeroed))


def _events(trace: Trace) -> tuple[Int64s, Int64s, Floats, Bools]:
    """(interval, page, position within the interval in [0, 1), page left zero) of every
    write event."""
    ids = trace.interval_ids()
    pages = trace.pages.astype(np.int64)
    zeroed = trace.zeroed_flags
    rng = np.random.default_rng(EVENT_SEED)
    # Entries sorted by (interval, page) make this key sorted: membership by bisection.
    key = ids * trace.meta.npages + pages
    continuous = _member(key - trace.meta.npages, key) & _member(key + trace.meta.npages, key)
    steps = max(1, round(trace.meta.interval_s / CONTINUOUS_STEP_S))
    once = ~continuous
    hot = np.flatnonzero(continuous)
    phase = rng.random(hot.size)
    hot_where = ((phase[:, None] + np.arange(steps)) / steps).ravel()
    return (
        np.concatenate((ids[once], np.repeat(ids[hot], steps))),
        np.concatenate((pages[once], np.repeat(pages[hot], steps))),
        np.concatenate((rng.random(int(once.sum())), hot_where)),
        np.concatenate((zeroed[once], np.repeat(zeroed[hot], steps))),
    )


def _member(values: Int64s, sorted_keys: Int64s) -> npt.NDArray[np.bool_]:
    if not sorted_keys.size:
        return np.zeros(values.size, dtype=np.bool_)
    at = np.minimum(np.searchsorted(sorted_keys, values), sorted_keys.size - 1)
    found: npt.NDArray[np.bool_] = sorted_keys[at] == values
    return found


def _previous_times(times: Floats, pages: Int64s, period_s: float) -> tuple[Floats, Floats]:
    prev = np.full(len(times), -np.inf)
    if not len(times):
        return prev, prev.copy()
    by_page = np.lexsort((times, pages))  # by page, then time
    same = pages[by_page[1:]] == pages[by_page[:-1]]
    prev[by_page[1:][same]] = times[by_page[:-1][same]]
    # In a later period a page's first event follows its last one of the period before.
    later = prev.copy()
    firsts = np.concatenate(([True], ~same))
    lasts = np.concatenate((~same, [True]))
    later[by_page[firsts]] = times[by_page[lasts]] - period_s
    return prev, later
