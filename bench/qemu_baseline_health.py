"""Does QEMU's own migration (each of our baselines) leave the guest whole, and if not, why?

The paper experiment saw guests broken (list corruption, GPFs, panics, silence) after
QEMU 7.2's pre-copy with downtime-limit 30 ms, never after the other engines. This checks
every mode of ``baselines.MODES`` and separates the suspects on one loaded VM (the game
server with its players, by default) moved hostA <-> hostB again and again by
``baselines.migrate``, exactly as the paper drives QEMU. A condition is a mode with
optional variants, ``MODE[+noshim][+ours|+paused|+oddsize]``:

- the uffd shim that every QEMU gets in LD_PRELOAD: on, or off with ``+noshim``
  (``LIVEMIG_NO_UFFD_SHIM=1``: QEMU as shipped);
- QEMU's own dirty tracking at a small downtime limit: ``qemu-precopy-30`` against
  ``qemu-precopy`` (more iterations, so more dirty-bitmap syncs while the guest runs);
- the order: QEMU after QEMU (each condition migrates the same VM with QEMU over and
  over, and every run notes how many QEMU migrations the guest has had since its boot),
  or QEMU after ours (``+ours`` puts one migration by our engine before each);
- QEMU 7.2's fast dirty-bitmap sync, which leaves TCG's TLB stale: ``+oddsize`` runs the
  same guest with two pages more RAM, which QEMU syncs page by page (``odd_size_argv``);
- the compare itself: ``+paused`` stops the guest before QEMU's migration
  starts, so nothing can dirty its RAM and the images must come out equal;
- a stale destination RAM file: no file may wait at the destination's path before the
  migration (checked for every run, ``dest_file_fresh``).

The witness is direct: once QEMU reports ``completed`` on both sides, both QEMUs are
paused (the source in ``postmigrate``, the destination ``paused``: ``baselines.migrate``
turns its autostart off and checks both run states), so the two RAM files must be
byte-equal. Every page that differs is an update the migration lost. (A destination left
to autostart, as this check once did, runs its guest before the compare, which then
counts that guest's own writes: 60-270 "lost" pages that were none.) Postcopy has no such
moment, its destination runs before its RAM is complete: only its guest is checked. Then
the guest runs on and is checked like the paper checks it: its console
(``paper.guest_kernel_trouble``), the UDP echo answering after the switchover, the guest
agent. A broken guest is replaced by a fresh boot, as in the paper.

    .venv/bin/python bench/qemu_baseline_health.py [--runs 4]
        [--conditions qemu-precopy,qemu-precopy-30,qemu-multifd,qemu-autoconverge,...]
        [--workload game] [--mem 256] [--json FILE]

For another QEMU (7.2, unpacked beside the system's) set ``LIVEMIG_QEMU_BINARY`` and
``LIVEMIG_QEMU_DATADIR`` (see ``livemig.vm.qemu``); the output names the version.

It builds a test bed of its own (LIVEMIG_INSTANCE=qh unless set) and removes it at the
end whatever happens, also on Ctrl-C or SIGTERM. It checks correctness, not speed.
"""

from __future__ import annotations

import os

# Before livemig reads it: this bed must never be an operator's (or a test's).
os.environ.setdefault("LIVEMIG_INSTANCE", "qh")

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livemig import paths
from livemig.daemon import control
from livemig.errors import LivemigError
from livemig.experiments import baselines, bed, paper
from livemig.experiments.bed import BedInUse, exclusive_test_bed
from livemig.experiments.probing import ProbeRun, wait_measuring
from livemig.image import builder
from livemig.net import testbed
from livemig.vm import dirtylog, qemu
from livemig.vm.spec import PAGE_SIZE, VMRecord, Workload
from livemig.wire.messages import Migrate

HOSTS = ("hostA", "hostB")
VM_NAME = "qhealth"
BASELINE_S = 1.5  # load before each migration
AFTER_S = 2.0  # load after it, in which the echo must answer again
CHUNK = 8 << 20  # RAM compared in chunks of this many bytes


