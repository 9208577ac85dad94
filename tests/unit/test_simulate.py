"""The simulator: the real planner on a virtual clock, with writes from models and traces."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from livemig.analysis import simulate as sim
from livemig.analysis.timeline import Writes
from livemig.analysis.trace import Trace, TraceMeta
from livemig.migration import source
from livemig.migration.planner import (
    MBIT,
    PAGE_SIZE,
    Mode,
    PlannerConfig,
    RateLimits,
    RoundPlan,
    RoundStats,
    StopReason,
)
from livemig.wire import channel

PAGE_BITS = PAGE_SIZE * 8
MIB_PAGES = 256


def model(npages: int, pages_per_s: float, **kw: object) -> sim.ModelDirtier:
    return sim.ModelDirtier(sim.Model(npages, pages_per_s, **kw))  # type: ignore[arg-type]


class Replay:
    """Writes given as explicit (page, time) events: a dirtier anyone can check by hand."""

    def __init__(self, npages: int, pages: list[int], times: list[float]) -> None:
        self.npages = npages
        self.pages = np.array(pages, dtype=np.int64)
        self.times = np.array(times)

    def first_writes(self, a: float, b: float) -> Writes:
        inside = (self.times >= a) & (self.times < b)
        first: dict[int, float] = {}
        for p, t in zip(self.pages[inside].tolist(), self.times[inside].tolist(), strict=True):
            first[p] = min(t, first.get(p, t))
        return Writes(np.array(list(first), dtype=np.int64), np.array(list(first.values())),
                      np.zeros(len(first), np.bool_))


def test_the_batching_and_pacing_are_the_source_roles() -> None:
    assert (sim.MIN_BATCH_PAGES, sim.MAX_BATCH_PAGES, sim.BATCH_SECONDS) == (
        source.MIN_BATCH_PAGES, source.MAX_BATCH_PAGES, source.BATCH_SECONDS)
    assert sim.PACER_BURST_S == channel.BURST_SECONDS
    assert sim.batch_pages(100 * MBIT) == 64
    assert sim.batch_pages(500 * MBIT) == 305


def test_a_guest_that_writes_nothing_takes_one_round_then_the_fixed_stop() -> None:
    npages = 64 * MIB_PAGES
    costs = sim.DEFAULT_COSTS
    result = sim.simulate(model(npages, 0), PlannerConfig(), costs)
    (only,) = result.rounds
    assert (only.pages_sent, only.pages_skipped, only.pages_dirtied) == (npages, 0, 0)
    round_s = npages * PAGE_BITS / (100 * MBIT) + costs.round_s
    assert only.duration_s == pytest.approx(round_s)
    assert result.stop_reason == StopReason.FEW_PAGES_LEFT
    assert result.final_pages == 0
    assert result.downtime_s == pytest.approx(costs.stop_s)
    assert result.total_time_s == pytest.approx(
        costs.setup_s + round_s + costs.pause_s + costs.stop_s + costs.release_s)
    assert result.bytes_sent == npages * PAGE_SIZE


def test_zero_pages_cost_no_time_and_no_bytes() -> None:
    npages = 4096
    zeros = np.arange(0, npages, 2, dtype=np.int64)
    result = sim.simulate(model(npages, 0), costs=sim.Costs.none(), zero_pages=zeros)
    (only,) = result.rounds
    assert (only.pages_sent, only.pages_zero) == (2048, 2048)
    assert only.duration_s == pytest.approx(2048 * PAGE_BITS / (100 * MBIT))
    assert result.bytes_sent == 2048 * PAGE_SIZE


def test_stop_and_copy_sends_exactly_ram_minus_zero_pages() -> None:
    npages = 32 * MIB_PAGES
    zeros = np.arange(1000, 3000, dtype=np.int64)
    config = PlannerConfig(mode=Mode.STOP_AND_COPY, limits=RateLimits(100 * MBIT, 800 * MBIT))
    result = sim.simulate(model(npages, 0), config, zero_pages=zeros)
    assert result.rounds == []
    assert result.stop_reason == StopReason.STOP_AND_COPY_MODE
    assert result.bytes_sent == (npages - 2000) * PAGE_SIZE
    assert result.final_pages == npages and result.final_data_pages == npages - 2000
    assert result.downtime_s == pytest.approx(
        (npages - 2000) * PAGE_BITS / (800 * MBIT) - sim.PACER_BURST_S + sim.DEFAULT_COSTS.stop_s)


def test_a_guest_dirtying_faster_than_the_maximum_rate_stops_early() -> None:
    # 256 MiB region written at 1 GiB/s in a 512 MiB VM: MMuncher, as in §6.4.
    npages = 512 * MIB_PAGES
    result = sim.simulate(model(npages, 1024 * MIB_PAGES, hot_pages=256 * MIB_PAGES, skew=1.0))
    assert result.stop_reason == StopReason.RATE_ABOVE_MAX
    assert len(result.rounds) <= 3
    assert result.final_pages > 128 * MIB_PAGES
    assert result.downtime_s > 2.0  # seconds of downtime, as in the paper


def test_a_quiet_hot_set_converges_with_a_short_stop() -> None:
    npages = 256 * MIB_PAGES
    result = sim.simulate(model(npages, 200, hot_pages=64, skew=0.95))
    assert result.stop_reason == StopReason.FEW_PAGES_LEFT
    assert result.final_pages < 64
    assert result.downtime_s < sim.DEFAULT_COSTS.stop_s + 0.005


def test_pages_written_before_their_turn_are_skipped_exactly_as_the_source_does() -> None:
    # 1024 pages at 64 per batch (100 Mbit/s): 16 batches, ~5.2 ms of data per batch.
    npages = 1024
    c = PAGE_BITS / (100 * MBIT)
    planner_order = sim.Planner(npages, PlannerConfig()).first()
    assert isinstance(planner_order, RoundPlan)
    order = planner_order.pages
    # Write the 3rd page of batch 0 (peeked at t=0: too late to skip), the 1st page of
    # batch 5 just before its peek and the 1st page of batch 6 just after its peek.
    early, late = order[64 * 5], order[64 * 6]
    writes = Replay(npages, [int(order[2]), int(early), int(late)],
                    [0.001, 64 * 5 * c - 1e-6, 64 * 6 * c + 1e-6])
    result = sim.simulate(writes, PlannerConfig(), sim.Costs.none())
    first = result.rounds[0]
    assert (first.pages_sent, first.pages_skipped, first.pages_dirtied) == (1023, 1, 3)
    assert first.duration_s == pytest.approx(1023 * c)


def test_skipping_matches_a_batch_by_batch_reference() -> None:
    rng = np.random.default_rng(11)
    npages = 20_000
    for trial in range(5):
        zeros = rng.choice(npages, 5000, replace=False).astype(np.int64)
        writes = model(npages, 20_000 + 10_000 * trial, hot_pages=3000, skew=0.7, seed=trial)
        is_zero = np.zeros(npages, np.bool_)
        is_zero[zeros] = True
        plan = sim.Planner(npages, PlannerConfig(seed=trial)).first(zeros)
        assert isinstance(plan, RoundPlan)
        first = np.full(npages, np.inf)
        longest = sim._longest_round(plan, is_zero, sim.Costs.none())
        written, when, _ = writes.first_writes(0.0, longest)
        first[written] = when
        got = sim._round(plan, first, is_zero, 0.0, sim.Costs.none())
        expected = _reference_round(plan.pages, first, is_zero, plan.rate_bps)
        assert got[:3] == expected[:3]
        assert got[3] == pytest.approx(expected[3])
        assert got[1] > 1000  # the guest did make pages skip


def _reference_round(pages: sim.Int64s, first: sim.Floats, is_zero: np.ndarray,
                     rate_bps: float) -> tuple[int, int, int, float]:
    """The source's loop, batch by batch, on the first-write times the simulator drew."""
    size = sim.batch_pages(rate_bps)
    now, sent, skipped, zero = 0.0, 0, 0, 0
    for lo in range(0, len(pages), size):
        batch = pages[lo:lo + size]
        again = first[batch] < now
        skipped += int(again.sum())
        todo = batch[~again]
        z = int(is_zero[todo].sum())
        zero += z
        sent += len(todo) - z
        now += (len(todo) - z) * PAGE_BITS / rate_bps
    return sent, skipped, zero, now


