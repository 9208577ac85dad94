"""The pre-copy simulator: the real ``Planner`` on a virtual clock.

The planner (``livemig.migration.planner``) is the one that migrates real VMs; this
module is only the world around it. It plays the source role's part (batches paced at
the round's rate, the §5.4 peek that skips pages written again before their turn, zero
pages sent as indexes only, the dirty log collected at the end of each round) and the
guest's: page writes from a recorded trace (``TraceDirtier``, replayed on the virtual
clock and looped when the migration outlasts it) or from a model (``ModelDirtier``).
Then it adds the engine's fixed costs (``Costs``), measured on real migrations.

Virtual time makes a migration cheap: each round is a handful of numpy calls over the
round's page array, so a 1 GiB VM migrates in milliseconds (bench/simulate_speed.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from livemig.analysis.timeline import Timeline, Writes
from livemig.analysis.trace import Trace
from livemig.migration.planner import (
    DEFAULT_CONFIG,
    Mode,
    Planner,
    PlannerConfig,
    RateLimits,
    RoundPlan,
    RoundStats,
    StopAndCopy,
)
from livemig.units import MBIT, PAGE_SIZE
from livemig.wire.messages import DEFAULT_OPTIONS

PAGE_BITS = PAGE_SIZE * 8
Int64s = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

# The source role's batching (livemig.migration.source: MIN_BATCH_PAGES, MAX_BATCH_PAGES
# = frames.MAX_PAGES_PER_FRAME, BATCH_SECONDS). Its peek happens once per batch, so the
# batch size decides how fresh a peek is; tests/unit/test_simulate.py pins them equal.
MIN_BATCH_PAGES = 64
MAX_BATCH_PAGES = 1024
BATCH_SECONDS = 0.02
# The channel's pacer (livemig.wire.channel.BURST_SECONDS) lets this much traffic through
# at once, and the stop-and-copy starts with a full bucket.
PACER_BURST_S = 0.01


def batch_pages(rate_bps: float) -> int:
    return int(min(MAX_BATCH_PAGES, max(MIN_BATCH_PAGES, rate_bps / 8 * BATCH_SECONDS / PAGE_SIZE)))


@dataclass(frozen=True)
class Costs:
    """The real engine's fixed costs, in seconds. The defaults come from MigrationReports
    of 256 MiB guests (idle, web, game, mmuncher) on this test bed, verification on.

    ``stop_s`` is the stop window beyond sending the final pages: the last dirty-log
    collect, QEMU's device state (3-9 ms), the destination's consistency reply (1-5 ms)
    and commit -> ``cont`` returned (1-7 ms). Fitted on twelve reports (three runs of
    bench/simulator_validation.py, four workloads each, after ``cont`` lost its 10-20 ms
    of fd-table growth): real downtime less the modelled final pages took 7-25 ms, median
    12.5 ms. It depends on how busy the machine is more than on the guest, and it is most
    of the downtime of a guest that converges. ``setup_s`` is reservation to round 1
    (65 ms) and ``release_s`` commitment to the source's QEMU gone (200 ms). A round costs
    ``round_s`` beyond its pages: the last collect and the planning of the next."""

    setup_s: float = 0.065  # reservation: the destination starts QEMU -incoming
    round_s: float = 0.005  # per round: collect the dirty log, plan the next round
    pause_s: float = 0.002  # QMP stop; the guest writes until it returns
    stop_s: float = 0.0125  # collect + device state + consistency + commit -> cont
    release_s: float = 0.2  # the source's QEMU ends after commitment

    @classmethod
    def none(cls) -> Costs:
        """No fixed costs: the planner and the link alone (what WWS analysis assumes)."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0)


DEFAULT_COSTS = Costs()


class Dirtier(Protocol):
    """Where the guest's writes come from, on the virtual clock (seconds)."""

    npages: int

    def first_writes(self, a: float, b: float) -> Writes:
        """The distinct pages written in ``[a, b)`` (in any order), the time of each
        one's first write there, and whether it left the page all zeros (the source then
        sends it as an index). Windows move forward; a window may begin inside the one before,
        but only in a part whose writes were not used (after the end of a round)."""
        ...


class TraceDirtier:
    """Replays a trace; time 0 is the start of the trace, and it loops after its end."""

    def __init__(self, trace: Trace) -> None:
        self.npages = trace.meta.npages
        self.timeline = Timeline(trace)
        self.start_s = self.timeline.start_s

    def first_writes(self, a: float, b: float) -> Writes:
        found = self.timeline.first_writes(a + self.start_s, b + self.start_s)
        return found._replace(times=found.times - self.start_s)


