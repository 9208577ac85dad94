"""Trace files: what is written is read back, and what is not a trace is refused."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from ipaddress import IPv4Address
from pathlib import Path

import numpy as np
import pytest

from livemig.analysis.record import check_recordable, zero_pages
from livemig.analysis.timeline import Timeline
from livemig.analysis.trace import FORMAT, VERSION, Trace, TraceFormatError, TraceMeta
from livemig.errors import VMError
from livemig.vm.memory import GuestMemory
from livemig.vm.spec import VMRecord, VMSpec, Workload

PAGE = 4096


def meta(npages: int = 100, interval_s: float = 1.0) -> TraceMeta:
    return TraceMeta(vm="v1", workload="idle", tracker="uffd", npages=npages,
                     interval_s=interval_s, started_at=1.7e9, options={"mm_mib": "64"})


def small_trace() -> Trace:
    return Trace.from_intervals(
        meta(), [0.0, 1.0, 2.1, 3.0],
        [np.array([5, 3, 3, 9]), np.array([], dtype=np.int64), np.array([99, 0])],
        zero_pages=np.array([50, 10, 10]), collect_ms=[0.1, 0.2, 0.3],
        zeroed=[np.array([False, True, True, False]), np.array([], bool),
                np.array([True, False])])


def test_intervals_are_stored_sorted_deduplicated_and_concatenated() -> None:
    trace = small_trace()
    assert trace.n_intervals == 3
    assert trace.offsets.tolist() == [0, 3, 3, 5]
    assert trace.pages.dtype == np.int32
    assert [s.tolist() for s in trace] == [[3, 5, 9], [], [0, 99]]
    assert trace.counts.tolist() == [3, 0, 2]
    assert trace.zero_pages.tolist() == [10, 50]
    # The flags follow their pages through the sort: 3 and 99 were left zero.
    assert trace.zeroed.tolist() == [True, False, False, False, True]
    assert trace.duration_s == pytest.approx(3.0)
    assert trace.interval_ids().tolist() == [0, 0, 0, 2, 2]
    assert not trace.pages.flags.writeable


def test_a_trace_survives_a_round_trip_through_its_file(tmp_path: Path) -> None:
    trace = small_trace()
    path = tmp_path / "t.npz"
    trace.save(path)
    back = Trace.load(path)
    assert back.meta == trace.meta
    for name in ("times", "offsets", "pages", "zero_pages", "collect_ms", "zeroed"):
        assert np.array_equal(getattr(back, name), getattr(trace, name)), name
        assert getattr(back, name).dtype == getattr(trace, name).dtype, name
    assert back.meta.ram_bytes == 100 * PAGE


def test_the_file_is_an_npz_with_json_metadata() -> None:
    # What docs/trace-format.md promises to readers without livemig.
    with np.load(io.BytesIO(small_trace().to_bytes()), allow_pickle=False) as npz:
        raw = json.loads(str(npz["meta"]))
        assert raw["format"] == FORMAT and raw["version"] == VERSION
        assert raw["page_size"] == PAGE and raw["npages"] == 100
        assert npz["pages"].dtype == np.int32 and npz["offsets"].dtype == np.int64


def test_a_busy_trace_stays_compact() -> None:
    rng = np.random.default_rng(0)
    # 200 intervals of 2,000 random pages out of 64 Ki: 1.6 MB of int32 before compression.
    sets = [rng.choice(65536, 2000, replace=False) for _ in range(200)]
    trace = Trace.from_intervals(meta(65536, 0.05), np.arange(201) * 0.05, sets)
    assert len(trace.to_bytes()) < 1.6e6


def _rewrite(trace: Trace, **changes: object) -> bytes:
    buffer = io.BytesIO()
    arrays = {"meta": np.array(json.dumps(dataclasses.asdict(trace.meta))),
              "times": trace.times, "offsets": trace.offsets, "pages": trace.pages,
              "zero_pages": trace.zero_pages}
    arrays.update(changes)  # type: ignore[arg-type]
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        b"not a zip",
        _rewrite(small_trace(), meta=np.array('{"format": "something-else", "version": 1}')),
        _rewrite(small_trace(), meta=np.array(json.dumps(
            {**dataclasses.asdict(meta()), "version": VERSION + 1}))),
        _rewrite(small_trace(), offsets=np.array([0, 3, 2, 5])),
        _rewrite(small_trace(), pages=np.array([3, 5, 9, 0, 100], dtype=np.int32)),
        _rewrite(small_trace(), times=np.array([0.0, 1.0, 1.0, 3.0])),
    ],
    ids=["not-npz", "other-format", "newer-version", "offsets-decrease", "page-out-of-range",
         "times-stall"],
)
def test_what_is_not_a_usable_trace_is_refused(data: bytes) -> None:
    with pytest.raises(TraceFormatError):
        Trace.from_bytes(data, "x.npz")


def test_a_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError) as err:
        Trace.load(tmp_path / "nope.npz")
    assert err.value.source == str(tmp_path / "nope.npz")


def test_pages_outside_ram_are_refused_when_building() -> None:
    with pytest.raises(ValueError):
        Trace.from_intervals(meta(10), [0.0, 1.0], [np.array([10])])


# -- the timeline ----------------------------------------------------------------------


def test_windows_on_interval_boundaries_hold_exactly_those_intervals() -> None:
    line = Timeline(small_trace())
    assert line.distinct(0.0, 1.0) == 3
    assert line.distinct(1.0, 2.1) == 0
    assert line.distinct(0.0, 3.0) == 5
    pages, times, _ = line.first_writes(0.0, 3.0)
    assert sorted(pages.tolist()) == [0, 3, 5, 9, 99]
    assert np.all(np.diff(times) >= 0)
    assert np.all(times[np.isin(pages, [3, 5, 9])] < 1.0)


def test_the_timeline_repeats_the_trace_after_its_end() -> None:
    trace = Trace.from_intervals(meta(10), [0.0, 1.0, 2.0], [np.array([1, 2]), np.array([2, 3])])
    line = Timeline(trace)
    assert line.distinct(2.0, 3.0) == 2  # the first interval again
    assert line.distinct(1.0, 3.0) == 3  # {2, 3} then {1, 2}: page 2 once
    assert line.distinct(0.0, 10.0) == 3
    pages, times, _ = line.first_writes(5.0, 6.0)  # the second interval, third period
    assert sorted(pages.tolist()) == [2, 3]
    assert np.all((times >= 5.0) & (times < 6.0))


# -- zero pages of a real RAM file -------------------------------------------------------


def test_zero_pages_are_holes_and_pages_of_zeros(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    with path.open("wb") as f:
        f.truncate(64 * PAGE)
        f.seek(3 * PAGE)
        f.write(b"x" * PAGE)  # data
        f.write(bytes(PAGE))  # data, but zero
        f.seek(40 * PAGE + 100)
        f.write(b"y")  # one byte of data in page 40
    with GuestMemory(path, 64 * PAGE, writable=False) as memory:
        zeros = zero_pages(memory)
    assert 3 not in zeros and 40 not in zeros
    assert zeros.size == 62


# -- which VMs may be recorded -------------------------------------------------------------


def test_a_vm_being_migrated_is_not_recorded() -> None:
    spec = VMSpec(name="v1", ip=IPv4Address("10.77.0.100"), mem_mib=64,
                  workload=Workload.IDLE, image="default", kernel=Path("k"), initrd=Path("i"))
    running = VMRecord(spec=spec, host="hostA", pid=os.getpid())
    incoming = VMRecord(spec=spec, host="hostB", pid=os.getpid(), incoming=True)
    with pytest.raises(VMError):
        check_recordable(running, [running, incoming])  # its dirty log is the migration's
    with pytest.raises(VMError):
        check_recordable(incoming, [running, incoming])
    # A live process, but not the QEMU of this VM (its command line lacks the RAM file).
    with pytest.raises(VMError):
        check_recordable(running, [running])


def test_a_page_written_in_every_interval_is_found_by_any_window() -> None:
    # Page 7 is in all five intervals; page 3 only in the middle one.
    trace = Trace.from_intervals(meta(10, 0.05), np.arange(6) * 0.05,
                                 [np.array([7]), np.array([7]), np.array([3, 7]),
                                  np.array([7]), np.array([7])])
    line = Timeline(trace)
    # Interval 2 is interior for page 7: every 5 ms window within it finds it.
    for start in np.arange(0.10, 0.15, 0.005):
        pages = line.first_writes(start, start + 0.005).pages
        assert 7 in pages
    # Page 3 is written once: exactly one of the ten 5 ms windows of interval 2 holds it.
    hits = sum(3 in line.first_writes(a, a + 0.005)[0] for a in np.arange(0.10, 0.15, 0.005))
    assert hits == 1
    assert line.distinct(0.10, 0.15) == 2  # aligned windows: the recorded set, exactly
