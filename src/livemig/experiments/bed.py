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

from livemig import paths
from livemig.daemon import launch
from livemig.errors import LivemigError
from livemig.image import builder
from livemig.net import testbed
from livemig.vm import qemu


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
            asyncio.run(qemu.stop_all())
        finally:
            removed = testbed.down()
            say(f"torn down: {len(removed.namespaces)} namespaces, "
                f"{len(removed.processes)} processes, {len(removed.ram_files)} RAM files")
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
