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


async def migrate(name: str, target: str, how: QemuMigration) -> dict[str, Any]:
    """Move VM ``name`` to ``target`` with QEMU's own migration; a report like ours."""
    record = qemu.find(name)
    source = await qemu.VM.attach(record)
    destination = None
    started = time.monotonic()
    try:
        # QEMU's postcopy needs kernel-fault userfaultfd on its destination, which its
        # unprivileged user may not have: that QEMU alone runs unconfined.
        destination = await qemu.VM.start(record.spec, target, incoming=True,
                                          confined=not how.postcopy)
        port = QEMU_PORT
        caps = [{"capability": "postcopy-ram", "state": how.postcopy}]
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
        if how.postcopy:
            await asyncio.sleep(0.2)  # one pre-copy pass of some pages, then switch
            await source.qmp_command("migrate-start-postcopy")
        info = await _wait(source, {"completed"}, how.timeout_s)
        # Without postcopy the destination waits paused for us; with it QEMU resumes it.
        if await destination.status() != "running":
            await destination.resume()
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
            "stopped_at": None, "cont_returned_at": None, "stop_window_ms": {},
        }
    except BaseException:
        # As a failed migration of ours would: the VM runs on at the source.
        with contextlib.suppress(LivemigError):
            await source.qmp_command("migrate_cancel")
        if await source.status() != "running":
            await source.resume()
        if destination is not None:
            await destination.stop()
        raise
    finally:
        await source.close()
        if destination is not None:
            await destination.close()


async def _wait(vm: qemu.VM, done: set[str], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info: dict[str, Any] = await vm.qmp_command("query-migrate")
        if info.get("status") in done:
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise LivemigError(f"QEMU's migration {info['status']}: {info.get('error-desc')}")
        await asyncio.sleep(0.005)
    raise LivemigError(f"QEMU's migration did not finish within {timeout_s:g} s")
