"""Record a dirty-page trace from a running VM, with the tracker the migration uses.

The recorder reads ``/proc/PID/pagemap`` (kernel dirty log) or the guest's RAM file
(shadow compare). Both are in the PID and mount namespaces this machine shares with
every test bed host, and neither depends on the network namespace, so the recorder runs
in the caller's process wherever that is; the integration test records from the test's
own namespace a VM that runs in a host's.

One tracker per VM at a time: the kernel log's ``collect()`` re-arms the pages it
reports, so two readers would each see only part of the writes. A VM that is being
migrated (it has a second, incoming copy) is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from livemig.analysis.trace import Trace, TraceMeta
from livemig.errors import LivemigError, VMError
from livemig.units import PAGE_SIZE
from livemig.vm import dirtylog
from livemig.vm.memory import GuestMemory
from livemig.vm.spec import VMRecord

ZERO_SCAN_PAGES = 4096  # 16 MiB at a time: bounded temporaries while finding zero pages


@dataclass(frozen=True)
class RecordProgress:
    interval: int  # intervals done
    elapsed_s: float
    duration_s: float
    pages: int  # dirtied in the last interval
    distinct: int  # distinct pages dirtied since the start
    npages: int


ProgressCallback = Callable[[RecordProgress], None]


def zero_pages(memory: GuestMemory) -> npt.NDArray[np.int64]:
    """Pages that read as zero: the holes of the RAM file, and data pages of zeros.

    Holes are found with SEEK_DATA without reading them (a read would allocate them);
    only data ranges are read."""
    is_zero = np.ones(memory.npages, dtype=np.bool_)
    for start, end in memory.data_ranges():
        for chunk in range(start, end, ZERO_SCAN_PAGES):
            stop = min(end, chunk + ZERO_SCAN_PAGES)
            rows = memory.pages[chunk:stop].view(np.uint64)
            is_zero[chunk:stop] = ~rows.any(axis=1)
    return np.flatnonzero(is_zero).astype(np.int64)


def check_recordable(record: VMRecord, copies: list[VMRecord]) -> None:
    """Raise unless ``record`` is a running VM that no migration is moving right now."""
    if record.incoming:
        raise VMError(record.spec.name, f"{record.spec.name} on {record.host} is an incoming "
                      "copy of a migration; record the running VM")
    if any(c.spec.name == record.spec.name and c.incoming for c in copies):
        raise VMError(record.spec.name, f"{record.spec.name} is being migrated; its dirty log "
                      "belongs to the migration until it ends")
    if not record.process_alive():
        raise VMError(record.spec.name, f"QEMU of {record.spec.name} (pid {record.pid}) "
                      "is not running")


def record(
    vm: VMRecord,
    *,
    interval_s: float = 0.05,
    duration_s: float = 60.0,
    tracker: str = dirtylog.TrackerKind.AUTO,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Trace:
    """Collect the VM's dirty pages every ``interval_s`` for ``duration_s`` seconds.

    The intervals follow an absolute schedule, so that a slow collect does not make the
    trace drift; the real boundaries are kept in ``Trace.times``. KeyboardInterrupt (or
    ``should_stop``) ends the recording early with the intervals done so far."""
    if not (interval_s > 0 and duration_s >= interval_s):
        raise LivemigError(f"need 0 < interval ({interval_s} s) <= duration ({duration_s} s)")
    spec = vm.spec
    memory = GuestMemory(vm.ram_file, spec.ram_bytes, writable=False)
    try:
        dirty = dirtylog.open_tracker(vm.pid, memory, tracker)
        try:
            return _record(vm, memory, dirty, interval_s, duration_s, on_progress, should_stop)
        finally:
            dirty.close()
    finally:
        memory.close()


def _record(
    vm: VMRecord,
    memory: GuestMemory,
    dirty: dirtylog.DirtyTracker,
    interval_s: float,
    duration_s: float,
    on_progress: ProgressCallback | None,
    should_stop: Callable[[], bool],
) -> Trace:
    shadow = dirty.name == dirtylog.TrackerKind.SHADOW
    dirty.start()
    started_at = time.time()
    t0 = time.monotonic()
    # The shadow tracker compares with what was last "sent": give it RAM as it is now, so
    # that each collect reports what changed in its interval. The kernel log needs
    # nothing: start() armed it. Zero pages are found after arming, so a page written
    # meanwhile is in the first interval and not lost.
    if shadow:
        _remember(dirty, memory, dirty.collect())
    zeros = zero_pages(memory)
    times = [0.0]
    intervals: list[npt.NDArray[np.int64]] = []
    zeroed: list[npt.NDArray[np.bool_]] = []
    collect_ms: list[float] = []
    seen = np.zeros(memory.npages, dtype=np.bool_)
    n = max(1, round(duration_s / interval_s))
    try:
        for k in range(1, n + 1):
            if should_stop():
                break
            delay = t0 + k * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            before = time.monotonic()
            pages = dirty.collect()
            after = time.monotonic()
            if shadow:
                _remember(dirty, memory, pages)
            # The interval ends when the collect re-armed the pages, about its midpoint.
            times.append((before + after) / 2 - t0)
            intervals.append(pages)
            zeroed.append(_all_zero(memory, pages))
            collect_ms.append((after - before) * 1000)
            seen[pages] = True
            if on_progress is not None:
                on_progress(RecordProgress(k, after - t0, duration_s, len(pages),
                                           int(np.count_nonzero(seen)), memory.npages))
    except KeyboardInterrupt:
        pass  # keep what was recorded; the caller saves it
    spec = vm.spec
    meta = TraceMeta(
        vm=spec.name,
        workload=str(spec.workload),
        tracker=dirty.name,
        npages=memory.npages,
        interval_s=interval_s,
        started_at=started_at,
        page_size=PAGE_SIZE,
        options=dict(spec.options),
    )
    return Trace.from_intervals(meta, times, intervals, zeros, collect_ms, zeroed)


def _all_zero(memory: GuestMemory, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which of ``pages`` (just written, so not holes) read as zero: the source sends
    those as indexes only, so the simulator must know."""
    flags = np.empty(len(pages), dtype=np.bool_)
    for i in range(0, len(pages), ZERO_SCAN_PAGES):
        rows = memory.pages[pages[i : i + ZERO_SCAN_PAGES]].view(np.uint64)
        flags[i : i + ZERO_SCAN_PAGES] = ~rows.any(axis=1)
    return flags


def _remember(
    dirty: dirtylog.DirtyTracker, memory: GuestMemory, pages: npt.NDArray[np.int64]
) -> None:
    if len(pages):
        dirty.sent(pages, memory.pages[pages])
