"""The pre-copy planner (Clark et al. §5.3-5.4), driven on virtual time with no QEMU.

Two ways in. Direct tests hand the planner exact dirty sets and durations, to pin each
rule to its number. Scenario tests run a tiny simulator (``simulate``): batches of a
round go out at the paced rate, the guest writes pages from a model meanwhile, and the
source peeks and skips as §5.4 says. The simulator also keeps a version number per page
on both sides, so it can check the one property that matters: when the stop-and-copy is
done, the destination holds every page as the source last wrote it.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import LivemigError
from livemig.migration.planner import (
    DEFAULT_CONFIG,
    MBIT,
    MIN_TIMEOUT_S,
    PAGE_SIZE,
    DowntimeTarget,
    Mode,
    Pages,
    Phase,
    Planner,
    PlannerConfig,
    PlannerStateError,
    RateLimits,
    RoundPlan,
    StopAndCopy,
    StopReason,
    default_timeout_s,
    service_share_bps,
)

PAGE_BITS = PAGE_SIZE * 8
MIB_PAGES = (1 << 20) // PAGE_SIZE


def pages(*indexes: int) -> Pages:
    return np.array(indexes, dtype=np.int64)


def duration_for(dirty_pages: int, dirty_rate_bps: float) -> float:
    """The round duration that makes ``dirty_pages`` a dirty rate of ``dirty_rate_bps``."""
    return dirty_pages * PAGE_BITS / dirty_rate_bps


def send_all(planner: Planner, plan: RoundPlan) -> None:
    planner.record_batch(sent=plan.pages.size, skipped=0)


def as_plan(step: RoundPlan | StopAndCopy) -> RoundPlan:
    assert isinstance(step, RoundPlan), step
    return step


def as_stop(step: RoundPlan | StopAndCopy) -> StopAndCopy:
    assert isinstance(step, StopAndCopy), step
    return step


# -- the simulator -------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """The guest writes ``writes_per_s`` pages a second, uniformly over ``region``."""

    writes_per_s: float
    region: Pages


def uniform(npages: int, writes_per_s: float) -> Model:
    return Model(writes_per_s, np.arange(npages, dtype=np.int64))


def hot_set(npages: int, hot: int, writes_per_s: float) -> Model:
    # Spread over RAM, so the random order and the physical layout do not line up.
    return Model(writes_per_s, np.linspace(0, npages - 1, hot).astype(np.int64))


@dataclass
class Run:
    planner: Planner
    final: StopAndCopy
    steps: list[RoundPlan | StopAndCopy] = field(default_factory=list)
    dirtied: list[Pages] = field(default_factory=list)  # per round, as given to end_round
    skipped: list[Pages] = field(default_factory=list)  # per round, the pages skipped


def simulate(
    npages: int,
    model: Model,
    config: PlannerConfig = DEFAULT_CONFIG,
    *,
    seed: int = 1,
    batch: int = 1024,
    overhead_s: float = 1e-3,
    holes: Pages | None = None,
    link_bps: float = 1000 * MBIT,
) -> Run:
    """One migration on virtual time. Each batch goes out at the round's rate (its
    duration is its data bytes x 8 / rate; zero pages cost nothing), then the guest
    writes for that long. Each round also pays ``overhead_s`` (collecting the dirty log,
    a round trip) during which the guest keeps writing. A round without a pace (the
    downtime target's) goes at ``link_bps``, which the planner is told it measured."""
    rng = np.random.default_rng(seed)
    planner = Planner(npages, config)
    src = np.zeros(npages, dtype=np.int64)  # version of each page at the source
    dst = np.full(npages, -1, dtype=np.int64)  # what the destination holds (-1: nothing)
    is_zero = np.zeros(npages, dtype=np.bool_)
    if holes is not None:
        is_zero[holes] = True
    written = np.zeros(npages, dtype=np.bool_)  # the dirty log since its last collect

    def guest_runs(seconds: float) -> None:
        count = rng.poisson(model.writes_per_s * seconds)
        if count:
            hit = model.region[rng.integers(0, model.region.size, count)]
            src[hit] += 1
            written[hit] = True
            is_zero[hit] = False

    step = planner.first(holes)
    run = Run(planner, StopAndCopy(pages(), 0.0, StopReason.STOP_AND_COPY_MODE), [step])
    clock = 0.0
    while isinstance(step, RoundPlan):
        elapsed = 0.0
        rate = link_bps if step.rate_bps is None else step.rate_bps
        skipped_here = []
        for start in range(0, step.pages.size, batch):
            chunk = step.pages[start : start + batch]
            skip = written[chunk]  # §5.4: peek, and leave re-dirtied pages to the next round
            todo = chunk[~skip]
            zero = int(np.count_nonzero(is_zero[todo]))
            planner.record_batch(todo.size - zero, int(np.count_nonzero(skip)), zero)
            dst[todo] = src[todo]
            skipped_here.append(chunk[skip])
            seconds = (todo.size - zero) * PAGE_BITS / rate
            guest_runs(seconds)
            elapsed += seconds
        guest_runs(overhead_s)
        dirtied = np.flatnonzero(written).astype(np.int64)
        written[:] = False
        run.dirtied.append(dirtied)
        run.skipped.append(np.concatenate(skipped_here))
        clock += elapsed + overhead_s
        step = planner.end_round(dirtied, elapsed + overhead_s, link_bps=link_bps,
                                 elapsed_s=clock, collect_s=overhead_s)
        run.steps.append(step)
    # Stop-and-copy: the guest is paused, so what is sent now is final.
    dst[step.pages] = src[step.pages]
    run.final = step
    assert np.array_equal(dst, src), "a page the guest wrote never reached the destination"
    return run


def check_rules(run: Run) -> None:
    """What every pre-copy must satisfy, whatever the guest did."""
    planner, config = run.planner, run.planner.config
    limits = config.limits
    stats = planner.rounds
    assert len(run.steps) == len(stats) + 1 <= config.max_rounds + 1
    assert isinstance(run.steps[-1], StopAndCopy)
    assert all(isinstance(s, RoundPlan) for s in run.steps[:-1])
    for i, s in enumerate(stats):
        assert s.number == i + 1
        assert s.pages_sent + s.pages_skipped + s.pages_zero == s.pages_planned
        assert s.pages_dirtied == run.dirtied[i].size
        assert s.dirty_rate_bps == pytest.approx(s.pages_dirtied * PAGE_BITS / s.duration_s)
        # No dirty page is forgotten: each round's dirty set is exactly the next step's
        # pages, and the pages skipped are among them.
        nxt = run.steps[i + 1].pages
        assert np.array_equal(np.sort(nxt), run.dirtied[i])
        assert np.isin(run.skipped[i], nxt).all()
    assert stats[0].rate_bps == limits.min_bps
    for before, after in itertools.pairwise(stats):
        expected = max(limits.min_bps, before.dirty_rate_bps + limits.increment_bps)
        assert after.rate_bps == pytest.approx(expected)
        assert after.rate_bps <= limits.max_bps
    assert planner.bytes_sent == sum(s.pages_sent for s in stats) * PAGE_SIZE
    assert run.final.rate_bps == limits.max_bps
    assert planner.phase is Phase.DONE and planner.final is run.final


# -- round 1 and later rounds --------------------------------------------------------


def test_round_one_sends_every_page_once_in_pseudo_random_order() -> None:
    planner = Planner(4096)
    plan = as_plan(planner.first())
    assert plan.number == 1
    assert plan.rate_bps == 100 * MBIT
    assert plan.zero_pages == 0
    assert np.array_equal(np.sort(plan.pages), np.arange(4096))
    # §5.4: not a linear scan. Consecutive entries are rarely neighbours in RAM.
    assert np.count_nonzero(np.abs(np.diff(plan.pages)) == 1) < 4096 // 100
    assert not plan.pages.flags.writeable


def test_later_rounds_send_exactly_the_previous_dirty_set_reshuffled() -> None:
    planner = Planner(10_000)
    send_all(planner, as_plan(planner.first()))
    dirty = np.arange(2000, 4000, dtype=np.int64)
    plan = as_plan(planner.end_round(dirty, 1.0))
    assert plan.number == 2
    assert np.array_equal(np.sort(plan.pages), dirty)
    assert not np.array_equal(plan.pages, dirty)
    # A set: order and duplicates in what the tracker reports do not matter.
    send_all(planner, plan)
    again = np.concatenate((dirty[::-1], dirty[:10]))
    plan3 = as_plan(planner.end_round(again, 1.0))
    assert np.array_equal(np.sort(plan3.pages), dirty)
    assert planner.rounds[-1].pages_dirtied == dirty.size


def test_the_callers_dirty_array_is_not_kept() -> None:
    planner = Planner(1000)
    send_all(planner, as_plan(planner.first()))
    dirty = np.arange(100, dtype=np.int64)
    plan = as_plan(planner.end_round(dirty, 1.0))
    dirty[:] = 999
    assert np.array_equal(np.sort(plan.pages), np.arange(100))


# -- dynamic rate limiting (§5.3) ----------------------------------------------------


def test_each_round_runs_at_the_previous_dirty_rate_plus_the_increment() -> None:
    planner = Planner(100_000)
    send_all(planner, as_plan(planner.first()))
    dirty = np.arange(1000, dtype=np.int64)

    plan = as_plan(planner.end_round(dirty, duration_for(1000, 200 * MBIT)))
    assert plan.rate_bps == pytest.approx(250 * MBIT)
    assert planner.rounds[0].dirty_rate_bps == pytest.approx(200 * MBIT)

    send_all(planner, plan)
    plan = as_plan(planner.end_round(dirty, duration_for(1000, 10 * MBIT)))
    assert plan.rate_bps == 100 * MBIT  # 10 + 50 is below the minimum: clamp up

    stats = planner.rounds
    assert [s.rate_bps for s in stats] == pytest.approx([100 * MBIT, 250 * MBIT])


def test_rate_limits_are_configurable() -> None:
    limits = RateLimits(min_bps=10 * MBIT, max_bps=1000 * MBIT, increment_bps=5 * MBIT)
    planner = Planner(10_000, PlannerConfig(limits=limits))
    plan = as_plan(planner.first())
    assert plan.rate_bps == 10 * MBIT
    send_all(planner, plan)
    plan = as_plan(planner.end_round(pages(*range(100)), duration_for(100, 700 * MBIT)))
    assert plan.rate_bps == pytest.approx(705 * MBIT)


# -- the stop conditions, pinned -----------------------------------------------------


def test_stops_when_less_than_256_kib_remains() -> None:
    planner = Planner(1000)
    send_all(planner, as_plan(planner.first()))
    plan = as_plan(planner.end_round(np.arange(64, dtype=np.int64), 1.0))  # 256 KiB: go on
    send_all(planner, plan)
    stop = as_stop(planner.end_round(np.arange(500, 563, dtype=np.int64), 1.0))  # 63 pages
    assert stop.reason is StopReason.FEW_PAGES_LEFT
    assert np.array_equal(stop.pages, np.arange(500, 563))  # sorted: the VM is paused
    assert stop.rate_bps == 500 * MBIT
    assert not stop.pages.flags.writeable


def test_a_clean_round_stops_even_when_final_bytes_is_zero() -> None:
    planner = Planner(1000, PlannerConfig(final_bytes=0))
    send_all(planner, as_plan(planner.first()))
    stop = as_stop(planner.end_round(np.empty(0, dtype=np.int64), 1.0))
    assert stop.reason is StopReason.FEW_PAGES_LEFT
    assert stop.pages.size == 0


def test_stops_when_the_next_rate_would_exceed_the_maximum() -> None:
    planner = Planner(100_000)
    send_all(planner, as_plan(planner.first()))
    dirty = np.arange(1000, dtype=np.int64)
    stop = as_stop(planner.end_round(dirty, duration_for(1000, 451 * MBIT)))
    assert stop.reason is StopReason.RATE_ABOVE_MAX
    assert np.array_equal(stop.pages, dirty)
    assert stop.rate_bps == 500 * MBIT


def test_a_round_at_exactly_the_maximum_still_runs() -> None:
    # Rates in pages per second, so that the arithmetic is exact at the boundary.
    limits = RateLimits(min_bps=PAGE_BITS, max_bps=1000 * PAGE_BITS, increment_bps=100 * PAGE_BITS)
    planner = Planner(10_000, PlannerConfig(limits=limits))
    send_all(planner, as_plan(planner.first()))
    plan = as_plan(planner.end_round(np.arange(900, dtype=np.int64), 1.0))
    assert plan.rate_bps == limits.max_bps
    send_all(planner, plan)
    stop = as_stop(planner.end_round(np.arange(901, dtype=np.int64), 1.0))
    assert stop.reason is StopReason.RATE_ABOVE_MAX


def test_stops_after_29_rounds() -> None:
    planner = Planner(10_000)
    step: RoundPlan | StopAndCopy = planner.first()
    dirty = np.arange(0, 10_000, 100, dtype=np.int64)  # 100 pages, always
    decisions = 1
    while isinstance(step, RoundPlan):
        send_all(planner, step)
        step = planner.end_round(dirty, duration_for(100, 100 * MBIT))
        decisions += 1
    assert step.reason is StopReason.ROUND_LIMIT
    assert decisions == 30
    assert len(planner.rounds) == 29


def test_stops_once_three_times_ram_was_sent() -> None:
    planner = Planner(1000)
    step = planner.first()
    dirty = np.arange(1000, dtype=np.int64)  # every page, every round
    for _ in range(2):
        send_all(planner, as_plan(step))
        step = planner.end_round(dirty, duration_for(1000, 100 * MBIT))
    send_all(planner, as_plan(step))
    assert planner.bytes_sent == 3 * 1000 * PAGE_SIZE  # "once" it is reached, not exceeded
    stop = as_stop(planner.end_round(dirty, duration_for(1000, 100 * MBIT)))
    assert stop.reason is StopReason.SENT_LIMIT
    assert len(planner.rounds) == 3


def test_zero_pages_do_not_spend_the_sent_budget() -> None:
    # They cost an index on the wire, not a page: bytes_sent, and so the budget, skip them.
    planner = Planner(1000)
    step = planner.first()
    dirty = np.arange(1000, dtype=np.int64)
    for _ in range(5):
        plan = as_plan(step)
        planner.record_batch(sent=0, skipped=0, zero=plan.pages.size)
        step = planner.end_round(dirty, duration_for(1000, 100 * MBIT))
    assert isinstance(step, RoundPlan)
    assert planner.bytes_sent == 0
    assert [s.pages_zero for s in planner.rounds] == [1000] * 5


def test_few_pages_left_wins_when_several_conditions_hold() -> None:
    config = PlannerConfig(max_rounds=1, max_sent_factor=0.5)
    planner = Planner(1000, config)
    send_all(planner, as_plan(planner.first()))
    # 10 pages in a nanosecond: also far above the maximum rate, and both Xen limits hold.
    stop = as_stop(planner.end_round(np.arange(10, dtype=np.int64), 1e-9))
    assert stop.reason is StopReason.FEW_PAGES_LEFT


def test_rate_above_max_wins_over_xens_limits() -> None:
    planner = Planner(1000, PlannerConfig(max_rounds=1, max_sent_factor=0.5))
    send_all(planner, as_plan(planner.first()))
    stop = as_stop(planner.end_round(np.arange(500, dtype=np.int64), 1e-3))
    assert stop.reason is StopReason.RATE_ABOVE_MAX


def test_sent_limit_wins_over_round_limit() -> None:
    planner = Planner(1000, PlannerConfig(max_rounds=1, max_sent_factor=0.5))
    send_all(planner, as_plan(planner.first()))
    stop = as_stop(planner.end_round(np.arange(500, dtype=np.int64), 10.0))
    assert stop.reason is StopReason.SENT_LIMIT


# -- stop-and-copy mode --------------------------------------------------------------


def test_stop_and_copy_mode_sends_everything_at_the_maximum_at_once() -> None:
    planner = Planner(2048, PlannerConfig(mode=Mode.STOP_AND_COPY))
    stop = as_stop(planner.first())
    assert stop.reason is StopReason.STOP_AND_COPY_MODE
    assert np.array_equal(stop.pages, np.arange(2048))
    assert stop.rate_bps == 500 * MBIT
    assert planner.rounds == []
    assert planner.bytes_sent == 0
    assert stop.predicted_downtime_s is None  # nothing measured the link


# -- batches, skipped and zero pages -------------------------------------------------


def test_batches_are_accounted_per_round() -> None:
    planner = Planner(1000)
    plan = as_plan(planner.first())
    planner.record_batch(sent=300, skipped=20, zero=80)
    progress = planner.progress
    assert (progress.phase, progress.round, progress.pages_left) == (Phase.IN_ROUND, 1, 600)
    planner.record_batch(sent=550, skipped=30, zero=20)
    assert planner.bytes_sent == 850 * PAGE_SIZE  # skipped and zero pages put no data out
    plan = as_plan(planner.end_round(np.arange(100, dtype=np.int64), 2.0))
    stats = planner.rounds[0]
    assert (stats.pages_planned, stats.pages_sent, stats.pages_skipped, stats.pages_zero) == (
        1000,
        850,
        50,
        100,
    )
    assert (stats.pages_dirtied, stats.duration_s) == (100, 2.0)
    assert planner.progress.pages_left == plan.pages.size == 100


def test_a_round_cannot_report_more_pages_than_planned() -> None:
    planner = Planner(100)
    planner.first()
    planner.record_batch(sent=90, skipped=0)
    with pytest.raises(ValueError):
        planner.record_batch(sent=10, skipped=1)
    assert planner.bytes_sent == 90 * PAGE_SIZE  # the refused batch changed nothing
    with pytest.raises(ValueError):
        planner.record_batch(sent=-1, skipped=0)


def test_a_round_cannot_end_before_every_page_is_reported() -> None:
    planner = Planner(100)
    planner.first()
    planner.record_batch(sent=99, skipped=0)
    with pytest.raises(ValueError):
        planner.end_round(pages(1), 1.0)
    planner.record_batch(sent=0, skipped=1)
    as_plan(planner.end_round(np.arange(64, dtype=np.int64), 1.0))


def test_holes_lead_round_one_and_cost_no_bytes() -> None:
    holes = np.array([7, 3, 900, 3, 512], dtype=np.int64)  # unsorted, with a duplicate
    planner = Planner(1000)
    plan = as_plan(planner.first(holes))
    assert plan.zero_pages == 4
    assert np.array_equal(plan.pages[:4], [3, 7, 512, 900])
    assert np.array_equal(np.sort(plan.pages), np.arange(1000))
    planner.record_batch(sent=996, skipped=0, zero=4)
    assert planner.bytes_sent == 996 * PAGE_SIZE


def test_skipped_pages_are_sent_in_the_next_round() -> None:
    # A hot set written far faster than it can be sent: most of it is skipped each round.
    run = simulate(4096, hot_set(4096, 200, 50_000), overhead_s=0.02, batch=64)
    check_rules(run)
    assert sum(s.pages_skipped for s in run.planner.rounds) > 0
    for skipped, step in zip(run.skipped, run.steps[1:], strict=True):
        assert np.isin(skipped, step.pages).all()


# -- scenarios: a model of the guest for each way pre-copy ends -----------------------


def test_a_quiet_guest_converges_with_few_pages_left() -> None:
    # Writes 200 pages/s within 4 MiB of a 64 MiB VM: round 1 takes 5 s at the minimum
    # rate, round 2 resends a few hundred pages, and then fewer than 64 remain.
    run = simulate(16384, Model(200, np.arange(1000, 2000, dtype=np.int64)))
    check_rules(run)
    assert run.final.reason is StopReason.FEW_PAGES_LEFT
    assert run.final.pages.size * PAGE_SIZE < 256 * 1024
    assert len(run.planner.rounds) >= 2
    assert run.final.pages.size * PAGE_BITS / (500 * MBIT) < 0.005


def test_mmuncher_outruns_the_maximum_rate() -> None:
    # §6.4's MMuncher: a 256 MiB region of a 512 MiB VM written flat out (1 GiB/s). Its
    # dirty rate soon exceeds what 500 Mbit/s can chase; pre-copy gives up and the
    # stop-and-copy carries most of the region: seconds of downtime, as in the paper.
    region = np.arange(256 * MIB_PAGES, dtype=np.int64)
    run = simulate(512 * MIB_PAGES, Model(256 * MIB_PAGES * 4, region))
    check_rules(run)
    assert run.final.reason is StopReason.RATE_ABOVE_MAX
    assert run.final.pages.size > region.size // 2
    assert run.final.pages.size * PAGE_BITS / (500 * MBIT) > 2.0
    assert run.planner.rounds[-1].dirty_rate_bps > 450 * MBIT


def test_a_small_hot_set_never_converges_and_hits_the_round_limit() -> None:
    # 100 pages rewritten 10,000 times a second, with 20 ms per round to collect the
    # dirty log: never below 64 pages, never faster than ~165 Mbit/s of dirtying.
    run = simulate(16384, hot_set(16384, 100, 10_000), overhead_s=0.02)
    check_rules(run)
    assert run.final.reason is StopReason.ROUND_LIMIT
    assert len(run.planner.rounds) == 29
    assert len(run.steps) == 30


def test_writes_across_all_ram_hit_the_sent_limit() -> None:
    # 10,000 pages/s (330 Mbit/s of writes) anywhere in a 32 MiB VM: each round resends
    # much of RAM, while the dirty rate stays under what the maximum could chase.
    run = simulate(8192, uniform(8192, 10_000))
    check_rules(run)
    assert run.final.reason is StopReason.SENT_LIMIT
    assert run.planner.bytes_sent >= 3 * 8192 * PAGE_SIZE
    assert len(run.planner.rounds) < 29


def test_holes_in_a_simulated_migration() -> None:
    rng = np.random.default_rng(5)
    holes = rng.choice(8192, 3000, replace=False).astype(np.int64)
    run = simulate(8192, hot_set(8192, 500, 2000), holes=holes)
    check_rules(run)
    first = run.planner.rounds[0]
    assert first.pages_zero >= 2900  # a few holes get written before their turn
    assert run.planner.bytes_sent < 2 * 8192 * PAGE_SIZE


# -- determinism ---------------------------------------------------------------------


def test_the_same_seed_gives_the_same_migration() -> None:
    a = simulate(4096, uniform(4096, 3000), PlannerConfig(seed=7), seed=3)
    b = simulate(4096, uniform(4096, 3000), PlannerConfig(seed=7), seed=3)
    assert len(a.steps) == len(b.steps)
    for x, y in zip(a.steps, b.steps, strict=True):
        assert np.array_equal(x.pages, y.pages)
        assert x.rate_bps == y.rate_bps
    assert a.planner.rounds == b.planner.rounds


def test_another_seed_gives_another_order() -> None:
    a = as_plan(Planner(4096, PlannerConfig(seed=1)).first())
    b = as_plan(Planner(4096, PlannerConfig(seed=2)).first())
    assert not np.array_equal(a.pages, b.pages)


# -- misuse --------------------------------------------------------------------------


def test_calls_out_of_order_raise_a_state_error() -> None:
    planner = Planner(100)
    with pytest.raises(PlannerStateError) as err:
        planner.end_round(pages(), 1.0)
    assert (err.value.operation, err.value.phase) == ("end_round", Phase.READY)
    assert isinstance(err.value, LivemigError)
    with pytest.raises(PlannerStateError):
        planner.record_batch(1, 0)

    plan = as_plan(planner.first())
    with pytest.raises(PlannerStateError):
        planner.first()
    send_all(planner, plan)
    as_stop(planner.end_round(pages(1), 1.0))

    for call in (
        lambda: planner.first(),
        lambda: planner.record_batch(0, 0),
        lambda: planner.end_round(pages(), 1.0),
    ):
        with pytest.raises(PlannerStateError) as err:
            call()
        assert err.value.phase is Phase.DONE
    # Questions are still answered.
    assert len(planner.rounds) == 1
    assert planner.bytes_sent == 100 * PAGE_SIZE


def test_nothing_follows_stop_and_copy_mode() -> None:
    planner = Planner(100, PlannerConfig(mode=Mode.STOP_AND_COPY))
    planner.first()
    with pytest.raises(PlannerStateError):
        planner.record_batch(100, 0)


@pytest.mark.parametrize(
    "dirtied",
    [pages(-1), pages(100), pages(3, 4, 1000)],
    ids=["negative", "one-past-the-end", "far-out"],
)
def test_dirty_pages_out_of_range_are_refused(dirtied: Pages) -> None:
    planner = Planner(100)
    send_all(planner, as_plan(planner.first()))
    with pytest.raises(ValueError):
        planner.end_round(dirtied, 1.0)
    # Nothing changed: the round can still be ended properly.
    assert planner.phase is Phase.IN_ROUND and planner.rounds == []
    as_stop(planner.end_round(pages(99), 1.0))


def test_dirty_pages_must_be_a_flat_integer_array() -> None:
    planner = Planner(100)
    send_all(planner, as_plan(planner.first()))
    with pytest.raises(ValueError):
        planner.end_round(np.zeros((2, 2), dtype=np.int64), 1.0)
    with pytest.raises(TypeError):
        planner.end_round(np.array([1.5]), 1.0)
    # An empty set is fine whatever its dtype (np.array([]) is float64).
    as_stop(planner.end_round(np.array([]), 1.0))


@pytest.mark.parametrize("duration", [0.0, -1.0, float("nan"), float("inf")])
def test_round_durations_must_be_positive_and_finite(duration: float) -> None:
    planner = Planner(100)
    send_all(planner, as_plan(planner.first()))
    with pytest.raises(ValueError):
        planner.end_round(pages(1), duration)


def test_holes_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        Planner(100).first(pages(100))


@pytest.mark.parametrize("npages", [0, -5])
def test_a_vm_has_pages(npages: int) -> None:
    with pytest.raises(ValueError):
        Planner(npages)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RateLimits(min_bps=0),
        lambda: RateLimits(min_bps=200 * MBIT, max_bps=100 * MBIT),
        lambda: RateLimits(increment_bps=-1),
        lambda: RateLimits(max_bps=float("inf")),
        lambda: PlannerConfig(max_rounds=0),
        lambda: PlannerConfig(max_sent_factor=0),
        lambda: PlannerConfig(final_bytes=-1),
    ],
)
def test_nonsense_configurations_are_refused(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


def test_defaults_are_xens() -> None:
    config = PlannerConfig()
    assert config == DEFAULT_CONFIG
    assert config.limits == RateLimits(100 * MBIT, 500 * MBIT, 50 * MBIT)
    assert (config.max_rounds, config.max_sent_factor, config.final_bytes) == (29, 3.0, 262144)
    assert dataclasses.replace(config, seed=3).seed == 3


# -- properties ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    npages=st.integers(1, 3000),
    seed=st.integers(0, 2**32 - 1),
    max_rounds=st.integers(1, 40),
    sent_factor=st.floats(0.5, 5.0),
    final_pages=st.integers(0, 200),
    data=st.data(),
)
def test_any_dirtying_is_followed_and_pre_copy_terminates(
    npages: int,
    seed: int,
    max_rounds: int,
    sent_factor: float,
    final_pages: int,
    data: st.DataObject,
) -> None:
    """Whatever the tracker reports, each dirty set is the next step's pages, rates obey
    §5.3, and a StopAndCopy comes within max_rounds + 1 decisions."""
    config = PlannerConfig(
        max_rounds=max_rounds,
        max_sent_factor=sent_factor,
        final_bytes=final_pages * PAGE_SIZE,
        seed=seed,
    )
    planner = Planner(npages, config)
    rng = np.random.default_rng(seed)
    step: RoundPlan | StopAndCopy = planner.first()
    decisions = 1
    while isinstance(step, RoundPlan):
        assert decisions <= max_rounds
        skipped = data.draw(st.integers(0, step.pages.size), label="skipped")
        zero = data.draw(st.integers(0, step.pages.size - skipped), label="zero")
        planner.record_batch(step.pages.size - skipped - zero, skipped, zero)
        count = data.draw(st.integers(0, npages), label="dirtied")
        dirty = rng.integers(0, npages, count).astype(np.int64)  # duplicates, unsorted
        duration = data.draw(st.floats(1e-6, 100.0), label="duration")
        step = planner.end_round(dirty, duration)
        decisions += 1
        expected = np.unique(dirty)
        assert np.array_equal(np.sort(step.pages), expected)
        last = planner.rounds[-1]
        if isinstance(step, RoundPlan):
            limits = config.limits
            assert step.rate_bps == pytest.approx(
                max(limits.min_bps, last.dirty_rate_bps + limits.increment_bps)
            )
            assert limits.min_bps <= step.rate_bps <= limits.max_bps
            assert expected.size * PAGE_SIZE >= config.final_bytes and expected.size > 0
    assert decisions <= max_rounds + 1
    assert step.rate_bps == config.limits.max_bps
    assert planner.bytes_sent == sum(s.pages_sent for s in planner.rounds) * PAGE_SIZE


