"""A host's configuration: one TOML file, ``/etc/livemig/livemig.toml`` by default.

It is everything a daemon (and the CLI on the same machine) knows about where it stands::

    [host]
    name = "alpha"              # the name in this host's certificate, and its peers' word for it
    address = "192.0.2.11"      # where peers reach this daemon (it listens here)
    port = 7477                 # optional
    bridge = "br0"              # VMs' taps become ports of this bridge

    [vms]
    network = "192.0.2.0/24"    # the LAN the VMs live on (their interface's prefix)
    pool = "192.0.2.100-192.0.2.149"   # addresses this host hands out, disjoint from others'

    [paths]                     # all optional, these are the defaults
    run = "/run/livemig"        # sockets, VM records, logs: gone at reboot, like the QEMUs
    ram = "/dev/shm"            # the VMs' RAM files
    state = "/var/lib/livemig/state"   # what outlives a reboot: the switchover history
    images = "/var/lib/livemig/images" # guest images (read only)

    [tls]                       # optional, these are the defaults
    dir = "/etc/livemig/tls"    # ca.crt, ca.crl, NAME.crt, NAME.key ('livemig keys')
    peer_key = "/etc/livemig/peer.key"  # the shared HMAC key, the same on every host

    [peers]                     # the inventory: name = address or DNS name
    beta = "192.0.2.12"

A peer the inventory does not name is looked up in DNS by its name, as ssh would. Why
per-host pools rather than one shared pool: no two hosts can then hand out the same
address at the same moment, without any lock between them. What per-host pools cannot
see alone, an address of this pool that left with a migrated VM, the daemon learns by
asking its peers before it hands an address out (``daemon.server``).

Sans-IO apart from ``load`` (a file) and ``peer_address`` (DNS).
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import msgspec

from livemig.errors import LivemigError

DEFAULT_PATH = Path("/etc/livemig/livemig.toml")
DEFAULT_PORT = 7477
DEFAULT_BRIDGE = "br0"
# The directories' defaults, one home for the file's schema and HostConfig alike.
DEFAULT_RUN = "/run/livemig"
DEFAULT_RAM = "/dev/shm"
DEFAULT_STATE = "/var/lib/livemig/state"
DEFAULT_IMAGES = "/var/lib/livemig/images"
DEFAULT_TLS = "/etc/livemig/tls"
DEFAULT_PEER_KEY = "/etc/livemig/peer.key"
_HOST_NAME_RULE = "1 to 63 letters, digits or '-', not starting or ending with '-'"


class ConfigError(LivemigError):
    """The configuration is missing, unreadable or wrong; the message names the file."""

    def __init__(self, path: Path | None, why: str) -> None:
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{why}")
        self.path = path


class PeerUnknown(LivemigError):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"host {name!r} is not in this host's [peers] and {why}; add it "
                         f"to [peers] in the configuration")
        self.host = name


# -- the file's schema: msgspec checks types and refuses unknown keys, naming the key --


class _Host(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    address: str
    port: int = DEFAULT_PORT
    bridge: str = DEFAULT_BRIDGE


class _VMs(msgspec.Struct, forbid_unknown_fields=True):
    network: str
    pool: str


class _Paths(msgspec.Struct, forbid_unknown_fields=True):
    run: str = DEFAULT_RUN
    ram: str = DEFAULT_RAM
    state: str = DEFAULT_STATE
    images: str = DEFAULT_IMAGES


class _TLS(msgspec.Struct, forbid_unknown_fields=True):
    dir: str = DEFAULT_TLS
    peer_key: str = DEFAULT_PEER_KEY


class _File(msgspec.Struct, forbid_unknown_fields=True):
    host: _Host
    vms: _VMs
    paths: _Paths = msgspec.field(default_factory=_Paths)
    tls: _TLS = msgspec.field(default_factory=_TLS)
    peers: dict[str, str] = msgspec.field(default_factory=dict)


def check_host_name(name: str, what: str = "host name") -> str:
    """A DNS label: it becomes a certificate's name, a file name and a peer's key."""
    label = name.lower()
    if not (0 < len(name) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            and not name.startswith("-") and not name.endswith("-")):
        raise LivemigError(f"{what} {name!r} is not valid: use {_HOST_NAME_RULE}")
    return name


@dataclass(frozen=True)
class Pool:
    """A range of VM addresses, both ends included."""

    first: IPv4Address
    last: IPv4Address

    @classmethod
    def parse(cls, text: str, network: IPv4Network) -> Pool:
        first_text, sep, last_text = text.partition("-")
        try:
            first = IPv4Address(first_text.strip())
            last = IPv4Address(last_text.strip()) if sep else first
        except ValueError as exc:
            raise ValueError(f"pool {text!r} is not FIRST-LAST of IPv4 addresses") from exc
        if last < first:
            raise ValueError(f"pool {text!r} ends before it begins")
        for end in (first, last):
            if end not in network or end in (network.network_address,
                                              network.broadcast_address):
                raise ValueError(f"pool {text!r}: {end} is no host address of {network}")
        return cls(first, last)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (IPv4Address(n) for n in range(int(self.first), int(self.last) + 1))

    def __len__(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, IPv4Address) and self.first <= ip <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class HostConfig:
    name: str
    address: IPv4Address
    vm_network: IPv4Network
    vm_pool: Pool
    port: int = DEFAULT_PORT
    bridge: str = DEFAULT_BRIDGE
    run_dir: Path = Path(DEFAULT_RUN)
    ram_dir: Path = Path(DEFAULT_RAM)
    state_dir: Path = Path(DEFAULT_STATE)
    images_dir: Path = Path(DEFAULT_IMAGES)
    tls_dir: Path = Path(DEFAULT_TLS)
    peer_key: Path = Path(DEFAULT_PEER_KEY)
    peers: dict[str, str] = field(default_factory=dict)
    source: Path | None = None  # the file it was read from

    def peer_address(self, name: str) -> str:
        """Where ``name``'s daemon listens: the inventory's word, else DNS's."""
        if name == self.name:
            return str(self.address)
        if name in self.peers:
            return self.peers[name]
        try:
            infos = socket.getaddrinfo(name, self.port, socket.AF_INET, socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise PeerUnknown(name, f"DNS does not know it ({exc})") from exc
        return str(infos[0][4][0])

    def to_toml(self) -> str:
        """The file that ``load`` reads back as this configuration."""
        lines = ["[host]", f'name = "{self.name}"', f'address = "{self.address}"',
                 f"port = {self.port}", f'bridge = "{self.bridge}"', "",
                 "[vms]", f'network = "{self.vm_network}"', f'pool = "{self.vm_pool}"', "",
                 "[paths]", f'run = "{self.run_dir}"', f'ram = "{self.ram_dir}"',
                 f'state = "{self.state_dir}"', f'images = "{self.images_dir}"', "",
                 "[tls]", f'dir = "{self.tls_dir}"', f'peer_key = "{self.peer_key}"', "",
                 "[peers]"]
        lines += [f'{name} = "{address}"' for name, address in sorted(self.peers.items())]
        return "\n".join(lines) + "\n"


def parse(text: str, source: Path | None = None) -> HostConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"not valid TOML ({exc})") from exc
    try:
        data = msgspec.convert(raw, _File)
    except msgspec.ValidationError as exc:
        raise ConfigError(source, str(exc).replace("$.", "")) from exc
    try:
        check_host_name(data.host.name)
        for peer in data.peers:
            check_host_name(peer, "peer name")
        network = IPv4Network(data.vms.network, strict=True)
        address = IPv4Address(data.host.address)
        pool = Pool.parse(data.vms.pool, network)
        if not 0 < data.host.port < 65536:
            raise ValueError(f"port {data.host.port} is not a TCP port")
        if not 0 < len(data.host.bridge) < 16:
            raise ValueError(f"bridge {data.host.bridge!r} is no interface name")
        if address in pool:
            raise ValueError(f"the pool {pool} holds this host's own address {address}")
        if data.host.name in data.peers:
            raise ValueError(f"[peers] names this host, {data.host.name}, itself")
        files = {f"{section}.{key}": Path(getattr(getattr(data, section), key))
                 for section, keys in (("paths", ("run", "ram", "state", "images")),
                                       ("tls", ("dir", "peer_key")))
                 for key in keys}
        for key, path in files.items():
            if not path.is_absolute():
                raise ValueError(f"{key} {str(path)!r} is not an absolute path")
    except (ValueError, LivemigError) as exc:
        raise ConfigError(source, str(exc)) from exc
    return HostConfig(
        name=data.host.name, address=address, vm_network=network, vm_pool=pool,
        port=data.host.port, bridge=data.host.bridge, run_dir=files["paths.run"],
        ram_dir=files["paths.ram"], state_dir=files["paths.state"],
        images_dir=files["paths.images"], tls_dir=files["tls.dir"],
        peer_key=files["tls.peer_key"], peers=dict(data.peers), source=source)


