"""VMSpec, VMRecord and the RAM mapping: pure logic and files, no QEMU."""

from __future__ import annotations

import gzip
import itertools
import lzma
import os
import random
import struct
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from livemig.errors import SetupError, TestbedError
from livemig.image import builder
from livemig.image.builder import Addition
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.memory import GuestMemory
from livemig.vm.spec import PAGE_SIZE, VMRecord, VMSpec, Workload


def make_spec(**overrides: object) -> VMSpec:
    fields: dict[str, object] = dict(
        name="v1",
        ip=IPv4Address("10.77.0.123"),
        mem_mib=256,
        workload=Workload.WEB,
        image="default",
        kernel=Path("/k"),
        initrd=Path("/i"),
        options=(("web_kb", "64"),),
    )
    fields.update(overrides)
    return VMSpec(**fields)  # type: ignore[arg-type]


def test_mac_and_tap_follow_the_ip_unless_given() -> None:
    spec = make_spec()
    assert spec.mac == "52:54:00:4d:00:7b"
    assert spec.tap == "tap0-123"
    assert make_spec(ip=IPv4Address("10.77.0.124")).mac != spec.mac
    assert make_spec(ip=IPv4Address("10.77.1.123")).tap != spec.tap
    given = make_spec(mac="52:54:00:AA:BB:CC", prefix=16)
    assert given.mac == "52:54:00:aa:bb:cc"
    assert "lm.ip=10.77.0.123/16" in given.kernel_cmdline().split()
    for bad in ("01:00:5e:00:00:01", "52:54:00:aa:bb", "zz:54:00:aa:bb:cc"):  # multicast...
        with pytest.raises(ValueError, match="MAC"):
            make_spec(mac=bad)


def test_the_network_identity_travels_with_the_spec() -> None:
    spec = make_spec(mac="52:54:00:01:02:03", prefix=22, image_digest="abc")
    assert VMSpec.from_json(spec.to_json()) == spec


def test_kernel_cmdline_carries_workload_and_options() -> None:
    cmdline = make_spec().kernel_cmdline().split()
    assert "lm.workload=web" in cmdline
    assert "lm.ip=10.77.0.123/24" in cmdline
    assert "lm.web_kb=64" in cmdline
    assert "console=ttyS0" in cmdline


def test_spec_round_trips_through_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_RUN", str(tmp_path))
    monkeypatch.delenv("LIVEMIG_INSTANCE", raising=False)
    record = VMRecord(spec=make_spec(), host="hostB", pid=4242, incoming=True)
    record.save()
    loaded = VMRecord.load(record.record_file)
    assert loaded.spec == record.spec
    assert (loaded.host, loaded.pid, loaded.incoming) == ("hostB", 4242, True)
    assert loaded.ram_file.name == "livemig-hostB-v1.ram"


def test_a_recycled_pid_is_not_our_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_RUN", str(tmp_path))
    # Our own PID is alive, but its command line does not name the VM's RAM file.
    assert not VMRecord(spec=make_spec(), host="hostA", pid=os.getpid()).process_alive()


def test_host_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_INSTANCE", "uvs")  # no bed of this name is up
    assert testbed.host_name(1) == "hostB"
    with pytest.raises(TestbedError, match="not up"):
        testbed.host_node("hostC")  # no bed of this instance is up
    with pytest.raises(TestbedError, match="client"):
        testbed.up(["alpha", "client"])
    for bad in ("a_b", "-x", ""):
        with pytest.raises(TestbedError):
            testbed.up(["alpha", bad])


def test_addition_parsing(tmp_path: Path) -> None:
    src = tmp_path / "prog"
    src.write_text("x")
    assert Addition.parse(f"{src}:/usr/bin/prog").dest == "/usr/bin/prog"
    for bad in (f"{src}", f"{src}:relative", f"{tmp_path / 'missing'}:/x", f"{src}:/init"):
        with pytest.raises(SetupError):
            Addition.parse(bad)


