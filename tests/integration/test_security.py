"""Security on the real test bed: the daemons' mutual TLS and certificate revocation,
their control sockets, and confined QEMUs.

Intruders are played from inside hostA's namespace by ``data/try_peer.py`` against the
real daemons. Each must be refused before any byte reaches a QEMU: no QEMU starts on the
target and no VM is recorded there, even though the intruder asks for a reservation
whenever it gets in, and the target's daemon logs why it refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from livemig import keys, paths
from livemig.daemon import control
from livemig.experiments import bed as bed_
from livemig.image import builder
from livemig.lab import launch
from livemig.migration.tunnel import StateSink
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import VMSpec, Workload
from livemig.wire.messages import (
    Migrate,
    MigrateOptions,
    MigrationReport,
    OnTimeout,
    Ping,
    Pong,
    decode_control_reply,
    encode_control,
)

TRY_PEER = Path(__file__).parent / "data" / "try_peer.py"


def UNUSED_IP() -> IPv4Address:
    """An address of the LAN that no pool hands out."""
    return testbed.lan()[-2]


def qemus_in(host: str) -> list[int]:
    """PIDs of the QEMUs running in ``host``'s namespace."""
    target = os.stat(f"/run/netns/{testbed.host_node(host).netns}")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino) and comm.startswith("qemu"):
            found.append(int(entry))
    return found


