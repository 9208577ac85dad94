"""``livemig daemon --config FILE``: a host's daemon.

Everything it knows of where it stands comes from its configuration (``config``): its
name, which its certificate must bear, its address, its bridge, its directories and its
peers. It owns its host's VMs: it starts, lists and stops them, and shows their consoles,
for the CLI; nothing else on the host touches them.

It listens in two places. The CLI talks to it on a root-only Unix socket
(``daemon.control``). Peer daemons reach it over TCP on the host's address, and
every peer connection must pass mutual TLS (a host certificate of our CA, ``wire.tls``)
and then the HMAC handshake of ``wire.frames`` before any of its requests reaches a
``DestinationSession``. As a source it connects the same way and requires the target's
certificate to name the target. Both ways the peer's certificate must not be on our CA's
CRL, read again whenever it changes (``tls.Contexts``): revoking a host takes effect at
the next connection, with no restart. ``--insecure-plaintext`` drops TLS, loudly. The
migrations it drives as a source run as tasks, one per VM, so ``cancel`` can stop one at
any stage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Coroutine
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
from cryptography import x509

from livemig import config, keys, paths
from livemig.daemon import control, memstats, remote
from livemig.daemon.history import SwitchoverHistory
from livemig.errors import LivemigError, MigrationError, VMExists
from livemig.image import builder
from livemig.migration import source
from livemig.migration.destination import DestinationSession, Incoming
from livemig.migration.source import MigrationOptions, SourceMigration
from livemig.vm import qemu
from livemig.vm.spec import VMRecord, VMSpec, Workload
from livemig.wire import channel, frames, messages, tls
from livemig.wire.channel import Channel
from livemig.wire.messages import Failed, Migrate, MigrationReport

log = logging.getLogger("livemigd")

SETTLE_RETRY_S = 10.0
CONSOLE_POLL_S = 0.2
# A console reply in one frame, were every byte escaped (\u001b, 6 bytes): within
# the wire's MAX_JSON_BYTES.
CONSOLE_CHUNK_BYTES = 8 << 10
INFO_QMP_TIMEOUT_S = 1.0  # a VM whose QMP another holds (a migration) is "unreachable"
PEER_FIRST_MESSAGE_S = 10.0  # a peer that connects and says nothing is dropped


PLAINTEXT_WARNING = (
    "running with --insecure-plaintext: peers are not authenticated by certificate, and "
    "guest memory and device state cross the network readable and forgeable by anyone on "
    "it; only the shared key vouches for a peer. Never use this on a real network."
)


class Daemon:
    def __init__(self, here: config.HostConfig, key: bytes,
                 tls_files: keys.HostFiles | None) -> None:
        """``tls_files`` None: plaintext, only by the operator's explicit choice."""
        self.config = here
        self.host = here.name
        self.key = key
        self.tls = tls.Contexts(tls_files) if tls_files is not None else None
        self.ip = str(here.address)
        self.migrations: dict[str, tuple[asyncio.Task[Outcome], SourceMigration]] = {}
        self.history = SwitchoverHistory(paths.state_dir(self.host) / "switchovers.jsonl")
        self.incoming = Incoming(self.host)
        # Addresses handed to VMs whose start is under way: not yet in any record.
        self._allocating: set[IPv4Address] = set()
        # Everything the daemon runs beside its listeners: recovery, migrations both
        # ways, settling. Entered by run(); a shutdown cancels them all.
        self._tasks = asyncio.TaskGroup()
        self._ready = asyncio.Event()  # the group is entered: the handlers may use it

    async def run(self) -> None:
        path = control.socket_path(self.host)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        # Unlinking a live daemon's socket would cut it off from the CLI for good.
        if await _answers(path):
            raise LivemigError(f"a livemig daemon already serves {self.host} ({path})")
        path.unlink(missing_ok=True)
        local = await asyncio.start_unix_server(self._on_cli, str(path),
                                                limit=control.MAX_LINE_BYTES)
        os.chmod(path, 0o600)
        try:
            peers = await channel.serve(self.ip, self.config.port, key=self.key,
                                        me=self.host, handler=self._on_peer,
                                        ssl=self.tls.server if self.tls else None)
        except OSError as exc:
            local.close()
            path.unlink(missing_ok=True)
            raise LivemigError(
                f"the daemon of {self.host} cannot listen on {self.ip}:{self.config.port} "
                f"({exc.strerror}); is [host] address in {self.config.source} one of this "
                f"machine's addresses?"
            ) from exc
        # Last: the launcher takes a pid file and a socket as a daemon that is ready.
        (path.parent / "livemigd.pid").write_text(str(os.getpid()))
        log.info("livemigd on %s: control %s, peers %s:%d (%s)", self.host, path, self.ip,
                 self.config.port, "mutual TLS" if self.tls else "PLAINTEXT")
        if self.tls is None:
            log.warning(PLAINTEXT_WARNING)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with self._tasks:
                self._ready.set()
                self._spawn(self._recover(), "recovery")
                await stop.wait()
                local.close()  # no new work from here on
                peers.close()
                # Leaving the group by an exception cancels every task in it (each
                # migration puts its VM back, each incoming copy is torn down) and
                # waits for them to finish.
                raise _ShuttingDown
        except* _ShuttingDown:
            pass
        finally:
            local.close()
            peers.close()
            path.unlink(missing_ok=True)

    def _spawn(self, work: Coroutine[Any, Any, T], what: str) -> asyncio.Task[T | None]:
        """Run ``work`` in the daemon's task group. Its failure is logged, never raised:
        one migration's bug must not cancel the others."""
        async def logged() -> T | None:
            try:
                return await work
            except Exception:
                log.exception("%s failed", what)
                return None
        return self._tasks.create_task(logged())

    async def _recover(self) -> None:
        """What a previous daemon on this host left behind: incoming copies that never
        ran (its migrations died with it) go; VMs it stopped in a switchover are settled
        as their migration would have been. Every other VM is simply ours again."""
        await self.incoming.remove_orphans()
        for record in qemu.records():
            if record.host == self.host and not record.incoming:
                await self._settle(record)

    async def _settle(self, record: VMRecord) -> None:
        """Settle ``record``'s switchover, if a journal says it was in one; an in-doubt
        commit is asked about again every SETTLE_RETRY_S until its target answers."""
        while (entry := source.read_journal(record)) and record.process_alive():
            try:
                vm = await qemu.VM.attach(record)
                try:
                    settled, what = await source.recover_switchover(
                        vm, self._connector(entry.target))
                finally:
                    await vm.close()
                log.log(logging.INFO if settled else logging.WARNING, "%s", what)
                if settled:
                    return
            except (LivemigError, OSError, ValueError, KeyError) as exc:
                log.error("could not settle %s: %s", record.spec.name, exc)
            await asyncio.sleep(SETTLE_RETRY_S)

    def _connector(self, target: str) -> source.Connect:
        """Fresh authenticated connections to ``target``'s daemon, each with the TLS
        files as they are now (a KeysError if our own certificate is revoked)."""
        async def connect() -> Channel:
            # Looked up at each connection: an inventory edit or a DNS change applies.
            ip = await asyncio.to_thread(self.config.peer_address, target)
            return await channel.connect(
                ip, self.config.port, key=self.key, me=self.host,
                ssl=self.tls.client() if self.tls else None, peer_name=target, timeout=10.0)
        return connect

    # -- peers ----------------------------------------------------------------------------

    async def _on_peer(self, peer: Channel) -> None:
        # In the daemon's task group, so that a shutdown tears the session down; the
        # peer server's task only waits for it.
        await self._ready.wait()
        await self._spawn(self._serve_peer(peer), "peer connection")

    async def _serve_peer(self, peer: Channel) -> None:
        try:
            first = await peer.recv(timeout=PEER_FIRST_MESSAGE_S)
            if isinstance(first, frames.Request) and first.kind == "control":
                await self._serve_control_call(peer, first)
                return
            await DestinationSession(self.host, peer, self.incoming).serve(first)
        except LivemigError as exc:
            log.warning("incoming migration ended: %s", exc)
        finally:
            memstats.give_back()
            await peer.close()

    async def _serve_control_call(self, peer: Channel, frame: frames.Request) -> None:
        """A control request from another host, which the channel has authenticated."""
        call = messages.read_request(frame, peer.peer)
        assert isinstance(call, messages.ControlCall)
        log.info("%s asks: %s", peer.peer, type(call.request).__name__)
        replies = _ChannelReplies(peer)
        try:
            try:
                await self._answer(call.request, replies)
            except LivemigError as exc:
                replies.post(Failed(message=str(exc)))
            await replies.flush()
        except ConnectionError:
            log.info("%s hung up before the last reply", peer.peer)  # Ctrl-C on --follow

    # -- the CLI --------------------------------------------------------------------------

    async def _on_cli(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        replies = _StreamReplies(writer)
        try:
            line = await reader.readline()
            await self._answer(messages.decode_control_request(line), replies)
            await replies.flush()
        except LivemigError as exc:
            with contextlib.suppress(OSError):
                replies.post(Failed(message=str(exc)))
                await replies.flush()
        except OSError:
            pass  # the CLI went away; a running migration goes on without it
        finally:
            writer.close()

    async def _answer(self, request: messages.ControlRequest, replies: Replies) -> None:
        match request:
            case messages.Ping():
                replies.post(messages.Pong(host=self.host))
            case messages.MemoryQuery():
                replies.post(memstats.report())
            case Migrate() as request:
                await self._migrate(request, replies)
            case messages.Cancel(vm=vm):
                replies.post(self._cancel(vm))
            case messages.StartVM() as request:
                replies.post(await self._start_vm(request))
            case messages.StartIncoming() as request:
                replies.post(await self._start_incoming(request))
            case messages.StopVM(vm=vm):
                replies.post(await self._stop_vm(vm))
            case messages.PauseVM(vm=vm, resume=resume):
                replies.post(await self._pause_vm(vm, resume))
            case messages.ListVMs():
                replies.post(messages.VMs(vms=[vm async for vm in self._vms()]))
            case messages.Console(vm=vm, follow=follow):
                await self._console(vm, follow, replies)

    def _cancel(self, vm: str) -> messages.Cancelled | Failed:
        task, engine = self.migrations.get(vm, (None, None))
        if task is None or engine is None or task.done():
            return Failed(message=f"no migration of {vm!r} runs on {self.host}")
        if (refused := engine.refuse_cancel()) is not None:
            return Failed(message=refused)
        task.cancel()
        return messages.Cancelled(vm=vm)

    async def _migrate(self, request: Migrate, replies: Replies) -> None:
        name, target = request.vm, request.to
        if name in self.migrations and not self.migrations[name][0].done():
            raise LivemigError(f"{name} is already migrating")
        record = qemu.find(name)
        if target == self.host:
            raise LivemigError(f"{name} already runs on {target}")
        if record.incoming:
            raise LivemigError(f"{name} is incoming here, not running: it runs elsewhere")
        await asyncio.to_thread(self.config.peer_address, target)  # a peer we can name
        # Validated when the line was decoded: the units are converted here, once.
        options = MigrationOptions.of(request.options,
                                      self.history.switchover_cost_s(target, name),
                                      self.history.final_collect_s(target, name))

        def progress(update: messages.Progress) -> None:
            replies.post(update)

        vm = await qemu.VM.attach(record)
        migration = SourceMigration(
            vm,
            source_host=self.host,
            target_host=target,
            connect=self._connector(target),
            options=options,
            on_progress=progress,
        )
        await self._ready.wait()
        task = self._tasks.create_task(_outcome(migration))
        self.migrations[name] = (task, migration)
        try:
            # shield: the CLI hanging up must not cancel the migration; only 'cancel' does
            outcome = await asyncio.shield(task)
            if isinstance(outcome, Exception):
                raise outcome
            self.history.record(outcome)
            replies.post(messages.Migrated(report=outcome))
        except MigrationError as exc:
            if exc.vm_runs_on is None:  # the commit is in doubt: keep asking the target
                self._spawn(self._settle(record), f"settling {name}")
            replies.post(Failed(message=str(exc), stage=exc.stage, vm_runs_on=exc.vm_runs_on))
        except Exception as exc:  # a bug: the engine has put the VM back; say so plainly
            log.exception("migration of %s failed", name)
            replies.post(Failed(
                vm_runs_on=record.host, stage=migration.stage.value,
                message=f"migration of {name} failed with an internal error ({exc!r}); "
                        f"it runs on {record.host}; see {self.host}'s livemigd.log",
            ))
        finally:
            if task.done():
                self.migrations.pop(name, None)
                await vm.close()
                memstats.give_back()


    # -- the host's VMs ----------------------------------------------------------------------

    def _mine(self, name: str) -> list[VMRecord]:
        return [r for r in qemu.records() if r.spec.name == name]

    async def _info(self, record: VMRecord, vm: qemu.VM | None = None) -> messages.VMInfo:
        """``record``'s copy as it stands; ``vm``: a handle on it that we hold already
        (QEMU serves one QMP client at a time)."""
        if not record.process_alive():
            state = "dead"
        elif vm is not None:
            state = await vm.status()
        else:
            try:
                vm = await qemu.VM.attach(record, timeout=INFO_QMP_TIMEOUT_S)
            except LivemigError:
                state = "unreachable"  # QEMU serves one QMP client: a migration holds it
            else:
                try:
                    state = await vm.status()
                finally:
                    await vm.close()
        spec = record.spec
        return messages.VMInfo(name=spec.name, host=record.host, ip=str(spec.ip),
                               mac=spec.mac, state=state,
                               copy="incoming" if record.incoming else "primary",
                               workload=str(spec.workload), mem_mib=spec.mem_mib,
                               pid=record.pid)

    async def _vms(self) -> AsyncIterator[messages.VMInfo]:
        for record in qemu.records():
            yield await self._info(record)

    async def _name_and_address(self, name: str, wanted: str | None) -> IPv4Address:
        """Check that no VM of this host or of its peers is called ``name``, and give
        ``wanted`` if none of them has it, else the pool's first address none has.

        A peer that does not answer may run a VM of this pool (one migrated there), so
        then no pool address is handed out; a name it may hold would only be refused
        later, by its reservation, if that VM ever came here."""
        here = qemu.records()
        if any(r.spec.name == name for r in here):
            raise VMExists(name, self.host)
        others, silent = await self._peers_vms()
        if (twin := next((vm for vm in others if vm.name == name), None)) is not None:
            raise VMExists(name, twin.host)
        used = ({r.spec.ip for r in here} | self._allocating
                | {IPv4Address(vm.ip) for vm in others})
        if wanted is not None:
            ip = IPv4Address(wanted)
            if ip in used:
                raise LivemigError(f"{ip} is taken by another VM; 'livemig vm list --all' "
                                   f"shows which")
            return ip
        if silent:
            peer, why = next(iter(silent.items()))
            raise LivemigError(
                f"cannot hand out an address of {self.host}'s pool: {peer} does not answer "
                f"({why}), and a VM of this pool may run there; bring {peer} back, or give "
                f"the address with --ip")
        for ip in self.config.vm_pool:
            if ip not in used:
                return ip
        raise LivemigError(f"all {len(self.config.vm_pool)} addresses of {self.host}'s pool "
                           f"({self.config.vm_pool}) are in use; stop a VM, or give one "
                           f"with --ip")

    async def _peers_vms(self) -> tuple[list[messages.VMInfo],
                                        dict[str, LivemigError | OSError]]:
        """The VMs every peer of the inventory runs, and the peers that did not answer."""

        async def ask(peer: str) -> list[messages.VMInfo]:
            return await remote.list_vms(self.config, self.key, self.tls, peer)

        return await remote.vms_of(sorted(self.config.peers), ask)

    async def _start_vm(self, request: messages.StartVM) -> messages.VMDone:
        workload = Workload(request.workload)
        image = builder.Image.load(request.image)
        ip = await self._name_and_address(request.name, request.ip)
        self._allocating.add(ip)
        try:
            spec = qemu.new_spec(request.name, image, ip=ip, mem_mib=request.mem_mib,
                                 workload=workload, options=tuple(request.options),
                                 prefix=self.config.vm_network.prefixlen,
                                 mac=request.mac or "")
            vm = await qemu.VM.start(spec, self.host)
        finally:
            self._allocating.discard(ip)
        return await self._started(vm)

    async def _start_incoming(self, request: messages.StartIncoming) -> messages.VMDone:
        spec = qemu.spec_here(VMSpec.from_json(msgspec.structs.asdict(request.spec)),
                              self.host)
        vm = await qemu.VM.start(spec, self.host, incoming=True,
                                 userfaultfd=request.userfaultfd)
        return await self._started(vm)

    async def _started(self, vm: qemu.VM) -> messages.VMDone:
        vm.disown()  # QEMU runs on; whoever asked attaches to it by its record
        try:
            return messages.VMDone(vm=await self._info(vm.record, vm),
                                   spec=messages.VMSpecFields(**vm.record.spec.to_json()))
        finally:
            await vm.close()

    async def _stop_vm(self, name: str) -> messages.VMDone:
        copies = self._mine(name)
        if not copies:
            raise LivemigError(f"no VM named {name!r} runs on {self.host}")
        if name in self.migrations and not self.migrations[name][0].done():
            raise LivemigError(f"{name} is migrating; 'livemig cancel {name}' first")
        for record in copies:
            await qemu.VM(record).stop()
        return messages.VMDone(vm=None)

    async def _pause_vm(self, name: str, resume: bool) -> messages.VMDone:
        record = qemu.find(name)
        vm = await qemu.VM.attach(record)
        try:
            await (vm.resume() if resume else vm.pause())
        finally:
            await vm.close()
        return messages.VMDone(vm=await self._info(record))

    async def _console(self, name: str, follow: bool, replies: Replies) -> None:
        """The console log from its start; with ``follow``, what comes after, until the
        VM's QEMU ends here (it stopped, or moved away) or the client hangs up."""
        record = qemu.find(name)
        position = 0
        while True:
            try:
                with record.console_log.open("rb") as f:
                    f.seek(position)
                    chunk = f.read(CONSOLE_CHUNK_BYTES)
            except FileNotFoundError:
                chunk = b""
            if chunk:
                position += len(chunk)
                replies.post(messages.ConsoleText(text=chunk.decode(errors="replace")))
                await replies.flush()  # raises once the client has gone: the loop ends
                continue
            if not follow:
                why = "end of the console so far"
                break
            if not record.process_alive():
                moved = [r.host for r in self._mine(name) if r.process_alive()]
                why = (f"{name} ended on {self.host}" if not moved
                       else f"{name} runs elsewhere now")
                break
            await asyncio.sleep(CONSOLE_POLL_S)
        replies.post(messages.ConsoleEnd(why=why))


class Replies(Protocol):
    """Where a request's replies go: the CLI's socket, or a peer's channel."""

    def post(self, reply: messages.ControlReply) -> None:
        """Queue ``reply``; never blocks (progress comes from the engine's loop)."""

    async def flush(self) -> None:
        """Wait until what was posted is sent; OSError once the asker has gone."""


class _StreamReplies:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def post(self, reply: messages.ControlReply) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # the CLI went: nobody to tell
            self.writer.write(messages.encode_control(reply))

    async def flush(self) -> None:
        await self.writer.drain()


class _ChannelReplies:
    """Replies as Reply frames, sent in order by one task, so that ``post`` never waits.
    The first answers the ``ControlCall``, each later one the caller's ``ControlMore``."""

    def __init__(self, peer: Channel) -> None:
        self.peer = peer
        self._queue: list[messages.ControlReply] = []
        self._sender: asyncio.Task[None] | None = None
        self._gone: BaseException | None = None
        self._answered = False  # the ControlCall: each later reply waits to be asked for

    def post(self, reply: messages.ControlReply) -> None:
        if self._gone is not None:
            return
        self._queue.append(reply)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all())

    async def _send_all(self) -> None:
        try:
            while self._queue:
                if self._answered:
                    asked = await self.peer.recv(timeout=remote.REPLY_TIMEOUT_S)
                    if not (isinstance(asked, frames.Request) and asked.kind == "more"):
                        raise frames.RemoteProtocolError(
                            self.peer.peer, f"sent {type(asked).__name__} where the next "
                                            f"reply was to be asked for", "Request")
                await self.peer.send(messages.control_reply_frame(self._queue.pop(0)))
                self._answered = True
        except (frames.WireError, OSError) as exc:
            self._gone = exc
            self._queue.clear()

    async def flush(self) -> None:
        if self._sender is not None:
            await self._sender
        if self._gone is not None:
            raise ConnectionError(f"the asker went away ({self._gone})")