def test_a_trace_is_replayed_and_looped_when_the_migration_outlasts_it() -> None:
    # 1 s of trace writing pages 0..9, one per 100 ms; round 1 of 1024 pages at
    # 10 Mbit/s takes 3.4 s, so it sees the trace three times over.
    meta = TraceMeta(vm="v", workload="idle", tracker="uffd", npages=1024, interval_s=0.1,
                     started_at=0.0)
    trace = Trace.from_intervals(meta, np.arange(11) * 0.1, [np.array([k]) for k in range(10)])
    config = PlannerConfig(limits=RateLimits(10 * MBIT, 500 * MBIT))
    result = sim.simulate(sim.TraceDirtier(trace), config, sim.Costs.none())
    assert result.rounds[0].duration_s > 3.0
    assert result.rounds[0].pages_dirtied == 10
    # 10 pages are less than 256 KiB: they go in the stop-and-copy (and nothing else can,
    # as the trace knows no other page).
    assert result.stop_reason == StopReason.FEW_PAGES_LEFT
    assert len(result.rounds) == 1 and result.final_pages == 10
    # Deterministic: a trace gives the same migration every time.
    again = sim.simulate(sim.TraceDirtier(trace), config, sim.Costs.none())
    assert again.rounds == result.rounds


def test_pages_a_trace_shows_left_zero_go_as_indexes() -> None:
    # Every 100 ms the guest writes pages 0..199 and leaves them all zeros (a kernel
    # clearing pages it allocates); they come back in each round but cost no bytes.
    meta = TraceMeta(vm="v", workload="idle", tracker="uffd", npages=4096, interval_s=0.1,
                     started_at=0.0)
    hot = np.arange(200)
    sets = [hot] * 10
    for zeroed in (True, False):
        trace = Trace.from_intervals(meta, np.arange(11) * 0.1, sets,
                                     zeroed=[np.full(200, zeroed)] * 10)
        result = sim.simulate(sim.TraceDirtier(trace), PlannerConfig(), sim.Costs.none())
        second = result.rounds[1]
        taken = 200 - second.pages_skipped
        assert (second.pages_zero, second.pages_sent) == ((taken, 0) if zeroed else (0, taken))
        if zeroed:  # a round of nothing but indexes takes no time: nothing more is written
            assert result.final_data_pages == 0
        else:
            assert result.final_data_pages == result.final_pages == 200


