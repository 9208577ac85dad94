"""A switched LAN of hosts on one machine, made of network namespaces.

    lm-client               lm-switch                     lm-hostA   (namespaces)
    eth0 10.77.0.2 ---- sw-client [lan] sw-hostA ---- uplink [br0 10.77.0.11] tap100 -- VM
                                       sw-hostB ---- uplink [br0 10.77.0.12] ...  (lm-hostB)

Every bridge learns MAC addresses as a real switch does. That is the point: after a
migration, frames for the VM reach its new port only once the VM itself has sent a frame
from there (the unsolicited ARP). Learning is never turned off to make a test pass.

The test bed keeps no state file: what exists is read back from the kernel (namespaces
named ``lm-*``), so ``up`` and ``down`` are idempotent and survive a crash half-way.
With ``LIVEMIG_INSTANCE=x`` the namespaces are ``lmx-*`` instead: a separate test bed.

Every cable to the switch has a speed, 1 Gbit/s unless ``up`` is told otherwise, shaped
at both of its ends (``net/shaping.py``); ``status`` reads it back from the qdiscs.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import fcntl
import functools
import ipaddress
import os
import shutil
import signal
import string
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from livemig import paths
from livemig.errors import TestbedError
from livemig.net import shaping
from livemig.net.shaping import Link

LAN = ipaddress.IPv4Network("10.77.0.0/24")
CLIENT_IP = IPv4Address("10.77.0.2")
FIRST_HOST_IP = IPv4Address("10.77.0.11")
VM_IPS = [IPv4Address(f"10.77.0.{n}") for n in range(100, 200)]
HOST_BRIDGE = "br0"
HOST_UPLINK = "uplink"
CLIENT_NIC = "eth0"
MAX_HOSTS = 26
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Node:
    """A machine on the LAN: a host that runs VMs, or the client that probes them."""

    name: str
    ip: IPv4Address

    @property
    def netns(self) -> str:
        return paths.netns_prefix() + self.name

    @property
    def switch_port(self) -> str:
        return f"sw-{self.name}"[:15]

    @property
    def mac(self) -> str:
        """A fixed, locally administered MAC for the node's own interface."""
        return f"02:4c:4d:00:00:{self.ip.packed[3]:02x}"

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this node. ``ip netns exec`` execs, so the PID stays argv's."""
        return ["ip", "netns", "exec", self.netns, *argv]


def host_name(index: int) -> str:
    return "host" + string.ascii_uppercase[index]


def host_node(name: str) -> Node:
    suffix = name.removeprefix("host")
    if not name.startswith("host") or len(suffix) != 1 or suffix not in string.ascii_uppercase:
        raise TestbedError(f"{name!r} is not a test bed host name; hosts are hostA, hostB, ...")
    return Node(name, FIRST_HOST_IP + string.ascii_uppercase.index(suffix))


CLIENT = Node("client", CLIENT_IP)
SWITCH = Node("switch", LAN.network_address)  # the LAN's switch: a namespace, no address


def existing_namespaces() -> list[str]:
    return sorted(ns for ns in netns.listnetns() if ns.startswith(paths.netns_prefix()))


def hosts() -> list[Node]:
    """The hosts that are up, in order."""
    names = [ns.removeprefix(paths.netns_prefix()) for ns in existing_namespaces()]
    return [host_node(n) for n in names if n.startswith("host")]


def require_host(name: str) -> Node:
    node = host_node(name)
    if node.netns not in existing_namespaces():
        up = ", ".join(h.name for h in hosts()) or "none"
        raise TestbedError(
            f"host {name!r} is not up (hosts up: {up}); run 'livemig testbed up' first"
        )
    return node


def require_client() -> Node:
    if CLIENT.netns not in existing_namespaces():
        raise TestbedError("the test bed is not up; run 'livemig testbed up' first")
    return CLIENT