class _ShuttingDown(Exception):
    """Raised inside the daemon's task group to end it: see ``Daemon.run``."""


T = TypeVar("T")
Outcome = MigrationReport | Exception


async def _outcome(migration: SourceMigration) -> Outcome:
    """A migration's report, or what it failed with: returned, not raised, because a
    task that raises in a task group cancels all the others."""
    try:
        return await migration.run()
    except Exception as exc:
        return exc


async def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def check_identity(here: config.HostConfig, files: keys.HostFiles) -> None:
    """The certificate must name the host the configuration names: peers know a daemon
    by its certificate, and would otherwise take it for another host."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise LivemigError(f"cannot read this host's certificate {files.cert} ({exc})") from exc
    named = keys.host_of(cert)
    if named != here.name:
        raise config.ConfigError(None,
            f"{files.cert} names host {named!r}, but {here.source} says this host is "
            f"{here.name!r}: issue it a certificate of its own name ('livemig keys host "
            f"{here.name} --dir CA'), or correct [host] name")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livemig daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH)
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help="no TLS: only for a closed test network")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    here = config.load(args.config)
    config.use(here)
    key = remote.read_key(here.peer_key)
    files = None
    if not args.insecure_plaintext:
        files = keys.HostFiles.in_dir(here.tls_dir, here.name).require()
        check_identity(here, files)
    # A LivemigError here (no TLS files, say) is one sentence: printed by the CLI, or
    # logged by __main__ below for the supervisor's log.
    asyncio.run(Daemon(here, key, files).run())
    return 0


# sysexits.h's EX_CONFIG: the configuration, keys or certificate are wrong, and starting
# again will not help (livemigd.service: RestartPreventExitStatus; lab.supervise too).
EX_CONFIG = 78

if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (config.ConfigError, keys.KeysError) as exc:
        log.error("%s", exc)
        raise SystemExit(EX_CONFIG) from None
    except LivemigError as exc:  # one line in livemigd.log, as the CLI would print it
        log.error("%s", exc)
        raise SystemExit(1) from None
