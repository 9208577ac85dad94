"""``livemig demo``: the main job, end to end on the built-in test bed.

Today it brings up the test bed, boots a VM with the chosen workload on hostA, shows
from the client's namespace that the VM serves (echo probe plus the workload's own
probe), and tears everything down, also when something fails. Live migration joins
here when the migration engine lands.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from livemig.experiments.probing import ProbeRun
from livemig.image import builder
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import VMSpec, Workload

DEMO_VM = "demo"
DEMO_HOST = "hostA"


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _workload_probe(workload: Workload, ip: str) -> ProbeRun | None:
    if workload is Workload.WEB:
        return ProbeRun(testbed.CLIENT, "http", f"http://{ip}/file.bin", "--clients", "4",
                        "--duration", "3")
    if workload is Workload.GAME:
        return ProbeRun(testbed.CLIENT, "game", ip, "--players", "2", "--duration", "3")
    return None


async def _exercise(workload: Workload, mem_mib: int) -> dict[str, Any]:
    image = builder.build(log=_say).image
    spec = VMSpec(
        name=DEMO_VM,
        ip=qemu.free_ip(),
        mem_mib=mem_mib,
        workload=workload,
        image=image.name,
        kernel=image.kernel,
        initrd=image.initrd,
    )
    _say(f"booting VM {DEMO_VM!r} ({workload}, {mem_mib} MiB) on {DEMO_HOST}")
    started = time.monotonic()
    vm = await qemu.VM.start(spec, DEMO_HOST)
    boot_s = time.monotonic() - started
    try:
        _say(f"workload ready after {boot_s:.1f} s at {spec.ip}; probing from the client")
        ip = str(spec.ip)
        workload_probe = _workload_probe(workload, ip)
        with ProbeRun(testbed.CLIENT, "echo", ip, "--duration", "3") as echo:
            echo_result = echo.wait()
        report: dict[str, Any] = {
            "vm": qemu.describe(vm.record, await vm.status()),
            "boot_to_ready_s": round(boot_s, 2),
            "echo": echo_result.get("summary", {}),
        }
        if workload_probe is not None:
            with workload_probe:
                report[str(workload)] = workload_probe.wait().get("summary", {})
        if workload is Workload.MMUNCHER:
            report["mmuncher"] = (await vm.agent.verify()).get("stats", {}).get("mmuncher", {})
        return report
    finally:
        await vm.stop()


def run(workload: Workload, mem_mib: int, json_file: Path | None) -> int:
    _say("bringing up the test bed (hostA, hostB, hostC, client)")
    testbed.up(3)
    try:
        report = asyncio.run(_exercise(workload, mem_mib))
    finally:
        _say("tearing down")
        asyncio.run(qemu.stop_all())
        testbed.down()
    print(json.dumps(report, indent=2))
    if json_file is not None:
        json_file.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def add_demo_command(commands: Any) -> None:
    parser = commands.add_parser("demo", help="the main job on the built-in test bed")
    parser.add_argument("--workload", default="web",
                        choices=[w.value for w in Workload if w is not Workload.CUSTOM])
    parser.add_argument("--mem", type=int, default=256, metavar="MiB")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report here")
    parser.set_defaults(
        func=lambda args: run(Workload(args.workload), args.mem, args.json)
    )
