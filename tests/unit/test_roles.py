"""The source and destination roles, driven against each other without QEMU or sockets.

Each test joins a real ``SourceMigration`` and real ``DestinationSession``s with an
in-memory channel pair (``wire.memory``: the real codec, handshake and flow control) and
gives them fake VMs (``fakevm``: real RAM files and a real device-state tunnel, with a
few lines of "QEMU"). Every stage's happy path and every abort path is here; the
integration suite runs the same roles on real QEMU guests in real namespaces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakevm import DEVICE_STATE, FakeHost, FakeVM, Faults, make_spec, source_vm

from livemig.errors import MigrationCancelled, MigrationError, ReservationRefused
from livemig.migration import destination as dest_module
from livemig.migration.destination import STEPS, DestinationSession, Incoming
from livemig.migration.holds import HoldPoint, release, wait_until_held
from livemig.migration.planner import MBIT, DowntimeTarget, RateLimits
from livemig.migration.source import MigrationOptions, MigrationReport, SourceMigration
from livemig.migration.stages import Stage
from livemig.wire import frames
from livemig.wire.channel import Channel
from livemig.wire.memory import channel_pair, transport_of
from livemig.wire.messages import OnTimeout

KEY = b"role-tests-shared-key-0123456789"
# Fast enough that a test takes milliseconds; the shadow tracker needs no QEMU process.
OPTIONS = MigrationOptions(limits=RateLimits(min_bps=2000 * MBIT, max_bps=4000 * MBIT),
                           tracker="shadow", stall_timeout_s=2.0)


class Bed:
    """hostA's VM, hostB's fake VMs, and every destination session a connect started."""

    def __init__(self, directory: Path, faults: Faults | None = None) -> None:
        self.spec = make_spec(directory)
        self.vm = source_vm(directory, self.spec)
        self.target = FakeHost("hostB", directory, faults)
        self.incoming = Incoming("hostB", self.target)
        self.incoming.recovered.set()
        self.sessions: list[DestinationSession] = []
        self.serving: list[asyncio.Task[None]] = []
        self.channels: list[Channel] = []
        self.fail_connects = False

    async def connect(self) -> Channel:
        if self.fail_connects:
            raise frames.PeerUnreachable("memory:hostB", "connection refused")
        client, server = await channel_pair(key=KEY, client="hostA", server="hostB")
        session = DestinationSession("hostB", server, self.incoming)
        self.sessions.append(session)
        self.serving.append(asyncio.ensure_future(session.serve()))
        self.channels.append(client)
        return client

    def migration(self, **options: Any) -> SourceMigration:
        return SourceMigration(self.vm, source_host="hostA", target_host="hostB",
                               connect=self.connect,
                               options=MigrationOptions(**{**vars(OPTIONS), **options}))

    @property
    def destination(self) -> DestinationSession:
        return self.sessions[0]

    def incoming_vm(self) -> FakeVM:
        return self.target.vms[self.spec.name]

    async def settled(self) -> list[BaseException | None]:
        """Every destination session's end: None, or what it raised."""
        results = await asyncio.wait_for(
            asyncio.gather(*self.serving, return_exceptions=True), timeout=15)
        return [r if isinstance(r, BaseException) else None for r in results]


@pytest.fixture
def bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    monkeypatch.setenv("LIVEMIG_RUN", str(tmp_path / "run"))  # records, journal, holds
    bed = Bed(tmp_path)
    yield bed
    for vm in [bed.vm, *bed.target.vms.values()]:
        vm.release()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def assert_runs_on_source_only(bed: Bed) -> None:
    assert bed.vm.runstate == "running" and not bed.vm.stopped
    assert bed.target.vms == {}, "the destination kept a copy"


async def migrate_failing(bed: Bed, error: type[BaseException] = MigrationError,
                          **options: Any) -> MigrationError:
    with pytest.raises(error) as caught:
        await bed.migration(**options).run()
    assert isinstance(caught.value, MigrationError)
    return caught.value


