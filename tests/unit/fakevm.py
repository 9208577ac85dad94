"""A fake VM and a fake host for driving the migration roles without QEMU.

``FakeVM`` is a ``livemig.vm.handle.MigratableVM``: its RAM is a real file mapped with
the real ``GuestMemory`` (so holes, checksums and the shadow dirty tracker are the real
ones), and its "QEMU" is a few lines that do what QEMU does with the engine's migration:
on ``migrate fd:NAME`` it writes its device state into the descriptor the role passed
and closes it; on ``migrate-incoming fd:NAME`` it reads until end of stream. So the
device-state tunnel is the real one too. Faults are switches on the fake (``Faults``).

``FakeHost`` is a destination's ``HostVMs``: it starts incoming fakes and lists them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from livemig.errors import SetupError, VMError, VMExists
from livemig.vm.memory import GuestMemory
from livemig.vm.spec import VMRecord, VMSpec, Workload

# What the fake QEMU migrates as its device state: some KB, as QEMU's is ~600 KB.
DEVICE_STATE = b"".join(i.to_bytes(4, "big") for i in range(16 * 1024))
MIGRATION_ENDED = ("completed", "failed", "cancelled")


@dataclass
class Faults:
    """What goes wrong in a fake's QEMU, set before or during a migration."""

    hung: bool = False  # QMP answers nothing, ever
    incoming_never_completes: bool = False  # the device state arrives, QEMU says nothing
    migrate_fails: bool = False  # the source's device-state migration fails
    cont_fails: bool = False
    no_room: str | None = None  # the host's answer to a reservation


class FakeAgent:
    def __init__(self) -> None:
        self.announcements = 0

    async def announce(self, timeout: float = 5.0) -> None:
        self.announcements += 1


