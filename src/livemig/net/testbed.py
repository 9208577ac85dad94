"""A switched LAN of isolated hosts on one machine: a lab, and one user of livemig's
configuration like any operator.

    lm-client               lm-switch                     lm-hostA   (namespaces)
    eth0 10.77.0.2 ---- sw-client [lan] sw-hostA ---- uplink [br0 10.77.0.11] tap0-64 -- VM
                                       sw-hostB ---- uplink [br0 10.77.0.12] ...  (lm-hostB)

Each host is a machine of its own: a network namespace and a mount namespace, with a
private ``/run``, ``/dev/shm`` and state directory, its own configuration in
``/etc/livemig/livemig.toml`` (written by ``up``) and its own TLS files. Hosts share
nothing but the LAN, and the image cache, read only. A host's namespaces are held by
an anchor process (``sleep``, like a pod's pause container); ``exec_argv`` runs a
command inside both, and the lab sees a host's files through the anchor's root
(``/proc/PID/root``, see ``paths``). Host names and the LAN are the operator's
(``up(["alpha", "beta"], lan=...)``); by default hostA, hostB, ... on 10.77.0.0/24.

Every bridge learns MAC addresses as a real switch does. That is the point: after a
migration, frames for the VM reach its new port only once the VM itself has sent a frame
from there (the unsolicited ARP). Learning is never turned off to make a test pass.

What exists is read back from the kernel (namespaces named ``lm-*``) and from the hosts'
configurations, so ``up`` and ``down`` are idempotent and survive a crash half-way.
With ``LIVEMIG_INSTANCE=x`` the namespaces are ``lmx-*`` instead: a separate test bed.

Every cable to the switch has a speed, 1 Gbit/s unless ``up`` is told otherwise, shaped
at both of its ends (``net/shaping.py``); ``status`` reads it back from the qdiscs.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import ipaddress
import os
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from livemig import config, paths
from livemig.errors import LivemigError, TestbedError
from livemig.net import shaping
from livemig.net.shaping import Link

LAN = ipaddress.IPv4Network("10.77.0.0/24")  # the default
CLIENT_OFFSET = 2  # the client is the LAN's 2nd address, hosts from the 11th on
FIRST_HOST_OFFSET = 11
POOL_OFFSET = 64  # VM pools from the 64th address on, POOL_SIZE to a host
POOL_SIZE = 16
HOST_BRIDGE = "br0"
HOST_UPLINK = "uplink"
CLIENT_NIC = "eth0"
MAX_HOSTS = 26
CLONE_NEWNET = 0x40000000
CONFIG_FILE = "livemig.toml"
# Inside a host: where its configuration and state directory are mounted.
HOST_ETC = Path("/etc/livemig")
HOST_STATE = Path("/var/lib/livemig/state")
ANCHOR_READY = "/run/.livemig-host-ready"
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
        return "02:4c:4d:{:02x}:{:02x}:{:02x}".format(*self.ip.packed[1:])

    @property
    def is_client(self) -> bool:
        return self.name == CLIENT_NAME

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this node: for a host, in both of its namespaces. Both
        ways exec, so the PID stays argv's."""
        if self.is_client:
            return ["ip", "netns", "exec", self.netns, *argv]
        return ["nsenter", "-t", str(anchor_pid(self.name)), "-m", "-n", "--", *argv]


CLIENT_NAME = "client"
SWITCH_NAME = "switch"
_NOT_HOSTS = (CLIENT_NAME, SWITCH_NAME)


def host_name(index: int) -> str:
    return "host" + string.ascii_uppercase[index]


def lab_dir(host: str) -> Path:
    """What the lab keeps of ``host`` outside it: its /etc/livemig, its state directory
    (its disk, as it were) and its anchor's PID."""
    return paths.run_dir() / "hosts" / host


def lab_etc(host: str) -> Path:
    """``host``'s /etc/livemig as the lab writes it: configuration, TLS files, peer key."""
    return lab_dir(host) / "etc"


def host_environment() -> dict[str, str]:
    """This process's environment less the lab's own settings: inside a host, the
    host's configuration says where things are."""
    return {k: v for k, v in os.environ.items()
            if k not in ("LIVEMIG_RUN", "LIVEMIG_DATA", "LIVEMIG_CONFIG")}