async def guest_writes(vm: FakeVM, pages: range, stop: asyncio.Event) -> int:
    """The guest dirties ``pages`` over and over while it runs, as a busy VM does."""
    value = 1
    while not stop.is_set() and vm.runstate == "running":
        vm.write(pages, value)
        value = value % 250 + 1
        await asyncio.sleep(0.001)
    return value


# -- happy paths ---------------------------------------------------------------------------


def test_an_idle_vm_moves_verified_and_both_roles_walk_the_six_stages(bed: Bed) -> None:
    bed.vm.write(range(0, 64), 7)
    bed.vm.write(range(1000, 1010), 9)

    async def main() -> None:
        report = await bed.migration().run()
        assert await bed.settled() == [None]
        assert report.verified is True
        assert report.source_checksum == report.destination_checksum
        moved = bed.incoming_vm()
        assert moved.runstate == "running" and not moved.record.incoming
        assert bed.vm.stopped, "the source's copy is released after commitment"
        assert moved.device_state_in == DEVICE_STATE  # through the tunnel, intact
        assert moved.agent.announcements == 1
        stages = [Stage(s) for s, _ in report.stages]
        assert stages == [Stage.RESERVATION, Stage.PRECOPY, Stage.STOP_AND_COPY,
                          Stage.COMMITMENT, Stage.ACTIVATION, Stage.DONE]
        assert [s for s, _ in bed.destination.machine.history] == stages
    run(main)


def test_pages_dirtied_during_precopy_arrive_as_they_were_at_the_stop(bed: Bed) -> None:
    bed.vm.write(range(0, 2048), 3)

    async def main() -> None:
        stop = asyncio.Event()
        writer = asyncio.ensure_future(guest_writes(bed.vm, range(100, 140), stop))
        report = await bed.migration().run()
        stop.set()
        await writer
        assert report.verified is True
        assert report.bytes_sent >= bed.spec.ram_bytes  # the dirtied pages went again
        moved = bed.incoming_vm().memory.pages
        assert (moved[100:140] == moved[100]).all()  # one consistent write, not torn
    run(main)


def test_holes_stay_holes_and_go_as_indexes_only(bed: Bed) -> None:
    bed.vm.write(range(10, 20), 5)

    async def main() -> None:
        report = await bed.migration().run()
        assert report.verified is True
        assert report.bytes_sent < 64 * 4096  # ten pages of data, the rest indexes
        assert bed.incoming_vm().memory.data_ranges() == [(10, 20)]
    run(main)


def test_the_report_times_the_stop_window_by_qemus_events(bed: Bed) -> None:
    async def main() -> None:
        report = await bed.migration().run()
        assert report.vcpus_stopped_ms is not None
        assert 0 <= report.vcpus_stopped_ms < 5000
        assert report.device_state_bytes == len(DEVICE_STATE)
        assert report.cont_ms is not None and report.cont_ms >= 10  # the fake's QMP trip
        assert report.downtime_ms > 0
        assert set(report.stop_window_ms) == {"final_pages", "device_state",
                                              "image_consistent", "commit_to_cont"}
    run(main)


def test_the_report_puts_the_downtime_predicted_beside_the_actual_and_the_target(
        bed: Bed) -> None:
    bed.vm.write(range(0, 512), 4)

    async def main() -> None:
        report = await bed.migration(target=DowntimeTarget(0.5, 0.02)).run()
        assert report.rates == "auto" and report.downtime_target_ms == 500.0
        assert report.stop_reason == "within-target"
        assert report.switchover_cost_ms == 20.0
        assert report.predicted_downtime_ms is not None
        assert 20.0 <= report.predicted_downtime_ms <= 500.0
        assert report.downtime_over_predicted == pytest.approx(
            report.downtime_ms / report.predicted_downtime_ms, rel=1e-3)
        assert not report.switchover_forced
    run(main)