class Intruder:
    """Runs try_peer.py in hostA against ``target``'s daemon and checks that nothing
    happened there."""

    def __init__(self, image: builder.Image, target: str = "hostB") -> None:
        self.image = image
        self.target = target
        self.spec = VMSpec(name="intruder", ip=UNUSED_IP(), mem_mib=64,
                           workload=Workload.IDLE, image=image.name, kernel=image.kernel,
                           initrd=image.initrd)
        self.log = paths.host_dir(target) / "livemigd.log"

    def attempt(self, **args: Any) -> tuple[dict[str, Any], str]:
        """Returns what the intruder saw and what the target's daemon logged meanwhile."""
        qemus_before = qemus_in(self.target)
        records_before = qemu.records()
        log_from = self.log.stat().st_size
        request = {"ip": str(testbed.host_node(self.target).ip), "me": "hostA",
                   "peer_name": self.target, "tls": "files",
                   # hostA's own copy: the intruder runs inside hostA.
                   "key_file": str(testbed.HOST_ETC / "peer.key"),
                   "spec": self.spec.to_json(), **args}
        done = subprocess.run(
            testbed.host_node("hostA").exec_argv([sys.executable, str(TRY_PEER),
                                                  json.dumps(request)]),
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        outcome: dict[str, Any] = json.loads(done.stdout)
        # Refused before any byte reached a QEMU: none started, none recorded.
        assert qemus_in(self.target) == qemus_before
        assert qemu.records() == records_before
        with self.log.open() as f:
            f.seek(log_from)
            logged = f.read()
        assert "incoming migration" not in logged
        return outcome, logged


def host_files(host: str) -> keys.HostFiles:
    return keys.HostFiles.in_dir(paths.tls_dir(host), host)


@pytest.fixture
def intruder(bed: list[testbed.Node], image: builder.Image) -> Intruder:
    return Intruder(image)


def test_the_test_bed_provisions_mutual_tls(bed: list[testbed.Node]) -> None:
    ca = (paths.pki_dir() / keys.CA_CERT).read_bytes()
    for node in testbed.hosts():
        files = host_files(node.name)
        assert files.missing() == []
        assert files.ca.read_bytes() == ca
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
        assert keys.describe(files.cert)["names"] == [node.name, str(node.ip)]
        assert files.crl is not None
        assert files.crl.read_bytes() == (paths.pki_dir() / keys.CA_CRL).read_bytes()
        log = (paths.host_dir(node.name) / "livemigd.log").read_text()
        assert "(mutual TLS)" in log
    assert stat.S_IMODE((paths.pki_dir() / keys.CA_KEY).stat().st_mode) == 0o600


def test_a_real_host_certificate_gets_in(intruder: Intruder) -> None:
    """The control for the refusals below: the same intruder with hostA's own files is let
    in and reaches the reservation (which fails on purpose: its spec is refused as too
    big for nothing, so no QEMU starts either)."""
    a = host_files("hostA")
    too_big = {**intruder.spec.to_json(), "mem_mib": 1 << 30}
    outcome, logged = intruder.attempt(ca=str(a.ca), cert=str(a.cert), key=str(a.key),
                                       spec=too_big)
    assert outcome["stage"] == "reserve" and outcome["error"] is None, outcome
    assert outcome["ok"] is False and "MiB" in outcome["body"]["error"]
    assert "accepted hostA from" in logged


def test_a_certificate_from_a_foreign_ca_is_refused(intruder: Intruder, tmp_path: Path) -> None:
    keys.init_ca(tmp_path, name="a foreign CA")
    forged = keys.issue_host(tmp_path, "hostA", [str(testbed.host_node("hostA").ip)])
    outcome, logged = intruder.attempt(ca=str(host_files("hostA").ca), cert=str(forged.cert),
                                       key=str(forged.key))
    assert outcome["stage"] == "connect", outcome
    assert outcome["error"] == "PeerNotTrusted" and outcome["by_peer"] is True
    assert "TLS handshake failed: certificate refused" in logged


def test_a_client_without_a_certificate_is_refused(intruder: Intruder) -> None:
    outcome, logged = intruder.attempt(tls="bare", ca=str(host_files("hostA").ca))
    assert outcome["stage"] == "connect", outcome
    assert outcome["error"] == "PeerNotTrusted" and outcome["by_peer"] is True
    assert "TLS handshake failed: peer did not return a certificate" in logged


def test_a_valid_certificate_of_another_host_is_refused(intruder: Intruder) -> None:
    """hostC holds a genuine certificate of our CA. Calling itself hostA, it is refused
    by hostB; answering in hostB's place, it is refused by the source."""
    c = host_files("hostC")
    files = {"ca": str(c.ca), "cert": str(c.cert), "key": str(c.key)}
    outcome, logged = intruder.attempt(**files)  # claims to be hostA (me)
    assert outcome["stage"] == "connect", outcome
    assert outcome["error"] == "PeerAborted"
    assert "is not trusted" in logged

    # The source means hostB, but reaches hostC's daemon (a stale address, a spoof).
    a = host_files("hostA")
    impostor = Intruder(intruder.image, target="hostC")
    outcome, _ = impostor.attempt(ca=str(a.ca), cert=str(a.cert), key=str(a.key),
                                  peer_name="hostB")
    assert outcome["stage"] == "connect", outcome
    assert outcome["error"] == "PeerNotTrusted" and outcome["by_peer"] is False
    assert "hostB" in outcome["message"]


def test_a_plaintext_peer_is_told_that_tls_is_required(intruder: Intruder) -> None:
    outcome, logged = intruder.attempt(tls=None)
    assert outcome["stage"] == "connect", outcome
    assert outcome["error"] == "PeerAborted" and "mutual TLS" in outcome["reason"]
    assert "speaks livemig in plaintext" in logged


def test_the_right_certificate_with_the_wrong_key_is_refused(
        intruder: Intruder, tmp_path: Path) -> None:
    """The HMAC stays as an inner check: a host certificate alone does not let a peer in
    without the cluster's shared key."""
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 32)
    a = host_files("hostA")
    outcome, logged = intruder.attempt(ca=str(a.ca), cert=str(a.cert), key=str(a.key),
                                       key_file=str(wrong))
    assert outcome["stage"] == "connect", outcome
    assert outcome["error"] == "AuthenticationError"
    assert "does not hold our key" in logged


# -- revocation ---------------------------------------------------------------------------


