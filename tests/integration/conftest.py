"""Fixtures that boot real QEMU guests on a real test bed of network namespaces.

The test bed is built once per session and torn down at the end, whatever happens. Each
VM a test starts is stopped after the test; when a test fails, the consoles and QEMU's
stderr of its VMs are attached to the report, as Firecracker's fixtures do, and so is
what each host's daemon logged meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig import paths
from livemig.errors import VMNotFound
from livemig.experiments import bed as bed_
from livemig.image import builder
from livemig.lab import launch
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import Workload

# The tests build a test bed of their own, apart from any an operator may have up.
os.environ.setdefault("LIVEMIG_INSTANCE", "t")

if os.geteuid() != 0 or shutil.which(qemu.QEMU_BINARY) is None:
    pytest.skip("integration tests need root and QEMU (run 'make test')", allow_module_level=True)


@pytest.fixture(scope="session")
def image() -> builder.Image:
    return builder.build(log=lambda _: None).image


@pytest.fixture(scope="session")
def _session_bed() -> Iterator[None]:
    testbed.up(3)
    yield
    asyncio.run(bed_.stop_all_vms())
    testbed.down()


DAEMON_LOG_TAIL_CHARS = 8000
VM_LOG_TAIL_CHARS = 6000
_daemon_logs_from = pytest.StashKey[dict[str, int]]()
_vms_of_the_test = pytest.StashKey[list[str]]()


def _attach_vm_logs_on_failure(item: pytest.Item, name: str) -> None:
    item.stash.setdefault(_vms_of_the_test, []).append(name)


@pytest.fixture
def vm_logs_on_failure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``vm_logs_on_failure(name)``: if the test fails, its report gets the consoles and
    QEMU's stderr of every copy of VM ``name``, read when the failure is reported (before
    teardown stops them). ``start_vm`` does it for the VMs it starts."""
    return lambda name: _attach_vm_logs_on_failure(request.node, name)


def _vm_log_sections(item: pytest.Item) -> list[tuple[str, str]]:
    sections = []
    for name in item.stash.get(_vms_of_the_test, []):
        # Every copy, wherever the VM has moved meanwhile.
        for record in [r for r in qemu.records() if r.spec.name == name]:
            for label, path in (("console", record.console_log),
                                ("stderr", record.stderr_log)):
                with contextlib.suppress(OSError):
                    text = path.read_text(errors="replace")[-VM_LOG_TAIL_CHARS:]
                    sections.append((f"{name} on {record.host}: {label}", text))
    return sections


def _daemon_log(host: str) -> Path:
    return paths.host_dir(host) / "livemigd.log"


@pytest.fixture
def bed(request: pytest.FixtureRequest, _session_bed: None) -> list[testbed.Node]:
    """The test bed, up with a daemon per host. Idempotent, so a test that tore it down
    leaves no gap behind."""
    nodes = testbed.up(3)
    launch.ensure_daemons()
    # Where each daemon's log stands: a failure's report gets what was logged since.
    request.node.stash[_daemon_logs_from] = {
        node.name: _daemon_log(node.name).stat().st_size
        for node in nodes if _daemon_log(node.name).exists()}
    return nodes


def _daemon_log_sections(item: pytest.Item) -> list[tuple[str, str]]:
    sections = []
    for host, start in item.stash.get(_daemon_logs_from, {}).items():
        try:
            with _daemon_log(host).open("rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
        except OSError as exc:
            text = f"(cannot read it: {exc})"
        if len(text) > DAEMON_LOG_TAIL_CHARS:
            text = "[...]\n" + text[-DAEMON_LOG_TAIL_CHARS:]
        sections.append((f"livemigd.log of {host} during the test", text or "(nothing)"))
    return sections


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop per test: VM handles (QMP, agent) are bound to the loop that made them.
    Whatever a test left running on it (a time-out, say, struck mid-drill) is cancelled
    and waited for before the loop closes, as ``asyncio.run`` does: it must not end in
    the next test as a destroyed task or an unclosed transport."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    try:
        pending = asyncio.all_tasks(event_loop)
        for task in pending:
            task.cancel()
        if pending:
            event_loop.run_until_complete(asyncio.wait(pending, timeout=30))
        event_loop.run_until_complete(event_loop.shutdown_asyncgens())
    finally:
        event_loop.close()


@pytest.fixture
def start_vm(
    request: pytest.FixtureRequest,
    bed: list[testbed.Node],
    image: builder.Image,
    loop: asyncio.AbstractEventLoop,
) -> Iterator[Callable[..., qemu.VM]]:
    """``start_vm(name, workload, host=..., mem_mib=..., options=...)`` boots a VM and
    waits for its workload; every VM is stopped when the test ends."""
    started: list[qemu.VM] = []

    def start(
        name: str,
        workload: Workload,
        *,
        host: str = "hostA",
        mem_mib: int = 128,
        options: tuple[tuple[str, str], ...] = (),
        image_: builder.Image | None = None,
    ) -> qemu.VM:
        _attach_vm_logs_on_failure(request.node, name)
        vm = loop.run_until_complete(bed_.start_vm(
            name, image_ or image, host, mem_mib=mem_mib, workload=workload, options=options))
        started.append(vm)
        return vm

    yield start
    for vm in started:
        loop.run_until_complete(vm.close())
        # Every copy goes, wherever the VM has moved meanwhile (or none is left).
        with contextlib.suppress(VMNotFound):
            loop.run_until_complete(bed_.stop_vm(vm.name))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.failed and report.when == "call":
        # On the call's report, read now: a section added in teardown goes to the
        # teardown's report, which pytest shows only if its title says "teardown"; and
        # teardown stops the VMs and removes their logs.
        report.sections.extend(_vm_log_sections(item))
        report.sections.extend(_daemon_log_sections(item))
    return report
