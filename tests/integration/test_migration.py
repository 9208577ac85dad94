"""Live migration end to end on real QEMU guests, between real daemons, over real sockets.

Each test boots a VM on hostA, keeps clients busy from the client namespace, and moves
the VM with the daemons, as 'livemig migrate' does. What must hold afterwards: both
images were equal at the switchover (checksums), the VM runs on the target and only
there, its console counter went on, its TCP connections survived, and mmuncher found no
lost or corrupted write.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest

from livemig import paths
from livemig.daemon import control
from livemig.experiments.probing import ProbeRun, wait_measuring
from livemig.migration.holds import HoldPoint, wait_until_held
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import Workload
from livemig.wire.messages import (
    Cancel,
    Cancelled,
    ControlReply,
    Migrate,
    MigrateOptions,
    MigrationReport,
    Mode,
    OnTimeout,
)

StartVM = Callable[..., qemu.VM]


def migrate(loop: asyncio.AbstractEventLoop, vm: str, source: str, target: str,
            **options: Any) -> MigrationReport:
    # The engine's defaults (no rate set, a 100 ms downtime target), except that a target
    # out of reach switches over: these tests check what a migration leaves behind, on a
    # machine whose load the downtime does not control; the benches measure the target.
    options.setdefault("on_timeout", OnTimeout.SWITCHOVER)
    request = Migrate(vm=vm, to=target, options=MigrateOptions(**options))
    return loop.run_until_complete(control.migrate(source, request))


def ticks(console: str) -> list[int]:
    return [int(line.split()[-1]) for line in console.splitlines()
            if line.startswith("lm: tick ") and line.split()[-1].isdigit()]


def first_ticks(loop: asyncio.AbstractEventLoop, vm: qemu.VM, within_s: float = 10.0) -> list[int]:
    """The moved guest's ticks (one a second), once there is one: a TCG guest busy
    with its workload on a loaded 2-core machine may print its first one late."""
    deadline = time.monotonic() + within_s
    while not (found := ticks(vm.console())) and time.monotonic() < deadline:
        loop.run_until_complete(asyncio.sleep(0.2))
    return found


def assert_runs_only_on(loop: asyncio.AbstractEventLoop, name: str, host: str) -> qemu.VM:
    """Checks that the VM runs on ``host`` and nowhere else; returns a handle to close."""
    copies = [r for r in qemu.records() if r.spec.name == name]
    assert [(r.host, r.incoming) for r in copies] == [(host, False)]
    vm = loop.run_until_complete(qemu.VM.attach(copies[0]))
    assert loop.run_until_complete(vm.status()) == "running"
    return vm


def assert_mmuncher_intact_on(loop: asyncio.AbstractEventLoop, name: str, host: str) -> None:
    """The VM runs only on ``host`` and mmuncher's full pass finds no bad page."""
    vm = assert_runs_only_on(loop, name, host)
    try:
        stats = loop.run_until_complete(vm.agent.verify())["stats"]["mmuncher"]
        assert stats["errors"] == 0, stats
    finally:
        loop.run_until_complete(vm.close())


def released(vm: qemu.VM) -> None:
    """The fixture's handle on the source copy: already stopped by the migration."""
    assert not vm.record.process_alive()
    assert not vm.record.ram_file.exists()


@pytest.mark.parametrize("workload", [Workload.IDLE, Workload.WEB, Workload.GAME,
                                      Workload.MMUNCHER])
def test_live_migration_moves_the_vm_and_its_service(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop, workload: Workload
) -> None:
    options = (("mm_mib", "32"), ("mm_rate", "16")) if workload is Workload.MMUNCHER else ()
    vm = start_vm(f"m-{workload}", workload, options=options)
    ip = str(vm.record.spec.ip)
    loop.run_until_complete(vm.close())
    ticks_before = ticks(vm.record.console_log.read_text())
    with ProbeRun(testbed.CLIENT, "tcp", ip) as tcp, \
            ProbeRun(testbed.CLIENT, "echo", ip) as echo:
        # Measuring before the migration starts: it takes about two seconds now, less
        # than a probe's start-up on a loaded machine.
        loop.run_until_complete(wait_measuring([tcp, echo]))
        loop.run_until_complete(asyncio.sleep(1.0))
        report = migrate(loop, vm.name, "hostA", "hostB")
        loop.run_until_complete(asyncio.sleep(1.0))
        tcp_result = tcp.stop()["summary"]
        echo_result = echo.stop()["summary"]

    assert report.verified is True, report
    assert report.source_checksum == report.destination_checksum
    assert report.rounds and report.rounds[0].pages_planned == vm.record.spec.npages
    assert 0 < report.downtime_ms < 5000
    released(vm)
    moved = assert_runs_only_on(loop, vm.name, "hostB")
    try:
        after = first_ticks(loop, moved)
        # The guest went on where it was: the destination's first tick follows the source's
        # last ones, with no restart at 0 and no gap or repeat from there on.
        assert after and after[0] > (ticks_before[-1] if ticks_before else -1)
        assert after == list(range(after[0], after[0] + len(after)))
        # Generous: TCG guests on a busy 2-core machine answer slowly, never not at all.
        status = loop.run_until_complete(moved.agent.status(timeout=20.0))
        assert status["ready"] and status["workload"] == str(workload)
        if workload is Workload.MMUNCHER:
            stats = loop.run_until_complete(moved.agent.verify())["stats"]["mmuncher"]
            assert stats["errors"] == 0 and stats["last_full_verify_errors"] == 0, stats
    finally:
        loop.run_until_complete(moved.close())
    assert tcp_result["survived"], tcp_result
    assert echo_result["replies"] > 500  # the probe reached the VM before and after
    assert echo_result["silent_at_end_ms"] < 500  # and it answers from hostB now