@settings(max_examples=40, deadline=None)
@given(
    npages=st.integers(64, 4096),
    writes_per_s=st.floats(0, 100_000),
    region=st.floats(0.01, 1.0),
    batch=st.integers(1, 2048),
    overhead_s=st.floats(1e-4, 0.1),
    seed=st.integers(0, 2**16),
)
def test_the_destination_always_ends_up_with_every_write(
    npages: int, writes_per_s: float, region: float, batch: int, overhead_s: float, seed: int
) -> None:
    """No dirty page is ever forgotten: ``simulate`` checks that the destination holds
    the source's last version of every page once the stop-and-copy is done."""
    start = seed % npages
    size = max(1, int(npages * region))
    model = Model(writes_per_s, (start + np.arange(size, dtype=np.int64)) % npages)
    run = simulate(
        npages, model, PlannerConfig(seed=seed), seed=seed, batch=batch, overhead_s=overhead_s
    )
    check_rules(run)


# -- the downtime target (rates=auto) -------------------------------------------------


def targeted(downtime_ms: float, cost_ms: float = 30.0,
             timeout_s: float | None = None) -> PlannerConfig:
    return PlannerConfig(target=DowntimeTarget(downtime_ms / 1000, cost_ms / 1000, timeout_s))


def test_the_prediction_is_the_fixed_cost_the_collect_and_the_pages_at_the_link_rate() -> None:
    planner = Planner(100_000, targeted(100, cost_ms=30))
    plan = as_plan(planner.first())
    assert plan.rate_bps is None  # as fast as the link delivers
    planner.record_batch(sent=plan.pages.size, skipped=0)
    # 1000 dirty pages at 800 Mbit/s: 40.96 ms; + 30 ms fixed + 5 ms collect = 75.96 ms.
    stop = as_stop(planner.end_round(np.arange(1000, dtype=np.int64), 2.0,
                                     link_bps=800 * MBIT, elapsed_s=2.5, collect_s=0.005))
    assert stop.reason is StopReason.WITHIN_TARGET and stop.reason.within_target
    assert stop.predicted_downtime_s == pytest.approx(0.07596)
    assert stop.rate_bps is None  # the stop-and-copy too: the VM's traffic is paused
    assert planner.predict_downtime_s(0) == pytest.approx(0.035)