def host_config(host: str) -> config.HostConfig:
    path = lab_etc(host) / CONFIG_FILE
    try:
        st = path.stat()
        return _config_as_of(path, st.st_ino, st.st_mtime_ns)
    except (OSError, config.ConfigError) as exc:
        raise TestbedError(f"host {host!r} is not up ({exc}); run 'livemig testbed up'") from exc


@functools.lru_cache(maxsize=64)
def _config_as_of(path: Path, inode: int, mtime_ns: int) -> config.HostConfig:
    """Read once per version of the file: the lab asks for it at every path it makes."""
    return config.load(path)


def existing_namespaces() -> list[str]:
    prefix = paths.netns_prefix()
    return sorted(ns for ns in netns.listnetns() if ns.startswith(prefix))


def host_names() -> list[str]:
    """The hosts that are up (a namespace and a configuration), in the order made."""
    names = [ns.removeprefix(paths.netns_prefix()) for ns in existing_namespaces()]
    made = [n for n in names
            if n not in _NOT_HOSTS and (lab_etc(n) / CONFIG_FILE).is_file()]
    return sorted(made, key=lambda n: host_config(n).address)


def hosts() -> list[Node]:
    return [Node(n, host_config(n).address) for n in host_names()]


def host_node(name: str) -> Node:
    return Node(name, host_config(name).address)


def require_host(name: str) -> Node:
    if name not in host_names():
        up = ", ".join(host_names()) or "none"
        raise TestbedError(
            f"host {name!r} is not up (hosts up: {up}); run 'livemig testbed up' first"
        )
    return host_node(name)


def lan() -> ipaddress.IPv4Network:
    """The LAN of the bed that is up (the default if none is)."""
    names = host_names()
    return host_config(names[0]).vm_network if names else LAN


def client() -> Node:
    return Node(CLIENT_NAME, lan()[CLIENT_OFFSET])


def require_client() -> Node:
    node = client()
    if node.netns not in existing_namespaces():
        raise TestbedError("the test bed is not up; run 'livemig testbed up' first")
    return node


def _switch() -> Node:
    return Node(SWITCH_NAME, IPv4Address(0))  # the LAN's switch: a namespace, no address


def anchor_pid(host: str) -> int:
    """The process that holds ``host``'s namespaces; TestbedError if it is gone."""
    try:
        pid = int((lab_dir(host) / "anchor.pid").read_text())
        if os.path.exists(f"/proc/{pid}/root{ANCHOR_READY}"):
            return pid
    except (OSError, ValueError):
        pass
    raise TestbedError(f"host {host!r} is not up (its namespaces' holder is gone); run "
                       f"'livemig testbed down' and 'livemig testbed up'")


def _view(host: str) -> paths.HostView | None:
    try:
        return paths.HostView(Path(f"/proc/{anchor_pid(host)}/root"), host_config(host))
    except TestbedError:
        return None


def _lab_hosts() -> list[str]:
    try:
        return host_names()
    except OSError:
        return []


# The lab sees its hosts' files (see ``paths``): whoever imports the test bed is the lab.
paths.see_lab_hosts(_view, _lab_hosts)


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


def _ensure_address(ipr: IPRoute, index: int, ip: IPv4Address, prefixlen: int) -> None:
    have = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
    if str(ip) not in have:
        ipr.addr("add", index=index, address=str(ip), prefixlen=prefixlen)


def _plug_into_switch(node: Node, inner_ifname: str) -> int:
    """Cable ``node`` to the LAN switch; returns the index of the node's end of the cable."""
    with _ipr(_switch().netns) as sw:
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


def _ensure_host(node: Node, network: ipaddress.IPv4Network) -> None:
    _ensure_netns(node.netns)
    uplink = _plug_into_switch(node, HOST_UPLINK)
    with _ipr(node.netns) as ipr:
        bridge = _ensure_bridge(ipr, HOST_BRIDGE, mac=node.mac)
        ipr.link("set", index=uplink, master=bridge)
        _ensure_address(ipr, bridge, node.ip, network.prefixlen)