DEFAULT_CONDITIONS = ("qemu-precopy,qemu-precopy-30,qemu-multifd,qemu-autoconverge,"
                      "qemu-postcopy,qemu-precopy-30+paused")


@dataclass(frozen=True)
class Condition:
    key: str
    mode: baselines.QemuMigration
    shim: bool = True
    ours_between: bool = False  # our pre-copy before each of QEMU's
    paused: bool = False  # the guest paused for the whole migration: the compare's control
    odd_size: bool = False  # guest RAM two pages more than whole MiB (see odd_size_argv)

    @classmethod
    def parse(cls, key: str) -> Condition:
        name, *variants = key.split("+")
        if (name not in baselines.MODES or len(set(variants)) != len(variants)
                or not set(variants) <= {"noshim", "ours", "paused", "oddsize"}
                or len(set(variants) - {"noshim"}) > 1):
            raise ValueError(f"condition {key!r}: want MODE[+noshim][+ours|+paused|+oddsize], "
                             f"MODE one of {', '.join(baselines.MODES)}")
        if "noshim" in variants and "ours" in variants:
            # The daemons, which start our engine's destinations, run with the shim.
            raise ValueError(f"condition {key!r}: +ours needs the shim")
        return cls(key, baselines.mode(name, timeout_s=60.0), "noshim" not in variants,
                   "ours" in variants, "paused" in variants, "oddsize" in variants)

    @property
    def compared(self) -> bool:
        """Whether both RAM images can be compared paused (not after postcopy)."""
        return not self.mode.postcopy


@dataclass
class Run:
    condition: str
    number: int
    qemu_migrations_since_boot: int  # before this one
    previous: str  # what moved the guest last: "boot", "qemu", "ours"
    source: str
    target: str
    status: str = "ok"  # ok, broken, did-not-converge, failed
    error: str | None = None
    migrated: bool = False  # QEMU's migration completed (what broke after is the guest)
    run_states: tuple[str, str] | None = None  # (source, destination) at the compare
    dest_file_fresh: bool | None = None
    differing_pages: int | None = None
    differing_zero_on_destination: int | None = None
    first_differing: list[int] = field(default_factory=list)  # guest page frame numbers
    dirty_sync_count: int | None = None
    qemu_downtime_ms: float | None = None
    total_time_s: float | None = None
    transferred_mib: float | None = None
    echo_answered_after: bool | None = None
    agent_ok: bool | None = None
    console_trouble: str | None = None
    qemu_info: dict[str, Any] = field(default_factory=dict)  # the last query-migrate


def odd_size_argv(original: Callable[[VMRecord, qemu.Inherited], list[str]]
                  ) -> Callable[[VMRecord, qemu.Inherited], list[str]]:
    """QEMU's command line with guest RAM 8 KiB (two pages) larger than ``mem_mib``.

    The test of suspect (c). QEMU 7.2 syncs its migration dirty bitmap over a RAM block
    in one of two ways: a fast path for a block whose length is a multiple of 64 pages
    (256 KiB), which clears the bits a word at a time and does not reset TCG's TLB, and
    a per-page path that does. A TLB entry made while its page was dirty has no
    TLB_NOTDIRTY flag, so after the fast path clears the page's bit the vCPU's stores
    through that entry set no bit again, until the TLB is flushed: lost updates (fixed
    upstream in QEMU 9.0, commit 03bfc2188f, "physmem: Fix migration dirty bitmap
    coherency with TCG memory access"; not in 7.2.x). Two pages more (QEMU rounds -m to
    8 KiB) put the same guest on the per-page path."""
    def argv(record: VMRecord, inherited: qemu.Inherited) -> list[str]:
        mib = record.spec.mem_mib
        odd = f"{(mib << 10) + 8}K"  # QEMU rounds -m up to 8 KiB
        return [odd if a == f"{mib}M"
                else a.replace(f"size={mib}M,", f"size={odd},") if a.startswith("memory-backend")
                else a for a in original(record, inherited)]
    return argv