def test_pre_copy_goes_on_while_the_prediction_misses_the_target() -> None:
    planner = Planner(100_000, targeted(50, cost_ms=30))
    plan = as_plan(planner.first())
    planner.record_batch(sent=plan.pages.size, skipped=0)
    # 1000 pages at 800 Mbit/s: 71 ms predicted, over 50: another round, unpaced.
    nxt = as_plan(planner.end_round(np.arange(1000, dtype=np.int64), 2.0,
                                    link_bps=800 * MBIT, elapsed_s=2.5))
    assert nxt.rate_bps is None and nxt.pages.size == 1000
    assert planner.predicted_downtime_s == pytest.approx(0.07096)
    planner.record_batch(sent=1000, skipped=0)
    stop = as_stop(planner.end_round(np.arange(100, dtype=np.int64), 0.05,
                                     link_bps=800 * MBIT, elapsed_s=2.6))
    assert stop.reason is StopReason.WITHIN_TARGET
    assert planner.predictions_s == pytest.approx([0.07096, 0.034096])
    assert planner.best_predicted_downtime_s == pytest.approx(0.034096)
    # The round's rate is what it achieved: 1000 pages in 50 ms.
    assert planner.rounds[1].rate_bps == pytest.approx(1000 * PAGE_BITS / 0.05)


