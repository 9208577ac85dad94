"""QEMU's own migration, run on the same test bed and VMs as ours: the peer to beat.

QEMU moves everything itself here, RAM included, from the source QEMU to a destination
QEMU started with ``-incoming``, in one of its best modes (``MODES``): pre-copy at its
defaults or with a 30 ms ``downtime-limit``, with multifd, with auto-converge, or
postcopy with postcopy-preempt. The link decides the bandwidth: no mode caps it. The same
client probes measure it, so the figures compare like with like. Its own ``downtime``
figure is reported too, but DESIGN.md found that it understates what clients see.

Progress comes from QEMU's events (``events`` capability: MIGRATION, MIGRATION_PASS;
STOP, RESUME), not from polling ``query-migrate``, which would steal the guest's CPU in
the window we measure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from qemu.qmp import EventListener
from qemu.qmp.message import Message

from livemig.errors import LivemigError
from livemig.experiments import bed
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import VMRecord

# The destination QEMU listens inside the target host's namespace, where nothing but
# livemig binds ports, and one baseline migration runs at a time.
QEMU_PORT = 7478
# QEMU's max-bandwidth is in bytes/s and 0 would mean "no transfer": this stands for
# unlimited, so that the test bed's link is what limits the rate.
UNLIMITED_BANDWIDTH = 1 << 40
# The capabilities any mode may switch on, all switched off again after the migration:
# a VM QEMU moved may next be moved by our engine, whose device-state-only migration wants
# none of them (and x-ignore-shared, which QEMU refuses beside postcopy-ram).
MODE_CAPABILITIES = ("postcopy-ram", "postcopy-preempt", "multifd", "auto-converge")


@dataclass(frozen=True)
class QemuMigration:
    """One way to run QEMU's migration; each field is one QMP capability or parameter.

    ``max_switchover_bandwidth`` is left out on purpose: QEMU (8.2 on) would take it, as
    ``avail-switchover-bandwidth``, instead of the throughput it measures when it decides
    whether the rest fits in ``downtime-limit``. With the link uncapped, what it measures
    is the link's rate, which is what a user's QEMU sees; we do not tune it with what we
    know of the test bed."""

    name: str
    downtime_limit_ms: int = 300  # QEMU's default
    max_bandwidth_mbps: float | None = None  # None: unlimited, the link decides
    multifd_channels: int = 0  # 0: no multifd, one connection
    auto_converge: bool = False  # throttle the vCPUs while the pre-copy lags
    postcopy: bool = False  # postcopy-ram with postcopy-preempt
    postcopy_after_s: float = 0.2  # one pre-copy pass of some pages, then switch
    timeout_s: float = 120.0  # a pre-copy that never converges is a result, not a hang
    # Xen's safety limit, as our planner's: a pre-copy that has sent this many x RAM is not
    # going to converge, so give up then rather than only at the timeout.
    max_sent_factor: float = 3.0

    def capabilities(self) -> list[dict[str, Any]]:
        """``migrate-set-capabilities`` for both QEMUs. ``x-ignore-shared`` is off: our
        engine leaves it on in a QEMU it moved, and QEMU's own migration must carry RAM."""
        return [{"capability": "events", "state": True},
                {"capability": "x-ignore-shared", "state": False},
                {"capability": "postcopy-ram", "state": self.postcopy},
                # A second channel for the pages the destination faults on, so they do
                # not queue behind the background stream (QEMU 8.0 on).
                {"capability": "postcopy-preempt", "state": self.postcopy},
                {"capability": "multifd", "state": self.multifd_channels > 0},
                {"capability": "auto-converge", "state": self.auto_converge}]

    def parameters(self) -> dict[str, Any]:
        """``migrate-set-parameters`` for the source (and the destination: the channel
        count must match)."""
        params: dict[str, Any] = {
            "downtime-limit": self.downtime_limit_ms,
            "max-bandwidth": (int(self.max_bandwidth_mbps * 1e6 / 8)
                              if self.max_bandwidth_mbps else UNLIMITED_BANDWIDTH)}
        if self.multifd_channels:
            # QEMU 9.0 on: the channels' threads find zero pages, not the main thread.
            params["multifd-channels"] = self.multifd_channels
            params["zero-page-detection"] = "multifd"
        return params


MODES: dict[str, QemuMigration] = {m.name: m for m in (
    QemuMigration("qemu-precopy"),
    QemuMigration("qemu-precopy-30", downtime_limit_ms=30),
    QemuMigration("qemu-precopy-100", downtime_limit_ms=100),
    QemuMigration("qemu-multifd", multifd_channels=2),
    QemuMigration("qemu-autoconverge", auto_converge=True),
    QemuMigration("qemu-postcopy", postcopy=True),
)}


