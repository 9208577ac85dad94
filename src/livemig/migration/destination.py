"""The destination side of a migration: one authenticated peer connection, one VM.

It answers the source's requests in stage order:

    reserve   check memory and disk, start QEMU with -incoming, map its RAM for writing
    Pages     write each page straight into the mapping (zero pages only where needed)
    image     wait for QEMU's device state, checksum the image: "consistent"
    commit    now primary: cont, then announce the VM on the LAN

Anything else, an ``Abort``, a lost peer or a silent one before ``commit``, or its own
QEMU dying, tears down everything the reservation made: QEMU, its tap, its RAM file and
its record, and tells the source why if it still can.

A source that lost track of a commit asks on a fresh connection where the VM stands
(``locate``, answered by ``Incoming``): "running" here, or "absent", in which case no
copy is left here that could ever run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from livemig.errors import LivemigError
from livemig.migration.holds import HoldPoint, hold
from livemig.migration.stages import Event, Stage, StageMachine
from livemig.migration.tunnel import StateSink
from livemig.vm import qemu
from livemig.vm.memory import page_checksums, sum_checksums
from livemig.vm.spec import VMRecord, VMSpec
from livemig.wire import frames, messages
from livemig.wire.channel import Channel

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 10.0  # no frame from the source for this long: it is gone
MEMORY_MARGIN_BYTES = 64 << 20  # QEMU itself, beyond guest RAM
INCOMING_TIMEOUT_S = 3.0  # QEMU's device state; ~5 ms when all is well
QEMU_WATCH_S = 0.1
ANNOUNCE_DELAY_S = 0.2  # see _announce


def reservation_problem(ram_bytes: int) -> str | None:
    """Why this host cannot hold ``ram_bytes`` of guest RAM, or None."""
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    if available < ram_bytes + MEMORY_MARGIN_BYTES:
        return (f"only {available >> 20} MiB of memory available, "
                f"{(ram_bytes + MEMORY_MARGIN_BYTES) >> 20} MiB needed")
    shm = os.statvfs("/dev/shm")
    if shm.f_bavail * shm.f_frsize < ram_bytes:
        return (f"only {shm.f_bavail * shm.f_frsize >> 20} MiB free in /dev/shm "
                f"for a {ram_bytes >> 20} MiB RAM file")
    return None


class Incoming:
    """One daemon's destination sessions, by VM name: what ``locate`` needs to know."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._sessions: dict[str, tuple[DestinationSession, asyncio.Task[Any]]] = {}
        self._activated_at: dict[str, float] = {}
        # Set once the daemon has settled what its predecessor left: until then an
        # orphaned incoming copy may still be in the records.
        self.recovered = asyncio.Event()

    def add(self, vm: str, session: DestinationSession, task: asyncio.Task[Any]) -> None:
        self._sessions[vm] = (session, task)

    def done(self, vm: str, session: DestinationSession, activated_at: float | None) -> None:
        if self._sessions.get(vm, (None,))[0] is session:
            del self._sessions[vm]
        if activated_at is not None:
            self._activated_at[vm] = activated_at

    async def remove_orphans(self) -> None:
        """A daemon starting: the incoming copies its predecessor left never ran, and
        nobody serves them now. Until they are gone ``locate`` does not answer."""
        for record in qemu.records():
            if record.host == self.host and record.incoming:
                log.info("removing %s: an incoming copy whose migration died with the "
                         "previous daemon", record.spec.name)
                try:
                    await qemu.VM(record).stop()
                except (LivemigError, OSError) as exc:
                    log.error("could not remove %s: %s", record.spec.name, exc)
        self.recovered.set()

    async def locate(self, vm: str) -> messages.Location:
        await asyncio.wait_for(self.recovered.wait(), timeout=60.0)
        if (entry := self._sessions.get(vm)) is not None:
            session, task = entry
            if not session.machine.stage.source_is_primary:
                return messages.Location("activating")  # committed; cont is under way
            # Uncommitted, and its source asks: it lost us. This copy must never run.
            task.cancel()
            await asyncio.wait({task}, timeout=15.0)
        for record in qemu.records():
            if record.spec.name != vm or record.host != self.host:
                continue
            if record.incoming or not record.process_alive():
                # An incoming copy nobody serves: its daemon died before commitment.
                await qemu.VM(record).stop()
                continue
            return messages.Location("running", self._activated_at.get(vm))
        return messages.Location("absent")


