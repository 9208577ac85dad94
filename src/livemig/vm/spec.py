"""What a VM is, independent of where it runs.

A ``VMSpec`` holds everything needed to start the VM's QEMU on any host: a migration's
destination starts an identical QEMU from the same spec, with ``-incoming``. A
``VMRecord`` adds where one copy runs (host, PID, files); it is saved as JSON so that
any later process (the CLI, a restarted daemon) can find the VM again.
"""

from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from livemig import paths
from livemig.units import PAGE_SIZE as PAGE_SIZE

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def unicast_mac(text: str) -> str:
    """``text`` as a MAC in lower case, if it is one of a single NIC; else ValueError."""
    mac = text.lower()
    if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
        raise ValueError(f"{text!r} is no unicast MAC address (like 52:54:00:12:34:56)")
    return mac


def default_mac(ip: IPv4Address) -> str:
    """52:54:00 is QEMU's locally administered prefix; the rest follows the IP."""
    _, b, c, d = ip.packed
    return f"52:54:00:{b:02x}:{c:02x}:{d:02x}"


DEFAULT_MEM_MIB = 256
# Measured with the default image: 80 MiB panics at boot ("System is deadlocked on
# memory"), 88 MiB boots; the initramfs is unpacked into RAM and stays there.
MIN_MEM_MIB = 96
MAX_MEM_MIB = 16384

# The workloads' parameters (guest/init/init), all whole numbers: (lowest, highest).
WORKLOAD_OPTIONS = {
    "web_kb": (0, 1 << 20),
    "game_hz": (1, 1000),
    "game_world_kb": (1, 1 << 20),
    "game_dirty_kb": (0, 1 << 20),
    "mm_mib": (1, MAX_MEM_MIB),
    "mm_rate": (0, 1 << 20),
    "ready_port": (1, 65535),
}
# What the guest holds beside a workload (kernel, initramfs, page tables). Measured: in a
# 128 MiB guest mmuncher runs with 40 MiB and is killed for want of memory with 48.
GUEST_OS_MIB = 88
DEFAULT_MM_MIB = 64  # lm-mmuncher's region when mm_mib is not given (guest/init/init)


class Workload(enum.StrEnum):
    """The guest's built-in workloads (``guest/init/init``), and ``custom`` for the user's own."""

    IDLE = "idle"
    ECHO = "echo"
    WEB = "web"
    GAME = "game"
    MMUNCHER = "mmuncher"
    CUSTOM = "custom"


def workload_misfit(
    workload: Workload, options: tuple[tuple[str, str], ...], mem_mib: int
) -> str | None:
    """Why the workload cannot run in ``mem_mib`` of guest RAM, or None."""
    if workload is not Workload.MMUNCHER:
        return None
    region = int(dict(options).get("mm_mib", DEFAULT_MM_MIB))
    if region + GUEST_OS_MIB <= mem_mib:
        return None
    # The guest would boot, run out of memory in mmuncher and never be ready.
    return (f"mmuncher's {region} MiB do not fit in a {mem_mib} MiB VM beside the guest's "
            f"own {GUEST_OS_MIB} MiB; raise --mem or lower --opt mm_mib")


@dataclass(frozen=True)
class VMSpec:
    name: str
    ip: IPv4Address
    mem_mib: int
    workload: Workload
    image: str
    kernel: Path
    initrd: Path
    # Workload parameters, passed as lm.KEY=VALUE on the kernel command line.
    options: tuple[tuple[str, str], ...] = ()
    # The VM's network identity travels with it: the length of its LAN's prefix, and its
    # MAC ('' at creation: derived from the IP, see ``default_mac``).
    prefix: int = 24
    mac: str = ""
    # The image's digest: a migration target must boot the very same kernel and initrd.
    image_digest: str = ""

    def __post_init__(self) -> None:
        # Also when the spec comes from a peer daemon: the name becomes file paths here.
        paths.check_name(self.name, "VM name")
        if not 0 < self.prefix < 32:
            raise ValueError(f"prefix length {self.prefix} is not one of an IPv4 LAN")
        object.__setattr__(self, "mac", unicast_mac(self.mac or default_mac(self.ip)))

    @property
    def tap(self) -> str:
        # Unique on a host as long as its VMs' addresses are, and within IFNAMSIZ.
        _, _, c, d = self.ip.packed
        return f"tap{c}-{d}"

    @property
    def interface(self) -> IPv4Interface:
        return IPv4Interface(f"{self.ip}/{self.prefix}")

    @property
    def ram_bytes(self) -> int:
        return self.mem_mib << 20

    @property
    def npages(self) -> int:
        return self.ram_bytes // PAGE_SIZE

    def kernel_cmdline(self) -> str:
        params = [
            "console=ttyS0",
            "quiet",
            "panic=-1",  # with QEMU's -no-reboot, a guest panic ends QEMU: a visible crash
            "mitigations=off",  # speculative-execution defences only slow TCG down
            f"lm.ip={self.interface}",
            f"lm.workload={self.workload}",
        ]
        params += [f"lm.{key}={value}" for key, value in self.options]
        return " ".join(params)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ip=str(self.ip), kernel=str(self.kernel), initrd=str(self.initrd))
        data["options"] = [list(pair) for pair in self.options]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMSpec:
        return cls(
            name=data["name"],
            ip=IPv4Address(data["ip"]),
            mem_mib=int(data["mem_mib"]),
            workload=Workload(data["workload"]),
            image=data["image"],
            kernel=Path(data["kernel"]),
            initrd=Path(data["initrd"]),
            options=tuple((str(k), str(v)) for k, v in data.get("options", [])),
            prefix=int(data.get("prefix", 24)),
            mac=str(data.get("mac", "")),
            image_digest=str(data.get("image_digest", "")),
        )


@dataclass(frozen=True)
class VMRecord:
    """One copy of a VM on one host: what a host's disk would remember about it."""

    spec: VMSpec
    host: str
    pid: int
    incoming: bool = False
    files: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return paths.vm_dir(self.host, self.spec.name)

    @property
    def ram_file(self) -> Path:
        return paths.ram_file(self.host, self.spec.name)

    @property
    def ram_file_on_host(self) -> Path:
        """The RAM file as its host names it: on QEMU's command line."""
        return paths.ram_file_on_host(self.host, self.spec.name)

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.directory / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def stderr_log(self) -> Path:
        return self.directory / "qemu.stderr"

    @property
    def record_file(self) -> Path:
        return self.directory / "vm.json"

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.record_file.with_suffix(".tmp")
        data = {"spec": self.spec.to_json(), "host": self.host, "pid": self.pid}
        data["incoming"] = self.incoming
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.record_file)

    @classmethod
    def load(cls, path: Path) -> VMRecord:
        data = json.loads(path.read_text())
        return cls(
            spec=VMSpec.from_json(data["spec"]),
            host=data["host"],
            pid=int(data["pid"]),
            incoming=bool(data.get("incoming", False)),
        )

    def process_alive(self) -> bool:
        """True while our QEMU runs; a recycled PID running something else does not count."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return str(self.ram_file_on_host).encode() in cmdline