@contextlib.contextmanager
def revoked(host: str) -> Iterator[None]:
    """Revoke ``host``'s certificate at the test bed's CA and copy the CRL to every host,
    as an operator does; the daemons keep running. Afterwards ``host`` gets a new
    certificate, which its daemon takes up as it took the CRL: without a restart."""
    node = testbed.host_node(host)
    keys.revoke(paths.pki_dir(), cert=host_files(host).cert,
                reason=x509.ReasonFlags.key_compromise)
    for other in testbed.hosts():
        launch.distribute_crl(host_files(other.name))
    try:
        yield
    finally:
        keys.issue_host(paths.pki_dir(), host, [str(node.ip)], out=paths.tls_dir(host))


def migrate(loop: asyncio.AbstractEventLoop, vm: str, source: str, target: str
            ) -> MigrationReport:
    # The engine's defaults, as in test_migration: what is checked here is who may
    # migrate and how QEMU is confined, not whether a downtime target is kept.
    request = Migrate(vm=vm, to=target,
                      options=MigrateOptions(on_timeout=OnTimeout.SWITCHOVER))
    return loop.run_until_complete(control.migrate(source, request))


def assert_runs_on(loop: asyncio.AbstractEventLoop, vm: str, host: str) -> None:
    (record,) = [r for r in qemu.records() if r.spec.name == vm]
    assert record.host == host
    handle = loop.run_until_complete(qemu.VM.attach(record))
    try:
        assert loop.run_until_complete(handle.status()) == "running"
    finally:
        loop.run_until_complete(handle.close())


def test_a_revoked_target_gets_no_vm_and_the_others_go_on(
        start_vm: Callable[..., qemu.VM], loop: asyncio.AbstractEventLoop) -> None:
    vm = start_vm("rvk-to", Workload.IDLE, host="hostA")
    loop.run_until_complete(vm.close())
    target_log = paths.host_dir("hostB") / "livemigd.log"
    with revoked("hostB"):
        qemus_before, records_before = qemus_in("hostB"), qemu.records()
        log_from = target_log.stat().st_size
        with pytest.raises(control.MigrationFailed) as caught:
            migrate(loop, vm.name, "hostA", "hostB")
        # Refused in the TLS handshake: nothing started or recorded on the target.
        assert qemus_in("hostB") == qemus_before
        assert qemu.records() == records_before
        assert caught.value.vm_runs_on == "hostA" and caught.value.stage == "pre-migration"
        assert "hostB's certificate is revoked" in str(caught.value)
        assert_runs_on(loop, vm.name, "hostA")
        with target_log.open() as f:
            f.seek(log_from)
            logged = f.read()
        assert "TLS handshake failed" in logged and "incoming migration" not in logged
        # Between two hosts nobody revoked, migrations go on.
        assert migrate(loop, vm.name, "hostA", "hostC").verified is True
        assert_runs_on(loop, vm.name, "hostC")
    # hostB's new certificate is good: its daemon took it up without a restart.
    assert migrate(loop, vm.name, "hostC", "hostB").verified is True
    assert_runs_on(loop, vm.name, "hostB")


def test_a_revoked_source_sends_no_vm(start_vm: Callable[..., qemu.VM],
                                      loop: asyncio.AbstractEventLoop,
                                      intruder: Intruder) -> None:
    vm = start_vm("rvk-from", Workload.IDLE, host="hostA")
    loop.run_until_complete(vm.close())
    with revoked("hostA"):
        qemus_before, records_before = qemus_in("hostB"), qemu.records()
        # hostA's daemon reads the CRL too and says so in its own words.
        with pytest.raises(control.MigrationFailed) as caught:
            migrate(loop, vm.name, "hostA", "hostB")
        assert caught.value.vm_runs_on == "hostA"
        assert "hostA's own certificate is revoked" in str(caught.value)
        assert qemus_in("hostB") == qemus_before and qemu.records() == records_before
        assert_runs_on(loop, vm.name, "hostA")
        # The target does not count on that: hostA's files with no CRL (a thief's, or
        # a host not yet given the new CRL) are refused by hostB's daemon.
        a = host_files("hostA")
        outcome, logged = intruder.attempt(ca=str(a.ca), cert=str(a.cert), key=str(a.key))
        assert outcome["stage"] == "connect", outcome
        assert outcome["error"] == "PeerNotTrusted" and outcome["by_peer"] is True
        assert "hostB refused our certificate" in outcome["message"]
        assert "TLS handshake failed: certificate refused: certificate revoked" in logged