@dataclass(frozen=True)
class Model:
    """A parametric guest: ``write_rate`` pages written per second in all (Poisson), a
    fraction ``skew`` of them spread over a hot set of ``hot_pages`` pages, the rest
    over all of RAM. ``skew=0`` (or ``hot_pages=0``) is uniform dirtying."""

    npages: int
    write_rate: float  # pages per second
    hot_pages: int = 0
    skew: float = 0.0
    zero_fraction: float = 0.0  # of RAM that reads as zero when the migration starts
    seed: int = 0

    def __post_init__(self) -> None:
        if self.npages < 1 or not (math.isfinite(self.write_rate) and self.write_rate >= 0):
            raise ValueError("a model needs pages and a finite, non-negative write rate")
        if not 0 <= self.hot_pages <= self.npages or not 0 <= self.skew <= 1:
            raise ValueError("hot_pages must fit in RAM and skew must be in [0, 1]")
        if not 0 <= self.zero_fraction <= 1:
            raise ValueError("zero_fraction must be in [0, 1]")


class ModelDirtier:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.npages = model.npages
        self._rng = np.random.default_rng(model.seed)
        # Spread over RAM, so that the hot set and the send order do not line up.
        self._hot = np.unique(np.linspace(0, model.npages - 1, model.hot_pages).astype(np.int64))
        skew = model.skew if self._hot.size else 0.0
        self._hot_rate = model.write_rate * skew  # writes/s into the hot set
        self._cold_rate = model.write_rate * (1 - skew)  # writes/s over all of RAM
        self._scratch = np.full(model.npages, np.inf)  # per page, while merging writes

    def zero_pages(self) -> Int64s:
        """Each page reads as zero with probability ``zero_fraction``, sorted."""
        rng = np.random.default_rng(self.model.seed + 1)
        return np.flatnonzero(rng.random(self.npages) < self.model.zero_fraction)

    def _first_of_each(self, pages: Int64s, times: Floats) -> tuple[Int64s, Floats]:
        """Each page once, at its earliest time; O(len(pages)), without sorting."""
        earliest = self._scratch
        np.minimum.at(earliest, pages, times)
        # Exactly one entry per page holds its minimum (times are continuous draws).
        keep = times == earliest[pages]
        earliest[pages] = np.inf  # clean again, for the next call
        return pages[keep], times[keep]

    def _part(self, region: Int64s | None, size: int, rate: float, a: float, length: float
              ) -> tuple[Int64s, Floats]:
        """First writes in a window of ``rate`` writes/s uniform over ``region``."""
        expected = rate * length
        if expected <= 0 or size == 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        if expected < size:
            # Few writes: draw them all, and keep each page's first.
            count = int(self._rng.poisson(expected))
            where = self._rng.integers(0, size, count)
            pages = region[where] if region is not None else where
            return self._first_of_each(pages, a + self._rng.random(count) * length)
        # Many: each page's first write is exponential at its share of the rate.
        first = self._rng.exponential(size / rate, size)
        hit = np.flatnonzero(first < length)
        pages = region[hit] if region is not None else hit.astype(np.int64)
        return pages, a + first[hit]

    def first_writes(self, a: float, b: float) -> Writes:
        length = b - a
        hot = self._part(self._hot, self._hot.size, self._hot_rate, a, length)
        cold = self._part(None, self.npages, self._cold_rate, a, length)
        if not hot[0].size:
            pages, times = cold
        elif not cold[0].size:
            pages, times = hot
        else:
            # A hot page may also take a cold write: keep the earlier.
            pages, times = self._first_of_each(np.concatenate((hot[0], cold[0])),
                                               np.concatenate((hot[1], cold[1])))
        return Writes(pages, times, np.zeros(pages.size, np.bool_))  # writes leave data


@dataclass(frozen=True)
class Result:
    """One simulated migration, in the terms of a real ``MigrationReport``."""

    mode: str
    limits: RateLimits
    ram_bytes: int
    downtime_s: float  # engine: stop returned -> cont returned
    total_time_s: float  # reservation -> source released
    bytes_sent: int  # page bytes on the wire, rounds and stop-and-copy
    rounds: list[RoundStats]
    stop_reason: str
    final_pages: int  # pages of the stop-and-copy (zero ones included)
    final_data_pages: int  # of which sent with their data
    costs: Costs = field(default=DEFAULT_COSTS)

    @property
    def data_sent_ratio(self) -> float:
        return self.bytes_sent / self.ram_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "min_rate_mbps": self.limits.min_bps / MBIT,
            "max_rate_mbps": self.limits.max_bps / MBIT,
            "increment_mbps": self.limits.increment_bps / MBIT,
            "ram_bytes": self.ram_bytes,
            "downtime_ms": round(self.downtime_s * 1000, 3),
            "total_time_s": round(self.total_time_s, 4),
            "bytes_sent": self.bytes_sent,
            "data_sent_ratio": round(self.data_sent_ratio, 4),
            "stop_reason": self.stop_reason,
            "final_pages": self.final_pages,
            "final_data_pages": self.final_data_pages,
            "rounds": [msgspec.structs.asdict(r) for r in self.rounds],
            "costs": dataclasses.asdict(self.costs),
        }


