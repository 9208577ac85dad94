"""The CLI's one-sentence errors for cases that need a live test bed, daemons and a VM.

The operator's command is run as a process of its own, as typed at a shell, against the
tests' own test bed (LIVEMIG_INSTANCE from conftest). Each refused command must leave
the VM running where it was. The cases without a test bed are in tests/unit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from livemig.daemon import control
from livemig.lab import launch
from livemig.migration.holds import HoldPoint, release, wait_until_held
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import Workload
from livemig.wire.messages import MemoryFigures, MemoryQuery, Ping, Pong

StartVM = Callable[..., qemu.VM]
LIVEMIG = str(Path(sys.executable).with_name("livemig"))


def livemig(*argv: str, host: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in the lab's namespace, or inside ``host`` (as its operator there)."""
    command = [LIVEMIG, *argv]
    if host is not None:
        command = [LIVEMIG, "testbed", "exec", host, "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ))


def assert_one_sentence(done: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    for mention in mentions:
        assert mention in lines[0], (mention, lines[0])


def runs_only_on(name: str, host: str) -> bool:
    return [(r.host, r.incoming) for r in qemu.records() if r.spec.name == name] == [
        (host, False)
    ]


@pytest.fixture
def idle_vm(start_vm: StartVM, loop: asyncio.AbstractEventLoop) -> qemu.VM:
    vm = start_vm("cli", Workload.IDLE)
    loop.run_until_complete(vm.close())  # the commands under test take hold of it
    return vm


def test_unknown_vm_unknown_host_and_same_host_on_a_live_bed(idle_vm: qemu.VM) -> None:
    assert_one_sentence(livemig("migrate", "nosuchvm", "--to", "hostB"), "nosuchvm")
    # hostZ is a host name, but not one that is up: the sentence lists the ones that are.
    assert_one_sentence(livemig("migrate", "cli", "--to", "hostZ"), "hostZ", "hostA, hostB")
    assert_one_sentence(livemig("migrate", "cli", "--to", "hostA"), "already runs on hostA")
    assert_one_sentence(livemig("vm", "stop", "nosuchvm"), "nosuchvm")
    assert_one_sentence(livemig("vm", "pause", "nosuchvm"), "nosuchvm")
    assert_one_sentence(livemig("cancel", "cli"), "no migration of 'cli'")
    assert runs_only_on("cli", "hostA")


def test_a_second_vm_of_the_same_name_or_an_unknown_image_is_refused(idle_vm: qemu.VM) -> None:
    assert_one_sentence(livemig("vm", "start", "cli", "--host", "hostB", "--workload", "idle"),
                        "cli", "hostA")
    assert_one_sentence(livemig("vm", "start", "other", "--host", "hostB", "--workload",
                                "idle", "--image", "nosuchimage"), "nosuchimage")
    assert runs_only_on("cli", "hostA")
    assert not any(r.spec.name == "other" for r in qemu.records())


def test_migrating_when_the_source_daemon_is_down_says_how_to_start_it(
    idle_vm: qemu.VM,
) -> None:
    pid = int(launch.pid_file("hostA").read_text())
    os.kill(pid, signal.SIGTERM)  # our test bed's daemon: we started it
    deadline = time.monotonic() + 10
    while control.socket_path("hostA").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert_one_sentence(livemig("migrate", "cli", "--to", "hostB"), "hostA", "testbed up")
        assert runs_only_on("cli", "hostA")
    finally:
        launch.ensure_daemons()


def test_a_second_daemon_for_a_host_leaves_the_running_one_alone(
    bed: list[testbed.Node], loop: asyncio.AbstractEventLoop
) -> None:
    assert_one_sentence(livemig("daemon", host="hostA"), "already serves hostA")

    # The running daemon still has its control socket: it was not unlinked under it.
    pong = loop.run_until_complete(control.request("hostA", Ping(), Pong))
    assert pong == Pong(host="hostA")

    # It also says where its memory is (the soak reads this after every migration).
    figures = loop.run_until_complete(control.request("hostA", MemoryQuery(), MemoryFigures))
    assert figures.rss_kib is not None and figures.rss_kib > 10_000, figures
    assert figures.heap_in_use_kib is not None, figures
    assert 0 < figures.heap_in_use_kib < figures.rss_kib, figures


def test_ctrl_c_stops_the_command_but_not_the_migration(idle_vm: qemu.VM) -> None:
    # Ctrl-C as at a terminal: a suite started in the background by a shell without job
    # control inherits SIGINT ignored, and so would the command.
    migrate = subprocess.Popen([LIVEMIG, "migrate", "cli", "--to", "hostB", "--quiet",
                                "--hold-at", "round-1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Held inside round 1 (the whole migration takes about two seconds otherwise).
    asyncio.run(wait_until_held("cli", HoldPoint.ROUND_1, timeout=60.0))
    migrate.send_signal(signal.SIGINT)
    _, err = migrate.communicate(timeout=30)
    release("cli", HoldPoint.ROUND_1)
    assert migrate.returncode == 130
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and "livemig cancel cli" in err, err
    deadline = time.monotonic() + 90
    while not runs_only_on("cli", "hostB") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runs_only_on("cli", "hostB")


def test_a_migration_for_programs_streams_json_and_reports_its_prediction(
        idle_vm: qemu.VM) -> None:
    # No rate given: the link is measured. A target out of reach (this machine's load is
    # not ours to control) switches over rather than aborting: the test is of what the
    # command says, the bench of whether the target is kept.
    done = livemig("migrate", "cli", "--to", "hostB", "--downtime", "50",
                   "--on-timeout", "switchover", "--progress", "json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    progress, result = lines[:-1], lines[-1]
    assert progress and all(p["type"] == "progress" for p in progress)
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents), "progress ran backwards"
    assert any(p["link_mbps"] for p in progress)
    report = result["report"]
    assert result["type"] == "result" and report["rates"] == "auto"
    assert report["downtime_target_ms"] == 50.0
    assert report["predicted_downtime_ms"] > 0 and report["link_mbps"] > 0
    assert report["downtime_over_predicted"] == pytest.approx(
        report["downtime_ms"] / report["predicted_downtime_ms"], rel=1e-2)
    assert report["verified"] is True
    assert runs_only_on("cli", "hostB")
    history = livemig("switchovers", "--host", "hostA", "--json")
    assert [e["vm"] for e in json.loads(history.stdout)][-1] == "cli"