def test_a_fixed_cost_beyond_the_target_stops_at_once_as_unreachable() -> None:
    planner = Planner(1000, targeted(20, cost_ms=30))
    plan = as_plan(planner.first())
    planner.record_batch(sent=plan.pages.size, skipped=0)
    stop = as_stop(planner.end_round(pages(1, 2), 0.1, link_bps=1e9, elapsed_s=0.2))
    assert stop.reason is StopReason.TARGET_UNREACHABLE and not stop.reason.within_target


def test_a_hot_set_the_link_cannot_chase_runs_out_of_time_with_its_best_prediction() -> None:
    # 4 MiB written 50,000 times a second (1.6 Gbit/s of dirtying) over a 100 Mbit/s
    # link: every round re-dirties the whole set. Rounds go on until the time allowed.
    run = simulate(16384, hot_set(16384, 1024, 50_000), targeted(100, timeout_s=5.0),
                   link_bps=100 * MBIT, overhead_s=0.01)
    assert run.final.reason is StopReason.TIMEOUT and not run.final.reason.within_target
    clock = sum(r.duration_s for r in run.planner.rounds)
    assert clock >= 5.0 and clock - run.planner.rounds[-1].duration_s < 5.0
    best = run.planner.best_predicted_downtime_s
    assert best is not None and best > 0.1
    assert best == min(run.planner.predictions_s)
    assert run.planner.timeout_s == 5.0


