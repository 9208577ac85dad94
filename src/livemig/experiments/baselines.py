"""QEMU's own migration, run on the same test bed and VMs as ours: the peer to beat.

QEMU moves everything itself here, RAM included, over one TCP connection from the
source QEMU to a destination QEMU started with ``-incoming``: its pre-copy (with a
bandwidth cap and a ``downtime-limit``) or its postcopy. The same client probes measure
it, so the figures compare like with like. Its own ``downtime`` figure is reported too,
but DESIGN.md found that it understates what clients see.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from livemig.errors import LivemigError
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import VMRecord

# The destination QEMU listens inside the target host's namespace, where nothing but
# livemig binds ports, and one baseline migration runs at a time.
QEMU_PORT = 7478


@dataclass(frozen=True)
class QemuMigration:
    postcopy: bool = False
    max_bandwidth_mbps: float | None = 500.0  # None: unlimited
    downtime_limit_ms: int = 300  # QEMU's default
    timeout_s: float = 120.0  # a pre-copy that never converges is a result, not a hang
    # Xen's safety limit, as our planner's: a pre-copy that has sent this many x RAM is not
    # going to converge, so give up then rather than only at the timeout.
    max_sent_factor: float = 3.0


# Called with (source, destination) once QEMU's pre-copy has completed and before the
# destination runs: both QEMUs are paused then, so their RAM images must be equal.
BeforeCont = Callable[[qemu.VM, qemu.VM], Awaitable[None]]


async def migrate(name: str, target: str, how: QemuMigration,
                  before_cont: BeforeCont | None = None) -> dict[str, Any]:
    """Move VM ``name`` to ``target`` with QEMU's own migration; a report like ours.

    ``before_cont`` (pre-copy only; postcopy's destination runs before it completes) lets
    a caller inspect both paused copies, as bench/qemu_baseline_health.py compares their
    RAM. It is for correctness checks only: its time lengthens the outage."""
    record = qemu.find(name)
    source = await qemu.VM.attach(record)
    destination = None
    started = time.monotonic()
    try:
        # QEMU's postcopy needs kernel-fault userfaultfd on its destination, which its
        # unprivileged user may not have: that QEMU alone keeps root (still sandboxed).
        destination = await qemu.VM.start(record.spec, target, incoming=True,
                                          unprivileged=not how.postcopy)
        port = QEMU_PORT
        # Our engine leaves x-ignore-shared on in a QEMU it moved; QEMU's own migration
        # must carry RAM, so it is switched off explicitly on both sides.
        caps = [{"capability": "postcopy-ram", "state": how.postcopy},
                {"capability": "x-ignore-shared", "state": False}]
        for vm in (source, destination):
            await vm.qmp_command("migrate-set-capabilities", capabilities=caps)
        params: dict[str, Any] = {"downtime-limit": how.downtime_limit_ms}
        # QEMU's max-bandwidth is in bytes/s; 0 would mean "no transfer", so a huge value
        # stands for unlimited.
        params["max-bandwidth"] = (int(how.max_bandwidth_mbps * 1e6 / 8)
                                   if how.max_bandwidth_mbps else 1 << 40)
        await source.qmp_command("migrate-set-parameters", **params)
        ip = str(testbed.host_node(target).ip)
        await destination.qmp_command("migrate-incoming", uri=f"tcp:{ip}:{port}")
        await source.qmp_command("migrate", uri=f"tcp:{ip}:{port}")
        # The switchover's instants on this machine's CLOCK_MONOTONIC, as our engine
        # reports them, so that the client's outage can be lined up with it.
        stopped_at = cont_returned_at = None
        if how.postcopy:
            await asyncio.sleep(0.2)  # one pre-copy pass of some pages, then switch
            stopped_at = time.monotonic()
            await source.qmp_command("migrate-start-postcopy")
            cont_returned_at = await _wait_running(destination, how.timeout_s)
        info = await _wait(source, {"completed"}, how.timeout_s,
                           max_bytes=int(how.max_sent_factor * record.spec.ram_bytes))
        if stopped_at is None:
            # QEMU's "downtime" runs from its stop to the completion on the source.
            stopped_at = time.monotonic() - float(info.get("downtime", 0)) / 1e3
        if before_cont is not None and not how.postcopy:
            await before_cont(source, destination)
        # Without postcopy the destination waits paused for us; with it QEMU resumes it.
        if await destination.status() != "running":
            await destination.resume()
        if cont_returned_at is None:
            cont_returned_at = time.monotonic()
        # The moved VM may be migrated again, by our engine, which needs x-ignore-shared:
        # QEMU refuses that next to postcopy-ram, so no capability of ours stays behind.
        await destination.qmp_command("migrate-set-capabilities", capabilities=[
            {"capability": "postcopy-ram", "state": False}])
        destination.record = VMRecord(spec=record.spec, host=target, pid=destination.pid)
        destination.record.save()
        await source.stop()
        return {
            "vm": name, "source": record.host, "target": target,
            "mode": "qemu-postcopy" if how.postcopy else "qemu-precopy",
            "tracker": "qemu", "ram_bytes": record.spec.ram_bytes,
            "downtime_ms": float(info.get("downtime", 0)),  # QEMU's own figure
            "total_time_s": time.monotonic() - started,
            "bytes_sent": int(info["ram"]["transferred"]),
            "data_sent_ratio": int(info["ram"]["transferred"]) / record.spec.ram_bytes,
            "rounds": [], "stop_reason": f"downtime-limit {how.downtime_limit_ms} ms",
            "final_pages": 0, "device_state_ms": 0.0, "verify_ms": 0.0, "verified": None,
            "source_checksum": None, "destination_checksum": None,
            "stages": [], "qemu_info": info,
            "stopped_at": stopped_at, "cont_returned_at": cont_returned_at,
            "stop_window_ms": {},
        }
    except BaseException:
        # As a failed migration of ours would: the VM runs on at the source. Each step is
        # tried on its own, so that one broken part (a destination QEMU that died) does not
        # leave the others undone; the original error is what the caller sees.
        with contextlib.suppress(LivemigError, OSError, EOFError):
            await source.qmp_command("migrate_cancel")
            await _wait(source, {"cancelled", "failed", "completed"}, 5.0)
        with contextlib.suppress(LivemigError, OSError, EOFError):
            if await source.status() != "running":
                await source.resume()
        if destination is not None:
            with contextlib.suppress(LivemigError, OSError, EOFError):
                await destination.stop()
        raise
    finally:
        await source.close()
        if destination is not None:
            await destination.close()


async def _wait_running(vm: qemu.VM, timeout_s: float) -> float:
    """When ``vm`` was first seen running (monotonic s), polled every 5 ms."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await vm.status() == "running":
            return time.monotonic()
        await asyncio.sleep(0.005)
    raise LivemigError(f"the destination of QEMU's postcopy did not run within {timeout_s:g} s")


class DidNotConverge(LivemigError):
    """QEMU's pre-copy gave up: out of time, or it had sent ``max_sent_factor`` x RAM,
    because the guest dirties memory faster than the link drains it. A result, not a
    fault; the VM runs on at the source. Carries how long it tried, what it had sent and
    QEMU's last ``query-migrate``."""

    def __init__(self, elapsed_s: float, bytes_sent: int, info: dict[str, Any]) -> None:
        super().__init__(f"QEMU's migration did not converge: {bytes_sent:,} bytes sent in "
                         f"{elapsed_s:.1f} s")
        self.elapsed_s = elapsed_s
        self.bytes_sent = bytes_sent
        self.info = info


async def _wait(vm: qemu.VM, done: set[str], timeout_s: float,
                max_bytes: int | None = None) -> dict[str, Any]:
    started = time.monotonic()
    info: dict[str, Any] = {}
    while (elapsed := time.monotonic() - started) < timeout_s:
        info = await vm.qmp_command("query-migrate")
        if info.get("status") in done:
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise LivemigError(f"QEMU's migration {info['status']}: {info.get('error-desc')}")
        sent = int(info.get("ram", {}).get("transferred", 0))
        if max_bytes is not None and sent >= max_bytes:
            raise DidNotConverge(elapsed, sent, info)
        await asyncio.sleep(0.005)
    raise DidNotConverge(timeout_s, int(info.get("ram", {}).get("transferred", 0)), info)
