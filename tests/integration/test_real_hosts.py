"""Hosts named by configuration, sharing nothing but the LAN: the issue's own check.

A test bed of its own (instance ``th``) with the operator's names and LAN:
``testbed up --hosts alpha,beta --lan 10.99.0.0/24``. Everything is done with the CLI, as
an operator would: from the lab's namespace, or inside a host (``testbed exec``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from livemig.image import builder
from livemig.net import testbed

LIVEMIG = str(Path(sys.executable).with_name("livemig"))
INSTANCE = "th"
LAN = IPv4Network("10.99.0.0/24")


def livemig(*argv: str, inside: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI in the lab's namespace, or inside host ``inside`` (as its operator)."""
    command = [LIVEMIG, *argv]
    if inside is not None:
        command = [LIVEMIG, "testbed", "exec", inside, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, "LIVEMIG_INSTANCE": INSTANCE})
    if check:
        assert done.returncode == 0, done
    return done


def ram_files(where: str | None) -> list[str]:
    """The RAM files in /dev/shm: the lab's own, or a host's."""
    if where is None:
        return sorted(p.name for p in Path("/dev/shm").glob("livemig-*.ram"))
    listing = livemig("testbed", "exec", where, "--", "ls", "/dev/shm").stdout
    return sorted(n for n in listing.split() if n.endswith(".ram"))


def listed(inside: str, *extra: str) -> list[dict[str, object]]:
    done = livemig("vm", "list", "--all", "--json", *extra, inside=inside)
    vms: list[dict[str, object]] = json.loads(done.stdout)["vms"]
    return vms


@pytest.fixture(scope="module")
def named_bed(image: builder.Image) -> Iterator[None]:
    livemig("testbed", "up", "--hosts", "alpha,beta", "--lan", str(LAN))
    try:
        yield
    finally:
        livemig("testbed", "down")


def test_a_vm_moves_between_isolated_hosts_named_by_their_operator(
        named_bed: None, tmp_path: Path) -> None:
    ip = IPv4Address(livemig("--host", "alpha", "vm", "start", "iso", "--workload", "web",
                             "--mem", "128").stdout.strip())
    assert ip in LAN
    # Its RAM is alpha's alone: not in the machine's /dev/shm, nor in beta's.
    assert ram_files("alpha") == ["livemig-iso.ram"]
    assert ram_files("beta") == [] and "livemig-iso.ram" not in ram_files(None)
    # Every host tells of its own VMs; together, the VM appears once.
    assert [(vm["name"], vm["host"], vm["copy"]) for vm in listed("beta")] == [
        ("iso", "alpha", "primary")]

    report = tmp_path / "report.json"
    livemig("migrate", "iso", "--to", "beta", "--quiet", "--json", str(report))
    assert json.loads(report.read_text())["verified"] is True
    assert ram_files("beta") == ["livemig-iso.ram"] and ram_files("alpha") == []
    assert [(vm["name"], vm["host"], vm["ip"]) for vm in listed("alpha")] == [
        ("iso", "beta", str(ip))]

    # From alpha, over mutual TLS: beta's console of the VM, which booted on alpha.
    console = livemig("--host", "beta", "vm", "console", "iso", inside="alpha").stdout
    assert "lm:" in console, console[-500:]

    # alpha's pool lent iso its address: alpha does not hand it out again.
    second = IPv4Address(livemig("vm", "start", "iso2", "--workload", "idle", "--mem", "96",
                                 inside="alpha").stdout.strip())
    assert second != ip
    # Names are the cluster's: beta refuses one that alpha runs.
    refused = livemig("vm", "start", "iso2", "--workload", "idle", inside="beta", check=False)
    assert refused.returncode == 1 and "alpha" in refused.stderr, refused


def test_an_unreachable_host_is_named_and_nothing_waits_for_it(
        named_bed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_INSTANCE", INSTANCE)  # this process's bed: th's
    beta = testbed.host_node("beta")
    testbed.set_blackhole(beta, on=True)  # beta's address answers nothing, not even RST
    try:
        started = time.monotonic()
        done = livemig("vm", "list", "--all", inside="alpha", check=False)
        assert time.monotonic() - started < 30
        assert done.returncode == 1 and "beta: unreachable" in done.stderr, done
        # No pool address while beta, which may hold one of alpha's, is silent.
        refused = livemig("vm", "start", "iso3", "--workload", "idle", inside="alpha",
                          check=False)
        assert refused.returncode == 1 and "beta" in refused.stderr, refused
    finally:
        testbed.set_blackhole(beta, on=False)