def test_an_http_download_survives_the_move(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop
) -> None:
    vm = start_vm("dl", Workload.WEB, options=(("web_kb", "8192"),))
    loop.run_until_complete(vm.close())
    url = f"http://{vm.record.spec.ip}/file.bin"
    with ProbeRun(testbed.CLIENT, "download", url, "--rate-kbps", "1500") as download:
        loop.run_until_complete(wait_measuring([download]))
        loop.run_until_complete(asyncio.sleep(1.0))
        report = migrate(loop, vm.name, "hostA", "hostB")
        result = download.wait(timeout=60)["summary"]
    assert report.verified is True
    assert result["complete"], result
    assert result["received_bytes"] == 8192 * 1024


def test_there_and_back_then_on_to_a_third_host(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop
) -> None:
    # Back to a host it left (whose stale copy must be gone), then to a third. More hops
    # add nothing that tests/unit/test_roles.py does not check in milliseconds.
    vm = start_vm("pp", Workload.MMUNCHER, options=(("mm_mib", "16"), ("mm_rate", "8")))
    loop.run_until_complete(vm.close())
    path = ["hostA", "hostB", "hostA", "hostC"]
    for source, target in itertools.pairwise(path):
        # The last hop holds hot pages back: whatever it held, the stop-and-copy sent.
        hold = 2 if target == "hostC" else 0
        report = migrate(loop, vm.name, source, target, hold_hot=hold)
        assert report.verified is True, (source, target, report)
        held = any(r.pages_held for r in report.rounds)
        assert report.aids == (["hold-hot"] if held else []), report
    assert_mmuncher_intact_on(loop, vm.name, "hostC")


def test_stop_and_copy_mode(start_vm: StartVM, loop: asyncio.AbstractEventLoop) -> None:
    vm = start_vm("sc", Workload.IDLE)
    loop.run_until_complete(vm.close())
    report = migrate(loop, vm.name, "hostA", "hostB", mode=Mode.STOP_AND_COPY)
    assert report.verified is True
    assert report.rounds == []  # no pre-copy: every page moved while the VM was stopped
    assert report.stop_reason == "stop-and-copy-mode"
    assert report.final_pages == vm.record.spec.npages
    loop.run_until_complete(assert_runs_only_on(loop, vm.name, "hostB").close())


def test_the_shadow_tracker_migrates_exactly_too(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop
) -> None:
    vm = start_vm("sh", Workload.MMUNCHER, options=(("mm_mib", "16"), ("mm_rate", "8")))
    loop.run_until_complete(vm.close())
    report = migrate(loop, vm.name, "hostA", "hostB", tracker="shadow")
    assert report.tracker == "shadow"
    assert report.verified is True
    assert_mmuncher_intact_on(loop, vm.name, "hostB")


def test_a_wrong_target_is_refused_and_the_vm_runs_on(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop
) -> None:
    vm = start_vm("big", Workload.IDLE)
    loop.run_until_complete(vm.close())
    with pytest.raises(control.MigrationFailed) as caught:
        migrate(loop, vm.name, "hostA", "hostA")
    assert "already runs on hostA" in str(caught.value)
    with pytest.raises(control.MigrationFailed) as caught:
        migrate(loop, vm.name, "hostA", "hostZ")
    loop.run_until_complete(assert_runs_only_on(loop, vm.name, "hostA").close())


def test_cancel_in_precopy_leaves_the_vm_on_the_source_and_a_retry_succeeds(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop
) -> None:
    vm = start_vm("cx", Workload.MMUNCHER, options=(("mm_mib", "16"), ("mm_rate", "8")))
    loop.run_until_complete(vm.close())

    async def migrate_then_cancel() -> tuple[ControlReply, control.MigrationFailed]:
        # Held inside round 1, which takes about a second at the link's rate: the cancel
        # must find it there, not done.
        migration = asyncio.ensure_future(control.migrate("hostA", Migrate(
            vm="cx", to="hostB", options=MigrateOptions(hold_at=HoldPoint.ROUND_1))))
        await wait_until_held("cx", HoldPoint.ROUND_1, timeout=60.0)
        replies = [r async for r in control.call("hostA", Cancel(vm="cx"))]
        with pytest.raises(control.MigrationFailed) as caught:
            await migration
        return replies[-1], caught.value

    cancelled, failure = loop.run_until_complete(migrate_then_cancel())
    assert cancelled == Cancelled(vm="cx")
    assert failure.vm_runs_on == "hostA"
    assert "cancelled" in str(failure)
    # The destination tears down on the source's Abort: QEMU, record and RAM file.
    deadline = loop.time() + 15
    while any(r.host == "hostB" for r in qemu.records()) and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(0.1))
    assert not any(r.host == "hostB" for r in qemu.records())
    assert not paths.ram_file("hostB", "cx").exists()
    assert_mmuncher_intact_on(loop, "cx", "hostA")
    report = migrate(loop, "cx", "hostA", "hostB")
    assert report.verified is True