def test_a_quiet_guest_switches_over_as_soon_as_the_prediction_fits() -> None:
    run = simulate(16384, Model(200, np.arange(1000, 2000, dtype=np.int64)), targeted(100))
    assert run.final.reason is StopReason.WITHIN_TARGET
    assert run.final.predicted_downtime_s is not None
    assert run.final.predicted_downtime_s <= 0.1
    assert all(r.rate_bps > 0 for r in run.planner.rounds)


def test_the_default_time_allowed_scales_with_ram_over_the_link() -> None:
    assert default_timeout_s(256 << 20, 1000 * MBIT) == MIN_TIMEOUT_S
    assert default_timeout_s(16 << 30, 1000 * MBIT) == pytest.approx(10 * 16 * 8 * 1.073741824)
    planner = Planner(1000, targeted(100))
    plan = as_plan(planner.first())
    planner.record_batch(sent=plan.pages.size, skipped=0)
    planner.end_round(np.arange(900, dtype=np.int64), 0.1, link_bps=1e6, elapsed_s=0.1)
    # Fixed at round 1's link rate: 4 MB x 8 x 10 / 1 Mbit/s.
    assert planner.timeout_s == pytest.approx(10 * 1000 * PAGE_BITS / 1e6)


def test_the_service_keeps_what_it_sends_with_headroom_up_to_its_share_of_the_link() -> None:
    assert service_share_bps(1000 * MBIT, 0.0, 0.2) == 0.0
    assert service_share_bps(1000 * MBIT, 40 * MBIT, 0.2) == pytest.approx(50 * MBIT)
    assert service_share_bps(1000 * MBIT, 400 * MBIT, 0.2) == pytest.approx(200 * MBIT)