def test_a_target_below_the_fixed_cost_aborts_and_says_what_is_within_reach(bed: Bed) -> None:
    async def main() -> None:
        error = await migrate_failing(bed, target=DowntimeTarget(0.01, 0.04))
        assert "downtime target of 10 ms was not within reach at all" in str(error)
        assert "fixed cost and final collect alone come to 4" in str(error)
        assert "the best within reach was 4" in str(error)  # 40 ms and a little more
        assert "--on-timeout switchover" in str(error)
        await bed.settled()
        assert_runs_on_source_only(bed)
    run(main)


def test_on_timeout_switchover_accepts_the_downtime_out_of_reach_and_reports_it(
        bed: Bed) -> None:
    async def main() -> None:
        report = await bed.migration(target=DowntimeTarget(0.01, 0.04),
                                     on_timeout=OnTimeout.SWITCHOVER).run()
        assert report.switchover_forced and report.stop_reason == "target-unreachable"
        assert report.verified is True
    run(main)


def test_the_papers_rates_still_drive_a_migration_when_asked_for(bed: Bed) -> None:
    async def main() -> None:
        report = await bed.migration(target=None).run()
        assert report.rates == "paper" and report.downtime_target_ms is None
        assert report.stop_reason == "few-pages-left"
        assert report.rounds[0].rate_bps == 2000 * MBIT  # the minimum, as §5.3 says
    run(main)


def test_both_ends_ask_qemu_for_events_and_a_device_state_only_migration(bed: Bed) -> None:
    async def main() -> None:
        await bed.migration().run()
        wanted = {("x-ignore-shared", True), ("events", True)}
        for vm in (bed.vm, bed.incoming_vm()):
            assert {(c["capability"], c["state"]) for c in vm.capabilities} == wanted
    run(main)


# -- refusals in reservation --------------------------------------------------------------


def test_a_host_without_room_refuses_with_its_reason(bed: Bed) -> None:
    bed.target.faults.no_room = "only 3 MiB of memory available, 72 MiB needed"

    async def main() -> None:
        error = await migrate_failing(bed, ReservationRefused)
        assert "only 3 MiB of memory available" in str(error)
        assert error.vm_runs_on == "hostA"
        assert_runs_on_source_only(bed)
        assert bed.target.started == 0
        assert bed.destination.machine.stage is Stage.ABORTED
    run(main)


def test_a_missing_image_is_refused_by_name(bed: Bed) -> None:
    bed.spec.kernel.unlink()

    async def main() -> None:
        error = await migrate_failing(bed, ReservationRefused)
        assert "image 'fake' is not on hostB" in str(error)
        assert_runs_on_source_only(bed)
    run(main)


def test_a_name_taken_on_the_target_is_refused_and_its_vm_left_alone(bed: Bed) -> None:
    async def main() -> None:
        squatter = await bed.target.start_incoming(bed.spec, "hostB")
        error = await migrate_failing(bed, ReservationRefused)
        assert "already runs on hostB" in str(error)
        assert bed.target.vms == {bed.spec.name: squatter} and not squatter.stopped
        await squatter.stop()
    run(main)


def test_a_paused_vm_is_not_migrated_and_no_peer_is_asked(bed: Bed) -> None:
    async def main() -> None:
        await bed.vm.pause()
        error = await migrate_failing(bed)
        assert "paused, not running" in str(error)
        assert bed.sessions == []
    run(main)


# -- failures before commitment: the VM runs on at the source ----------------------------


def test_a_destination_qemu_that_dies_in_precopy_is_torn_down_and_heard_of(bed: Bed) -> None:
    bed.vm.write(range(0, 2048), 1)

    async def main() -> None:
        migration, running = await held_at(bed, HoldPoint.ROUND_1)
        bed.incoming_vm().crash()
        release(bed.spec.name, HoldPoint.ROUND_1)
        with pytest.raises(MigrationError) as caught:
            await running
        assert "destination QEMU of vm1 on hostB exited" in str(caught.value)
        assert await bed.settled() == [None]
        assert_runs_on_source_only(bed)
    run(main)


