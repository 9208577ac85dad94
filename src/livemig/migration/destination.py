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
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from livemig import config, paths
from livemig.errors import LivemigError
from livemig.migration.holds import HoldPoint, hold
from livemig.migration.stages import Event, Stage, StageMachine
from livemig.migration.tunnel import StateSink
from livemig.vm import qemu
from livemig.vm.handle import MigratableVM
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
    own = config.current()
    ram_dir = own.ram_dir if own is not None else paths.SHM_DIR
    shm = os.statvfs(ram_dir)
    if shm.f_bavail * shm.f_frsize < ram_bytes:
        return (f"only {shm.f_bavail * shm.f_frsize >> 20} MiB free in {ram_dir} "
                f"for a {ram_bytes >> 20} MiB RAM file")
    return None


class HostVMs(Protocol):
    """What a destination needs of its host's VMs: QEMU's (``QemuVMs``), or a test's."""

    def room_problem(self, ram_bytes: int) -> str | None:
        """Why this host cannot hold ``ram_bytes`` of guest RAM, or None."""

    async def start_incoming(self, spec: VMSpec, host: str) -> MigratableVM: ...

    def records(self) -> list[VMRecord]:
        """Every VM this host holds, running or incoming."""

    def running(self, record: VMRecord) -> bool: ...

    async def remove(self, record: VMRecord) -> None:
        """End that copy and remove all it had here."""


class QemuVMs:
    def room_problem(self, ram_bytes: int) -> str | None:
        return reservation_problem(ram_bytes)

    async def start_incoming(self, spec: VMSpec, host: str) -> MigratableVM:
        # The same image, from this host's own image directory.
        return await qemu.VM.start(qemu.spec_here(spec, host), host, incoming=True)

    def records(self) -> list[VMRecord]:
        return qemu.records()

    def running(self, record: VMRecord) -> bool:
        return record.process_alive()

    async def remove(self, record: VMRecord) -> None:
        await qemu.VM(record).stop()


class Incoming:
    """One daemon's destination sessions, by VM name: what ``locate`` needs to know."""

    def __init__(self, host: str, vms: HostVMs | None = None) -> None:
        self.host = host
        self.vms: HostVMs = QemuVMs() if vms is None else vms
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
        for record in self.vms.records():
            if record.host == self.host and record.incoming:
                log.info("removing %s: an incoming copy whose migration died with the "
                         "previous daemon", record.spec.name)
                try:
                    await self.vms.remove(record)
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
        for record in self.vms.records():
            if record.spec.name != vm or record.host != self.host:
                continue
            if record.incoming or not self.vms.running(record):
                # An incoming copy nobody serves: its daemon died before commitment.
                await self.vms.remove(record)
                continue
            return messages.Location("running", self._activated_at.get(vm))
        return messages.Location("absent")


class QEMUGone(LivemigError):
    """Our incoming QEMU ended before commitment: the migration cannot go on."""