@pytest.fixture
def ram_file(tmp_path: Path) -> Path:
    path = tmp_path / "ram"
    with path.open("wb") as f:
        f.truncate(64 * PAGE_SIZE)
        f.seek(10 * PAGE_SIZE)
        f.write(b"\x01" * PAGE_SIZE * 2)
        f.seek(40 * PAGE_SIZE + 100)
        f.write(b"\x02")
    return path


def test_data_ranges_find_written_pages_without_touching_holes(ram_file: Path) -> None:
    with GuestMemory(ram_file, 64 * PAGE_SIZE, writable=False) as mem:
        ranges = mem.data_ranges()
        assert ranges == [(10, 12), (40, 41)]
        # The scan allocated nothing: the file still has exactly its three data pages.
        assert os.stat(ram_file).st_blocks * 512 == 3 * PAGE_SIZE
        assert mem.pages[10].sum() == PAGE_SIZE
        assert mem.npages == 64


def test_source_mapping_is_read_only(ram_file: Path) -> None:
    with GuestMemory(ram_file, 64 * PAGE_SIZE, writable=False) as mem:
        assert not mem.pages.flags.writeable
        with pytest.raises(ValueError):
            mem.pages[0, 0] = 1


def test_destination_mapping_writes_through_to_the_file(ram_file: Path) -> None:
    with GuestMemory(ram_file, 64 * PAGE_SIZE, writable=True) as mem:
        mem.pages[5, :4] = [1, 2, 3, 4]
    with ram_file.open("rb") as f:
        f.seek(5 * PAGE_SIZE)
        assert f.read(4) == b"\x01\x02\x03\x04"


def test_mapping_refuses_a_short_file(ram_file: Path) -> None:
    with pytest.raises(ValueError):
        GuestMemory(ram_file, 128 * PAGE_SIZE, writable=False)


def test_checksum_sees_content_and_position_but_not_how_zeros_are_stored(ram_file: Path,
                                                                          tmp_path: Path) -> None:
    with GuestMemory(ram_file, 64 * PAGE_SIZE, writable=True) as mem:
        before = mem.checksum()
        mem.pages[30] = 0  # a zero page written explicitly: same contents, same checksum
        assert mem.checksum() == before
        mem.pages[10, 7] ^= 1  # one bit
        flipped = mem.checksum()
        assert flipped != before
        mem.pages[10, 7] ^= 1
        assert mem.checksum() == before
        mem.pages[12] = mem.pages[11]  # page 11's bytes moved to page 12: another image
        mem.pages[11] = 0
        assert mem.checksum() != before
        mem.pages[11] = mem.pages[12]
        mem.pages[12] = 0
        assert mem.checksum() == before
        mem.pages[40, 100] = 0
        mem.pages[41, 100] = 2
        assert mem.checksum() != before


INHERITED = qemu.Inherited(qmp=3, agent=4, tap=5, console=6)


def option(argv: list[str], flag: str, prefix: str) -> str:
    """The value of the one ``flag`` whose value starts with ``prefix``."""
    (value,) = [v for f, v in itertools.pairwise(argv) if f == flag and v.startswith(prefix)]
    return value