def test_a_device_state_that_never_completes_is_given_up_and_torn_down(
        bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dest_module, "INCOMING_TIMEOUT_S", 0.5)
    bed.target.faults.incoming_never_completes = True

    async def main() -> None:
        error = await migrate_failing(bed)
        assert "device state not completed after 0.5 s" in str(error)
        assert error.stage == Stage.STOP_AND_COPY.value
        assert await bed.settled() == [None]
        assert_runs_on_source_only(bed)
        assert bed.vm.resumes == 1
    run(main)


def test_a_hung_destination_qemu_is_torn_down_within_the_stop_window(
        bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dest_module, "INCOMING_TIMEOUT_S", 0.5)

    async def main() -> None:
        migration, running = await held_at(bed, HoldPoint.DEVICE_STATE)
        bed.incoming_vm().faults.hung = True
        release(bed.spec.name, HoldPoint.DEVICE_STATE)
        error = await migrate_failing_task(running)
        assert "device state not completed after 0.5 s" in str(error)
        assert await bed.settled() == [None]
        assert_runs_on_source_only(bed)  # the hung copy was ended, not waited for
    run(main)


def test_a_failed_device_state_migration_at_the_source_puts_the_vm_back(bed: Bed) -> None:
    bed.vm.faults.migrate_fails = True

    async def main() -> None:
        error = await migrate_failing(bed)
        assert "device-state transfer failed" in str(error)
        assert await bed.settled() == [None]
        assert_runs_on_source_only(bed)
        assert "migrate_cancel" in bed.vm.commands
    run(main)


def test_a_vanished_peer_in_precopy_aborts_both_sides(bed: Bed) -> None:
    bed.vm.write(range(0, 2048), 1)

    async def main() -> None:
        _, running = await held_at(bed, HoldPoint.ROUND_1)
        transport_of(bed.channels[0]).sever()
        release(bed.spec.name, HoldPoint.ROUND_1)
        error = await migrate_failing_task(running)
        assert error.vm_runs_on == "hostA"
        assert await bed.settled() == [None]
        assert_runs_on_source_only(bed)
    run(main)


def test_a_destination_that_stops_reading_is_given_up_after_the_stall_timeout(bed: Bed) -> None:
    bed.vm.write(range(0, 2048), 1)

    async def main() -> None:
        _, running = await held_at(bed, HoldPoint.ROUND_1, stall_timeout_s=0.5)
        transport_of(bed.destination.channel).stall()
        release(bed.spec.name, HoldPoint.ROUND_1)
        error = await migrate_failing_task(running)
        assert error.vm_runs_on == "hostA"
        assert bed.vm.runstate == "running"
        # The stalled destination hears nothing more and ends on its idle time-out; here
        # the test ends it, as the daemon would on shutdown.
        for task in bed.serving:
            task.cancel()
        await asyncio.gather(*bed.serving, return_exceptions=True)
        assert bed.target.vms == {}
    run(main)


def test_a_time_budget_that_runs_out_aborts_before_commitment(bed: Bed) -> None:
    async def main() -> None:
        running = asyncio.ensure_future(
            bed.migration(hold_at=HoldPoint.RESERVATION, timeout_s=0.3).run())
        error = await migrate_failing_task(running)
        assert "time budget of 0.3 s" in str(error)
        assert await bed.settled() == [None]
        assert_runs_on_source_only(bed)
    run(main)


async def held_at(bed: Bed, point: HoldPoint,
                  **options: Any) -> tuple[SourceMigration, asyncio.Future[MigrationReport]]:
    """A migration under way and waiting at ``point`` (``migration.holds``)."""
    migration = bed.migration(hold_at=point, **options)
    running = asyncio.ensure_future(migration.run())
    await wait_until_held(bed.spec.name, point, timeout=5)
    return migration, running


