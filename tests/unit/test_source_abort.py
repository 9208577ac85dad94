"""The source's abort against a fake VM: a cancel must not cut the clean-up short.

Only what an abort touches is faked (QMP, resume, the record's directory, where the
switchover journal lives); the migration is put in its stop window by hand.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from livemig.errors import MigrationCancelled
from livemig.migration.source import MigrationOptions, MigrationReport, SourceMigration
from livemig.migration.stages import Event, Stage
from livemig.vm.qemu import VM
from livemig.wire.channel import Channel

RESUME_S = 0.2  # QEMU's cont can take this long on a busy 2-core host


class PausedVM:
    def __init__(self, directory: Path) -> None:
        self.name = "vm0"
        self.record = SimpleNamespace(directory=directory)
        self.state = "paused"
        self.resuming = asyncio.Event()
        self.resumed = asyncio.Event()

    async def qmp_command(self, command: str, **arguments: Any) -> Any:
        return {}

    async def resume(self) -> None:
        self.resuming.set()
        await asyncio.sleep(RESUME_S)
        self.state = "running"
        self.resumed.set()


async def no_target() -> Channel:
    raise AssertionError("the migration is put in its stage by hand: it connects nowhere")


def paused_migration(vm: PausedVM) -> tuple[SourceMigration, asyncio.Event]:
    """A migration that waits in its stop window, the VM paused, until cancelled."""
    migration = SourceMigration(cast(VM, vm), source_host="hostA", target_host="hostB",
                                connect=no_target, options=MigrationOptions())
    waiting = asyncio.Event()

    async def in_the_stop_window() -> MigrationReport:
        for event in (Event.BEGIN, Event.RESERVED, Event.PRECOPY_DONE):
            migration.machine.handle(event, at=0.0)
        migration._paused = True
        waiting.set()
        await asyncio.Event().wait()
        raise AssertionError("only a cancel ends this")

    migration._migrate = in_the_stop_window  # type: ignore[method-assign]
    return migration, waiting


def test_a_cancel_during_the_abort_does_not_interrupt_the_resume(tmp_path: Path) -> None:
    async def main() -> None:
        vm = PausedVM(tmp_path)
        migration, waiting = paused_migration(vm)
        task = asyncio.create_task(migration.run())
        await waiting.wait()
        task.cancel()
        await vm.resuming.wait()
        task.cancel()  # a second cancel, in the middle of vm.resume()
        with pytest.raises((MigrationCancelled, asyncio.CancelledError)):
            await task
        await asyncio.wait_for(vm.resumed.wait(), timeout=RESUME_S + 2)
        assert vm.state == "running"
        assert migration.stage is Stage.ABORTED

    asyncio.run(asyncio.wait_for(main(), timeout=10))


def test_a_cancel_during_the_abort_is_answered_and_not_acted_on(tmp_path: Path) -> None:
    async def main() -> None:
        vm = PausedVM(tmp_path)
        migration, waiting = paused_migration(vm)
        task = asyncio.create_task(migration.run())
        await waiting.wait()
        assert migration.refuse_cancel() is None  # the caller cancels the task now
        task.cancel()
        assert "already being aborted" in str(migration.refuse_cancel())  # not yet running
        await vm.resuming.wait()
        assert "already being aborted" in str(migration.refuse_cancel())
        with pytest.raises(MigrationCancelled):
            await task
        assert vm.state == "running" and migration.stage is Stage.ABORTED

    asyncio.run(asyncio.wait_for(main(), timeout=10))


def test_a_cancel_is_refused_once_the_commit_has_begun(tmp_path: Path) -> None:
    migration, _ = paused_migration(PausedVM(tmp_path))
    for event in (Event.BEGIN, Event.RESERVED, Event.PRECOPY_DONE, Event.IMAGE_CONSISTENT):
        migration.machine.handle(event, at=0.0)
    assert migration.stage.source_is_primary  # a failure here still aborts ...
    assert "too late" in str(migration.refuse_cancel())  # ... but a cancel does not apply
