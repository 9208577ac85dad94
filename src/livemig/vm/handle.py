"""What the migration roles need of a VM, as a protocol: ``qemu.VM`` is the real one.

The roles (``migration.source``, ``migration.destination``) are written against this
and nothing more of QEMU, so that a unit test can drive them with a fake VM whose RAM is
a file in a temporary directory and whose "QEMU" is a few lines of Python.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from livemig.vm.memory import GuestMemory
from livemig.vm.spec import VMRecord


class Announcer(Protocol):
    async def announce(self, timeout: float = 5.0) -> None:
        """The guest's own unsolicited ARP, from its NIC."""


class MigratableVM(Protocol):
    record: VMRecord

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def memory(self) -> GuestMemory:
        """The guest's RAM: read-only on a source, writable on an incoming copy."""

    @property
    def agent(self) -> Announcer: ...

    async def qmp_command(self, command: str, **arguments: Any) -> Any: ...

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a copy of ``fd`` for a ``fd:NAME`` migration URI."""

    async def migration_ended(self, timeout: float,
                              alongside: asyncio.Future[Any] | None = None) -> dict[str, Any]:
        """``query-migrate`` once QEMU's migration has completed, failed or been
        cancelled; TimeoutError after ``timeout``; ``alongside``'s failure if first."""

    async def pause(self) -> float | None:
        """Stop the vCPUs; when they stopped (CLOCK_REALTIME), None if already stopped."""

    async def resume(self) -> float | None:
        """Run the vCPUs; when they started (CLOCK_REALTIME)."""

    async def status(self) -> str: ...

    async def stop(self) -> None:
        """End this copy and remove everything it had on its host."""

    async def close(self) -> None:
        """Let go of the VM without stopping it."""

    def exited(self) -> bool: ...

    async def wait_exited(self) -> None: ...

    def nic_sent_bytes(self) -> int | None:
        """Bytes the guest has sent out of its NIC, as this host counts them; None if
        it cannot tell. The VM's own traffic, which shares the uplink with a migration."""
