"""A test bed that a long benchmark has to itself, and leaves nothing of behind.

Soaks and health checks run for many minutes and are stopped every way there is: an
exception, Ctrl-C, a SIGTERM from whoever started them. ``exclusive_test_bed`` gives them
a bed of their ``LIVEMIG_INSTANCE`` and takes it down again in every one of those cases:

- an instance already in use is refused (``BedInUse``), never taken over: tearing its bed
  down at the end would wreck whatever runs there;
- SIGTERM unwinds like Ctrl-C, through the same clean-up;
- a child that pyroute2 forks to reach a namespace inherits our signal handler and our
  ``finally``: there it dies as by default instead of tearing the bed down under us;
- while the clean-up runs, Ctrl-C and SIGTERM are ignored, so that a second press cannot
  leave half a bed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType

import msgspec

from livemig import paths
from livemig.daemon import control
from livemig.errors import LivemigError, VMNotFound
from livemig.image import builder
from livemig.lab import launch
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import VMRecord, VMSpec, Workload
from livemig.wire import messages

# -- VMs, through their hosts' daemons, as an operator's CLI would ------------------------


async def start_vm(name: str, image: builder.Image, host: str, *, mem_mib: int,
                   workload: Workload, options: tuple[tuple[str, str], ...] = (),
                   ip: str | None = None) -> qemu.VM:
    """Boot VM ``name`` on ``host`` (its daemon does) and take hold of it."""
    done = await control.request(host, messages.StartVM(
        name=name, workload=str(workload), mem_mib=mem_mib, image=image.name,
        options=list(options), ip=ip), messages.VMDone)
    return await qemu.VM.attach(_record(done, host))


async def start_incoming(spec: VMSpec, host: str, *, userfaultfd: bool = False) -> qemu.VM:
    """QEMU -incoming for ``spec`` on ``host``, for QEMU's own migration."""
    done = await control.request(host, messages.StartIncoming(
        spec=messages.VMSpecFields(**spec.to_json()), userfaultfd=userfaultfd),
        messages.VMDone)
    return await qemu.VM.attach(_record(done, host))


def _record(done: messages.VMDone, host: str) -> VMRecord:
    assert done.vm is not None and done.spec is not None
    spec = VMSpec.from_json(msgspec.structs.asdict(done.spec))
    return VMRecord(spec=spec, host=host, pid=done.vm.pid, incoming=done.vm.copy == "incoming")


async def stop_vm(name: str) -> None:
    """Stop every copy of ``name``, wherever it is; VMNotFound if there is none. A copy
    whose daemon does not answer (a drill killed or froze it) the lab ends itself."""
    copies = [r for r in qemu.records() if r.spec.name == name]
    if not copies:
        raise VMNotFound(name)
    for host in sorted({r.host for r in copies}):
        try:
            await control.request(host, messages.StopVM(vm=name), messages.VMDone)
        except LivemigError:
            for record in copies:
                if record.host == host:
                    await qemu.VM(record).stop()


async def stop_vm_on(name: str, host: str) -> None:
    """Stop ``host``'s copy of ``name``, and only that."""
    await control.request(host, messages.StopVM(vm=name), messages.VMDone)


async def stop_all_vms() -> list[str]:
    """Every VM of every host, stopped by its daemon; where a daemon is gone, by the lab
    (its host's namespaces go with 'down' in any case)."""
    names = sorted({r.spec.name for r in qemu.records()})
    for name in names:
        with contextlib.suppress(VMNotFound):
            await stop_vm(name)
    return names


class BedInUse(LivemigError):
    def __init__(self, namespaces: list[str]) -> None:
        super().__init__(f"instance {paths.instance()!r} is in use ({', '.join(namespaces)}): "
                         "set LIVEMIG_INSTANCE to another name, or 'livemig testbed down' if "
                         "nothing runs there")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@contextlib.contextmanager
def exclusive_test_bed(hosts: int, *, daemons: bool = True,
                       say: Callable[[str], None] = _stderr) -> Iterator[list[testbed.Node]]:
    """Bring up ``hosts`` hosts (and their daemons, if ``daemons``) with the guest image
    built, yield the nodes, and tear everything down on the way out, however it comes."""
    if busy := testbed.existing_namespaces():
        raise BedInUse(busy)
    owner = os.getpid()

    def terminate(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked child: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt  # the same clean-up path as Ctrl-C

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        try:
            builder.Image.load()
        except LivemigError:  # only when there is none: the image cache is shared
            builder.build(log=say)
        nodes = testbed.up(hosts)
        if daemons:
            launch.ensure_daemons()
        yield nodes
    finally:
        if os.getpid() != owner:  # a forked child that Ctrl-C unwound: not ours to clean
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            asyncio.run(stop_all_vms())
        finally:
            removed = testbed.down()
            say(f"torn down: {len(removed.namespaces)} namespaces, "
                f"{len(removed.processes)} processes, {len(removed.ram_files)} RAM files")
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
