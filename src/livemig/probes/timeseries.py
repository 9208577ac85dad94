"""Sans-IO analysis of what the probes record: pure functions over numpy arrays.

Nothing here opens a socket or reads a clock. Every time is an integer count of
nanoseconds on one monotonic clock (the probes use ``time.monotonic_ns()``); every
function takes its window bounds as arguments, so the same code serves the probes, the
experiments and the unit tests.

Windows are half-open, ``[start_ns, end_ns)``, so adjacent windows never count an event
twice. Results that carry milliseconds say so in their names (``_ms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000


def as_int_array(values: npt.ArrayLike, *, name: str = "values") -> IntArray:
    """``values`` as a one-dimensional int64 array (no copy when it already is one)."""
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, not of shape {array.shape}")
    return array


@dataclass(frozen=True)
class Gap:
    """A stretch without events: from the last event before it to the first one after."""

    start_ns: int
    end_ns: int

    @property
    def length_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def length_ms(self) -> float:
        return self.length_ns / NS_PER_MS


def longest_gap(
    times_ns: npt.ArrayLike, *, start_ns: int | None = None, end_ns: int | None = None
) -> Gap | None:
    """The longest interval between consecutive events, or None with fewer than two.

    The times need not be sorted: replies may be recorded out of order, and a gap is
    between neighbours in time, not in recording order. Ties go to the earliest gap.

    ``start_ns`` and ``end_ns``, when given, bound the observation: events outside
    ``[start_ns, end_ns]`` are ignored and the bounds themselves count as events, so that
    silence at the start or at the end of a run is a gap too (a VM that never answered
    again after a migration has a gap up to the end of the run, not none at all).
    """
    times = np.sort(as_int_array(times_ns, name="times_ns"))
    if start_ns is not None and end_ns is not None and start_ns > end_ns:
        raise ValueError(f"start_ns {start_ns} is after end_ns {end_ns}")
    if start_ns is not None:
        times = np.concatenate(([start_ns], times[times >= start_ns])).astype(np.int64)
    if end_ns is not None:
        times = np.concatenate((times[times <= end_ns], [end_ns])).astype(np.int64)
    if times.size < 2:
        return None
    # argmax returns the first maximum, which is what makes ties go to the earliest gap.
    i = int(np.argmax(np.diff(times)))
    return Gap(start_ns=int(times[i]), end_ns=int(times[i + 1]))


def count_lost(sent: int, received_seq: npt.ArrayLike) -> int:
    """How many of the sequence numbers ``0 .. sent-1`` never came back.

    Duplicated replies count once and numbers outside the range are ignored: UDP may
    duplicate datagrams, and a stray datagram must not make loss look smaller.
    """
    if sent < 0:
        raise ValueError(f"sent must be >= 0, not {sent}")
    seq = as_int_array(received_seq, name="received_seq")
    valid = seq[(seq >= 0) & (seq < sent)]
    return sent - int(np.unique(valid).size)


@dataclass(frozen=True, eq=False)
class Buckets:
    """Events counted in fixed windows ``[start_ns + i*width_ns, start_ns + (i+1)*width_ns)``.

    The last window ends at ``end_ns`` and may therefore be shorter than ``width_ns``;
    ``durations_s()`` gives each window's real length so that rates stay right.
    ``counts[i]`` is the number of events in window i, ``totals[i]`` the sum of their
    weights (for instance bytes); without weights ``totals`` equals ``counts``.
    """

    start_ns: int
    end_ns: int
    width_ns: int
    counts: IntArray
    totals: IntArray

    def __len__(self) -> int:
        return int(self.counts.size)

    def starts_ns(self) -> IntArray:
        """Start time of each window."""
        return self.start_ns + self.width_ns * np.arange(len(self), dtype=np.int64)

    def durations_s(self) -> FloatArray:
        """Real length of each window in seconds (only the last one can be short)."""
        starts = self.starts_ns()
        ends = np.minimum(starts + self.width_ns, self.end_ns)
        return (ends - starts).astype(np.float64) / NS_PER_S

    def count_rates_per_s(self) -> FloatArray:
        """Events per second in each window."""
        return self.counts / self.durations_s()

    def total_rates_per_s(self) -> FloatArray:
        """Weight per second in each window (bytes/s when the weights are bytes)."""
        return self.totals / self.durations_s()


def bucketize(
    times_ns: npt.ArrayLike,
    *,
    start_ns: int,
    end_ns: int,
    width_ns: int,
    weights: npt.ArrayLike | None = None,
) -> Buckets:
    """Count events (and sum their integer weights) in fixed windows over ``[start_ns, end_ns)``.

    Events outside that interval are left out; every event inside lands in exactly one
    window, so ``counts.sum()`` is the number of events in the interval.
    """
    if width_ns <= 0:
        raise ValueError(f"width_ns must be > 0, not {width_ns}")
    if end_ns < start_ns:
        raise ValueError(f"end_ns {end_ns} is before start_ns {start_ns}")
    times = as_int_array(times_ns, name="times_ns")
    weight_array = np.ones_like(times) if weights is None else as_int_array(weights, name="weights")
    if weight_array.shape != times.shape:
        raise ValueError(f"weights has shape {weight_array.shape}, times {times.shape}")
    n = -(-(end_ns - start_ns) // width_ns)  # ceiling division: a short last window counts
    inside = (times >= start_ns) & (times < end_ns)
    index = (times[inside] - start_ns) // width_ns
    counts = np.bincount(index, minlength=n).astype(np.int64)
    totals = np.zeros(n, dtype=np.int64)
    # np.add.at rather than bincount(weights=): bincount sums in float64 and would round
    # byte totals beyond 2**53.
    np.add.at(totals, index, weight_array[inside])
    return Buckets(
        start_ns=start_ns, end_ns=end_ns, width_ns=width_ns, counts=counts, totals=totals
    )


@dataclass(frozen=True)
class Distribution:
    """Summary of a set of durations: how many, median, 99th percentile and maximum, in ms."""

    count: int
    median_ms: float
    p99_ms: float
    max_ms: float

    def to_json(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "median_ms": self.median_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


def distribution(durations_ns: npt.ArrayLike) -> Distribution | None:
    """Median, p99 (linear interpolation) and max of durations in ns; None when empty."""
    values = as_int_array(durations_ns, name="durations_ns")
    if values.size == 0:
        return None
    median, p99 = np.percentile(values, [50.0, 99.0])
    return Distribution(
        count=int(values.size),
        median_ms=float(median) / NS_PER_MS,
        p99_ms=float(p99) / NS_PER_MS,
        max_ms=float(values.max()) / NS_PER_MS,
    )


def interarrival(times_ns: npt.ArrayLike) -> Distribution | None:
    """Distribution of the intervals between consecutive events (sorted by time).

    None with fewer than two events. ``count`` is the number of intervals.
    """
    times = np.sort(as_int_array(times_ns, name="times_ns"))
    return distribution(np.diff(times))


def throughput_per_s(
    times_ns: npt.ArrayLike,
    *,
    start_ns: int,
    end_ns: int,
    weights: npt.ArrayLike | None = None,
) -> float:
    """Events (or summed weights) per second over ``[start_ns, end_ns)``."""
    if end_ns <= start_ns:
        raise ValueError(f"empty window [{start_ns}, {end_ns})")
    buckets = bucketize(
        times_ns, start_ns=start_ns, end_ns=end_ns, width_ns=end_ns - start_ns, weights=weights
    )
    return float(buckets.totals.sum()) * NS_PER_S / (end_ns - start_ns)


@dataclass(frozen=True)
class ServiceImpact:
    """Throughput during a window against throughput before it (DESIGN.md, "Measures").

    ``ratio`` is during over before: 1.0 means users noticed nothing, 0.0 that the service
    stopped for the whole window. It is None when nothing happened before the window,
    because then there is no baseline to compare with.
    """

    before_per_s: float
    during_per_s: float

    @property
    def ratio(self) -> float | None:
        if self.before_per_s == 0.0:
            return None
        return self.during_per_s / self.before_per_s

    def to_json(self) -> dict[str, float | None]:
        return {
            "before_per_s": self.before_per_s,
            "during_per_s": self.during_per_s,
            "ratio": self.ratio,
        }


def service_impact(
    times_ns: npt.ArrayLike,
    *,
    before_start_ns: int,
    during_start_ns: int,
    during_end_ns: int,
    weights: npt.ArrayLike | None = None,
) -> ServiceImpact:
    """Throughput during ``[during_start_ns, during_end_ns)`` over throughput before it.

    "Before" is ``[before_start_ns, during_start_ns)``. With ``weights`` (for instance
    bytes per completed request) it compares volume per second, not events per second.
    """
    return ServiceImpact(
        before_per_s=throughput_per_s(
            times_ns, start_ns=before_start_ns, end_ns=during_start_ns, weights=weights
        ),
        during_per_s=throughput_per_s(
            times_ns, start_ns=during_start_ns, end_ns=during_end_ns, weights=weights
        ),
    )