def simulate(
    dirtier: Dirtier,
    config: PlannerConfig = DEFAULT_CONFIG,
    costs: Costs = DEFAULT_COSTS,
    *,
    zero_pages: Int64s | None = None,
    start_s: float = 0.0,
) -> Result:
    """Migrate a guest whose writes come from ``dirtier``, starting at ``start_s`` on its
    clock. ``zero_pages`` read as zero when the migration starts (holes of the RAM file,
    pages of zeros): round 1 sends them as indexes only, as the source does."""
    npages = dirtier.npages
    planner = Planner(npages, config)
    is_zero = np.zeros(npages, dtype=np.bool_)
    if zero_pages is not None and len(zero_pages):
        is_zero[zero_pages] = True
    first_write = np.full(npages, np.inf)  # in the window being looked at
    t = start_s + costs.setup_s
    step = planner.first(np.flatnonzero(is_zero).astype(np.int64) if is_zero.any() else None)
    while isinstance(step, RoundPlan):
        written, when, zeroed = dirtier.first_writes(
            t, t + _longest_round(step, is_zero, costs))
        first_write[written] = when
        sent, skipped, zero, seconds = _round(step, first_write, is_zero, t, costs)
        planner.record_batch(sent=sent, skipped=skipped, zero=zero)
        end = t + seconds
        in_round = when < end
        dirtied = np.sort(written[in_round])
        first_write[written] = np.inf  # clean for the next round, without a RAM-sized pass
        # What the next round finds in them: mostly data, zeros where the trace says so.
        is_zero[written[in_round]] = zeroed[in_round]
        step = planner.end_round(dirtied, seconds)
        t = end
    assert isinstance(step, StopAndCopy)
    # Written while QMP stop was under way: the source collects once more after it.
    late, _, late_zeroed = dirtier.first_writes(t, t + costs.pause_s)
    last = np.asarray(step.pages)
    if late.size:
        in_last = np.zeros(npages, dtype=np.bool_)  # cheaper than sorting a big final set
        in_last[last] = True
        in_last[late] = True
        last = np.flatnonzero(in_last)
    is_zero[late] = late_zeroed
    data_pages = int(np.count_nonzero(~is_zero[last]))
    final_s = max(0.0, data_pages * PAGE_BITS / _paced(step.rate_bps) - PACER_BURST_S)
    downtime = final_s + costs.stop_s
    total = t + costs.pause_s + downtime + costs.release_s - start_s
    return Result(
        mode=str(config.mode),
        limits=config.limits,
        ram_bytes=npages * PAGE_SIZE,
        downtime_s=downtime,
        total_time_s=total,
        bytes_sent=planner.bytes_sent + data_pages * PAGE_SIZE,
        rounds=planner.rounds,
        stop_reason=str(step.reason),
        final_pages=int(last.size),
        final_data_pages=data_pages,
        costs=costs,
    )


def _paced(rate_bps: float | None) -> float:
    """The simulator models the paper's policy, whose every round has a pace."""
    if rate_bps is None:
        raise ValueError("the simulator runs the paper's rates only (PlannerConfig.target "
                         "None): a round without a pace follows a link it does not model")
    return rate_bps


def _longest_round(plan: RoundPlan, is_zero: npt.NDArray[np.bool_], costs: Costs) -> float:
    """How long ``plan`` takes if no page is skipped: an upper bound on the round."""
    n_data = plan.pages.size - int(np.count_nonzero(is_zero[plan.pages]))
    return n_data * PAGE_BITS / _paced(plan.rate_bps) + costs.round_s


