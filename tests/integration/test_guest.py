"""Real guests on the real test bed: each workload boots on hostA and serves the client.

What a person would check by hand: the page comes back over HTTP, the game server
streams snapshots, echo answers, mmuncher's own integrity check passes, a user's own
static program runs, a crashed QEMU is reported with its stderr, and 'testbed down'
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from livemig import paths
from livemig.errors import LivemigError
from livemig.experiments import bed as bed_
from livemig.experiments.bed import BedInUse, exclusive_test_bed
from livemig.experiments.probing import ProbeRun
from livemig.image import builder
from livemig.net import testbed
from livemig.probes.http import POST_FORM
from livemig.vm import qemu
from livemig.vm.spec import Workload

StartVM = Callable[..., qemu.VM]


def echo_summary(ip: IPv4Address, seconds: str = "1") -> dict[str, float]:
    with ProbeRun(testbed.CLIENT, "echo", str(ip), "--duration", seconds) as probe:
        summary: dict[str, float] = probe.wait()["summary"]
    return summary


def assert_echo_answers(ip: IPv4Address) -> None:
    summary = echo_summary(ip)
    assert summary["replies"] > 100, summary
    # An idle LAN: the longest gap between replies is a few ms, not a stall.
    assert summary["downtime_ms"] < 500, summary


def test_web_serves_static_and_dynamic_pages(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop
) -> None:
    vm = start_vm("web1", Workload.WEB, options=(("web_kb", "64"),))
    ip = vm.record.spec.ip
    url = f"http://{ip}/file.bin"
    with ProbeRun(testbed.CLIENT, "http", url, "--clients", "2", "--duration", "2") as probe:
        result = probe.wait()
    summary = result["summary"]
    assert summary["requests"] > 0, result
    assert summary["bytes"] == summary["requests"] * 64 * 1024, summary
    mix = "/file.bin:0.4,/cgi-bin/dyn?kb=4:0.4,POST /cgi-bin/post:0.2"
    with ProbeRun(testbed.CLIENT, "http", f"http://{ip}", "--clients", "2", "--duration", "2",
                  "--mix", mix) as probe:
        mixed = probe.wait()["summary"]
    assert mixed["errors"] == 0, mixed
    by_path = mixed["requests_by_path"]
    assert all(n > 0 for n in by_path.values()), by_path
    # Each answer whole: the file, the CGI's KiB, and the post CGI's confirmation of the
    # whole form (it read Content-Length bytes from httpd).
    confirmation = len(f"posted {len(POST_FORM)} bytes")
    assert mixed["bytes"] == (by_path["/file.bin"] * 64 * 1024 + by_path["/cgi-bin/dyn?kb=4"]
                              * 4 * 1024 + by_path["POST /cgi-bin/post"] * confirmation), mixed
    assert_echo_answers(ip)


def test_game_server_streams_snapshots_to_players(start_vm: StartVM) -> None:
    vm = start_vm("game1", Workload.GAME)
    with ProbeRun(testbed.CLIENT, "game", str(vm.record.spec.ip), "--players", "3",
                  "--duration", "3") as probe:
        result = probe.wait()
    players = result["players"]
    assert len(players) == 3
    for player in players:
        # 20 Hz for ~3 s; TCG on a shared machine may drop the pace, never to nothing.
        assert player["snapshots"] >= 20, player
        assert 20 <= player["interarrival"]["median_ms"] <= 150, player["interarrival"]
    assert_echo_answers(vm.record.spec.ip)


def test_mmuncher_integrity_check_passes(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop
) -> None:
    vm = start_vm("mm1", Workload.MMUNCHER, options=(("mm_mib", "32"),))
    status = loop.run_until_complete(vm.agent.verify())
    stats = status["stats"]["mmuncher"]
    assert stats["full_verifies"] >= 1
    assert stats["errors"] == 0 and stats["last_full_verify_errors"] == 0, stats
    assert stats["pages_written"] > 0
    assert_echo_answers(vm.record.spec.ip)


@pytest.mark.parametrize("workload", [Workload.ECHO, Workload.IDLE])
def test_quiet_workloads_answer_echo(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop, workload: Workload
) -> None:
    vm = start_vm(f"q-{workload}", workload)
    assert loop.run_until_complete(vm.status()) == "running"
    assert_echo_answers(vm.record.spec.ip)


def test_second_image_build_is_a_cache_hit(image: builder.Image) -> None:
    again = builder.build(log=lambda _: None)
    assert again.cache_hit
    assert again.image.digest == image.digest


def test_custom_workload_runs_the_users_static_program(
    start_vm: StartVM, tmp_path: Path
) -> None:
    program = tmp_path / "hello"
    source = Path(__file__).parent / "data" / "hello.c"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(program), str(source)], check=True)
    greeting = tmp_path / "hello.txt"
    greeting.write_text(f"greetings from a custom workload {os.getpid()}\n")
    recipe = builder.Recipe(
        name="test-custom",
        additions=(
            builder.Addition(program, "/usr/bin/hello"),
            builder.Addition(greeting, "/etc/hello.txt"),
        ),
        run="/usr/bin/hello /etc/hello.txt",
    )
    custom = builder.build(recipe, log=lambda _: None).image
    vm = start_vm("custom1", Workload.CUSTOM, options=(("ready_port", "9000"),), image_=custom)
    reply = subprocess.run(
        testbed.CLIENT.exec_argv(["busybox", "nc", "-w", "3", str(vm.record.spec.ip), "9000"]),
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert reply.stdout == greeting.read_text(), reply.stderr


@pytest.fixture
def broken_image(image: builder.Image) -> Iterator[builder.Image]:
    """The image with a kernel QEMU cannot load, in the image cache every host reads."""
    directory = paths.images_dir() / "broken"
    directory.mkdir()
    try:
        (directory / "manifest.json").write_text((image.directory / "manifest.json").read_text())
        (directory / "vmlinuz").write_bytes(b"not a kernel")
        os.link(image.initrd, directory / "initrd.img")
        yield builder.Image.load("broken")
    finally:
        shutil.rmtree(directory)


def test_a_crashed_qemu_is_reported_with_its_stderr(
    bed: list[testbed.Node], broken_image: builder.Image, loop: asyncio.AbstractEventLoop
) -> None:
    with pytest.raises(LivemigError) as caught:
        loop.run_until_complete(bed_.start_vm("broken", broken_image, "hostA", mem_mib=128,
                                              workload=Workload.IDLE))
    # The daemon's one sentence carries QEMU's own last word.
    assert "exited" in str(caught.value) and "kernel" in str(caught.value)
    assert not paths.ram_file("hostA", "broken").exists()
    assert not paths.vm_dir("hostA", "broken").exists()
    assert all(r.spec.name != "broken" for r in qemu.records())


def test_testbed_down_leaves_nothing_behind(
    start_vm: StartVM, loop: asyncio.AbstractEventLoop
) -> None:
    vm = start_vm("doomed", Workload.IDLE, host="hostB")
    loop.run_until_complete(vm.close())
    ram_file = paths.ram_file("hostB", "doomed")
    assert ram_file.exists()
    host_b = testbed.host_node("hostB")
    removed = testbed.down()  # with a VM running: its host's end takes everything
    assert host_b.netns in removed.namespaces
    assert testbed.existing_namespaces() == []
    # Exited: QEMU is this test's child, so it stays a zombie until the fixture reaps it.
    assert not vm.record.process_alive()
    assert list(paths.SHM_DIR.glob(paths.ram_file_glob())) == []
    assert not ram_file.exists()  # hostB's /dev/shm went with hostB
    assert not paths.run_dir().exists()  # keys, locks, holds: nothing of the bed is left
    # Nothing of ours answers on the LAN address any more: the client namespace is gone.
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(testbed.CLIENT.exec_argv(["true"]), check=True, capture_output=True)


def test_probes_enter_the_client_namespace_by_themselves(bed: list[testbed.Node]) -> None:
    """A probe started from the machine's own namespace must not send from there."""
    code = (
        "import os; from livemig.net import testbed; testbed.enter_client_namespace(); "
        "print(os.stat('/proc/self/ns/net').st_ino)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert int(done.stdout) == os.stat(f"/run/netns/{testbed.CLIENT.netns}").st_ino
    assert int(done.stdout) != os.stat("/proc/self/ns/net").st_ino


def test_an_exclusive_bed_refuses_an_instance_in_use_and_leaves_none_behind(
    bed: list[testbed.Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    in_use = testbed.existing_namespaces()
    with pytest.raises(BedInUse), exclusive_test_bed(len(bed)):
        pass
    assert testbed.existing_namespaces() == in_use  # the running bed was not touched

    # A bed of another instance, left by an exception: nothing of it remains.
    monkeypatch.setenv("LIVEMIG_INSTANCE", "tx")
    with pytest.raises(RuntimeError), exclusive_test_bed(1, daemons=False, say=lambda _: None):
        assert testbed.existing_namespaces()
        raise RuntimeError("the benchmark failed")
    assert testbed.existing_namespaces() == []
    assert not paths.run_dir().exists()