def test_the_control_socket_is_root_only(bed: list[testbed.Node]) -> None:
    path = control.socket_path("hostB")
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n"
             "    s.connect(sys.argv[1])\n"
             "except PermissionError:\n"
             "    print('refused')\n"
             "else:\n"
             "    print('connected')\n")
    as_nobody = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         "/usr/bin/python3", "-c", probe, str(path)],
        capture_output=True, text=True, timeout=30, check=True)
    assert as_nobody.stdout.strip() == "refused"
    as_root = subprocess.run(["/usr/bin/python3", "-c", probe, str(path)],
                             capture_output=True, text=True, timeout=30, check=True)
    assert as_root.stdout.strip() == "connected"
    with socket.socket(socket.AF_UNIX) as s:  # and the daemon answers root
        s.connect(str(path))
        s.sendall(encode_control(Ping()))
        assert decode_control_reply(s.makefile("rb").readline()) == Pong(host="hostB")


# -- confined QEMUs and the tunnel --------------------------------------------------------


def confinement(pid: int) -> dict[str, str]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return {k: " ".join(fields[k].split()) for k in ("Uid", "Gid", "Groups", "CapEff",
                                                     "CapPrm", "CapBnd", "NoNewPrivs",
                                                     "Seccomp")}


def assert_confined(pid: int) -> None:
    user = pwd.getpwnam(qemu.QEMU_USER)
    seen = confinement(pid)
    assert seen["Uid"] == " ".join([str(user.pw_uid)] * 4), seen  # real, effective, saved, fs
    assert seen["Gid"] == " ".join([str(user.pw_gid)] * 4), seen
    assert seen["Groups"] == "", seen  # no supplementary groups
    assert seen["CapEff"] == seen["CapPrm"] == seen["CapBnd"] == "0000000000000000", seen
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2", seen  # 2: filter mode
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[0] == qemu.QEMU_BINARY  # the PID is QEMU's own, nothing in between
    sandbox = argv[argv.index("-sandbox") + 1].split(",")
    assert "elevateprivileges=deny" in sandbox and "spawn=deny" in sandbox, sandbox
    assert "-runas" not in argv
    # Non-dumpable (the shim sees to it): its /proc files are root's, so no other QEMU,
    # all being the same user, may ptrace it or read its memory.
    assert os.stat(f"/proc/{pid}/mem").st_uid == 0
    # Its RAM file was lent to it for start-up only: root's again.
    (ram,) = [line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
              if line.split()[-1].endswith(".ram")]
    ram_here = os.stat(f"/proc/{pid}/root{ram}")  # QEMU's path is its host's
    assert (ram_here.st_uid, ram_here.st_mode & 0o777) == (0, 0o600)


def tcp_sockets_of(pid: int) -> set[int]:
    """Inodes of the TCP sockets ``pid`` holds (any state), from its namespace's tables."""
    tcp = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            tcp.add(int(line.split()[9]))
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                held.add(int(target[8:-1]))
    return held & tcp