def _round(
    plan: RoundPlan,
    first_write: Floats,
    is_zero: npt.NDArray[np.bool_],
    t0: float,
    costs: Costs,
) -> tuple[int, int, int, float]:
    """One pre-copy round from ``t0``: (pages sent, skipped, zero, seconds it took), given
    each page's first write since ``t0`` (``inf`` if none before the round can end).

    The source peeks at each batch before sending it: a page written since the round
    began is skipped (§5.4), a page of zeros goes as an index and takes no time, and the
    rest go at the round's rate. So batch ``b`` is peeked at ``t0 + c x (data pages
    before b - data pages skipped before b)``; skipping makes later peeks earlier. Only
    batches with a page written before their latest possible peek can skip anything,
    and only their pages are looked at."""
    pages = plan.pages
    c = PAGE_BITS / _paced(plan.rate_bps)  # seconds per data page
    data = ~is_zero[pages]
    n_data = int(np.count_nonzero(data))
    size = batch_pages(_paced(plan.rate_bps))
    n_batches = -(-pages.size // size)
    starts = np.arange(0, pages.size, size)
    f = first_write[pages]
    data_before = np.concatenate(([0], np.cumsum(np.add.reduceat(data, starts))[:-1]))
    latest_peek = t0 + c * data_before
    # Pages written before their batch's latest possible peek: only they can be skipped.
    maybe = np.flatnonzero(f < np.repeat(latest_peek, size)[: pages.size])
    if not maybe.size:
        return n_data, 0, pages.size - n_data, max(n_data * c + costs.round_s, 1e-9)
    batch, when, is_data = maybe // size, f[maybe], data[maybe]
    skipped_before = _skips_before(batch, when, is_data, latest_peek, c, n_batches)
    hit = when < latest_peek[batch] - c * skipped_before[batch]
    skipped_data = int(np.count_nonzero(hit & is_data))
    skipped_zero = int(np.count_nonzero(hit)) - skipped_data
    sent = n_data - skipped_data
    zero = pages.size - n_data - skipped_zero
    # A positive duration even for a round of nothing but zero pages and no fixed cost.
    return sent, skipped_data + skipped_zero, zero, max(sent * c + costs.round_s, 1e-9)


def _skips_before(
    batch: Int64s, when: Floats, is_data: npt.NDArray[np.bool_], latest_peek: Floats,
    c: float, n_batches: int, max_passes: int = 32,
) -> Int64s:
    """Data pages skipped before each batch, given the pages that may be skipped.

    A batch's skips depend only on the batches before it, so a pass that recomputes
    every batch from the previous pass's counts gets at least one more batch exactly
    right; in practice a few passes reach the fixed point, which is the exact answer.
    A guest that keeps it moving longer is finished batch by batch."""
    skipped = np.zeros(n_batches, dtype=np.int64)
    if not is_data.any():
        return skipped  # skipping pages of zeros takes no time: no peek moves
    for _ in range(max_passes):
        hit = when < latest_peek[batch] - c * skipped[batch]
        per_batch = np.bincount(batch[hit & is_data], minlength=n_batches)
        again = np.concatenate(([0], np.cumsum(per_batch)[:-1]))
        if np.array_equal(again, skipped):
            return skipped
        skipped = again
    # Sequentially, batch by batch: exact whatever the guest does.
    total = 0
    order = np.argsort(batch, kind="stable")
    batch, when, is_data = batch[order], when[order], is_data[order]
    bounds = np.searchsorted(batch, np.arange(n_batches + 1))
    for b in range(n_batches):
        skipped[b] = total
        lo, hi = bounds[b], bounds[b + 1]
        if hi > lo:
            peek = latest_peek[b] - c * total
            total += int(np.count_nonzero((when[lo:hi] < peek) & is_data[lo:hi]))
    return skipped


# -- grids of settings ------------------------------------------------------------------


@dataclass(frozen=True)
class SweepCell:
    min_rate_mbps: float
    max_rate_mbps: float
    result: Result


def sweep(
    make_dirtier: Callable[[], Dirtier],
    min_rates_mbps: list[float],
    max_rates_mbps: list[float],
    *,
    increment_mbps: float = DEFAULT_OPTIONS.increment_mbps,
    base: PlannerConfig = DEFAULT_CONFIG,
    costs: Costs = DEFAULT_COSTS,
    zero_pages: Int64s | None = None,
) -> Iterator[SweepCell]:
    """Every (min, max) pair with min <= max, each on a fresh dirtier from
    ``make_dirtier()`` so that every cell sees the same guest."""
    for lo in min_rates_mbps:
        for hi in max_rates_mbps:
            if lo > hi:
                continue
            limits = RateLimits(lo * MBIT, hi * MBIT, increment_mbps * MBIT)
            config = dataclasses.replace(base, limits=limits, mode=Mode.PRECOPY)
            yield SweepCell(lo, hi, simulate(make_dirtier(), config, costs, zero_pages=zero_pages))