def mode(name: str, **changes: Any) -> QemuMigration:
    """``MODES[name]``, with ``changes`` (a timeout, say) made to it."""
    try:
        return dataclasses.replace(MODES[name], **changes)
    except KeyError as exc:
        raise LivemigError(f"no QEMU migration mode {name!r}; there are "
                           f"{', '.join(MODES)}") from exc


# Called with (source, destination) once QEMU's pre-copy has completed on both sides and
# before the destination runs: both QEMUs are paused then (checked: ``DestinationRan``), so
# their RAM images must be equal.
BeforeCont = Callable[[qemu.VM, qemu.VM], Awaitable[None]]


class DestinationRan(LivemigError):
    """The destination QEMU was not paused when ``before_cont`` was due: a compare of
    the RAM images would race the guest's own writes. Carries both run states."""

    def __init__(self, source_status: str, destination_status: str) -> None:
        super().__init__(f"QEMU's destination is {destination_status!r} (source "
                         f"{source_status!r}) where both must be paused")
        self.source_status = source_status
        self.destination_status = destination_status


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


def _monotonic(event: Message) -> float:
    """An event's time on this machine's CLOCK_MONOTONIC: QEMU stamps it with the wall
    clock when it emits it, which is earlier than we read it."""
    stamp = _mapping(event, "timestamp")
    wall = float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
    return time.monotonic() - (time.time() - wall)


def _mapping(event: Message, key: str) -> dict[str, Any]:
    value = event[key]
    if not isinstance(value, dict):
        raise LivemigError(f"QEMU sent a {event['event']} event whose {key!r} is no object")
    return value


def _status(event: Message) -> str:
    """A MIGRATION event's status."""
    return str(_mapping(event, "data")["status"])


async def _next(listener: EventListener, names: set[str], deadline: float) -> Message:
    """The next of ``names`` from ``listener``; TimeoutError at ``deadline``."""
    async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
        while True:
            event = await listener.get()
            if event["event"] in names:
                return event


async def migrate(name: str, target: str, how: QemuMigration,
                  before_cont: BeforeCont | None = None) -> dict[str, Any]:
    """Move VM ``name`` to ``target`` with QEMU's own migration; a report like ours.

    ``before_cont`` lets a caller inspect both paused copies, as
    bench/qemu_baseline_health.py compares their RAM. With it the destination cannot run
    before it: QMP ``stop`` while the destination is ``inmigrate`` turns QEMU's autostart
    off (as ``-S`` would), and its run state is checked. Without it the destination
    starts itself, as a user's QEMU does. It is for correctness checks only: its time
    lengthens the outage. Not for postcopy, whose destination runs before the migration
    completes (then only the guest can be checked, after)."""
    if before_cont is not None and how.postcopy:
        raise ValueError("postcopy's destination runs before its RAM is complete: "
                         "there is no paused image to compare")
    record = qemu.find(name)
    source = await qemu.VM.attach(record)
    destination = None
    started = time.monotonic()
    deadline = started + how.timeout_s
    try:
        # QEMU's postcopy needs a userfaultfd for kernel faults on its destination.
        destination = await bed.start_incoming(record.spec, target,
                                               userfaultfd=how.postcopy)
        if before_cont is not None:
            await destination.qmp_command("stop")  # inmigrate: autostart off, as -S
        for vm in (source, destination):
            await vm.qmp_command("migrate-set-capabilities", capabilities=how.capabilities())
            await vm.qmp_command("migrate-set-parameters", **how.parameters())
        uri = f"tcp:{testbed.host_node(target).ip}:{QEMU_PORT}"
        with source.qmp.listener(("MIGRATION", "MIGRATION_PASS", "STOP")) as at_source, \
                destination.qmp.listener(("MIGRATION", "RESUME")) as at_destination:
            await destination.qmp_command("migrate-incoming", uri=uri)
            await source.qmp_command("migrate", uri=uri)
            if how.postcopy:
                await asyncio.sleep(how.postcopy_after_s)
                await source.qmp_command("migrate-start-postcopy")
            info, stopped_at = await _completion(
                source, at_source, deadline, started,
                max_bytes=int(how.max_sent_factor * record.spec.ram_bytes))
            # The source's "completed" means all was sent; the destination may still be
            # loading the device state.
            resumed_at = await _destination_completed(at_destination, deadline)
            status = await destination.status()
            if before_cont is not None:
                source_status = await source.status()
                if status != "paused" or source_status == "running":
                    raise DestinationRan(source_status, status)
                await before_cont(source, destination)
            if status == "running":
                # QEMU started it itself (postcopy: at the switch), before "completed".
                if resumed_at is None:
                    raise LivemigError("QEMU's destination runs, but sent no RESUME")
                cont_returned_at = resumed_at
            else:  # the compare's, or a source that was paused
                await destination.resume()
                cont_returned_at = time.monotonic()
        # The moved VM may be migrated again, by our engine: no mode's capability stays.
        await destination.qmp_command("migrate-set-capabilities", capabilities=[
            {"capability": c, "state": False} for c in MODE_CAPABILITIES])
        destination.record = VMRecord(spec=record.spec, host=target, pid=destination.pid)
        destination.record.save()
        await source.close()
        await bed.stop_vm_on(name, record.host)  # the source's copy; the target's is the VM
        sent = int(info["ram"]["transferred"])
        return {
            "vm": name, "source": record.host, "target": target,
            "mode": how.name, "tracker": "qemu", "ram_bytes": record.spec.ram_bytes,
            "downtime_ms": float(info.get("downtime", 0)),  # QEMU's own figure
            "total_time_s": time.monotonic() - started,
            "bytes_sent": sent, "data_sent_ratio": sent / record.spec.ram_bytes,
            "rounds": [], "stop_reason": f"downtime-limit {how.downtime_limit_ms} ms",
            "final_pages": 0, "device_state_ms": 0.0, "verify_ms": 0.0, "verified": None,
            "source_checksum": None, "destination_checksum": None,
            "stages": [], "qemu_info": info, "qemu_mode": dataclasses.asdict(how),
            "stopped_at": stopped_at, "cont_returned_at": cont_returned_at,
            "stop_window_ms": {},
        }
    except BaseException:
        # As a failed migration of ours would: the VM runs on at the source. Each step is
        # tried on its own, so that one broken part (a destination QEMU that died) does not
        # leave the others undone; the original error is what the caller sees.
        with contextlib.suppress(LivemigError, OSError, EOFError):
            await source.qmp_command("migrate_cancel")
        with contextlib.suppress(LivemigError, OSError, EOFError):
            await _cancelled(source)
        with contextlib.suppress(LivemigError, OSError, EOFError):
            if await source.status() != "running":
                await source.resume()
        if destination is not None:
            with contextlib.suppress(LivemigError, OSError, EOFError):
                await destination.close()
                await bed.stop_vm_on(name, target)
        raise
    finally:
        await source.close()
        if destination is not None:
            await destination.close()