def test_a_downtime_target_needs_what_was_measured() -> None:
    planner = Planner(100, targeted(100))
    plan = as_plan(planner.first())
    planner.record_batch(sent=plan.pages.size, skipped=0)
    with pytest.raises(ValueError, match="link_bps and elapsed_s"):
        planner.end_round(pages(1), 0.1)
    with pytest.raises(ValueError, match="link_bps"):
        planner.end_round(pages(1), 0.1, link_bps=0.0, elapsed_s=1.0)



def test_a_final_collect_slower_than_the_rounds_ones_is_predicted_as_it_was() -> None:
    planner = Planner(1000, PlannerConfig(target=DowntimeTarget(0.1, 0.03, None, 0.022)))
    plan = as_plan(planner.first())
    planner.record_batch(sent=plan.pages.size, skipped=0)
    planner.end_round(np.arange(10, dtype=np.int64), 0.1, link_bps=1e9, elapsed_s=0.1,
                      collect_s=0.001)
    # 30 ms fixed + 22 ms collect (the past final one, not this round's 1 ms) + 10 pages.
    assert planner.predict_downtime_s(10) == pytest.approx(0.052 + 10 * PAGE_BITS / 1e9)


# -- hot pages held back (hold_hot) ----------------------------------------------------


def test_pages_dirty_round_after_round_are_held_for_the_stop_and_copy() -> None:
    planner = Planner(16, PlannerConfig(hold_hot=2, final_bytes=3 * PAGE_SIZE))
    send_all(planner, as_plan(planner.first()))
    plan = as_plan(planner.end_round(pages(1, 2, 3), 1.0))  # dirty once: all sent again
    assert sorted(plan.pages) == [1, 2, 3]
    send_all(planner, plan)
    plan = as_plan(planner.end_round(pages(1, 2, 5), 1.0))  # 1, 2: twice in a row, hot
    assert sorted(plan.pages) == [5] and planner.rounds[-1].pages_held == 2
    send_all(planner, plan)
    # 2 cooled down: it goes now; 1 stays hot and stays held.
    plan = as_plan(planner.end_round(pages(1, 7, 8, 9, 10, 11, 12, 13, 14), 1.0))
    assert sorted(plan.pages) == [2, 7, 8, 9, 10, 11, 12, 13, 14]
    assert planner.rounds[-1].pages_held == 1
    send_all(planner, plan)
    final = as_stop(planner.end_round(pages(3), 1.0))  # few pages left: the held one too
    assert list(final.pages) == [1, 3]