def test_the_same_seed_gives_the_same_prediction() -> None:
    a = sim.simulate(model(8192, 3000, hot_pages=100, skew=0.5, seed=4), PlannerConfig(seed=2))
    b = sim.simulate(model(8192, 3000, hot_pages=100, skew=0.5, seed=4), PlannerConfig(seed=2))
    assert a.rounds == b.rounds and a.downtime_s == b.downtime_s


def test_uniform_writes_dirty_the_expected_number_of_pages() -> None:
    # 20,000 writes uniform over 50,000 pages: 50,000 x (1 - e^-0.4) = 16,484 distinct.
    pages, times, zeroed = model(50_000, 20_000).first_writes(3.0, 4.0)
    assert not zeroed.any()
    assert len(np.unique(pages)) == len(pages)
    assert len(pages) == pytest.approx(16_484, rel=0.03)
    assert times.min() >= 3.0 and times.max() < 4.0


def test_a_sweep_covers_every_sensible_pair() -> None:
    cells = list(sim.sweep(lambda: model(4096, 500), [50, 200], [100, 500]))
    assert [(c.min_rate_mbps, c.max_rate_mbps) for c in cells] == [
        (50, 100), (50, 500), (200, 500)]
    assert cells[2].result.limits == RateLimits(200 * MBIT, 500 * MBIT, 50 * MBIT)
    # A faster first round shortens the migration.
    assert cells[2].result.total_time_s < cells[1].result.total_time_s


def test_results_serialise_like_a_migration_report() -> None:
    result = sim.simulate(model(4096, 1000, hot_pages=50, skew=0.9))
    data = json.loads(json.dumps(result.to_json()))
    assert data["bytes_sent"] == result.bytes_sent
    assert data["downtime_ms"] == pytest.approx(result.downtime_s * 1000, abs=1e-3)
    assert len(data["rounds"]) == len(result.rounds)
    # A round reads back as the type the engine's report carries.
    assert msgspec.convert(data["rounds"][0], RoundStats) == result.rounds[0]


# -- the command line ----------------------------------------------------------------------


def test_simulate_and_wws_from_the_command_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from livemig.cli import main

    out = tmp_path / "sim.json"
    assert main(["simulate", "--model", "hotset", "--ram", "64MiB", "--dirty-rate", "2MiB/s",
                 "--hot-set", "1MiB", "--skew", "0.9", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ram_bytes"] == 64 << 20 and data["rounds"]
    sweep = tmp_path / "sweep.json"
    plot = tmp_path / "sweep.png"
    assert main(["simulate", "--model", "uniform", "--ram", "16MiB", "--dirty-rate", "1MiB/s",
                 "--sweep", "--sweep-min", "100,200", "--sweep-max", "200,500",
                 "--json", str(sweep), "--plot", str(plot)]) == 0
    assert len(json.loads(sweep.read_text())["cells"]) == 4  # 200 <= 200 counts
    assert plot.stat().st_size > 10_000

    meta = TraceMeta(vm="v", workload="web", tracker="uffd", npages=4096, interval_s=0.05,
                     started_at=0.0)
    rng = np.random.default_rng(0)
    trace = Trace.from_intervals(meta, np.arange(201) * 0.05,
                                 [rng.integers(0, 300, 50) for _ in range(200)])
    path = tmp_path / "t.npz"
    trace.save(path)
    figure = tmp_path / "wws.png"
    summary = tmp_path / "wws.json"
    assert main(["wws", str(path), "--plot", str(figure), "--json", str(summary)]) == 0
    assert figure.stat().st_size > 10_000
    assert json.loads(summary.read_text())["distinct_pages"] == 300
    assert main(["simulate", "--trace", str(path)]) == 0
    assert "simulated precopy of the trace" in capsys.readouterr().out
    assert main(["trace", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["intervals"], info["npages"]) == (200, 4096)
    assert info["page_writes"] == int(trace.counts.sum()) > 9000  # duplicates drawn go


@pytest.mark.parametrize(("text", "expected"), [
    ("1GiB", 2**30), ("16MiB", 16 << 20), ("512k", 512_000), ("4096", 4096), ("1.5GiB", 3 << 29)])
def test_sizes(text: str, expected: int) -> None:
    from livemig.analysis.cli_commands import parse_size

    assert parse_size(text) == expected


def test_durations_and_rates() -> None:
    from livemig.analysis.cli_commands import parse_byte_rate, parse_duration

    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("60s") == 60 and parse_duration("2m") == 120
    assert parse_byte_rate("50MiB/s") == 50 * 2**20