class DestinationSession:
    def __init__(self, host: str, channel: Channel, incoming: Incoming | None = None) -> None:
        self.host = host
        self.channel = channel
        if incoming is None:  # alone, not in a daemon: nothing to recover first
            incoming = Incoming(host)
            incoming.recovered.set()
        self.incoming = incoming
        self.machine = StageMachine()
        self.vm: qemu.VM | None = None
        self._state_sink: StateSink | None = None
        self._written: npt.NDArray[np.bool_] | None = None
        self._page_sums = np.zeros(0, dtype=np.uint64)
        self._started = time.monotonic()
        self._hold_at: HoldPoint | None = None
        self._qemu_gone: str | None = None  # why the watchdog ended the session
        self._activated_at: float | None = None

    def _event(self, event: Event) -> None:
        self.machine.handle(event, time.monotonic() - self._started)

    async def serve(self) -> None:
        """Answer the source until the VM runs here, or until the migration is abandoned."""
        watchdog: asyncio.Task[None] | None = None
        try:
            self._event(Event.BEGIN)
            while not self.machine.stage.terminal:
                message = await self.channel.recv(timeout=IDLE_TIMEOUT_S)
                await self._dispatch(message)
                if watchdog is None and self.vm is not None:
                    watchdog = asyncio.create_task(self._watch_qemu(asyncio.current_task()))
            if self.machine.stage is Stage.ABORTED:
                # Every way into ABORTED ends here (an Abort, a refused reservation, an
                # image that never came): none may leave an incoming copy behind, which
                # would block the next try of this VM with VMExists.
                await self._tear_down()
        except BaseException as exc:
            if self.machine.stage.source_is_primary:
                why = self._qemu_gone or str(exc) or type(exc).__name__
                log.warning("migration from %s abandoned in %s: %s", self.channel.peer,
                            self.machine.stage.value, why)
                await self._tear_down()
                if self._qemu_gone:
                    await self.channel.abort(f"{self._qemu_gone}; {self.host} tore down",
                                             timeout=1.0)
                    return
                if not isinstance(exc, LivemigError | OSError):
                    raise
            else:
                log.error("VM %s committed here but: %s", self._vm_name, exc)
                raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if self._state_sink is not None:
                self._state_sink.close()
            if self.vm is not None:
                self.incoming.done(self.vm.name, self, self._activated_at)
                await self.vm.close()  # frees QEMU's one-client agent and QMP sockets
            await self.channel.close()

    async def _watch_qemu(self, serving: asyncio.Task[Any] | None) -> None:
        """End the session if our QEMU dies before commitment: the source must hear it
        now, not after its next time-out."""
        while self.vm is not None and not self.vm.exited():
            await asyncio.sleep(QEMU_WATCH_S)
        if self.vm is not None and self.machine.stage.source_is_primary and serving:
            self._qemu_gone = f"the destination QEMU of {self.vm.name} on {self.host} exited"
            serving.cancel()

    @property
    def _vm_name(self) -> str:
        return self.vm.name if self.vm is not None else "?"

    async def _dispatch(self, message: frames.Message) -> None:
        stage = self.machine.stage
        request = (messages.read_request(message, self.channel.peer)
                   if isinstance(message, frames.Request) else None)
        if isinstance(message, frames.Pages) and stage in (Stage.PRECOPY, Stage.STOP_AND_COPY):
            self._write(message)
        elif (isinstance(message, frames.DeviceState) and self._state_sink is not None
              and stage in (Stage.PRECOPY, Stage.STOP_AND_COPY)):
            await self._state_sink.write(message)
        elif isinstance(message, frames.Abort):
            log.info("source aborted the migration: %s", message.reason)
            self._event(Event.CANCELLED)
            await self._tear_down()
        elif isinstance(request, messages.Reserve):
            await self.channel.send(messages.reply_frame(await self._reserve(request)))
        elif isinstance(request, messages.Image):
            await self.channel.send(messages.reply_frame(await self._image(request.verify)))
        elif isinstance(request, messages.Commit):
            await self._commit()
        elif isinstance(request, messages.Locate) and stage is Stage.RESERVATION:
            answer = await self.incoming.locate(request.vm)
            await self.channel.send(messages.reply_frame(answer))
            self._event(Event.FAILED)  # this connection only asked; it reserved nothing
        else:
            raise frames.RemoteProtocolError(
                self.channel.peer,
                f"{type(message).__name__} {getattr(message, 'kind', '')!s} is not expected "
                f"in stage {stage.value}"
            )

    # -- stage 1 ------------------------------------------------------------------------

    async def _reserve(self, request: messages.Reserve) -> messages.Reserved | messages.Refusal:
        if self.machine.stage is not Stage.RESERVATION:
            raise frames.RemoteProtocolError(
                self.channel.peer, f"reserve in stage {self.machine.stage.value}"
            )
        try:
            spec = VMSpec.from_json(msgspec.structs.asdict(request.spec))
        except (TypeError, ValueError) as exc:
            raise frames.RemoteProtocolError(
                self.channel.peer, f"malformed VM spec: {exc}"
            ) from exc
        log.info("%s asks to move %s here (%s)", self.channel.peer, spec.name,
                 "its certificate names it" if self.channel.certified_host
                 else "plaintext: only the shared key vouches for it")
        if problem := reservation_problem(spec.ram_bytes):
            self._event(Event.FAILED)
            return messages.Refusal(error=problem)
        self._hold_at = request.hold_at
        if not (spec.kernel.is_file() and spec.initrd.is_file()):
            self._event(Event.FAILED)
            return messages.Refusal(error=f"image {spec.image!r} is not here")
        try:
            self.vm = await qemu.VM.start(spec, self.host, incoming=True)
        except LivemigError as exc:
            self._event(Event.FAILED)
            return messages.Refusal(error=str(exc))
        task = asyncio.current_task()
        assert task is not None
        self.incoming.add(spec.name, self, task)
        await self.vm.qmp_command(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True}],
        )
        # No port for QEMU: it reads its device state from a socket only we hold, and
        # we write into it what arrives on this authenticated channel.
        self._state_sink = await StateSink.open(self.vm)
        await self.vm.qmp_command("migrate-incoming", uri=self._state_sink.uri)
        memory = self.vm.memory  # mapped now, writable, for the VM's lifetime here
        self._written = np.zeros(memory.npages, dtype=bool)
        self._page_sums = np.zeros(memory.npages, dtype=np.uint64)
        self.channel.connection.npages = memory.npages  # the codec bounds page indexes
        self._event(Event.RESERVED)
        return messages.Reserved()

    # -- stages 2 and 3 -----------------------------------------------------------------

    def _write(self, pages: frames.Pages) -> None:
        assert self.vm is not None and self._written is not None
        memory = self.vm.memory
        npages = memory.npages
        if (len(pages.indexes) and int(pages.indexes.max()) >= npages) or (
            len(pages.zero_indexes) and int(pages.zero_indexes.max()) >= npages
        ):
            raise frames.RemoteProtocolError(
                self.channel.peer, f"a page index beyond the VM's {npages} pages"
            )
        if len(pages.indexes):
            data = np.frombuffer(pages.data, dtype=np.uint8).reshape(-1, memory.pages.shape[1])
            memory.pages[pages.indexes] = data
            self._written[pages.indexes] = True
            # The bytes just written: reading them back out of the mapping would copy
            # every frame a second time for the same answer.
            self._page_sums[pages.indexes] = page_checksums(data, pages.indexes)
        if len(pages.zero_indexes):
            # A fresh RAM file reads as zeros: write zeros only over what we wrote before,
            # so that holes stay holes and cost no memory.
            rewrite = pages.zero_indexes[self._written[pages.zero_indexes]]
            memory.pages[rewrite] = 0
            self._page_sums[pages.zero_indexes] = 0

    async def _image(self, verify: bool) -> messages.ImageConsistent | messages.Refusal:
        assert self.vm is not None
        if self.machine.stage is Stage.PRECOPY:
            self._event(Event.PRECOPY_DONE)
        status = "unanswered"
        try:
            # Around QMP too: a hung QEMU answers nothing, not even "failed", and its QMP
            # time-out is longer than the source waits for this reply.
            async with asyncio.timeout(INCOMING_TIMEOUT_S):
                while status not in ("completed", "failed"):
                    status = (await self.vm.qmp_command("query-migrate")).get("status")
                    if status != "completed":
                        await asyncio.sleep(0.001)
        except TimeoutError:
            status = f"{status} after {INCOMING_TIMEOUT_S:g} s"
        if status != "completed":
            self._event(Event.FAILED)  # serve() tears down once the source has the reply
            return messages.Refusal(error=f"device state {status}")
        checksum, verify_ms = None, 0.0
        if verify:
            started = time.monotonic()
            checksum = sum_checksums(self._page_sums)
            verify_ms = (time.monotonic() - started) * 1000
        self._event(Event.IMAGE_CONSISTENT)
        return messages.ImageConsistent(consistent=True, checksum=checksum,
                                        verify_ms=verify_ms)

    # -- stages 4 and 5 -----------------------------------------------------------------

    async def _commit(self) -> None:
        assert self.vm is not None
        if self.machine.stage is not Stage.COMMITMENT:
            raise frames.RemoteProtocolError(
                self.channel.peer, f"commit in stage {self.machine.stage.value}"
            )
        self._event(Event.COMMITTED)  # primary from here on: never tear down after this
        await hold(self.vm.name, HoldPoint.COMMITMENT, self._hold_at)
        cont_asked = time.monotonic()
        try:
            await self.vm.resume()
        except LivemigError as exc:
            # It never ran here, and it never will: the source may take it back.
            self._event(Event.FAILED)
            await self._tear_down()
            await self.channel.send(messages.reply_frame(messages.Refusal(
                error=f"cont failed on {self.host}: {exc}", running=False)))
            return
        cont_returned_at = self._activated_at = time.monotonic()
        # First of all, before any I/O that may fail: the record says this copy runs
        # now. An incoming record is an uncommitted copy, which 'locate' would remove.
        record = self.vm.record
        self.vm.record = VMRecord(spec=record.spec, host=record.host, pid=record.pid)
        self.vm.record.save()
        log.info("cont of %s took %.1f ms", self.vm.name, (cont_returned_at - cont_asked) * 1e3)
        # The source's clock is this one (one machine); across machines it would need
        # the offset measured at connection time.
        try:
            await self.channel.send(messages.reply_frame(
                messages.Activated(cont_returned_at=cont_returned_at)), timeout=5.0)
        except frames.WireError as exc:
            # The VM runs here regardless; the source asks where it runs ('locate').
            log.warning("%s runs here, but %s did not hear it: %s", self.vm.name,
                        self.channel.peer, exc)
        await self._announce()
        self._event(Event.ACTIVATED)

    async def _announce(self) -> None:
        """The guest's own unsolicited ARP, from its NIC: it also refreshes the ARP caches
        of hosts that moved the VM's IP elsewhere (a real failover). QMP announce-self is
        the fallback for a guest without our agent.

        The switches already know: QEMU queued its own post-migration RARP when the
        device state arrived and sends it the instant ``cont`` runs the VM (straced:
        0.2 ms after the RESUME event). So the agent's arping, a process the guest must
        fork and exec on a cold translation cache, waits ANNOUNCE_DELAY_S and leaves the
        guest's first milliseconds to its service."""
        assert self.vm is not None
        await asyncio.sleep(ANNOUNCE_DELAY_S)
        started = time.monotonic()
        try:
            await self.vm.agent.announce(timeout=5.0)
            log.info("%s announced itself from its NIC in %.0f ms", self.vm.name,
                     (time.monotonic() - started) * 1000)
        except LivemigError as exc:
            log.info("agent announce failed (%s); QMP announce-self instead", exc)
            await self.vm.qmp_command("announce-self", initial=1, max=50, rounds=3, step=50)

    async def _tear_down(self) -> None:
        if self.vm is not None:
            vm, self.vm = self.vm, None
            await vm.stop()