def test_a_round_of_nothing_but_hot_pages_sends_them() -> None:
    planner = Planner(8, PlannerConfig(hold_hot=2, final_bytes=0))
    send_all(planner, as_plan(planner.first()))
    send_all(planner, as_plan(planner.end_round(pages(4, 5), 1.0)))
    plan = as_plan(planner.end_round(pages(4, 5), 1.0))
    assert sorted(plan.pages) == [4, 5] and planner.rounds[-1].pages_held == 0


def test_the_prediction_counts_the_pages_held_back() -> None:
    config = dataclasses.replace(targeted(downtime_ms=10, cost_ms=1), hold_hot=2)
    planner = Planner(4096, config)
    send_all(planner, as_plan(planner.first()))
    hot = np.arange(100, dtype=np.int64)
    send_all(planner, as_plan(planner.end_round(hot, 1.0, link_bps=100 * MBIT, elapsed_s=1)))
    plan = as_plan(planner.end_round(np.concatenate((hot, pages(500))), 1.0,
                                     link_bps=100 * MBIT, elapsed_s=2))
    assert list(plan.pages) == [500]
    assert planner.predicted_downtime_s == pytest.approx(planner.predict_downtime_s(101))


@pytest.mark.parametrize("make", [lambda: PlannerConfig(hold_hot=1),
                                  lambda: PlannerConfig(hold_hot=-2)])