class FakeVM:
    def __init__(self, record: VMRecord, ram_path: Path, *, faults: Faults | None = None,
                 on_stop: Any = None) -> None:
        self.record = record
        self.faults = faults or Faults()
        self._on_stop = on_stop
        size = record.spec.ram_bytes
        with open(ram_path, "ab") as f:
            f.truncate(size)  # a sparse file: every page a hole until written
        self._ram_path = ram_path
        self._memory: GuestMemory | None = GuestMemory(ram_path, size, writable=True)
        self.agent = FakeAgent()
        self.runstate = "inmigrate" if record.incoming else "running"
        self.migration = "none"
        self.capabilities: list[Any] = []
        self.commands: list[str] = []
        self.device_state_in = bytearray()
        self.resumes = 0
        self.stopped = False
        self.nic_bytes: int | None = None  # the guest's outbound traffic, if a test sets it
        self._fds: dict[str, socket.socket] = {}
        self._changed = asyncio.Event()
        self._exit = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        record.directory.mkdir(parents=True, exist_ok=True)
        record.save()

    # -- the guest ----------------------------------------------------------------------

    def write(self, pages: list[int] | range, value: int) -> None:
        """The guest writes ``value`` over whole pages, as a running VM would."""
        assert self.runstate == "running", "a paused guest writes nothing"
        for page in pages:
            self.memory.pages[page] = value

    # -- MigratableVM -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.record.spec.name

    @property
    def pid(self) -> int:
        return 0  # no process: the roles' shadow tracker needs none

    @property
    def memory(self) -> GuestMemory:
        assert self._memory is not None, f"{self.name} was stopped"
        return self._memory

    async def qmp_command(self, command: str, **arguments: Any) -> Any:
        self._check_alive()
        self.commands.append(command)
        if self.faults.hung:
            await asyncio.Event().wait()  # a hung QEMU: no answer, ever
        if command == "migrate-set-capabilities":
            self.capabilities = arguments["capabilities"]
        elif command == "migrate":
            self._set_migration("active")
            self._spawn(self._send_device_state(self._fd(arguments["uri"])))
        elif command == "migrate-incoming":
            self._spawn(self._receive_device_state(self._fd(arguments["uri"])))
        elif command == "migrate_cancel":
            if self.migration not in MIGRATION_ENDED:
                self._set_migration("cancelled")
        elif command == "query-migrate":
            return {"status": self.migration}
        elif command != "announce-self":
            raise VMError(self.name, f"the fake QEMU knows no {command!r}")
        return {}

    async def pass_fd(self, fd: int, name: str) -> None:
        self._check_alive()
        self._fds[name] = socket.socket(fileno=os.dup(fd))  # QEMU's copy: the caller closes its own

    async def migration_ended(self, timeout: float,
                              alongside: asyncio.Future[Any] | None = None) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            # Asked over "QMP", as qemu.VM does: a hung fake never answers.
            while (status := (await self.qmp_command("query-migrate"))["status"]) \
                    not in MIGRATION_ENDED:
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                waits: set[asyncio.Future[Any]] = {changed}
                if alongside is not None:
                    waits.add(alongside)
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if alongside is not None and alongside.done():
                    failure = None if alongside.cancelled() else alongside.exception()
                    if failure is not None:
                        raise failure
                    alongside = None
        return {"status": status}

    async def pause(self) -> float | None:
        self._check_alive()
        self.commands.append("stop")
        if self.runstate != "running":
            return None
        self.runstate = "paused"
        return time.time()

    async def resume(self) -> float | None:
        self._check_alive()
        self.commands.append("cont")
        await asyncio.sleep(0.01)  # a QMP round trip: long enough to be interrupted
        if self.faults.cont_fails:
            raise VMError(self.name, "QMP cont failed: the fake says no")
        self.resumes += 1
        was = self.runstate
        self.runstate = "running"
        return None if was == "running" else time.time()

    async def status(self) -> str:
        self._check_alive()
        return self.runstate

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._exit.set()
        await self.close()
        self._ram_path.unlink(missing_ok=True)
        if self._on_stop is not None:
            self._on_stop(self)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_fds()
        if self._memory is not None and self.stopped:
            self._memory.close()
            self._memory = None

    def release(self) -> None:
        """After the test: whatever a VM still holds (a source VM that ran on)."""
        self._close_fds()
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def _close_fds(self) -> None:
        for sock in self._fds.values():
            sock.close()
        self._fds.clear()

    def exited(self) -> bool:
        return self._exit.is_set()

    async def wait_exited(self) -> None:
        await self._exit.wait()

    def nic_sent_bytes(self) -> int | None:
        return self.nic_bytes


    # -- faults ---------------------------------------------------------------------------

    def crash(self) -> None:
        """QEMU dies: every later call fails, as on a real crash."""
        self._exit.set()

    def _check_alive(self) -> None:
        if self._exit.is_set():
            raise VMError(self.name, f"QEMU of VM {self.name!r} exited")

    # -- the fake QEMU's migration --------------------------------------------------------

    def _fd(self, uri: str) -> socket.socket:
        assert uri.startswith("fd:"), uri
        sock = self._fds.pop(uri.removeprefix("fd:"))
        sock.setblocking(False)
        return sock

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_migration(self, status: str) -> None:
        self.migration = status
        self._changed.set()

    async def _send_device_state(self, sock: socket.socket) -> None:
        with sock:
            if self.faults.migrate_fails:
                self._set_migration("failed")
                return
            await asyncio.get_running_loop().sock_sendall(sock, DEVICE_STATE)
        self.runstate = "postmigrate"
        self._set_migration("completed")

    async def _receive_device_state(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._set_migration("active")
        with sock:
            while chunk := await loop.sock_recv(sock, 65536):
                self.device_state_in += chunk
        if not self.faults.incoming_never_completes:
            self.runstate = "paused"
            self._set_migration("completed" if self.device_state_in == DEVICE_STATE
                                else "failed")


def make_spec(directory: Path, name: str = "vm1", mem_mib: int = 8) -> VMSpec:
    """A spec whose image files exist in ``directory`` (a destination checks them)."""
    kernel, initrd = directory / "vmlinuz", directory / "initrd.img"
    for path in (kernel, initrd):
        path.touch()
    return VMSpec(name=name, ip=IPv4Address("10.77.0.100"), mem_mib=mem_mib,
                  workload=Workload.IDLE, image="fake", kernel=kernel, initrd=initrd)


class FakeHost:
    """A destination host's VMs (``destination.HostVMs``), all fakes."""

    def __init__(self, name: str, directory: Path, faults: Faults | None = None) -> None:
        self.name = name
        self.directory = directory
        self.faults = faults or Faults()  # given to every VM started here
        self.vms: dict[str, FakeVM] = {}
        self.started = 0

    def room_problem(self, ram_bytes: int) -> str | None:
        return self.faults.no_room

    async def start_incoming(self, spec: VMSpec, host: str) -> FakeVM:
        if spec.name in self.vms:
            raise VMExists(spec.name, host)
        if not spec.kernel.is_file():  # as qemu.spec_here finds this host's image missing
            raise SetupError(f"image {spec.image!r} is not on {host}; build it there")
        self.started += 1
        vm = FakeVM(VMRecord(spec=spec, host=host, pid=0, incoming=True),
                    self.directory / f"{host}-{spec.name}.ram", faults=self.faults,
                    on_stop=lambda gone: self.vms.pop(gone.name, None))
        self.vms[spec.name] = vm
        return vm

    def records(self) -> list[VMRecord]:
        return [vm.record for vm in self.vms.values()]

    def running(self, record: VMRecord) -> bool:
        vm = self.vms.get(record.spec.name)
        return vm is not None and not vm.exited()

    async def remove(self, record: VMRecord) -> None:
        if (vm := self.vms.get(record.spec.name)) is not None:
            await vm.stop()


def source_vm(directory: Path, spec: VMSpec, host: str = "hostA") -> FakeVM:
    """A running VM on the source host, its RAM all holes until the guest writes."""
    return FakeVM(VMRecord(spec=spec, host=host, pid=0), directory / f"{host}-{spec.name}.ram")