async def migrate_failing_task(task: asyncio.Future[MigrationReport]) -> MigrationError:
    with pytest.raises(MigrationError) as caught:
        await task
    return caught.value


# -- cancel --------------------------------------------------------------------------------


@pytest.mark.parametrize("point", [HoldPoint.RESERVATION, HoldPoint.ROUND_1,
                                   HoldPoint.STOP_AND_COPY, HoldPoint.DEVICE_STATE])
def test_a_cancel_before_commitment_puts_the_vm_back_running(bed: Bed, point: HoldPoint) -> None:
    bed.vm.write(range(0, 2048), 1)

    async def main() -> None:
        migration, running = await held_at(bed, point)
        assert migration.refuse_cancel() is None
        running.cancel()
        with pytest.raises(MigrationCancelled):
            await running
        assert await bed.settled() == [None]
        assert_runs_on_source_only(bed)
        assert migration.stage is Stage.ABORTED
    run(main)


def test_a_second_cancel_during_the_abort_is_answered_and_not_acted_on(bed: Bed) -> None:
    async def main() -> None:
        migration, running = await held_at(bed, HoldPoint.STOP_AND_COPY)
        assert migration.refuse_cancel() is None
        running.cancel()
        while migration._aborting is None:  # the abort has begun: the VM is resuming
            await asyncio.sleep(0)
        refusal = migration.refuse_cancel()
        assert refusal is not None and "already being aborted" in refusal
        running.cancel()  # and the daemon shuts down meanwhile: the clean-up goes on
        with pytest.raises(asyncio.CancelledError):
            await running
        await migration._aborting
        assert bed.vm.resumes == 1
        assert_runs_on_source_only(bed)
        await bed.settled()
    run(main)


def test_a_cancel_after_commitment_is_refused_with_a_reason(bed: Bed) -> None:
    async def main() -> None:
        migration, running = await held_at(bed, HoldPoint.COMMITMENT)
        refusal = migration.refuse_cancel()
        assert refusal is not None and "committed to hostB" in refusal
        release(bed.spec.name, HoldPoint.COMMITMENT)
        report = await running
        assert report.verified is True
    run(main)


# -- commitment and activation -------------------------------------------------------------


def test_a_cont_that_fails_on_the_target_gives_the_vm_back_to_the_source(bed: Bed) -> None:
    bed.target.faults.cont_fails = True

    async def main() -> None:
        error = await migrate_failing(bed)
        assert "did not activate" in str(error) and "cont failed on hostB" in str(error)
        assert error.vm_runs_on == "hostA"
        assert await bed.settled() == [None]
        assert_runs_on_source_only(bed)
        assert [s for s, _ in bed.destination.machine.history][-1] is Stage.ABORTED
    run(main)