# -- the checks ---------------------------------------------------------------------------


def differing_pages(a: Path, b: Path, size: int) -> tuple[np.ndarray, int]:
    """Pages (numbers) whose bytes differ between two RAM files, and how many of them are
    all zero in ``b``. Read with pread: a mapping would allocate the files' holes."""
    found: list[np.ndarray] = []
    zero_in_b = 0
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        for offset in range(0, size, CHUNK):
            x = np.frombuffer(os.pread(fa.fileno(), CHUNK, offset), dtype=np.uint64)
            y = np.frombuffer(os.pread(fb.fileno(), CHUNK, offset), dtype=np.uint64)
            # A file shorter than the RAM (never written at its end) reads as zeros there.
            x = np.pad(x, (0, CHUNK // 8 - x.size))
            y = np.pad(y, (0, CHUNK // 8 - y.size))
            x, y = x.reshape(-1, PAGE_SIZE // 8), y.reshape(-1, PAGE_SIZE // 8)
            bad = np.flatnonzero((x != y).any(axis=1))
            zero_in_b += int((~y[bad].any(axis=1)).sum())
            found.append(bad + offset // PAGE_SIZE)
    return np.concatenate(found), zero_in_b


def echo_after(replies: list[int], after_ns: int) -> bool:
    recv = np.asarray(replies, dtype=np.int64).reshape(-1, 3)[:, 2]
    return bool((recv > after_ns).any())


async def agent_answers(name: str) -> bool:
    try:
        vm = await qemu.VM.attach(qemu.find(name))
    except LivemigError:
        return False
    try:
        await vm.agent.ping(timeout=5.0)
        return True
    except LivemigError:
        return False
    finally:
        await vm.close()


def console_trouble(name: str) -> str | None:
    for record in [r for r in qemu.records() if r.spec.name == name]:
        with contextlib.suppress(OSError):
            line = paper.guest_kernel_trouble(record.console_log.read_text(errors="replace"))
            if line:
                return f"{record.host}: {line}"
    return None


# -- one condition --------------------------------------------------------------------------


async def boot(workload: Workload, mem_mib: int) -> None:
    with contextlib.suppress(LivemigError):
        await bed.stop_vm(VM_NAME)
    image = builder.Image.load()
    vm = await bed.start_vm(VM_NAME, image, HOSTS[0], mem_mib=mem_mib, workload=workload)
    await vm.close()


def load_probe(workload: Workload, ip: str, players: int) -> ProbeRun | None:
    if workload is Workload.GAME:
        return ProbeRun(testbed.CLIENT, "game", ip, "--players", str(players))
    if workload is Workload.WEB:
        return ProbeRun(testbed.CLIENT, "http", f"http://{ip}/file.bin", "--clients", "20")
    return None


async def ours(source: str, target: str) -> None:
    await control.migrate(source, Migrate(vm=VM_NAME, to=target))  # the defaults


async def one_run(run: Run, c: Condition, workload: Workload, players: int) -> None:
    """One QEMU pre-copy of the VM under load, with the RAM compare and the checks."""
    record = qemu.find(VM_NAME)
    ip = str(record.spec.ip)

    async def compare(source: qemu.VM, destination: qemu.VM) -> None:
        # baselines.migrate has checked these; kept as the run's evidence.
        run.run_states = (await source.status(), await destination.status())
        size = os.stat(source.record.ram_file).st_size  # two pages more with odd_size
        bad, zero = await asyncio.to_thread(differing_pages, source.record.ram_file,
                                            destination.record.ram_file, size)
        run.differing_pages = int(bad.size)
        run.differing_zero_on_destination = zero
        run.first_differing = [int(p) for p in bad[:8]]

    with ProbeRun(testbed.CLIENT, "echo", ip) as echo:
        probe = load_probe(workload, ip, players)
        try:
            await wait_measuring([p for p in (echo, probe) if p is not None])
            await asyncio.sleep(BASELINE_S)
            # No file may wait at the destination's path (suspect (b)); qemu.VM.start
            # also unlinks one and creates the file anew (O_EXCL).
            run.dest_file_fresh = not paths.ram_file(run.target, VM_NAME).exists()
            if c.paused:
                # Nothing can dirty RAM during the migration, so the images must come out
                # equal: what the compare finds otherwise is its own error. The
                # destination is resumed by baselines.migrate as always.
                vm = await qemu.VM.attach(record)
                try:
                    await vm.pause()
                finally:
                    await vm.close()
            report = await baselines.migrate(VM_NAME, run.target, c.mode,
                                             before_cont=compare if c.compared else None)
            run.migrated = True
            ended_ns = time.monotonic_ns()
            await asyncio.sleep(AFTER_S)
        finally:
            if probe is not None:
                with probe, contextlib.suppress(LivemigError):
                    probe.stop()
        echo_result = echo.stop()
    info = run.qemu_info = report["qemu_info"]
    run.dirty_sync_count = int(info.get("ram", {}).get("dirty-sync-count", 0))
    run.qemu_downtime_ms = report["downtime_ms"]
    run.total_time_s = round(report["total_time_s"], 3)
    run.transferred_mib = round(report["bytes_sent"] / 2**20, 1)
    run.echo_answered_after = echo_after(echo_result["replies"], ended_ns)
    run.agent_ok = await agent_answers(VM_NAME)
    run.console_trouble = console_trouble(VM_NAME)


async def condition(c: Condition, runs: int, workload: Workload, mem_mib: int, players: int,
                    out: list[Run]) -> None:
    if c.shim:
        os.environ.pop(dirtylog.NO_SHIM_ENV, None)
    else:
        os.environ[dirtylog.NO_SHIM_ENV] = "1"
    original_argv = qemu.qemu_argv
    if c.odd_size:
        qemu.qemu_argv = odd_size_argv(original_argv)  # type: ignore[assignment]
    try:
        await boot(workload, mem_mib)
        since_boot, previous, host = 0, "boot", HOSTS[0]
        for n in range(1, runs + 1):
            if c.ours_between:
                target = HOSTS[1] if host == HOSTS[0] else HOSTS[0]
                try:
                    await ours(host, target)
                    host, previous = target, "ours"
                except LivemigError as exc:
                    print(f"  {c.key} #{n}: our engine failed first ({exc}); QEMU goes on",
                          flush=True)
                    host = qemu.find(VM_NAME).host
            target = HOSTS[1] if host == HOSTS[0] else HOSTS[0]
            run = Run(c.key, n, since_boot, previous, host, target)
            try:
                await one_run(run, c, workload, players)
            except baselines.DidNotConverge as exc:
                run.status, run.error = "did-not-converge", str(exc)
            except LivemigError as exc:
                # Past the compare the migration had completed: what failed then (QEMU
                # gone after a guest panic, say) is the guest, not the migration.
                run.status = "broken" if run.migrated else "failed"
                run.error = f"{type(exc).__name__}: {exc}"
                run.console_trouble = console_trouble(VM_NAME)
            if run.status == "ok" and (run.console_trouble or not run.echo_answered_after
                                       or not run.agent_ok):
                run.status = "broken"
            out.append(run)
            print(f"  {c.key} #{n} {run.source}->{run.target} (QEMU moves since boot "
                  f"{since_boot}, after {previous}): {run.status}, "
                  f"{run.differing_pages} pages differ ({run.differing_zero_on_destination} "
                  f"zero on dest; first {run.first_differing[:4]}), syncs "
                  f"{run.dirty_sync_count}, QEMU downtime {run.qemu_downtime_ms} ms, echo "
                  f"after {run.echo_answered_after}, agent {run.agent_ok}"
                  + (f", console: {run.console_trouble}" if run.console_trouble else "")
                  + (f", {run.error}" if run.error else ""), flush=True)
            if run.status in ("broken", "failed"):
                await boot(workload, mem_mib)
                since_boot, previous, host = 0, "boot", HOSTS[0]
            elif run.status == "ok":
                since_boot, previous, host = since_boot + 1, "qemu", run.target
    finally:
        with contextlib.suppress(LivemigError):
            await bed.stop_vm(VM_NAME)
        os.environ.pop(dirtylog.NO_SHIM_ENV, None)
        qemu.qemu_argv = original_argv


# -- the whole experiment ---------------------------------------------------------------


def table(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for key in dict.fromkeys(r.condition for r in runs):
        mine = [r for r in runs if r.condition == key]
        done = [r for r in mine if r.differing_pages is not None]
        syncs = [r.dirty_sync_count for r in mine if r.dirty_sync_count is not None]
        rows.append({
            "condition": key, "runs": len(mine),
            "broken": sum(r.status in ("broken", "failed") for r in mine),
            "did_not_converge": sum(r.status == "did-not-converge" for r in mine),
            "ram_differs": sum(bool(r.differing_pages) for r in done),
            "pages_differing_median": (float(np.median([r.differing_pages for r in done]))
                                       if done else None),
            "pages_differing_worst": max((r.differing_pages or 0 for r in done), default=None),
            "syncs_median": float(np.median(syncs)) if syncs else None,
            "consoles": sorted({r.console_trouble.split(": ", 1)[-1][:90]
                                for r in mine if r.console_trouble}),
        })
    return rows


async def experiment(conditions: list[Condition], args: argparse.Namespace,
                     out: list[Run]) -> None:
    for c in conditions:
        print(f"condition {c.key}: shim {'on' if c.shim else 'off'}, {c.mode}"
              f"{', ours before each' if c.ours_between else ''}", flush=True)
        await condition(c, args.runs, Workload(args.workload), args.mem, args.players, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="QEMU migrations per condition")
    parser.add_argument("--conditions", default=DEFAULT_CONDITIONS)
    parser.add_argument("--workload", default="game", choices=["game", "web", "echo", "idle"])
    parser.add_argument("--players", type=int, default=6)
    parser.add_argument("--mem", type=int, default=256, metavar="MiB")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    try:
        conditions = [Condition.parse(k) for k in args.conditions.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    print(f"instance {paths.instance()!r}: namespaces {paths.netns_prefix()}*", file=sys.stderr)
    version = subprocess.run([qemu.QEMU_BINARY, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[0]
    print(version, file=sys.stderr)
    runs: list[Run] = []
    started = time.monotonic()
    interrupted = False
    try:
        # Daemons first when a condition migrates with ours: before any condition turns
        # the shim off.
        with exclusive_test_bed(len(HOSTS), daemons=any(c.ours_between for c in conditions)):
            asyncio.run(experiment(conditions, args, runs))
    except BedInUse as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaned up", file=sys.stderr)
    except LivemigError as exc:
        print(f"stopped: {exc}", file=sys.stderr)
    rows = table(runs)
    print(f"\n{version}")
    print(f"{'condition':<28}{'runs':>5}{'broken':>7}{'no conv':>8}{'RAM differs':>12}"
          f"{'pages (med)':>12}{'(worst)':>8}{'syncs (med)':>12}  console")
    for r in rows:
        med, worst = r["pages_differing_median"], r["pages_differing_worst"]
        print(f"{r['condition']:<28}{r['runs']:>5}{r['broken']:>7}{r['did_not_converge']:>8}"
              f"{r['ram_differs']:>12}{'-' if med is None else f'{med:g}':>12}"
              f"{'-' if worst is None else worst:>8}"
              f"{r['syncs_median'] or 0:>12g}  {'; '.join(r['consoles'])}")
    print(f"wall time {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"qemu": version,
                                         "settings": vars(args) | {"json": str(args.json)},
                                         "table": rows, "runs": [asdict(r) for r in runs]},
                                        indent=1) + "\n")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