def load(path: Path) -> HostConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, "no such file; write one (see docs/real-hosts.md) or name "
                                "another with --config") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read it ({exc.strerror})") from exc
    return parse(text, path)


# -- this process's own configuration --------------------------------------------------

_current: HostConfig | None = None
_looked = False


def use(config: HostConfig | None) -> None:
    """Make ``config`` this process's own (the daemon's, or the CLI's ``--config``)."""
    global _current, _looked
    _current, _looked = config, True


def forget() -> None:
    """Back to knowing no host until ``current`` looks again (tests)."""
    global _current, _looked
    _current, _looked = None, False


def current() -> HostConfig | None:
    """This process's host, if it is one: ``use``'s, else ``$LIVEMIG_CONFIG``'s, else
    the default file's if it exists. None on a machine that is no configured host (the
    test bed's own namespace, a unit test)."""
    global _current, _looked
    if not _looked:
        named = os.environ.get("LIVEMIG_CONFIG")
        if named:
            _current = load(Path(named))
        elif DEFAULT_PATH.is_file():
            _current = load(DEFAULT_PATH)
        _looked = True
    return _current


def require() -> HostConfig:
    found = current()
    if found is None:
        raise ConfigError(DEFAULT_PATH, "no such file: this machine is no livemig host yet "
                                        "(docs/real-hosts.md), or name a file with --config")
    return found