def _ensure_client(network: ipaddress.IPv4Network) -> None:
    node = Node(CLIENT_NAME, network[CLIENT_OFFSET])
    _ensure_netns(node.netns)
    nic = _plug_into_switch(node, CLIENT_NIC)
    with _ipr(node.netns) as ipr:
        _ensure_address(ipr, nic, node.ip, network.prefixlen)


def _node_ifname(node: Node) -> str:
    return CLIENT_NIC if node.is_client else HOST_UPLINK


@functools.cache
def netem_available() -> bool:
    """Whether this kernel can add the link's latency (netem); asked of the switch."""
    with _ipr(_switch().netns) as ipr:
        lo = _link_index(ipr, "lo")
        assert lo is not None
        return shaping.has_netem(ipr, lo)


def _shape(node: Node, link: Link) -> None:
    """Both ends of ``node``'s cable: what it sends (its end, with the latency) and what
    it receives (the switch's port)."""
    for ns, ifname, delays in ((node.netns, _node_ifname(node), True),
                               (_switch().netns, node.switch_port, False)):
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
                            ("receive", _switch().netns, node.switch_port)):
        with _ipr(ns) as ipr:
            index = _link_index(ipr, ifname)
            ends[key] = None if index is None else shaping.read(ipr, index).describe()
    return ends


def up(hosts_wanted: int | list[str] = 3, link: Link = shaping.DEFAULT_LINK,
       network: ipaddress.IPv4Network | None = None) -> list[Node]:
    """Build (or complete) the LAN with these hosts (a number: hostA, hostB, ...) and
    the client, every node's cable shaped to ``link`` (hosts already up beyond these
    too). Idempotent: a cable already shaped so is left alone, one shaped otherwise is
    shaped anew. ``network``: the LAN, 10.77.0.0/24 by default or the bed's own."""
    count = hosts_wanted if isinstance(hosts_wanted, int) else len(hosts_wanted)
    if not 1 <= count <= MAX_HOSTS:
        raise TestbedError(f"--hosts must name between 1 and {MAX_HOSTS} hosts, not {count}")
    names = ([host_name(i) for i in range(hosts_wanted)] if isinstance(hosts_wanted, int)
             else list(hosts_wanted))
    for name in names:
        if name in _NOT_HOSTS:
            raise TestbedError(f"{name!r} is the test bed's own; name hosts otherwise")
        try:
            config.check_host_name(name)
        except LivemigError as exc:
            raise TestbedError(str(exc)) from None
    if len(set(names)) != len(names):
        raise TestbedError(f"--hosts names a host twice: {','.join(names)}")
    if os.geteuid() != 0:
        raise TestbedError("the test bed needs root (network namespaces); run as root")
    existing = host_names()
    network = _bed_network(network, existing)
    everyone = existing + [n for n in names if n not in existing]
    if (POOL_OFFSET + POOL_SIZE * len(everyone) >= network.num_addresses - 1
            or FIRST_HOST_OFFSET + len(everyone) >= POOL_OFFSET):
        raise TestbedError(f"{network} has no room for {len(everyone)} hosts and their VM "
                           f"pools ({POOL_SIZE} addresses each); give a larger --lan")
    nodes = [Node(name, network[FIRST_HOST_OFFSET + i]) for i, name in enumerate(everyone)]
    try:
        with _one_socket_per_namespace():
            _ensure_netns(_switch().netns)
            _ensure_client(network)
            for node in nodes:
                _ensure_host(node, network)
            for i, node in enumerate(nodes):
                _write_host_config(node, network, i, [n for n in nodes if n != node])
                _ensure_anchor(node)
            for node in [Node(CLIENT_NAME, network[CLIENT_OFFSET]), *nodes]:
                _shape(node, link)
    except NetlinkError as exc:
        raise TestbedError(
            f"could not build the test bed: {exc}; try 'livemig testbed down' first"
        ) from exc
    return [client(), *hosts()]


def _bed_network(wanted: ipaddress.IPv4Network | None,
                 existing: list[str]) -> ipaddress.IPv4Network:
    if not existing:
        return wanted or LAN
    have = host_config(existing[0]).vm_network
    if wanted is not None and wanted != have:
        raise TestbedError(f"the test bed is up on {have}, not {wanted}; 'livemig testbed "
                           f"down' first to build it on another LAN")
    return have


