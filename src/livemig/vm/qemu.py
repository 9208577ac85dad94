"""A QEMU virtual machine on one host: start, find again, pause, resume, stop.

QEMU runs under TCG (no working KVM here) with ``-nodefaults``, its RAM a shared file in
/dev/shm, its NIC virtio-net on a tap of the host's bridge, its console in a log file,
the guest agent on virtio-serial and QMP on a Unix socket (spoken through qemu.qmp).

QEMU runs in its own session, so it outlives the process that started it; its
``VMRecord`` on the host's disk lets any later process attach to it again.

Every QEMU runs confined, a destination's as much as any (in ping-pong every host is
both): it starts as a user of its own (``livemig-qemu``: no supplementary groups, no
capabilities, no_new_privs), and a seccomp sandbox (``-sandbox``) with every deny QEMU
7.2 offers, ``elevateprivileges=deny`` included, so no set*id call ever succeeds.

It never holds root, not even at start-up: ``ip netns exec`` (which needs root for
setns) enters the host's namespace, then ``setpriv`` drops to the user, then QEMU is
exec'd; each step execs, so the PID we started is QEMU's. (``-runas`` cannot do this:
QEMU 7.2 installs its filter before -runas calls setgid/setuid, so with
elevateprivileges=deny it dies of SIGSYS; tried.) What needs root is opened by us and
inherited, by descriptor number:

- the tap: a queue of the root-owned tap (``net.bridge.open_tap``), ``-netdev tap,fd=N``;
- QMP and the agent: listening sockets we bind in the VM's directory (root's, 0700),
  ``-chardev socket,fd=N``; any process of ours still connects by path;
- the console log: ``-add-fd`` into an fd set, ``-chardev file,path=/dev/fdset/S``;
- stdout and stderr: the stderr log;
- device state arrives later on a descriptor passed over QMP (``pass_fd``).

The RAM file is the exception: memory-backend-file opens a path, never a descriptor.
We create it and lend it to the user until QEMU has opened it (QMP answers only after
the machine, RAM included, is built), then take it back: no other QEMU, all being the
same user, can open a running VM's RAM. The kernel, initrd and the uffd shim are
world-readable files (``LIVEMIG_NO_UFFD_SHIM=1`` leaves the shim out, for diagnosis:
see ``dirtylog.NO_SHIM_ENV``). The shim also makes QEMU non-dumpable, as a set*id drop would
have: QEMUs of the same user cannot ptrace one another; root (the daemon reading
/proc/PID/pagemap for the dirty log) still can. Where the shim is not loaded (a kernel
without the dirty log, no gcc) QEMU stays dumpable. The shim's userfaultfd needs no
privilege: vm.unprivileged_userfaultfd=0 still allows UFFD_USER_MODE_ONLY, and async
write-protection never takes a kernel fault.

No QEMU keeps root. The destination of QEMU's own postcopy baseline needs a userfaultfd
that takes kernel faults, which vm.unprivileged_userfaultfd=0 refuses an unprivileged
process; QEMU (8.1 on) asks /dev/userfaultfd for one instead, and that device's only
check is its file mode. So that one QEMU gets one supplementary group,
``USERFAULTFD_GROUP``, which owns /dev/userfaultfd (tools/setup-host.sh); every other
QEMU has no group at all (``command``).

For diagnosis only, ``LIVEMIG_QEMU_BINARY`` runs another QEMU (an older one unpacked
beside the system's, say) and ``LIVEMIG_QEMU_DATADIR`` gives it its own firmware and
ROMs (``-L``; QEMU 7.2 then looks nowhere else, so link /usr/share/seabios's files into
it): bench/qemu_baseline_health.py compared QEMU 7.2 with 10.0 that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from livemig import config, paths
from livemig.errors import (
    AgentError,
    GuestTimeout,
    QEMUCrashed,
    SetupError,
    VMError,
    VMExists,
    VMNotFound,
)
from livemig.image.builder import Image
from livemig.net import bridge
from livemig.vm import dirtylog
from livemig.vm.agent import AgentClient
from livemig.vm.memory import GuestMemory
from livemig.vm.spec import VMRecord, VMSpec, Workload

QEMU_BINARY = os.environ.get("LIVEMIG_QEMU_BINARY") or "qemu-system-x86_64"
QEMU_DATADIR = os.environ.get("LIVEMIG_QEMU_DATADIR")  # -L: that QEMU's own BIOS and ROMs
BOOT_TIMEOUT_S = 90.0
# QEMU queues STOP or RESUME before it replies to stop or cont; this only bounds the wait
# for an event that will never come because the run state did not change.
EVENT_AFTER_REPLY_S = 0.5
MIGRATION_ENDED = frozenset({"completed", "failed", "cancelled"})
# Our engine's use of QEMU's migration, the same on both ends: device state only (the
# RAM is ours to move: x-ignore-shared), and MIGRATION events to wait on, not polling.
ENGINE_MIGRATION_CAPABILITIES = (
    {"capability": "x-ignore-shared", "state": True},
    {"capability": "events", "state": True},
)
QMP_TIMEOUT_S = 10.0  # every command we send answers in milliseconds; a hung QEMU must not hang us
AGENT_PORT_NAME = "org.livemig.agent"
QEMU_USER = "livemig-qemu"  # made by tools/setup-host.sh
USERFAULTFD_GROUP = "livemig-uffd"  # owns /dev/userfaultfd (mode 0660), by setup-host.sh
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
CONSOLE_FDSET = 1  # -add-fd's set for the console log; QEMU's own sets start above


@dataclass(frozen=True)
class Inherited:
    """The descriptors QEMU inherits from us, by number: everything it would otherwise
    need root (or a writable directory) to open."""

    qmp: int
    agent: int
    tap: int
    console: int

    def numbers(self) -> tuple[int, ...]:
        return (self.qmp, self.agent, self.tap, self.console)


def qemu_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(QEMU_USER)
    except KeyError as exc:
        raise SetupError(f"there is no user {QEMU_USER!r} for QEMU to run as; run "
                         "'make setup' (tools/setup-host.sh adds it)") from exc


def userfaultfd_gid() -> int:
    try:
        return grp.getgrnam(USERFAULTFD_GROUP).gr_gid
    except KeyError as exc:
        raise SetupError(f"there is no group {USERFAULTFD_GROUP!r} for QEMU's postcopy "
                         "destination; run 'make setup' (tools/setup-host.sh adds it)") from exc


def unprivileged_argv(user: pwd.struct_passwd, *, userfaultfd: bool = False) -> list[str]:
    """What runs QEMU as ``user`` with nothing of root's: all uids and gids changed, no
    supplementary groups (but ``USERFAULTFD_GROUP`` when ``userfaultfd``), empty
    capability sets (the bounding set too, so no exec could regain any), and
    no_new_privs. setpriv execs, so QEMU keeps its PID."""
    if shutil.which("setpriv") is None:
        raise SetupError("setpriv is missing (Debian: util-linux); run 'make setup'")
    groups = f"--groups={userfaultfd_gid()}" if userfaultfd else "--clear-groups"
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", groups,
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def qemu_argv(record: VMRecord, inherited: Inherited) -> list[str]:
    """QEMU's command line, sandboxed; ``inherited`` numbers the descriptors it finds
    open."""
    spec = record.spec
    argv = [
        QEMU_BINARY,
        *(("-L", QEMU_DATADIR) if QEMU_DATADIR else ()),
        "-name", spec.name,
        "-accel", "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-machine", "pc,memory-backend=ram0",
        "-m", f"{spec.mem_mib}M",
        # The path also identifies our QEMU among processes (VMRecord.process_alive).
        "-object",
        f"memory-backend-file,id=ram0,size={spec.mem_mib}M,mem-path={record.ram_file_on_host},"
        "share=on",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.kernel_cmdline(),
        "-add-fd", f"fd={inherited.console},set={CONSOLE_FDSET},opaque=console",
        "-chardev", f"file,id=console,path=/dev/fdset/{CONSOLE_FDSET}",
        "-serial", "chardev:console",
        "-netdev", f"tap,id=net0,fd={inherited.tap}",
        # romfile= leaves out the PXE option ROM: less non-shared RAM for QEMU to migrate.
        "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac},romfile=",
        # Two ports (0 is kept for a console), not the default 31: every virtqueue gets an
        # ioeventfd when the VM starts running, ~64 of them by default. On a destination
        # that crossed 64 open fds inside `cont`, and growing a threaded process's fd
        # table waits for an RCU grace period: 10-25 ms more downtime, measured.
        "-device", "virtio-serial-pci,id=vser0,max_ports=2",
        "-chardev", f"socket,id=agent,fd={inherited.agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-chardev", f"socket,id=qmp,fd={inherited.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if record.incoming:
        argv += ["-incoming", "defer"]
    argv += ["-sandbox", SANDBOX]
    return argv


def command(record: VMRecord, inherited: Inherited, *, userfaultfd: bool = False) -> list[str]:
    """QEMU's command line, run as ``QEMU_USER``; the caller prefixes the host's
    namespace entry, which must come first (setns needs root).

    ``userfaultfd`` only for the destination of QEMU's own postcopy baseline, which needs
    a userfaultfd for kernel faults: /dev/userfaultfd, through ``USERFAULTFD_GROUP``.
    (QEMU 7.2 knew no /dev/userfaultfd; that destination kept root then.)"""
    user = unprivileged_argv(qemu_user(), userfaultfd=userfaultfd)
    return [*user, *qemu_argv(record, inherited)]


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a QEMU that crashed: nobody listens there any more
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _for_qemu(record: VMRecord, user: pwd.struct_passwd) -> Iterator[Inherited]:
    """Open what QEMU inherits, and close our copies afterwards: a listener or tap queue
    we kept open would outlive QEMU (and a QMP connect would wait on it forever).

    Also creates the RAM file, lent to ``user`` (see the module docstring)."""
    with contextlib.ExitStack() as ours:
        qmp = ours.enter_context(_listen(record.qmp_socket))
        agent = ours.enter_context(_listen(record.agent_socket))
        tap = bridge.open_tap(record.spec.tap)
        ours.callback(os.close, tap)
        console = os.open(record.console_log,
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        ours.callback(os.close, console)
        # A stale file would hand its old bytes to the new guest; by now the registry
        # lock has made sure no copy of this VM runs on this host.
        with contextlib.suppress(FileNotFoundError):
            record.ram_file.unlink()
        ram = os.open(record.ram_file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchown(ram, user.pw_uid, user.pw_gid)
        finally:
            os.close(ram)
        yield Inherited(qmp=qmp.fileno(), agent=agent.fileno(), tap=tap, console=console)


def _take_back_ram_file(record: VMRecord) -> None:
    """QEMU has opened its RAM file (it answers QMP only once its machine is built), so
    the file goes back to root: QEMU keeps its descriptor, no other QEMU gets one."""
    os.chown(record.ram_file, os.geteuid(), os.getegid())


def _tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    """Serialises name and IP allocation between concurrent ``vm start`` calls."""
    paths.run_dir().mkdir(parents=True, exist_ok=True)
    with (paths.run_dir() / "registry.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def records() -> list[VMRecord]:
    """Every VM copy recorded on the hosts this process sees (a daemon: its own), in
    name order."""
    found = []
    for host in paths.visible_hosts():
        for path in sorted((paths.host_dir(host) / "vms").glob("*/vm.json")):
            try:
                record = VMRecord.load(path)
            except (OSError, ValueError, KeyError):
                continue  # written half-way by a crashed process; its daemon sweeps it
            if record.host == host:
                found.append(record)
    return sorted(found, key=lambda r: (r.spec.name, r.host))


def find(name: str) -> VMRecord:
    matches = [r for r in records() if r.spec.name == name]
    if not matches:
        raise VMNotFound(name)
    # During a migration two copies exist; the running one (not -incoming) is the VM.
    return next((r for r in matches if not r.incoming), matches[0])


def new_spec(name: str, image: Image, *, ip: IPv4Address, mem_mib: int, workload: Workload,
             options: tuple[tuple[str, str], ...] = (), prefix: int = 24, mac: str = ""
             ) -> VMSpec:
    """The spec of a new VM booting ``image`` at ``ip``."""
    return VMSpec(name=name, ip=ip, mem_mib=mem_mib, workload=workload, image=image.name,
                  kernel=image.kernel, initrd=image.initrd, options=options, prefix=prefix,
                  mac=mac, image_digest=image.digest)


def spec_here(spec: VMSpec, host: str) -> VMSpec:
    """``spec`` booting this host's copy of its image, which must be the very same.
    Refuses, naming the image and the fix, when it is missing or differs."""
    try:
        image = Image.load(spec.image)
    except SetupError as exc:
        raise SetupError(f"image {spec.image!r} is not on {host} ({exc}); build it there "
                         f"with 'livemig image build --name {spec.image}' as on the "
                         f"source") from None
    if spec.image_digest and image.digest != spec.image_digest:
        raise SetupError(f"image {spec.image!r} on {host} (digest {image.digest[:12]}) is "
                         f"not the source's ({spec.image_digest[:12]}); build the same "
                         f"image on both: 'livemig image build --name {spec.image}' from "
                         f"the same recipe and release")
    return dataclasses.replace(spec, kernel=image.kernel, initrd=image.initrd)


class VM:
    """One QEMU process and our handles on it: QMP, the agent, and the RAM mapping."""

    def __init__(self, record: VMRecord, process: subprocess.Popen[bytes] | None = None) -> None:
        self.record = record
        self._process = process  # only when we started it: then we must reap it
        self.qmp = QMPClient(record.spec.name)
        self.agent = AgentClient(record.spec.name, record.agent_socket)
        self._memory: GuestMemory | None = None

    @property
    def name(self) -> str:
        return self.record.spec.name

    @property
    def pid(self) -> int:
        return self.record.pid

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    async def start(
        cls, spec: VMSpec, host: str, *, incoming: bool = False, wait_ready: bool = True,
        userfaultfd: bool = False,
    ) -> VM:
        """Start QEMU for ``spec`` on ``host``; unless ``incoming``, wait for the workload.
        ``userfaultfd``: see ``command``."""
        here = config.require()
        if host != here.name:
            raise VMError(spec.name, f"this is {here.name}, not {host}: a VM starts on its "
                                     f"host, by that host's daemon")
        with _registry_lock():
            for other in records():
                if other.spec.name == spec.name and other.host == host:
                    raise VMExists(spec.name, host)
                if other.spec.name == spec.name and not incoming:
                    raise VMExists(spec.name, other.host)
            record = VMRecord(spec=spec, host=host, pid=0, incoming=incoming)
            record.directory.mkdir(parents=True, exist_ok=True)
            record.save()  # reserves the name and IP before QEMU exists
        vm = cls(record)
        try:
            # Root's alone: QEMU never looks inside, it inherits what it needs from here.
            os.chmod(record.directory, 0o700)
            user = qemu_user()
            # pyroute2's sync API runs its own event loop, so netlink work goes to a thread.
            await asyncio.to_thread(bridge.add_tap, here.bridge, spec.tap)
            env = dict(os.environ)
            shim = dirtylog.qemu_preload()
            if shim is not None:  # every QEMU may become a migration source, even a destination
                env["LD_PRELOAD"] = str(shim)
            with (_for_qemu(record, user) as inherited,
                  record.stderr_log.open("wb") as stderr):
                process = subprocess.Popen(
                    command(record, inherited, userfaultfd=userfaultfd),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    pass_fds=inherited.numbers(),
                    start_new_session=True,  # Ctrl-C in the CLI must not reach QEMU
                )
            vm = cls(VMRecord(spec=spec, host=host, pid=process.pid, incoming=incoming), process)
            vm.record.save()
            await vm._connect_qmp(timeout=15.0)
            _take_back_ram_file(record)
            if wait_ready and not incoming:
                await vm.wait_ready(BOOT_TIMEOUT_S)
        except BaseException:
            await vm._destroy(kill_pid=vm.record.pid or None)
            raise
        return vm

    @classmethod
    async def attach(cls, record: VMRecord, timeout: float = 5.0) -> VM:
        """Take hold of a VM that a previous process started."""
        vm = cls(record)
        vm._check_alive()
        await vm._connect_qmp(timeout=timeout)
        return vm

    async def close(self) -> None:
        """Let go of the VM without stopping it."""
        await self.agent.close()
        # A QEMU that died leaves qemu.qmp's reader with EOFError, which disconnect()
        # raises again: the connection is gone either way.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.qmp.disconnect()
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def disown(self) -> None:
        """Let QEMU outlive this handle: a VM started here that others attach to later
        by its record. Its Popen goes (whose finaliser would warn that QEMU still runs);
        ``_exited`` reaps QEMU by PID once it ends."""
        if self._process is not None:
            self._process.returncode = 0  # all Popen's finaliser looks at
            self._process = None

    async def stop(self) -> None:
        """End QEMU and remove everything this copy of the VM had on its host."""
        await self._destroy(kill_pid=self.pid)

    async def _destroy(self, kill_pid: int | None) -> None:
        await self.close()
        if kill_pid and (self.record.process_alive() or self._process is not None):
            await _end_process(kill_pid, self.record, self._process)
        own = config.current()
        if own is not None and own.name == self.record.host:  # a tap is its host's to remove
            await asyncio.to_thread(bridge.del_tap, self.record.spec.tap)
        with contextlib.suppress(FileNotFoundError):
            self.record.ram_file.unlink()
        # The logs go too: a stopped VM leaves nothing behind. (Fixtures copy them first.)
        shutil.rmtree(self.record.directory, ignore_errors=True)

    # -- QMP ----------------------------------------------------------------------------

    async def _connect_qmp(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if time.monotonic() > deadline:
                raise GuestTimeout(self.name, "QMP connection", timeout)
            # We bound the socket before QEMU started, so a connection may wait in its
            # backlog until QEMU, its machine built, greets: bounded by the deadline.
            if self.record.qmp_socket.exists():
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                        await self.qmp.connect(str(self.record.qmp_socket))
                    return
                except (QMPError, TimeoutError) as exc:
                    if time.monotonic() > deadline:
                        # QEMU serves one QMP client at a time: another livemig process
                        # (a 'vm start' still waiting, a migration) may hold it.
                        raise VMError(self.name, f"cannot reach QMP of VM {self.name!r} "
                                      f"within {timeout:g} s ({exc}); another livemig "
                                      f"process may be using it") from exc
            await asyncio.sleep(0.05)

    async def qmp_command(self, command: str, **arguments: Any) -> Any:
        self._check_alive()
        try:
            async with asyncio.timeout(QMP_TIMEOUT_S):
                return await self.qmp.execute(command, arguments or None)
        except TimeoutError as exc:
            raise VMError(self.name, f"QEMU of VM {self.name!r} did not answer QMP {command} "
                                     f"within {QMP_TIMEOUT_S:g} s") from exc
        except QMPError as exc:
            self._check_alive()  # a crash explains the failure better than QMP can
            raise VMError(self.name, f"QMP {command} failed on VM {self.name!r}: {exc}") from exc

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a copy of ``fd`` (SCM_RIGHTS on the QMP socket) as ``name``, for a
        ``fd:NAME`` migration URI. QEMU holds it for this QMP connection only."""
        self._check_alive()
        try:
            self.qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise VMError(self.name, f"could not pass a descriptor to VM {self.name!r}: "
                                     f"{exc}") from exc
        await self.qmp_command("getfd", fdname=name)

    async def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``inmigrate``, ``postmigrate``, ..."""
        result = await self.qmp_command("query-status")
        return str(result["status"])

    async def pause(self) -> float | None:
        """Stop the vCPUs; when they stopped, by QEMU's STOP event (CLOCK_REALTIME, s), or
        None if they were stopped already."""
        return await self._run_state_change("stop", "STOP")

    async def resume(self) -> float | None:
        """Run the vCPUs; when they started, by QEMU's RESUME event (CLOCK_REALTIME, s)."""
        return await self._run_state_change("cont", "RESUME")

    async def _run_state_change(self, command: str, event_name: str) -> float | None:
        # QEMU emits the event inside the command, before its reply: listening from
        # before the command, the event is queued by the time the reply is in. The
        # event's own time stamp is when the vCPUs stopped or started, free of the QMP
        # round trip and of this process's scheduling.
        with self.qmp.listener(event_name) as events:
            await self.qmp_command(command)
            try:
                event = await asyncio.wait_for(events.get(), EVENT_AFTER_REPLY_S)
            except TimeoutError:
                return None  # no change of run state: it already was as asked
        return event_time(event)

    async def migration_ended(self, timeout: float,
                              alongside: asyncio.Future[Any] | None = None) -> dict[str, Any]:
        """QEMU's ``query-migrate`` once its migration has ended ("completed", "failed" or
        "cancelled"), woken by MIGRATION events instead of polling (the ``events``
        capability must be on). If ``alongside``, a task the migration depends on,
        fails first, its exception is raised: QEMU would wait on it for ever."""
        async with asyncio.timeout(timeout):
            with self.qmp.listener("MIGRATION") as events:
                # Subscribed first, then asked: an end reached before we listened shows
                # in the answer, one reached after it in an event.
                info: dict[str, Any] = await self.qmp_command("query-migrate")
                while info.get("status") not in MIGRATION_ENDED:
                    await _event_or_failure(events, alongside)
                    if alongside is not None and alongside.done():
                        alongside = None  # it finished cleanly; only QEMU is left
                    info = await self.qmp_command("query-migrate")
        return info

    # -- guest --------------------------------------------------------------------------

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait until the guest's workload serves; returns the agent's status."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeout(
                    self.name, "workload ready", timeout, _tail(self.record.console_log)
                )
            self._check_alive()
            try:
                status = await self.agent.status(timeout=min(remaining, 2.0))
            except GuestTimeout:
                continue  # still booting: the agent has not opened its port yet
            except AgentError:
                # A guest that panics ends QEMU (panic=-1, -no-reboot), and the agent's
                # socket is reset on the way out: QEMU's exit, with the console's last
                # words, explains it; a reset says nothing.
                for _ in range(40):
                    self._check_alive()
                    await asyncio.sleep(0.05)
                raise
            if status.get("ready"):
                return status
            await asyncio.sleep(0.1)

    @property
    def memory(self) -> GuestMemory:
        """The guest's RAM, mapped on first use and kept: writable only on a destination."""
        if self._memory is None:
            spec = self.record.spec
            self._memory = GuestMemory(
                self.record.ram_file, spec.ram_bytes, writable=self.record.incoming
            )
        return self._memory

    def console(self) -> str:
        return self.record.console_log.read_text(errors="replace")

    async def wait_exited(self) -> None:
        """Until QEMU's process has ended, woken by the kernel (a pidfd becomes readable
        when its process exits), not by polling."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, _resolve, ended)
        try:
            await ended
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    def nic_sent_bytes(self) -> int | None:
        # What the host receives on the tap is what the guest sent.
        return interface_counters(self.record.spec.tap).get("rx_bytes")

    def exited(self) -> bool:
        try:
            self._check_alive()
        except QEMUCrashed:
            return True
        return False

    def _check_alive(self) -> None:
        if self._process is not None:
            returncode = self._process.poll()
            alive = returncode is None
        else:
            returncode = None
            alive = self.record.process_alive()
        if not alive:
            raise QEMUCrashed(
                self.name,
                returncode,
                _tail(self.record.stderr_log),
                _tail(self.record.console_log),
            )


def _exited(record: VMRecord, process: subprocess.Popen[bytes] | None) -> bool:
    if process is not None:
        return process.poll() is not None
    # A QEMU this process started in an earlier role (a daemon's destination VM) is our
    # child: reap it, or it stays a zombie. Anyone else's child is reaped by its parent.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(record.pid, os.WNOHANG)
    return not record.process_alive()  # gone, or a zombie: either way it has exited


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def event_time(event: Any) -> float:
    """A QMP event's time stamp: QEMU's CLOCK_REALTIME when it happened, in seconds."""
    stamp = event["timestamp"]
    return int(stamp["seconds"]) + int(stamp["microseconds"]) / 1e6


async def _event_or_failure(events: EventListener,
                            alongside: asyncio.Future[Any] | None) -> None:
    """Until ``events`` has an event or ``alongside`` is done; raises what it raised."""
    if alongside is None:
        await events.get()
        return
    next_event = asyncio.ensure_future(events.get())
    try:
        await asyncio.wait({next_event, alongside}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not next_event.done():
            next_event.cancel()
    if alongside.done() and not alongside.cancelled():
        failure = alongside.exception()
        if failure is not None:
            raise failure


async def _end_process(
    pid: int, record: VMRecord, process: subprocess.Popen[bytes] | None, grace_s: float = 5.0
) -> None:
    """SIGTERM (QEMU then exits cleanly), SIGKILL after ``grace_s``, without blocking the
    event loop: a daemon serves other migrations meanwhile."""
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
            if signum == signal.SIGTERM:
                # A stopped QEMU (SIGSTOP, a debugger) would hold SIGTERM pending for the
                # whole grace period: let it act on it now.
                os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if _exited(record, process):
                return
            await asyncio.sleep(0.01)


def interface_counters(name: str) -> dict[str, int]:
    """An interface's byte counters in this process's network namespace (empty if it
    has none of that name). /proc/self/net/dev follows the namespace, where /sys/class/net
    shows that of whoever mounted /sys."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return {}
    for line in lines:
        iface, _, fields = line.partition(":")
        if iface.strip() == name:
            values = fields.split()
            return {"rx_bytes": int(values[0]), "tx_bytes": int(values[8])}
    return {}