def test_one_dirty_round_does_not_make_a_page_hot(make: object) -> None:
    with pytest.raises(ValueError, match="hold_hot"):
        make()  # type: ignore[operator]


def skewed(npages: int, hot: int, weight: int, writes_per_s: float) -> Model:
    """Writes over all of RAM, but ``weight`` times as often to ``hot`` pages of it."""
    hot_pages = np.linspace(0, npages - 1, hot).astype(np.int64)
    return Model(writes_per_s, np.concatenate([np.arange(npages, dtype=np.int64),
                                               *([hot_pages] * weight)]))


@settings(max_examples=40, deadline=None)
@given(hold=st.integers(2, 4), seed=st.integers(0, 2**16), writes=st.floats(1e3, 5e4))
def test_holding_back_never_loses_a_write(hold: int, seed: int, writes: float) -> None:
    """``simulate`` checks that the destination ends with the source's every page."""
    config = dataclasses.replace(targeted(downtime_ms=50, timeout_s=30.0), hold_hot=hold,
                                 seed=seed)
    run = simulate(2048, skewed(2048, 64, 40, writes), config, seed=seed,
                   link_bps=200 * MBIT)
    for step in run.steps:
        assert np.unique(step.pages).size == step.pages.size  # and none twice


def test_holding_back_hot_pages_sends_less_for_the_same_downtime() -> None:
    """A guest that rewrites a hot set all the time and the rest now and then: without
    the hold, every round resends the hot set; with it, only the stop-and-copy does."""
    sent = {}
    for hold in (0, 2):
        config = dataclasses.replace(targeted(downtime_ms=60, timeout_s=20.0),
                                     hold_hot=hold)
        run = simulate(16384, skewed(16384, 256, 400, 10_000.0), config, seed=3,
                       link_bps=300 * MBIT)
        assert run.final.reason is StopReason.WITHIN_TARGET, run.planner.rounds
        sent[hold] = run.planner.bytes_sent
    assert sent[2] < sent[0]