def _write_host_config(node: Node, network: ipaddress.IPv4Network, index: int,
                       peers: list[Node]) -> None:
    """``node``'s /etc/livemig: its configuration, its peers those of the bed."""
    etc = lab_etc(node.name)
    etc.mkdir(parents=True, exist_ok=True)
    os.chmod(etc, 0o700)
    (lab_dir(node.name) / "state").mkdir(parents=True, exist_ok=True)
    first = network[POOL_OFFSET + POOL_SIZE * index]
    here = config.HostConfig(
        name=node.name, address=node.ip, vm_network=network,
        vm_pool=config.Pool(first, first + POOL_SIZE - 1), bridge=HOST_BRIDGE,
        state_dir=HOST_STATE, tls_dir=HOST_ETC / "tls", peer_key=HOST_ETC / "peer.key",
        peers={p.name: str(p.ip) for p in peers})
    text = here.to_toml()
    path = etc / CONFIG_FILE
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# What the anchor does in its new mount namespace, before it sleeps: the host's own
# /etc/livemig and state directory (bound first: they live under the lab's /run, which
# the host's own /run then hides), an empty /run and /dev/shm, the image cache read
# only, and a /sys of its own network namespace.
_ANCHOR_SCRIPT = """set -e
echo $$ > "$LAB/anchor.pid"
mount --make-rprivate /
mount --bind "$LAB/etc" {etc}
mount --bind "$LAB/state" {state}
mount --bind "$IMAGES" "$IMAGES"
mount -o remount,bind,ro "$IMAGES"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t sysfs -o ro sysfs /sys
touch {ready}
exec sleep infinity
"""


def _ensure_anchor(node: Node) -> None:
    """Start ``node``'s anchor, unless it runs: the process whose mount namespace is the
    host's, entered by ``exec_argv``."""
    with contextlib.suppress(TestbedError):
        anchor_pid(node.name)
        return
    images = paths.images_dir()
    for path in (HOST_ETC, HOST_STATE, images):  # mount points, empty in the lab's view
        path.mkdir(parents=True, exist_ok=True)
    script = _ANCHOR_SCRIPT.format(etc=HOST_ETC, state=HOST_STATE, ready=ANCHOR_READY)
    log = lab_dir(node.name) / "anchor.log"
    with log.open("wb") as out:
        subprocess.run(
            ["setsid", "-f", "nsenter", f"--net=/run/netns/{node.netns}", "--",
             "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                 "LAB": str(lab_dir(node.name)), "IMAGES": str(images)},
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        with contextlib.suppress(TestbedError):
            anchor_pid(node.name)
            return
        time.sleep(0.02)
    raise TestbedError(f"host {node.name}'s namespaces did not come up: "
                       f"{log.read_text(errors='replace').strip() or 'no word why'}")


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
    # A host's RAM files went with its /dev/shm (ended with its last process); these are
    # from a bed of before hosts had their own.
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
    # The hosts' mount points, empty in the machine's view, once no bed of any instance
    # is left to use them (removing one would unmount it in a host that still runs).
    if not any(ns.startswith("lm") and ns.endswith(f"-{CLIENT_NAME}")
               for ns in netns.listnetns()):
        for mount_point in (HOST_STATE, HOST_ETC):
            with contextlib.suppress(OSError):  # not empty: the machine's own, not ours
                mount_point.rmdir()
    return Teardown(namespaces, pids, ram_files)


def status() -> dict[str, object]:
    nodes = ([client()] if client().netns in existing_namespaces() else []) + hosts()
    return {
        "up": bool(nodes),
        "lan": str(lan()),
        "nodes": [{"name": n.name, "netns": n.netns, "ip": str(n.ip), "link": link_of(n)}
                  for n in nodes],
    }



def __getattr__(name: str) -> Node:
    """``CLIENT`` and ``SWITCH``: nodes whose address is the bed's LAN's."""
    if name == "CLIENT":
        return client()
    if name == "SWITCH":
        return _switch()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