async def _completion(source: qemu.VM, events: EventListener, deadline: float,
                      started: float, max_bytes: int) -> tuple[dict[str, Any], float]:
    """Wait for the source's MIGRATION "completed": QEMU's last ``query-migrate`` and
    when the source stopped (its STOP event). The sent bytes are read once per pass
    (MIGRATION_PASS), not polled."""
    stopped_at = None
    info: dict[str, Any] = {}
    try:
        while True:
            event = await _next(events, {"MIGRATION", "MIGRATION_PASS", "STOP"}, deadline)
            if event["event"] == "STOP":
                stopped_at = _monotonic(event)
                continue
            if event["event"] == "MIGRATION_PASS":
                info = await source.qmp_command("query-migrate")
                sent = int(info.get("ram", {}).get("transferred", 0))
                if sent >= max_bytes:
                    raise DidNotConverge(time.monotonic() - started, sent, info)
                continue
            status = _status(event)
            if status in ("failed", "cancelled"):
                info = await source.qmp_command("query-migrate")
                raise LivemigError(f"QEMU's migration {status}: {info.get('error-desc')}")
            if status == "completed":
                info = await source.qmp_command("query-migrate")
                if stopped_at is None:  # not seen: QEMU's downtime runs from its stop
                    stopped_at = time.monotonic() - float(info.get("downtime", 0)) / 1e3
                return info, stopped_at
    except TimeoutError:
        info = await source.qmp_command("query-migrate")
        raise DidNotConverge(time.monotonic() - started,
                             int(info.get("ram", {}).get("transferred", 0)), info) from None


async def _destination_completed(events: EventListener, deadline: float) -> float | None:
    """Until the destination's MIGRATION "completed"; when it resumed (its RESUME, on
    CLOCK_MONOTONIC), if it did: QEMU starts it before it says "completed"."""
    resumed_at = None
    try:
        while True:
            event = await _next(events, {"MIGRATION", "RESUME"}, deadline)
            if event["event"] == "RESUME":
                resumed_at = _monotonic(event)
                continue
            status = _status(event)
            if status == "completed":
                return resumed_at
            if status in ("failed", "cancelled"):
                raise LivemigError(f"QEMU's incoming migration {status}")
    except TimeoutError as exc:
        raise LivemigError("QEMU's destination did not complete its migration in time") from exc


async def _cancelled(vm: qemu.VM, timeout_s: float = 5.0) -> None:
    """After ``migrate_cancel``: until the source's migration has ended. Its MIGRATION
    event may have gone by already, so one ``query-migrate`` first."""
    ended = {"cancelled", "failed", "completed", "none"}
    with vm.qmp.listener("MIGRATION") as events:
        info = await vm.qmp_command("query-migrate")
        if info.get("status", "none") in ended:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while _status(await events.get()) not in ended:
                    pass
