"""A host's VM taps: ports of the bridge its configuration names, in this process's own
network namespace (a daemon runs in its host's; on a real machine, the only one).

The bridge is the host's: the operator makes it, with the LAN's uplink as a port (see
docs/real-hosts.md), or the test bed does. Taps persist and are owned by root; QEMU,
unprivileged, gets a queue of one from ``open_tap``.
"""

from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import IPRoute

from livemig.errors import SetupError

_TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), from linux/if_tun.h
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def add_tap(bridge: str, tap: str) -> None:
    """A fresh tap ``tap``, up, as a port of ``bridge``."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            raise SetupError(f"this host has no bridge {bridge!r} for its VMs; make it (see "
                             f"docs/real-hosts.md), or name the right one in [host] bridge")
        for stale in ipr.link_lookup(ifname=tap):  # a crashed QEMU's
            ipr.link("del", index=stale)
        ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
        (index,) = ipr.link_lookup(ifname=tap)
        ipr.link("set", index=index, master=found[0], state="up")


def del_tap(tap: str) -> None:
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=tap):
            ipr.link("del", index=index)


def open_tap(tap: str) -> int:
    """A descriptor of ``tap``'s queue, for QEMU's ``-netdev tap,fd=N``.

    Attaching to a tap needs CAP_NET_ADMIN (or owning it), which QEMU does not have, so
    root opens the queue and QEMU inherits it. The flags are those QEMU uses when it opens
    a tap by name: no packet-information header, and the virtio-net header, so the guest
    keeps its checksum and segmentation offloads (QEMU probes the descriptor for it).
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH22x", tap.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, request)
    except OSError as exc:
        os.close(fd)
        raise SetupError(f"cannot open tap {tap}: {exc.strerror}") from exc
    return fd
