"""Writable working set analysis of a trace, after Clark et al. §4 (Figures 2-6).

- ``expected_downtimes``: the paper's method. Start a pre-copy at time ``t`` with
  bandwidth ``B``. Round 1 sends all of RAM and takes ``RAM / B``; each later round sends
  the pages dirtied during the round before, and takes their size over ``B``. Stopping
  after ``k`` rounds leaves the pages dirtied during round ``k``, and the downtime is
  their size over ``B``. (This is the ideal the paper plots: no rate policy, no skipping,
  no fixed costs. ``livemig simulate`` runs the real planner instead.)
- ``wws_sizes``: how many distinct pages are written in each window of ``m`` intervals,
  for several ``m``: the size of the writable working set as a function of time and of
  the window it is looked at through (Figure 2).
- ``hot_set``: the pages written in most intervals. Every round finds them dirty again,
  so their size over the stop-and-copy's rate is a floor that no number of rounds lowers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.analysis.timeline import Timeline
from livemig.analysis.trace import Trace
from livemig.units import PAGE_SIZE

MBIT = 1_000_000
DEFAULT_RATES_MBPS = (128.0, 256.0, 512.0)  # the paper's
DEFAULT_WINDOWS = (1, 2, 4, 8)  # in intervals
DEFAULT_ROUNDS = 4
HOT_FRACTION = 0.5  # "hot": written in at least half of the intervals
MAX_STARTS = 240  # starting points of the downtime curves; enough for a smooth figure

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DowntimeCurves:
    """``downtime_s[r, i, k]``: at ``rates_bps[r]``, starting at ``starts_s[i]``, the
    expected downtime after ``k + 1`` rounds (NaN where the rounds outlast the trace)."""

    rates_bps: Floats
    starts_s: Floats
    downtime_s: Floats
    round_s: Floats  # the same shape: how long round k + 1 took


def expected_downtimes(
    trace: Trace,
    rates_bps: tuple[float, ...] | list[float],
    *,
    rounds: int = DEFAULT_ROUNDS,
    starts: int = MAX_STARTS,
    timeline: Timeline | None = None,
    loop: bool = False,
) -> DowntimeCurves:
    """The curves at each of ``rates_bps``. Rounds that outlast the trace are NaN,
    unless ``loop``: then the trace repeats after its end, as in the simulator."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, not {rounds}")
    line = timeline or Timeline(trace)
    page_bits = trace.meta.page_size * 8
    t_end = float(trace.times[-1])
    # Start on interval boundaries, at most ``starts`` of them, evenly spread.
    bounds = trace.times[:-1]
    step = max(1, -(-len(bounds) // starts))
    start_times = bounds[::step].astype(np.float64)
    shape = (len(rates_bps), len(start_times), rounds)
    downtime = np.full(shape, np.nan)
    lengths = np.full(shape, np.nan)
    for r, rate in enumerate(rates_bps):
        first_round = trace.meta.ram_bytes * 8 / rate
        for i, start in enumerate(start_times):
            a, length = float(start), first_round
            for k in range(rounds):
                b = a + length
                if b > t_end + 1e-9 and not loop:
                    break  # the trace does not say what happens after its end
                remaining = line.distinct(a, b)
                lengths[r, i, k] = length
                downtime[r, i, k] = remaining * page_bits / rate
                a, length = b, remaining * page_bits / rate
                if length == 0:
                    # Nothing left: every later round is empty too.
                    downtime[r, i, k + 1 :] = 0.0
                    lengths[r, i, k + 1 :] = 0.0
                    break
    return DowntimeCurves(np.asarray(rates_bps, np.float64), start_times, downtime, lengths)


def wws_sizes(trace: Trace, windows: tuple[int, ...] | list[int] = DEFAULT_WINDOWS) -> Floats:
    """``sizes[w, k]``: distinct pages written in intervals ``k .. k + windows[w] - 1``,
    NaN where the window runs past the end of the trace.

    One pass per window length over the trace's entries: an entry of page ``p`` in
    interval ``i``, whose previous entry was in interval ``j``, is new to exactly the
    windows that start in ``max(j + 1, i - m + 1) .. i``."""
    n = trace.n_intervals
    ids = trace.interval_ids()
    pages = trace.pages.astype(np.int64)
    order = np.lexsort((ids, pages))
    prev = np.full(len(ids), -1, dtype=np.int64)
    same = pages[order[1:]] == pages[order[:-1]]
    prev[order[1:][same]] = ids[order[:-1]][same]
    sizes = np.full((len(windows), n), np.nan)
    for w, m in enumerate(windows):
        if m < 1:
            raise ValueError(f"window lengths are whole intervals >= 1, not {m}")
        lo = np.maximum(prev + 1, ids - m + 1)
        delta = np.zeros(n + 1, dtype=np.int64)
        np.add.at(delta, lo, 1)
        np.add.at(delta, ids + 1, -1)
        counts = np.cumsum(delta[:n]).astype(np.float64)
        valid = n - m + 1
        if valid > 0:
            sizes[w, :valid] = counts[:valid]
    return sizes


@dataclass(frozen=True)
class HotSet:
    fraction: float  # a page is hot if written in at least this fraction of intervals
    pages: int
    distinct_pages: int  # written at all during the trace
    frequency: Floats  # per page: fraction of intervals it was written in

    @property
    def bytes(self) -> int:
        return self.pages * PAGE_SIZE


def hot_set(trace: Trace, fraction: float = HOT_FRACTION) -> HotSet:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    n = max(trace.n_intervals, 1)
    frequency = np.bincount(trace.pages, minlength=trace.meta.npages) / n
    return HotSet(
        fraction=fraction,
        pages=int(np.count_nonzero(frequency >= fraction)),
        distinct_pages=int(np.count_nonzero(frequency)),
        frequency=frequency,
    )


@dataclass(frozen=True)
class RateSummary:
    rate_mbps: float
    hot_set_floor_ms: float
    # Over every starting point that fits in the trace: the median expected downtime
    # after 1..rounds rounds (None when no starting point fits).
    median_downtime_ms: list[float | None]
    best_round: int | None  # the round count with the lowest median


def summary(
    trace: Trace,
    rates_mbps: tuple[float, ...] | list[float] = DEFAULT_RATES_MBPS,
    *,
    windows: tuple[int, ...] | list[int] = DEFAULT_WINDOWS,
    hot_fraction: float = HOT_FRACTION,
    curves: DowntimeCurves | None = None,
) -> dict[str, Any]:
    """Everything ``livemig wws`` prints, as plain data (the JSON output)."""
    meta = trace.meta
    page_bits = meta.page_size * 8
    hot = hot_set(trace, hot_fraction)
    if curves is None:
        curves = expected_downtimes(trace, [r * MBIT for r in rates_mbps])
    sizes = wws_sizes(trace, windows)
    per_rate = []
    for r, rate in enumerate(rates_mbps):
        medians: list[float | None] = []
        for k in range(curves.downtime_s.shape[2]):
            column = curves.downtime_s[r, :, k]
            column = column[~np.isnan(column)]
            medians.append(round(float(np.median(column)) * 1000, 3) if column.size else None)
        known = [(m, k + 1) for k, m in enumerate(medians) if m is not None]
        per_rate.append(RateSummary(
            rate_mbps=rate,
            hot_set_floor_ms=round(hot.pages * page_bits / (rate * MBIT) * 1000, 3),
            median_downtime_ms=medians,
            best_round=min(known)[1] if known else None,
        ))
    duration = trace.duration_s
    written = int(trace.counts.sum())
    return {
        "vm": meta.vm,
        "workload": meta.workload,
        "tracker": meta.tracker,
        "ram_bytes": meta.ram_bytes,
        "npages": meta.npages,
        "interval_ms": meta.interval_s * 1000,
        "intervals": trace.n_intervals,
        "duration_s": round(duration, 3),
        "zero_pages_at_start": int(trace.zero_pages.size),
        "dirty_pages_per_s": round(written / duration, 3) if duration > 0 else 0.0,
        "dirty_rate_mbps": round(written * page_bits / duration / MBIT, 3) if duration else 0.0,
        "distinct_pages": hot.distinct_pages,
        "hot_set": {"fraction": hot.fraction, "pages": hot.pages,
                    "mib": round(hot.bytes / 2**20, 3)},
        "wws_pages": {
            f"{m}x{meta.interval_s * 1000:g}ms": _stats(sizes[w]) for w, m in enumerate(windows)
        },
        "rates": [asdict(r) for r in per_rate],
    }


def _stats(values: Floats) -> dict[str, float | None]:
    v = values[~np.isnan(values)]
    if not v.size:
        return {"median": None, "p90": None, "max": None}
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
            "max": float(v.max())}
