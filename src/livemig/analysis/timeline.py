"""A trace as a stream of write events on a clock, the view that WWS analysis and the
simulator share.

A trace says only in which interval a page was written. Each (interval, page) entry
becomes one write event at a time spread uniformly within its interval, by a fixed
pseudo-random draw: a window of the clock then holds the events whose time falls in it,
and a window aligned on interval boundaries holds exactly those intervals' pages. A page
the trace shows in many consecutive intervals gets one event in each, which is what
50 ms of resolution can say about a page written continuously.

After the end of the trace the stream repeats it, period after period, so that a
migration may outlast what was recorded.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from livemig.analysis.trace import Trace

Floats = npt.NDArray[np.float64]
Int64s = npt.NDArray[np.int64]

EVENT_SEED = 0x11FE  # fixed: the same trace always gives the same events


class Timeline:
    """Write events of one period, ``(times[i], pages[i])`` sorted by time, repeated
    forever from ``start_s``. For each event, ``prev`` is the time of the same page's
    previous event in the first period (``-inf`` if none) and ``prev_later`` in any
    later period, where the previous event may lie in the period before."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.start_s = float(trace.times[0])
        self.period_s = trace.duration_s
        ids = trace.interval_ids()
        spread = np.random.default_rng(EVENT_SEED).random(len(ids))
        times = trace.times[:-1][ids] + spread * trace.durations_s[ids]
        order = np.argsort(times, kind="stable")
        self.times: Floats = times[order]
        self.pages: Int64s = trace.pages.astype(np.int64)[order]
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

    def first_writes(self, a: float, b: float) -> tuple[Int64s, Floats]:
        """The distinct pages written in ``[a, b)`` and the time of each one's first write
        there, in time order."""
        pages, times = [], []
        for c, lo, hi in self._pieces(a, b):
            first = self._is_first(a, c, lo, hi)
            pages.append(self.pages[lo:hi][first])
            times.append(self.times[lo:hi][first] + c * self.period_s)
        if not pages:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        return np.concatenate(pages), np.concatenate(times)


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