def test_qemu_starts_unprivileged_and_always_sandboxed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_RUN", str(tmp_path))
    record = VMRecord(spec=make_spec(), host="hostA", pid=0, incoming=True)
    monkeypatch.setattr(qemu, "QEMU_USER", "root")  # a user every machine has
    argv = qemu.command(record, INHERITED)
    sandbox = argv[argv.index("-sandbox") + 1].split(",")
    assert sandbox[0] == "on"
    assert {"obsolete=deny", "elevateprivileges=deny", "spawn=deny",
            "resourcecontrol=deny"} <= set(sandbox)
    assert "-runas" not in argv  # QEMU starts unprivileged: nothing for it to drop
    # setpriv drops everything before QEMU runs, and execs it (QEMU keeps the PID).
    drop = argv[:argv.index(qemu.QEMU_BINARY)]
    assert drop[0] == "setpriv" and drop[-1] == "--"
    assert {"--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs"} <= set(drop)
    # QEMU's postcopy destination (kernel-fault userfaultfd) gets /dev/userfaultfd's
    # group, and nothing else of root's.
    monkeypatch.setattr(qemu, "USERFAULTFD_GROUP", "root")  # a group every machine has
    postcopy = qemu.command(record, INHERITED, userfaultfd=True)
    drop = postcopy[:postcopy.index(qemu.QEMU_BINARY)]
    assert drop[0] == "setpriv" and "--groups=0" in drop and "--clear-groups" not in drop
    assert {"--reuid=0", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"} <= set(drop)
    assert postcopy[postcopy.index("-sandbox") + 1] == qemu.SANDBOX
    monkeypatch.setattr(qemu, "QEMU_USER", "no-such-user-here")
    with pytest.raises(SetupError):
        qemu.command(record, INHERITED)


def test_qemu_opens_nothing_that_needs_root(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tap, socket and log QEMU uses is one of the descriptors it inherits."""
    monkeypatch.setenv("LIVEMIG_RUN", str(tmp_path))
    record = VMRecord(spec=make_spec(), host="hostA", pid=0)
    argv = qemu.qemu_argv(record, INHERITED)
    assert option(argv, "-netdev", "tap,") == "tap,id=net0,fd=5"
    assert option(argv, "-chardev", "socket,id=qmp,") == "socket,id=qmp,fd=3,server=on,wait=off"
    assert argv[argv.index("-mon") + 1] == "chardev=qmp,mode=control"
    assert option(argv, "-chardev", "socket,id=agent,").startswith("socket,id=agent,fd=4,")
    fdset = option(argv, "-add-fd", "fd=6,")
    assert f"set={qemu.CONSOLE_FDSET}" in fdset.split(",")
    assert option(argv, "-chardev", "file,") == (
        f"file,id=console,path=/dev/fdset/{qemu.CONSOLE_FDSET}")
    assert str(record.ram_file) in option(argv, "-object", "memory-backend-file,")
    for path in (record.qmp_socket, record.agent_socket, record.console_log):
        assert not any(str(path) in arg for arg in argv)
    assert "-qmp" not in argv and "-incoming" not in argv


def bzimage(payload: bytes, *, version: int = 0x20F, setup_sectors: int = 3) -> bytes:
    """A bzImage's layout as the boot protocol describes it: setup sectors, then the
    compressed kernel, found by the header's payload offset and length."""
    head = bytearray((setup_sectors + 1) * 512)
    head[0x1F1] = setup_sectors
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, version)
    decompressor = b"\x90" * 100  # the real one sits between the setup and its payload
    struct.pack_into("<II", head, 0x248, len(decompressor), len(payload))
    return bytes(head) + decompressor + payload + b"\0" * 16


def test_the_kernel_is_unpacked_from_its_bzimage_for_a_direct_boot() -> None:
    elf = b"\x7fELF" + random.Random(0).randbytes(20000)  # incompressible: cut, it shows
    assert builder.uncompressed_kernel(bzimage(lzma.compress(elf))) == elf
    assert builder.uncompressed_kernel(bzimage(gzip.compress(elf))) == elf
    # What we cannot unpack is booted as it is: no kernel, never a wrong one.
    assert builder.uncompressed_kernel(bzimage(b"\x28\xb5\x2f\xfd" + b"zstd")) is None
    assert builder.uncompressed_kernel(bzimage(lzma.compress(b"not an ELF"))) is None
    assert builder.uncompressed_kernel(bzimage(lzma.compress(elf), version=0x207)) is None
    assert builder.uncompressed_kernel(bzimage(gzip.compress(elf))[:-600]) is None  # cut short
    assert builder.uncompressed_kernel(b"MZ" + bytes(4096)) is None
