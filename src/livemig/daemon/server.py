"""``livemig daemon --host H``: the host daemon, run inside the host's namespace.

It listens in two places. The CLI talks to it on a root-only Unix socket
(``daemon.control``). Peer daemons reach it over TCP on the host's LAN address, and
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
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from livemig import keys, paths
from livemig.daemon import control, memstats
from livemig.daemon.history import SwitchoverHistory
from livemig.errors import LivemigError, MigrationError
from livemig.migration import source
from livemig.migration.destination import DestinationSession, Incoming
from livemig.migration.source import MigrationOptions, SourceMigration
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import VMRecord
from livemig.wire import channel, frames, messages, tls
from livemig.wire.channel import Channel
from livemig.wire.messages import Failed, Migrate, MigrationReport

log = logging.getLogger("livemigd")

SETTLE_RETRY_S = 10.0


PLAINTEXT_WARNING = (
    "running with --insecure-plaintext: peers are not authenticated by certificate, and "
    "guest memory and device state cross the network readable and forgeable by anyone on "
    "it; only the shared key vouches for a peer. Never use this on a real network."
)


class Daemon:
    def __init__(self, host: str, key: bytes, tls_files: keys.HostFiles | None) -> None:
        """``tls_files`` None: plaintext, only by the operator's explicit choice."""
        self.host = host
        self.key = key
        self.tls = tls.Contexts(tls_files) if tls_files is not None else None
        self.ip = str(testbed.host_node(host).ip)
        self.migrations: dict[str, tuple[asyncio.Task[Outcome], SourceMigration]] = {}
        self.history = SwitchoverHistory(paths.host_dir(host) / "switchovers.jsonl")
        self.incoming = Incoming(host)
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
            raise LivemigError(f"a livemig daemon already serves {self.host}; "
                               f"'livemig testbed down' ends it")
        path.unlink(missing_ok=True)
        local = await asyncio.start_unix_server(self._on_cli, str(path),
                                                limit=control.MAX_LINE_BYTES)
        os.chmod(path, 0o600)
        try:
            peers = await channel.serve(self.ip, control.PEER_PORT, key=self.key,
                                        me=self.host, handler=self._on_peer,
                                        ssl=self.tls.server if self.tls else None)
        except OSError as exc:
            local.close()
            path.unlink(missing_ok=True)
            raise LivemigError(
                f"the daemon of {self.host} cannot listen on {self.ip}:{control.PEER_PORT} "
                f"({exc.strerror}); it runs inside the host's namespace, where "
                f"'livemig testbed up' starts it"
            ) from exc
        # Last: the launcher takes a pid file and a socket as a daemon that is ready.
        (path.parent / "livemigd.pid").write_text(str(os.getpid()))
        log.info("livemigd on %s: control %s, peers %s:%d (%s)", self.host, path, self.ip,
                 control.PEER_PORT, "mutual TLS" if self.tls else "PLAINTEXT")
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
        ip = str(testbed.require_host(target).ip)

        async def connect() -> Channel:
            return await channel.connect(
                ip, control.PEER_PORT, key=self.key, me=self.host,
                ssl=self.tls.client() if self.tls else None, peer_name=target, timeout=10.0)
        return connect

    # -- peers ----------------------------------------------------------------------------

    async def _on_peer(self, peer: Channel) -> None:
        # In the daemon's task group, so that a shutdown tears the session down; the
        # peer server's task only waits for it.
        await self._ready.wait()
        await self._spawn(self._serve_peer(peer), "incoming migration")

    async def _serve_peer(self, peer: Channel) -> None:
        try:
            await DestinationSession(self.host, peer, self.incoming).serve()
        except LivemigError as exc:
            log.warning("incoming migration ended: %s", exc)
        finally:
            memstats.give_back()

    # -- the CLI --------------------------------------------------------------------------

    async def _on_cli(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            match messages.decode_control_request(line):
                case messages.Ping():
                    writer.write(messages.encode_control(messages.Pong(host=self.host)))
                case messages.MemoryQuery():
                    writer.write(messages.encode_control(memstats.report()))
                case Migrate() as request:
                    await self._migrate(request, writer)
                case messages.Cancel(vm=vm):
                    writer.write(messages.encode_control(self._cancel(vm)))
            await writer.drain()
        except LivemigError as exc:
            with contextlib.suppress(OSError):
                writer.write(messages.encode_control(Failed(message=str(exc))))
                await writer.drain()
        except OSError:
            pass  # the CLI went away; a running migration goes on without it
        finally:
            writer.close()

    def _cancel(self, vm: str) -> messages.Cancelled | Failed:
        task, engine = self.migrations.get(vm, (None, None))
        if task is None or engine is None or task.done():
            return Failed(message=f"no migration of {vm!r} runs on {self.host}")
        if (refused := engine.refuse_cancel()) is not None:
            return Failed(message=refused)
        task.cancel()
        return messages.Cancelled(vm=vm)

    async def _migrate(self, request: Migrate, writer: asyncio.StreamWriter) -> None:
        name, target = request.vm, request.to
        if name in self.migrations and not self.migrations[name][0].done():
            raise LivemigError(f"{name} is already migrating")
        record = qemu.find(name)
        if record.host != self.host:
            raise LivemigError(f"{name} runs on {record.host}, not on {self.host}")
        if target == self.host:
            raise LivemigError(f"{name} already runs on {target}")
        testbed.require_host(target)
        # Validated when the line was decoded: the units are converted here, once.
        options = MigrationOptions.of(request.options,
                                      self.history.switchover_cost_s(target, name),
                                      self.history.final_collect_s(target, name))

        def progress(update: messages.Progress) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(messages.encode_control(update))

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
            writer.write(messages.encode_control(messages.Migrated(report=outcome)))
        except MigrationError as exc:
            if exc.vm_runs_on is None:  # the commit is in doubt: keep asking the target
                self._spawn(self._settle(record), f"settling {name}")
            writer.write(messages.encode_control(
                Failed(message=str(exc), stage=exc.stage, vm_runs_on=exc.vm_runs_on)))
        except Exception as exc:  # a bug: the engine has put the VM back; say so plainly
            log.exception("migration of %s failed", name)
            writer.write(messages.encode_control(Failed(
                vm_runs_on=record.host, stage=migration.stage.value,
                message=f"migration of {name} failed with an internal error ({exc!r}); "
                        f"it runs on {record.host}; see {self.host}'s livemigd.log",
            )))
        finally:
            if task.done():
                self.migrations.pop(name, None)
                await vm.close()
                memstats.give_back()


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


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise LivemigError(f"cannot read the peer key {path} ({exc.strerror}); "
                           f"'livemig testbed up' creates it") from exc
    if len(key) < frames.MIN_KEY_BYTES:
        raise LivemigError(f"the peer key {path} holds {len(key)} bytes, fewer than the "
                           f"{frames.MIN_KEY_BYTES} a key needs")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livemig daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--key-file", type=Path, default=None)
    parser.add_argument("--tls-dir", type=Path, default=None,
                        help="ca.crt, ca.crl, HOST.crt and HOST.key (default: the host's own)")
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help="no TLS: only for a closed test network")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    testbed.host_node(args.host)  # a host's name, before its files are looked for
    key = _read_key(args.key_file or control.key_file())
    files = None
    if not args.insecure_plaintext:
        files = keys.HostFiles.in_dir(args.tls_dir or paths.tls_dir(args.host), args.host)
    # A LivemigError here (no TLS files, say) is one sentence: printed by the CLI, or
    # logged by __main__ below for the supervisor's log.
    asyncio.run(Daemon(args.host, key, files).run())
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except LivemigError as exc:  # one line in livemigd.log, as the CLI would print it
        log.error("%s", exc)
        raise SystemExit(1) from None
