"""QEMU's own migration in each of its modes (``baselines.MODES``), on one real guest.

One VM, writing its memory all the while (mmuncher), goes back and forth between hostA
and hostB once per mode. For every pre-copy mode both QEMUs must be paused when
``before_cont`` runs (the destination never ran) and their RAM images byte-equal;
postcopy has no such moment, its destination runs before its RAM is complete. After every
mode the guest must run on the target only, its agent answer and mmuncher find no lost
write.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import numpy as np

from livemig.experiments import baselines
from livemig.vm import qemu
from livemig.vm.spec import PAGE_SIZE, Workload

StartVM = Callable[..., qemu.VM]


def differing_pages(source: qemu.VM, destination: qemu.VM) -> int:
    """Pages whose bytes differ between the two RAM files (pread: no holes allocated)."""
    size, chunk, count = source.record.spec.ram_bytes, 8 << 20, 0
    with open(source.record.ram_file, "rb", buffering=0) as a, \
            open(destination.record.ram_file, "rb", buffering=0) as b:
        for offset in range(0, size, chunk):
            x, y = (np.frombuffer(os.pread(f.fileno(), chunk, offset).ljust(chunk, b"\0"),
                                  dtype=np.uint64).reshape(-1, PAGE_SIZE // 8) for f in (a, b))
            count += int((x != y).any(axis=1).sum())
    return count


def test_every_qemu_mode_moves_a_writing_guest_whole(
        start_vm: StartVM, loop: asyncio.AbstractEventLoop) -> None:
    vm = start_vm("qmodes", Workload.MMUNCHER, options=(("mm_mib", "16"), ("mm_rate", "8")))
    loop.run_until_complete(vm.close())
    seen: list[tuple[str, str, int]] = []  # run states and differing pages at the compare

    async def compare(source: qemu.VM, destination: qemu.VM) -> None:
        seen.append((await source.status(), await destination.status(),
                     await asyncio.to_thread(differing_pages, source, destination)))

    host = "hostA"
    for name, how in baselines.MODES.items():
        target = "hostB" if host == "hostA" else "hostA"
        seen.clear()
        report = loop.run_until_complete(baselines.migrate(
            "qmodes", target, baselines.mode(name, timeout_s=60.0),
            before_cont=None if how.postcopy else compare))
        assert report["mode"] == name
        if not how.postcopy:
            assert seen == [("postmigrate", "paused", 0)], name
        copies = [r for r in qemu.records() if r.spec.name == "qmodes"]
        assert [(r.host, r.incoming) for r in copies] == [(target, False)], name
        moved = loop.run_until_complete(qemu.VM.attach(copies[0]))
        try:
            assert loop.run_until_complete(moved.status()) == "running", name
            stats = loop.run_until_complete(moved.agent.verify())["stats"]["mmuncher"]
            assert stats["errors"] == 0, (name, stats)
            # No mode's capability stays behind for the next engine to trip on.
            caps = {c["capability"]: c["state"] for c in loop.run_until_complete(
                moved.qmp_command("query-migrate-capabilities"))}
            assert not any(caps[c] for c in baselines.MODE_CAPABILITIES), (name, caps)
        finally:
            loop.run_until_complete(moved.close())
        host = target