def test_a_lost_commit_reply_is_settled_by_asking_where_the_vm_runs(
        bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("livemig.migration.source.COMMIT_TIMEOUT_S", 0.5)

    async def main() -> None:
        migration, running = await held_at(bed, HoldPoint.COMMITMENT)
        # The destination has the commit; the source will never hear its reply.
        transport_of(bed.channels[0]).stall()
        release(bed.spec.name, HoldPoint.COMMITMENT)
        report = await running
        assert bed.vm.stopped, "the target runs it: the source's copy is released"
        assert bed.incoming_vm().runstate == "running"
        assert len(bed.sessions) >= 2  # a fresh connection asked 'locate'
        assert report.verified is True
        for task in bed.serving:
            task.cancel()
        await asyncio.gather(*bed.serving, return_exceptions=True)
    run(main)


def test_a_commit_lost_before_the_target_got_it_resumes_the_vm_here(bed: Bed) -> None:
    async def main() -> None:
        migration, running = await held_at(bed, HoldPoint.DEVICE_STATE)
        original_commit = migration._commit

        async def commit_into_the_void() -> float:
            transport_of(bed.channels[0]).sever()  # "commit" never reaches the target
            return await original_commit()

        migration._commit = commit_into_the_void  # type: ignore[method-assign]
        release(bed.spec.name, HoldPoint.DEVICE_STATE)
        error = await migrate_failing_task(running)
        assert "holds no copy of it now" in str(error)
        assert error.vm_runs_on == "hostA"
        assert_runs_on_source_only(bed)
        await bed.settled()
    run(main)


def test_a_target_that_cannot_be_asked_leaves_the_vm_paused_here(
        bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("livemig.migration.source.COMMIT_TIMEOUT_S", 0.5)
    monkeypatch.setattr("livemig.migration.source.RESOLVE_TIMEOUT_S", 1.0)

    async def main() -> None:
        migration, running = await held_at(bed, HoldPoint.COMMITMENT)
        transport_of(bed.channels[0]).stall()  # the commit's reply never comes
        bed.fail_connects = True  # and hostB answers no 'locate' either
        release(bed.spec.name, HoldPoint.COMMITMENT)
        error = await migrate_failing_task(running)
        assert "in doubt" in str(error)
        assert error.vm_runs_on is None
        assert bed.vm.runstate != "running" and not bed.vm.stopped  # never running twice
        for task in bed.serving:
            task.cancel()
        await asyncio.gather(*bed.serving, return_exceptions=True)
    run(main)


# -- the destination's table ---------------------------------------------------------------


def test_a_source_that_sends_out_of_order_is_refused_and_the_target_tears_down(
        bed: Bed) -> None:
    async def main() -> None:
        channel = await bed.connect()
        reply = await channel.request("reserve", {"spec": bed.spec.to_json()}, timeout=5)
        assert reply.ok and bed.target.vms
        await channel.send(frames.Request("commit", {}))  # commit in pre-copy
        message = await channel.recv(timeout=5)
        assert isinstance(message, frames.Abort)
        assert "commit is not expected in stage iterative pre-copy" in message.reason
        assert await bed.settled() == [None]
        assert bed.target.vms == {}
        await channel.close()
    run(main)


def test_an_abort_from_the_source_tears_the_reservation_down(bed: Bed) -> None:
    async def main() -> None:
        channel = await bed.connect()
        assert (await channel.request("reserve", {"spec": bed.spec.to_json()}, timeout=5)).ok
        await channel.abort("operator cancelled")
        assert await bed.settled() == [None]
        assert bed.destination.machine.stage is Stage.ABORTED
        assert bed.target.vms == {}
    run(main)


def test_locate_answers_absent_when_nothing_is_here(bed: Bed) -> None:
    async def main() -> None:
        channel = await bed.connect()
        reply = await channel.request("locate", {"vm": "vm1"}, timeout=5)
        assert reply.ok and reply.body == {"state": "absent"}
        assert await bed.settled() == [None]
        await channel.close()
    run(main)


def test_every_stage_takes_only_the_messages_its_table_lists() -> None:
    kinds = {kind for _, kind in STEPS}
    for stage in Stage:
        for kind in kinds:
            handled = (stage, kind) in STEPS
            # The source-primary stages are where a migration can be under way.
            assert not handled or stage.source_is_primary, (stage, kind)
    assert dest_module.message_kind(frames.Request("image", {})) == "image"
    assert dest_module.message_kind(frames.DeviceState(b"x")) == "device-state"


def test_a_bug_on_the_destination_aborts_cleanly_and_is_raised_there(bed: Bed) -> None:
    async def broken(spec: object, host: str) -> FakeVM:
        raise RuntimeError("a bug in starting QEMU")

    bed.target.start_incoming = broken  # type: ignore[method-assign]

    async def main() -> None:
        error = await migrate_failing(bed)
        assert "a bug in starting QEMU" in str(error) and error.vm_runs_on == "hostA"
        ended = await bed.settled()
        assert isinstance(ended[0], RuntimeError)  # the daemon logs it as a bug
        assert_runs_on_source_only(bed)
    run(main)