def _cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What ended a session's tasks: one session has one cause. Our QEMU's exit explains
    the failures it caused in the message loop better than they do."""
    leaves = list(_leaves(group))
    return next((e for e in leaves if isinstance(e, QEMUGone)), leaves[0])


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def message_kind(message: frames.Message) -> str:
    """What the table below is keyed by: a request's kind, else the frame's type."""
    if isinstance(message, frames.Request):
        return message.kind
    return {frames.Pages: "pages", frames.DeviceState: "device-state",
            frames.Abort: "abort"}.get(type(message), type(message).__name__)


Handler = Callable[["DestinationSession", frames.Message], Awaitable[None]]
PeerRequestT = TypeVar("PeerRequestT", messages.Reserve, messages.Image, messages.Commit,
                       messages.Locate)


class DestinationSession:
    """Serves one source, in stage order, by ``STEPS``: the one place that says what the
    destination does with each message in each stage, and which event that fires."""

    def __init__(self, host: str, channel: Channel, incoming: Incoming | None = None) -> None:
        self.host = host
        self.channel = channel
        if incoming is None:  # alone, not in a daemon: nothing to recover first
            incoming = Incoming(host)
            incoming.recovered.set()
        self.incoming = incoming
        self.machine = StageMachine()
        self.vm: MigratableVM | None = None
        self._state_sink: StateSink | None = None
        self._written: npt.NDArray[np.bool_] | None = None
        self._page_sums = np.zeros(0, dtype=np.uint64)
        self._started = time.monotonic()
        self._hold_at: HoldPoint | None = None
        self._qemu_exit: asyncio.Future[None] | None = None
        self._tasks = asyncio.TaskGroup()  # entered by serve()
        self._tearing_down: asyncio.Future[None] | None = None
        self._vm_name_here: str | None = None  # what Incoming knows this session by
        self._activated_at: float | None = None

    def _event(self, event: Event) -> None:
        self.machine.handle(event, time.monotonic() - self._started)

    async def serve(self, first: frames.Message | None = None) -> None:
        """Answer the source until the VM runs here, or until the migration is abandoned.
        ``first``: the source's first message, if the daemon has read it already."""
        try:
            try:
                # The session's tasks: the message loop (this task) and, once a QEMU
                # runs here, its watcher. Either one failing ends the other.
                async with asyncio.TaskGroup() as self._tasks:
                    await self._serve_messages(first)
            except BaseExceptionGroup as group:
                raise _cause(group) from None
        except Exception as exc:
            await self._abandon(exc)
            if not isinstance(exc, LivemigError | OSError):
                raise  # a bug: torn down like any failure, and then told loudly
        except asyncio.CancelledError:
            # The daemon stops, or 'locate' learnt that the source lost us: tear down
            # (to its end, whatever else is cancelled meanwhile), then stay cancelled.
            if self.machine.stage.source_is_primary:
                await self._tear_down()
            raise
        finally:
            if self._state_sink is not None:
                self._state_sink.close()
            if self._vm_name_here is not None:
                self.incoming.done(self._vm_name_here, self, self._activated_at)
            if self.vm is not None:
                await self.vm.close()  # frees QEMU's one-client agent and QMP sockets
            await self.channel.close()

    async def _serve_messages(self, first: frames.Message | None) -> None:
        self._event(Event.BEGIN)
        if first is not None:
            await self._dispatch(first)
        while not self.machine.stage.terminal:
            # Dispatched at once, with no await between: a Pages frame's data is the
            # channel's buffer, valid only until the channel reads again.
            await self._dispatch(await self.channel.recv(timeout=IDLE_TIMEOUT_S))
        if self._qemu_exit is not None:
            self._qemu_exit.cancel()  # the session is over: nothing left to watch for
        if self.machine.stage is Stage.ABORTED:
            # Every way into ABORTED ends here (an Abort, a refused reservation, an
            # image that never came): none may leave an incoming copy behind, which
            # would block the next try of this VM with VMExists.
            await self._tear_down()

    def _request(self, message: frames.Message, kind: type[PeerRequestT]) -> PeerRequestT:
        """The typed request in ``message``, which STEPS routed here by its kind."""
        assert isinstance(message, frames.Request)
        request = messages.read_request(message, self.channel.peer)
        assert isinstance(request, kind)
        return request

    async def _abandon(self, exc: BaseException) -> None:
        """A failure: before commitment, tear down and tell the source why."""
        if not self.machine.stage.source_is_primary:
            log.error("VM %s committed here but: %s", self._vm_name, exc)
            raise exc
        log.warning("migration from %s abandoned in %s: %s", self.channel.peer,
                    self.machine.stage.value, exc)
        await self._tear_down()
        await self.channel.abort(f"{exc}; {self.host} tore down", timeout=1.0)

    async def _watch_qemu(self, vm: MigratableVM) -> None:
        """Until commitment, our QEMU exiting ends the session at once: the source must
        hear of it now, not after its next time-out."""
        await vm.wait_exited()
        if self.machine.stage.source_is_primary:
            raise QEMUGone(f"the destination QEMU of {vm.name} on {self.host} exited")

    @property
    def _vm_name(self) -> str:
        return self.vm.name if self.vm is not None else "?"

    async def _dispatch(self, message: frames.Message) -> None:
        stage = self.machine.stage
        kind = message_kind(message)
        if kind == "abort" and stage.source_is_primary:
            assert isinstance(message, frames.Abort)
            log.info("source aborted the migration: %s", message.reason)
            self._event(Event.CANCELLED)  # serve() tears down
            return
        handler = STEPS.get((stage, kind))
        if handler is None:
            raise frames.RemoteProtocolError(
                self.channel.peer, f"{kind} is not expected in stage {stage.value}")
        await handler(self, message)

    # -- stage 1: reservation -------------------------------------------------------------

    async def _reserve(self, message: frames.Message) -> None:
        request = self._request(message, messages.Reserve)
        try:
            spec = VMSpec.from_json(msgspec.structs.asdict(request.spec))
        except (TypeError, ValueError) as exc:
            raise frames.RemoteProtocolError(
                self.channel.peer, f"malformed VM spec: {exc}"
            ) from exc
        log.info("%s asks to move %s here (%s)", self.channel.peer, spec.name,
                 "its certificate names it" if self.channel.certified_host
                 else "plaintext: only the shared key vouches for it")
        self._hold_at = request.hold_at
        problem = self.incoming.vms.room_problem(spec.ram_bytes)
        if problem is None:
            try:
                self.vm = await self.incoming.vms.start_incoming(spec, self.host)
            except LivemigError as exc:
                problem = str(exc)
        if problem is not None:
            self._event(Event.FAILED)
            await self.channel.send(messages.reply_frame(messages.Refusal(error=problem)))
            return
        assert self.vm is not None
        self._qemu_exit = self._tasks.create_task(self._watch_qemu(self.vm))
        task = asyncio.current_task()
        assert task is not None
        self.incoming.add(spec.name, self, task)
        self._vm_name_here = spec.name
        await self.vm.qmp_command("migrate-set-capabilities",
                                  capabilities=list(qemu.ENGINE_MIGRATION_CAPABILITIES))
        # No port for QEMU: it reads its device state from a socket only we hold, and
        # we write into it what arrives on this authenticated channel.
        self._state_sink = await StateSink.open(self.vm)
        await self.vm.qmp_command("migrate-incoming", uri=self._state_sink.uri)
        memory = self.vm.memory  # mapped now, writable, for the VM's lifetime here
        self._written = np.zeros(memory.npages, dtype=bool)
        self._page_sums = np.zeros(memory.npages, dtype=np.uint64)
        self.channel.connection.npages = memory.npages  # the codec bounds page indexes
        self._event(Event.RESERVED)
        await self.channel.send(messages.reply_frame(messages.Reserved()))

    async def _locate(self, message: frames.Message) -> None:
        """A source that lost track of a commit asks, on a connection of its own, where
        the VM stands. This connection reserved nothing: it ends here."""
        request = self._request(message, messages.Locate)
        answer = await self.incoming.locate(request.vm)
        await self.channel.send(messages.reply_frame(answer))
        self._event(Event.FAILED)

    # -- stages 2 and 3: pre-copy and stop-and-copy --------------------------------------

    async def _write_pages(self, message: frames.Message) -> None:
        assert isinstance(message, frames.Pages)
        assert self.vm is not None and self._written is not None
        memory = self.vm.memory
        npages = memory.npages
        if (len(message.indexes) and int(message.indexes.max()) >= npages) or (
            len(message.zero_indexes) and int(message.zero_indexes.max()) >= npages
        ):
            raise frames.RemoteProtocolError(
                self.channel.peer, f"a page index beyond the VM's {npages} pages"
            )
        if len(message.indexes):
            data = np.frombuffer(message.data, dtype=np.uint8).reshape(
                -1, memory.pages.shape[1])
            memory.pages[message.indexes] = data
            self._written[message.indexes] = True
            # The bytes just written: reading them back out of the mapping would copy
            # every frame a second time for the same answer.
            self._page_sums[message.indexes] = page_checksums(data, message.indexes)
        if len(message.zero_indexes):
            # A fresh RAM file reads as zeros: write zeros only over what we wrote before,
            # so that holes stay holes and cost no memory.
            rewrite = message.zero_indexes[self._written[message.zero_indexes]]
            memory.pages[rewrite] = 0
            self._page_sums[message.zero_indexes] = 0

    async def _first_device_state(self, message: frames.Message) -> None:
        """QEMU's device state leaves the source only once the source has stopped the
        VM: its first chunk is the stop-and-copy beginning."""
        self._event(Event.PRECOPY_DONE)
        await self._write_device_state(message)

    async def _write_device_state(self, message: frames.Message) -> None:
        assert isinstance(message, frames.DeviceState) and self._state_sink is not None
        await self._state_sink.write(message)

    async def _image(self, message: frames.Message) -> None:
        request = self._request(message, messages.Image)
        assert self.vm is not None
        try:
            # Bounded as a whole: a hung QEMU answers nothing, not even "failed", and
            # its QMP time-out is longer than the source waits for this reply.
            status = (await self.vm.migration_ended(INCOMING_TIMEOUT_S)).get("status")
        except TimeoutError:
            status = f"not completed after {INCOMING_TIMEOUT_S:g} s"
        if status != "completed":
            self._event(Event.FAILED)  # serve() tears down once the source has the reply
            await self.channel.send(messages.reply_frame(
                messages.Refusal(error=f"device state {status}")))
            return
        checksum, verify_ms = None, 0.0
        if request.verify:
            started = time.monotonic()
            checksum = sum_checksums(self._page_sums)
            verify_ms = (time.monotonic() - started) * 1000
        self._event(Event.IMAGE_CONSISTENT)
        await self.channel.send(messages.reply_frame(messages.ImageConsistent(
            consistent=True, checksum=checksum, verify_ms=verify_ms)))

    # -- stages 4 and 5: commitment and activation -----------------------------------------

    async def _commit(self, message: frames.Message) -> None:
        self._request(message, messages.Commit)
        assert self.vm is not None
        self._event(Event.COMMITTED)  # primary from here on: never tear down after this
        await hold(self.host, self.vm.name, HoldPoint.COMMITMENT, self._hold_at)
        cont_asked = time.monotonic()
        try:
            resumed_at = await self.vm.resume()
        except LivemigError as exc:
            # It never ran here, and it never will: the source may take it back.
            self._event(Event.NOT_ACTIVATED)
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
            await self.channel.send(messages.reply_frame(messages.Activated(
                cont_returned_at=cont_returned_at, resumed_at=resumed_at,
                cont_ms=(cont_returned_at - cont_asked) * 1e3)), timeout=5.0)
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
        """End the incoming copy and remove all it had here. Once begun it runs to its
        end, whatever cancels the session meanwhile; later calls wait for that end."""
        if self._qemu_exit is not None:
            self._qemu_exit.cancel()  # QEMU ending now is our doing, not a failure
        if self._tearing_down is None:
            if self.vm is None:
                return
            vm, self.vm = self.vm, None
            self._tearing_down = asyncio.ensure_future(vm.stop())
        await asyncio.shield(self._tearing_down)


