"""Recording a dirty-page trace from a real guest, and reading it back."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from livemig.analysis import record, simulate, wws
from livemig.analysis.trace import Trace
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import PAGE_SIZE, Workload

pytestmark = pytest.mark.integration
StartVM = Callable[..., qemu.VM]
MM_MIB, MM_RATE = 32, 8  # mmuncher writes 8 MiB/s, cycling over a 32 MiB region


def test_a_trace_of_mmuncher_shows_its_known_rate(start_vm: StartVM, tmp_path: Path) -> None:
    vm = start_vm("tr", Workload.MMUNCHER, mem_mib=128,
                  options=(("mm_mib", str(MM_MIB)), ("mm_rate", str(MM_RATE))))
    # The recorder runs here, outside the host's network namespace: /proc/PID/pagemap
    # and /dev/shm do not depend on it.
    host_ns = os.stat(f"/run/netns/{testbed.host_node(vm.record.host).netns}")
    here = os.stat("/proc/self/ns/net")
    assert (here.st_dev, here.st_ino) != (host_ns.st_dev, host_ns.st_ino)

    record.check_recordable(qemu.find("tr"), qemu.records())
    progress: list[record.RecordProgress] = []
    trace = record.record(qemu.find("tr"), interval_s=0.05, duration_s=4.0,
                          on_progress=progress.append)
    path = tmp_path / "mm.npz"
    trace.save(path)
    trace = Trace.load(path)

    meta = trace.meta
    assert (meta.vm, meta.workload, meta.tracker) == ("tr", "mmuncher", "uffd")
    assert meta.npages == 128 * 256 and meta.options == {"mm_mib": "32", "mm_rate": "8"}
    assert trace.n_intervals == 80 == len(progress)
    assert trace.duration_s == pytest.approx(4.0, abs=0.1)
    assert np.all(np.abs(trace.durations_s - 0.05) < 0.05)  # a shared machine, loose
    # 8 MiB/s is 2,048 pages/s; the kernel and idle tasks add a few hundred more.
    writes_per_s = trace.counts.sum() / trace.duration_s
    assert 0.8 * MM_RATE * 256 < writes_per_s < 1.6 * MM_RATE * 256
    # In 4 s it has covered all of its 32 MiB region, and little else.
    distinct = np.unique(trace.pages).size
    assert MM_MIB * 256 * 0.9 < distinct < MM_MIB * 256 + 4096
    # A fresh guest never wrote a good part of its RAM (a quarter of 128 MiB, here).
    assert trace.zero_pages.size > 0.1 * meta.npages
    assert not np.isin(np.unique(trace.pages), trace.zero_pages).all()

    # Every interval sees a slice of the region: the WWS of one interval is ~100 pages.
    sizes = wws.wws_sizes(trace, [1, 8])
    assert 0.6 * 2048 * 0.05 < np.nanmedian(sizes[0]) < 3 * 2048 * 0.05
    result = simulate.simulate(simulate.TraceDirtier(trace),
                               zero_pages=trace.zero_pages.astype(np.int64))
    assert result.bytes_sent >= (meta.npages - trace.zero_pages.size) * PAGE_SIZE