def _same_netns(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def enter_client_namespace() -> None:
    """Move this (single-threaded) process into the client's namespace, if not there yet.

    Probes measure what the client sees, and must never send from the machine's own
    namespace: there, an address of the test bed's LAN would leave for the real network.
    """
    client = require_client()
    target = f"/run/netns/{client.netns}"
    if _same_netns("/proc/self/ns/net", target):
        return
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise TestbedError(f"cannot enter {client.netns}: {os.strerror(err)}")
    finally:
        os.close(fd)
    # Fail closed: a probe that stayed outside would send to the real network.
    if not _same_netns("/proc/self/ns/net", target):
        raise TestbedError(f"entering {client.netns} did not take effect; not probing")


# Inside ``_one_socket_per_namespace``: the sockets opened so far, by namespace.
_SHARED_IPR: contextvars.ContextVar[dict[str, IPRoute] | None] = contextvars.ContextVar(
    "_SHARED_IPR", default=None)


@contextlib.contextmanager
def _ipr(ns: str) -> Iterator[IPRoute]:
    shared = _SHARED_IPR.get()
    if shared is not None and ns in shared:
        yield shared[ns]
        return
    # pyroute2 reaches another namespace through a forked child that it ends with
    # SIGTERM; that child shares an asyncio process's signal wake-up fd, so the parent
    # would take the signal for its own. A daemon already inside ``ns`` needs no child.
    here = _same_netns("/proc/self/ns/net", f"/run/netns/{ns}")
    ipr = IPRoute() if here else IPRoute(netns=ns)
    if shared is not None:
        shared[ns] = ipr  # closed by _one_socket_per_namespace
        yield ipr
        return
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def _one_socket_per_namespace() -> Iterator[None]:
    """Within, ``_ipr`` opens one socket per namespace and reuses it: each costs a fork
    (~16 ms), and ``up`` would open 25 for 5 namespaces, on every test's set-up."""
    shared: dict[str, IPRoute] = {}
    token = _SHARED_IPR.set(shared)
    try:
        yield
    finally:
        _SHARED_IPR.reset(token)
        for ipr in shared.values():
            ipr.close()


def _ensure_netns(name: str) -> None:
    if name not in netns.listnetns():
        netns.create(name)
    with _ipr(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _ensure_bridge(ipr: IPRoute, ifname: str, mac: str | None = None) -> int:
    index = _link_index(ipr, ifname)
    if index is None:
        # STP off and no forward delay: a port forwards as soon as it is up. Learning and
        # ageing stay at the kernel's defaults, like an ordinary switch.
        ipr.link("add", ifname=ifname, kind="bridge", br_stp_state=0, br_forward_delay=0)
        index = _link_index(ipr, ifname)
        if mac is not None:
            # A bridge without a MAC of its own takes its lowest port's, so adding a VM's
            # tap would change the host's address under its neighbours' ARP caches.
            ipr.link("set", index=index, address=mac)
    assert index is not None
    ipr.link("set", index=index, state="up")
    return index


def _ensure_address(ipr: IPRoute, index: int, ip: IPv4Address) -> None:
    have = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
    if str(ip) not in have:
        ipr.addr("add", index=index, address=str(ip), prefixlen=LAN.prefixlen)


def _plug_into_switch(node: Node, inner_ifname: str) -> int:
    """Cable ``node`` to the LAN switch; returns the index of the node's end of the cable."""
    with _ipr(SWITCH.netns) as sw:
        lan = _ensure_bridge(sw, "lan")
        port = _link_index(sw, node.switch_port)
        if port is None:
            with _ipr(node.netns) as inner:
                stale = _link_index(inner, inner_ifname)
                if stale is not None:  # a half-made cable from an interrupted 'up'
                    inner.link("del", index=stale)
            sw.link(
                "add",
                ifname=node.switch_port,
                kind="veth",
                peer={"ifname": inner_ifname, "net_ns_fd": node.netns},
            )
            port = _link_index(sw, node.switch_port)
        assert port is not None
        sw.link("set", index=port, master=lan, state="up")
    with _ipr(node.netns) as inner:
        index = _link_index(inner, inner_ifname)
        assert index is not None
        inner.link("set", index=index, state="up")
        return index


def _ensure_host(node: Node) -> None:
    _ensure_netns(node.netns)
    uplink = _plug_into_switch(node, HOST_UPLINK)
    with _ipr(node.netns) as ipr:
        bridge = _ensure_bridge(ipr, HOST_BRIDGE, mac=node.mac)
        ipr.link("set", index=uplink, master=bridge)
        _ensure_address(ipr, bridge, node.ip)


def _ensure_client() -> None:
    _ensure_netns(CLIENT.netns)
    nic = _plug_into_switch(CLIENT, CLIENT_NIC)
    with _ipr(CLIENT.netns) as ipr:
        _ensure_address(ipr, nic, CLIENT.ip)


def _node_ifname(node: Node) -> str:
    return CLIENT_NIC if node == CLIENT else HOST_UPLINK


@functools.cache
def netem_available() -> bool:
    """Whether this kernel can add the link's latency (netem); asked of the switch."""
    with _ipr(SWITCH.netns) as ipr:
        lo = _link_index(ipr, "lo")
        assert lo is not None
        return shaping.has_netem(ipr, lo)


def _shape(node: Node, link: Link) -> None:
    """Both ends of ``node``'s cable: what it sends (its end, with the latency) and what
    it receives (the switch's port)."""
    for ns, ifname, delays in ((node.netns, _node_ifname(node), True),
                               (SWITCH.netns, node.switch_port, False)):
        with _ipr(ns) as ipr:
            index = _link_index(ipr, ifname)
            if index is None:
                raise TestbedError(f"{node.name} has no {ifname}; run 'livemig testbed up'")
            shaping.apply(ipr, index, link.end(delays=delays), f"{node.name}'s {ifname}",
                          netem=netem_available())


def link_of(node: Node) -> dict[str, object]:
    """``node``'s link as the kernel holds it: what it sends and what it receives."""
    ends: dict[str, object] = {}
    for key, ns, ifname in (("send", node.netns, _node_ifname(node)),
                            ("receive", SWITCH.netns, node.switch_port)):
        with _ipr(ns) as ipr:
            index = _link_index(ipr, ifname)
            ends[key] = None if index is None else shaping.read(ipr, index).describe()
    return ends


def up(n_hosts: int = 3, link: Link = shaping.DEFAULT_LINK) -> list[Node]:
    """Build (or complete) the LAN with ``n_hosts`` hosts and the client, every node's
    cable shaped to ``link`` (hosts already up beyond ``n_hosts`` too). Idempotent: a
    cable already shaped so is left alone, one shaped otherwise is shaped anew."""
    if not 1 <= n_hosts <= MAX_HOSTS:
        raise TestbedError(f"--hosts must be between 1 and {MAX_HOSTS}, not {n_hosts}")
    if os.geteuid() != 0:
        raise TestbedError("the test bed needs root (network namespaces); run as root")
    try:
        with _one_socket_per_namespace():
            _ensure_netns(SWITCH.netns)
            _ensure_client()
            for index in range(n_hosts):
                _ensure_host(host_node(host_name(index)))
            for node in [CLIENT, *hosts()]:
                _shape(node, link)
    except NetlinkError as exc:
        raise TestbedError(
            f"could not build the test bed: {exc}; try 'livemig testbed down' first"
        ) from exc
    return [CLIENT, *hosts()]


def add_tap(host: Node, tap: str) -> None:
    """A tap for a VM's NIC, a port of the host's bridge. It persists, owned by root;
    QEMU, unprivileged, gets a queue of it from ``open_tap``."""
    with _ipr(host.netns) as ipr:
        stale = _link_index(ipr, tap)
        if stale is not None:
            ipr.link("del", index=stale)
        ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
        bridge = _link_index(ipr, HOST_BRIDGE)
        if bridge is None:
            raise TestbedError(f"host {host.name} has no bridge; run 'livemig testbed up'")
        index = _link_index(ipr, tap)
        ipr.link("set", index=index, master=bridge, state="up")


_TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), from linux/if_tun.h
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def open_tap(host: Node, tap: str) -> int:
    """A descriptor of ``tap``'s queue, for QEMU's ``-netdev tap,fd=N``.

    Attaching to a tap needs CAP_NET_ADMIN (or owning it), which QEMU does not have, so
    root opens the queue and QEMU inherits it. The flags are those QEMU uses when it opens
    a tap by name: no packet-information header, and the virtio-net header, so the guest
    keeps its checksum and segmentation offloads (QEMU probes the descriptor for it).

    /dev/net/tun binds a queue to the namespace of whoever opens it, so the open happens
    in a thread that enters ``host``'s namespace and then ends: setns moves the calling
    thread only, and no other thread of this process ever runs in the wrong namespace.
    """
    opened: list[int] = []
    failed: list[BaseException] = []

    def inside() -> None:
        try:
            ns = os.open(f"/run/netns/{host.netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(ns, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
            finally:
                os.close(ns)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                request = struct.pack("16sH22x", tap.encode(),
                                      _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
                fcntl.ioctl(fd, _TUNSETIFF, request)
            except BaseException:
                os.close(fd)
                raise
            opened.append(fd)
        except BaseException as exc:  # handed to the caller's thread, raised there
            failed.append(exc)

    thread = threading.Thread(target=inside, name=f"open-{tap}")
    thread.start()
    thread.join()
    if failed:
        raise TestbedError(f"cannot open tap {tap} on {host.name}: {failed[0]}") from failed[0]
    return opened[0]


# -- faults, for drills and the fault-matrix tests ---------------------------------------

BLACKHOLE_TABLE = "livemig_blackhole"


def set_uplink(host: Node, up: bool) -> None:
    """Cut (or mend) ``host``'s cable to the switch: its VMs and daemon fall off the LAN."""
    with _ipr(host.netns) as ipr:
        index = _link_index(ipr, HOST_UPLINK)
        if index is None:
            raise TestbedError(f"host {host.name} has no uplink; run 'livemig testbed up'")
        ipr.link("set", index=index, state="up" if up else "down")


def set_blackhole(host: Node, on: bool) -> None:
    """Drop every packet to and from ``host``'s own address, silently (no reset, no ICMP):
    a peer that simply stops answering. Its VMs, bridged past the host's IP stack, are
    not affected."""
    hooks = "type filter hook {} priority -300;"
    rules = (f"table inet {BLACKHOLE_TABLE} {{\n"
             f"  chain input {{ {hooks.format('input')} ip daddr {host.ip} drop; }}\n"
             f"  chain output {{ {hooks.format('output')} ip saddr {host.ip} drop; }}\n"
             f"}}\n") if on else f"delete table inet {BLACKHOLE_TABLE}\n"
    done = subprocess.run(host.exec_argv(["nft", "-f", "-"]), input=rules.encode(),
                          capture_output=True, check=False)
    if done.returncode != 0 and on:
        raise TestbedError(f"nft could not blackhole {host.name}: "
                           f"{done.stderr.decode(errors='replace').strip()}")


def del_tap(host: Node, tap: str) -> None:
    if host.netns not in existing_namespaces():
        return
    with _ipr(host.netns) as ipr:
        index = _link_index(ipr, tap)
        if index is not None:
            ipr.link("del", index=index)


def _ancestry() -> set[int]:
    """This process and its ancestors: never ours to end, wherever they stand."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _pids_in(ns: str) -> list[int]:
    """Processes inside one of our namespaces: by construction, ones livemig started."""
    pids = []
    spared = _ancestry()
    target = os.stat(f"/run/netns/{ns}")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino) and int(entry) not in spared:
            pids.append(int(entry))
    return pids


def _end_processes(pids: list[int], grace_s: float = 3.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}")]
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class Teardown:
    namespaces: list[str]
    processes: list[int]
    ram_files: list[str]


def down() -> Teardown:
    """Remove every namespace, link, process and RAM file the test bed holds.

    Links die with their namespace. Processes still inside a namespace (QEMU, daemons,
    probes) were started by livemig, so ending them by PID is safe.
    """
    namespaces = existing_namespaces()
    pids = [pid for ns in namespaces for pid in _pids_in(ns)]
    _end_processes(pids)
    for ns in namespaces:
        with contextlib.suppress(FileNotFoundError):  # another 'down' of this bed was first
            netns.remove(ns)
    ram_files = sorted(str(p) for p in paths.SHM_DIR.glob(paths.ram_file_glob()))
    for path in ram_files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    run = paths.run_dir()
    shutil.rmtree(run / "hosts", ignore_errors=True)
    shutil.rmtree(paths.pki_dir(), ignore_errors=True)  # the CA: a new bed, a new CA
    shutil.rmtree(run / "holds", ignore_errors=True)
    for name in ("peer.key", "registry.lock"):  # the next bed makes a new key
        with contextlib.suppress(FileNotFoundError):
            (run / name).unlink()
    # Only what we know by name goes: LIVEMIG_RUN may name a directory with more in it.
    with contextlib.suppress(OSError):
        run.rmdir()
    return Teardown(namespaces, pids, ram_files)


def status() -> dict[str, object]:
    nodes = ([CLIENT] if CLIENT.netns in existing_namespaces() else []) + hosts()
    return {
        "up": bool(nodes),
        "lan": str(LAN),
        "nodes": [{"name": n.name, "netns": n.netns, "ip": str(n.ip), "link": link_of(n)}
                  for n in nodes],
    }


def vm_interface(ip: IPv4Address) -> IPv4Interface:
    return IPv4Interface(f"{ip}/{LAN.prefixlen}")