def test_every_qemu_runs_confined_and_the_dirty_log_still_works(
        start_vm: Callable[..., qemu.VM], loop: asyncio.AbstractEventLoop) -> None:
    vm = start_vm("conf", Workload.MMUNCHER, options=(("mm_mib", "16"), ("mm_rate", "8")))
    loop.run_until_complete(vm.close())
    assert_confined(vm.pid)
    assert "-sandbox" in Path(f"/proc/{vm.pid}/cmdline").read_bytes().decode().split("\0")
    # There and back: the first destination becomes a source, still confined.
    for source, target in (("hostA", "hostB"), ("hostB", "hostA")):
        report = migrate(loop, vm.name, source, target)
        assert report.tracker == "uffd", report.tracker  # the shim and pagemap work
        assert report.verified is True
        (record,) = [r for r in qemu.records() if r.spec.name == vm.name]
        assert record.host == target
        assert_confined(record.pid)
    moved = loop.run_until_complete(qemu.VM.attach(record))
    try:
        stats = loop.run_until_complete(moved.agent.verify())["stats"]["mmuncher"]
        assert stats["errors"] == 0, stats
    finally:
        loop.run_until_complete(moved.close())


def test_an_incoming_qemu_listens_on_no_port(
        bed: list[testbed.Node], image: builder.Image, loop: asyncio.AbstractEventLoop) -> None:
    daemon = int((paths.host_dir("hostB") / "livemigd.pid").read_text())
    assert tcp_sockets_of(daemon)  # the check sees a listener where there is one
    spec = VMSpec(name="incoming", ip=UNUSED_IP(), mem_mib=64, workload=Workload.IDLE,
                  image=image.name, kernel=image.kernel, initrd=image.initrd)

    async def main() -> None:
        vm = await bed_.start_incoming(spec, "hostB")
        try:
            sink = await StateSink.open(vm)
            try:
                await vm.qmp_command("migrate-incoming", uri=sink.uri)
                assert await vm.status() == "inmigrate"
                assert_confined(vm.pid)
                assert tcp_sockets_of(vm.pid) == set()
            finally:
                sink.close()
        finally:
            await vm.close()
            await bed_.stop_vm_on(spec.name, "hostB")
    loop.run_until_complete(main())


# -- plaintext, only by choice --------------------------------------------------------------


def restart_daemons(hosts: list[str], *, plaintext: bool) -> None:
    """End these hosts' daemons (ours: this test bed started them) and start them again."""
    launch.stop_daemons(hosts)
    launch.ensure_daemons(plaintext=plaintext)


def test_plaintext_only_by_choice_and_refused_by_tls_daemons(
        start_vm: Callable[..., qemu.VM], loop: asyncio.AbstractEventLoop) -> None:
    tls_vm = start_vm("ptls", Workload.IDLE, host="hostA")
    plain_vm = start_vm("pplain", Workload.IDLE, host="hostC")
    for vm in (tls_vm, plain_vm):
        loop.run_until_complete(vm.close())
    restart_daemons(["hostB", "hostC"], plaintext=True)
    try:
        for host in ("hostB", "hostC"):
            log = (paths.host_dir(host) / "livemigd.log").read_text()
            assert "(PLAINTEXT)" in log and "--insecure-plaintext" in log
        qemus_before = qemus_in("hostB")

        # A TLS source and a plaintext target: refused, the VM runs on as before.
        with pytest.raises(control.MigrationFailed) as caught:
            migrate(loop, "ptls", "hostA", "hostB")
        assert caught.value.vm_runs_on == "hostA"
        assert "--insecure-plaintext" in str(caught.value)
        # A plaintext source and a TLS target: told so, in the target's words.
        with pytest.raises(control.MigrationFailed) as caught:
            migrate(loop, "pplain", "hostC", "hostA")
        assert caught.value.vm_runs_on == "hostC"
        assert "requires mutual TLS" in str(caught.value)
        assert qemus_in("hostB") == qemus_before
        assert [r.host for r in qemu.records() if r.spec.name == "pplain"] == ["hostC"]

        # Two plaintext daemons, by choice: the migration works (the tunnel included).
        report = migrate(loop, "pplain", "hostC", "hostB")
        assert report.verified is True
        assert [r.host for r in qemu.records() if r.spec.name == "pplain"] == ["hostB"]
    finally:
        restart_daemons(["hostB", "hostC"], plaintext=False)
    log = (paths.host_dir("hostB") / "livemigd.log").read_text()
    assert log.rstrip().splitlines()[-1].endswith("(mutual TLS)")