# What the destination does with each message in each stage; anything else is the
# source's protocol error. An Abort is taken in every stage where the source is primary
# (see _dispatch). Each handler fires its stage's events itself, on success or failure:
#   reserve        RESERVED, or FAILED with the reason in the reply
#   locate         FAILED: a connection that only asked reserved nothing
#   device-state   PRECOPY_DONE on the first chunk (the source has stopped the VM)
#   image          IMAGE_CONSISTENT, or FAILED with the reason in the reply
#   commit         COMMITTED, then ACTIVATED; NOT_ACTIVATED if cont fails
STEPS: dict[tuple[Stage, str], Handler] = {
    (Stage.RESERVATION, "reserve"): DestinationSession._reserve,
    (Stage.RESERVATION, "locate"): DestinationSession._locate,
    (Stage.PRECOPY, "pages"): DestinationSession._write_pages,
    (Stage.PRECOPY, "device-state"): DestinationSession._first_device_state,
    (Stage.STOP_AND_COPY, "pages"): DestinationSession._write_pages,
    (Stage.STOP_AND_COPY, "device-state"): DestinationSession._write_device_state,
    (Stage.STOP_AND_COPY, "image"): DestinationSession._image,
    (Stage.COMMITMENT, "commit"): DestinationSession._commit,
}
