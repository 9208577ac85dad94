"""Soak: many ping-pong live migrations of one mmuncher VM, watching for leaks.

One VM runs lm-mmuncher (it writes its region without pause and checks every write) and
is moved hostA -> hostB -> hostA ... by the host daemons, as 'livemig migrate' does, with
the engine's checksum of both images on. After each move mmuncher runs a full pass over
its region (SIGUSR1, through the guest agent) and must find no bad page.

Leaks are looked for from the outside, the way an operator would see them:
  - file descriptors and RSS of each livemigd (/proc/PID/fd, VmRSS), after every move,
    and the daemon's own account of its C heap (a ``MemoryQuery``, daemon.memstats):
    RSS alone cannot tell a leak from freed memory that malloc keeps for reuse;
  - processes inside our namespaces: only the daemons and the one VM's QEMU may remain;
  - network links in each namespace: only the VM's tap on the host it runs on;
  - /dev/shm: only the VM's RAM file on the host it runs on;
  - VM records: one copy of the VM, running.

The Python block count (``python_blocks``) is expected to creep between full collections
of the cyclic garbage collector: each migration leaves a few hundred objects in reference
cycles (pyroute2's netlink messages and closures, asyncio's closed transports), and
CPython collects its oldest generation only once those awaiting it outnumber a quarter of
the long-lived objects. Measured (128 MiB guest): ~130-180 blocks a move as the daemon
runs; ~25 a move with a full collection forced before each reading.

    .venv/bin/python bench/soak.py [--runs 50] [--mem 128] [--json soak.json]
        [--plot soak.png]

It builds a test bed of its own (LIVEMIG_INSTANCE=soak unless set), and removes it at
the end whatever happens, also on Ctrl-C or SIGTERM. It measures, so run it alone.
"""

from __future__ import annotations

import os

# Before livemig reads it: the soak's test bed must never be an operator's (or a test's).
os.environ.setdefault("LIVEMIG_INSTANCE", "soak")

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livemig import paths
from livemig.daemon import control
from livemig.errors import LivemigError
from livemig.experiments import bed
from livemig.experiments.bed import BedInUse, exclusive_test_bed
from livemig.image import builder
from livemig.lab import launch
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import Workload
from livemig.wire.messages import (
    DEFAULT_OPTIONS,
    MemoryFigures,
    MemoryQuery,
    Migrate,
    MigrateOptions,
)

HOSTS = ("hostA", "hostB")
VM_NAME = "soak"
FULL_CHECK_EVERY = 10  # processes, links and /dev/shm; fds and RSS are read after every move


# -- what the machine looks like from outside ---------------------------------------------


def _proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@dataclass(frozen=True)
class DaemonSample:
    host: str
    pid: int
    fds: int
    rss_kib: int
    threads: int
    # The daemon's own view (daemon.memstats): a leak grows heap_in_use; memory malloc
    # keeps after a free grows heap_free; a mapped guest RAM file grows shmem.
    heap_in_use_kib: int | None
    heap_free_kib: int | None
    rss_anon_kib: int
    rss_shmem_kib: int
    python_blocks: int  # the interpreter's live memory blocks: Python objects piling up


async def _memory(host: str) -> MemoryFigures:
    return await control.request(host, MemoryQuery(), MemoryFigures)


async def daemon_samples() -> list[DaemonSample]:
    samples = []
    for host in HOSTS:
        pid = int(launch.pid_file(host).read_text())
        # fds before asking: the control connection of the question is one of them.
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        memory = await _memory(host)
        status = _proc_status(pid)
        samples.append(DaemonSample(
            host=host, pid=pid, fds=fds,
            rss_kib=int(status["VmRSS"].split()[0]), threads=int(status["Threads"]),
            heap_in_use_kib=memory.heap_in_use_kib, heap_free_kib=memory.heap_free_kib,
            rss_anon_kib=memory.rss_anon_kib or 0, rss_shmem_kib=memory.rss_shmem_kib or 0,
            python_blocks=memory.python_blocks,
        ))
    return samples


def processes_in_our_namespaces() -> dict[str, list[str]]:
    """Namespace -> 'PID command' of every process inside it."""
    inodes = {}
    for ns in testbed.existing_namespaces():
        st = os.stat(f"/run/netns/{ns}")
        inodes[(st.st_dev, st.st_ino)] = ns
    found: dict[str, list[str]] = {ns: [] for ns in inodes.values()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile, or a kernel thread
        ns = inodes.get((st.st_dev, st.st_ino))
        if ns is not None:
            words = [w.decode(errors="replace") for w in cmdline if w]
            # The interpreter says nothing; the module or binary does.
            what = next((w for w in words if w.startswith("livemig.")), words[0] if words else "?")
            found[ns].append(f"{entry} {Path(what).name if '/' in what else what}")
    return found


def links(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def shm_files() -> list[str]:
    """Every file in every host's /dev/shm (each host has its own), and any of this
    instance's in the machine's own, as HOST:NAME."""
    found = [f"{h}:{p.name}" for h in HOSTS
             for p in paths.ram_file(h, VM_NAME).parent.iterdir()]
    found += [f"lab:{p.name}" for p in paths.SHM_DIR.iterdir()
              if p.name.startswith(paths.ram_file_prefix())]
    return sorted(found)


@dataclass
class FullCheck:
    after_run: int
    vm_host: str
    processes: dict[str, list[str]]
    links: dict[str, list[str]]
    shm: list[str]
    records: list[str]
    problems: list[str] = field(default_factory=list)


def full_check(after_run: int, vm_host: str, baseline_links: dict[str, list[str]]) -> FullCheck:
    """Everything our namespaces hold, and what of it should not be there."""
    procs = processes_in_our_namespaces()
    host_links = {h: links(testbed.host_node(h).netns) for h in HOSTS}
    records = [f"{r.spec.name}@{r.host}{' (incoming)' if r.incoming else ''}"
               for r in qemu.records()]
    check = FullCheck(after_run, vm_host, procs, host_links, shm_files(), records)
    vm = qemu.find(VM_NAME)
    tap = vm.spec.tap
    for host in HOSTS:
        ns = testbed.host_node(host).netns
        kinds = Counter(entry.split(" ", 1)[1] for entry in procs.get(ns, []))
        # A supervisor may keep the daemon running (one, or none in older trees).
        supervisors = kinds.pop("livemig.lab.supervise", 0)
        want = Counter({"livemig.daemon.server": 1, qemu.QEMU_BINARY: int(host == vm_host)})
        if supervisors > 1 or +kinds != +want:
            check.problems.append(f"{ns}: processes {procs[ns]}, expected one livemigd"
                                  f"{' and the QEMU' if host == vm_host else ''}")
        want = sorted([*baseline_links[host], *([tap] if host == vm_host else [])])
        if host_links[host] != want:
            check.problems.append(f"{ns}: links {host_links[host]}, expected {want}")
    for ns in (testbed.CLIENT.netns, testbed.SWITCH.netns):
        if procs.get(ns):
            check.problems.append(f"{ns}: processes {procs[ns]}, expected none")
    want_shm = [f"{vm_host}:{paths.ram_file(vm_host, VM_NAME).name}"]
    if check.shm != want_shm:
        check.problems.append(f"/dev/shm: {check.shm}, expected {want_shm}")
    if records != [f"{VM_NAME}@{vm_host}"]:
        check.problems.append(f"VM records {records}, expected one copy on {vm_host}")
    return check


# -- the moves ----------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    source: str
    target: str
    downtime_ms: float | None = None
    total_time_s: float | None = None
    wall_s: float | None = None
    verified: bool | None = None
    integrity_errors: int | None = None
    full_verifies: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.verified is True and self.integrity_errors == 0


async def start_vm(mem_mib: int, options: tuple[tuple[str, str], ...]) -> None:
    image = builder.Image.load()
    vm = await bed.start_vm(VM_NAME, image, HOSTS[0], mem_mib=mem_mib,
                            workload=Workload.MMUNCHER, options=options)
    await vm.close()  # the source daemon takes hold of it for each migration


async def mmuncher_check(host: str) -> tuple[int, int]:
    """(errors, full verifications so far) after a full pass over mmuncher's region."""
    record = qemu.find(VM_NAME)
    if record.host != host or record.incoming:
        raise LivemigError(f"{VM_NAME} is on {record.host}, not on {host}")
    vm = await qemu.VM.attach(record)
    try:
        if (state := await vm.status()) != "running":
            raise LivemigError(f"{VM_NAME} is {state} on {host}, not running")
        stats = (await vm.agent.verify(timeout=30.0))["stats"]["mmuncher"]
    finally:
        await vm.close()
    errors = int(stats["errors"]) + int(stats["last_full_verify_errors"])
    return errors, int(stats["full_verifies"])


async def migrate_once(run: Run, options: MigrateOptions) -> None:
    request = Migrate(vm=VM_NAME, to=run.target, options=options)
    started = time.monotonic()
    try:
        report = await control.migrate(run.source, request)
    except LivemigError as exc:
        run.error = f"migration: {exc}"
        return
    finally:
        run.wall_s = time.monotonic() - started
    run.downtime_ms = report.downtime_ms
    run.total_time_s = report.total_time_s
    run.verified = report.verified
    try:
        run.integrity_errors, run.full_verifies = await mmuncher_check(run.target)
    except LivemigError as exc:
        run.error = f"integrity check: {exc}"


# -- output -------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def plot(path: Path, runs: list[Run], samples: list[tuple[int, list[DaemonSample]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, (rss_ax, fd_ax, down_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for host in HOSTS:
        xs = [n for n, sample in samples]
        per_host = [next(s for s in sample if s.host == host) for _, sample in samples]
        line, = rss_ax.plot(xs, [s.rss_kib / 1024 for s in per_host], marker=".",
                            label=f"{host} RSS")
        # What malloc has handed out: a leak raises this; RSS above it is freed memory
        # that malloc keeps, which a leak-free daemon reuses.
        rss_ax.plot(xs, [(s.heap_in_use_kib or 0) / 1024 for s in per_host], ls="--",
                    color=line.get_color(), label=f"{host} C heap in use")
        fd_ax.plot(xs, [s.fds for s in per_host], marker=".", label=host)
    rss_ax.set_ylabel("livemigd memory (MiB)")
    rss_ax.set_ylim(0, None)
    rss_ax.legend()
    fd_ax.set_ylabel("livemigd open fds")
    # From 0: a flat line must look flat, not like noise around its own value.
    fd_ax.set_ylim(0, max(s.fds for _, sample in samples for s in sample) + 4)
    fd_ax.legend()
    down_ax.bar([r.n for r in runs], [r.downtime_ms or 0 for r in runs],
                color=["#4878a8" if r.ok else "#c0504d" for r in runs])
    down_ax.set_ylabel("engine downtime (ms)")
    down_ax.set_xlabel("migration (0 = before the first)")
    fig.suptitle(f"soak: {len(runs)} ping-pong migrations of one mmuncher VM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(runs: list[Run], samples: list[tuple[int, list[DaemonSample]]],
            checks: list[FullCheck]) -> dict[str, Any]:
    first, last = samples[0][1], samples[-1][1]
    # From the 10th move on, past the first-use allocations (numpy, the maps, caches).
    warm_n, warm = next(((n, s) for n, s in samples if n >= FULL_CHECK_EVERY), samples[0])
    daemons = {}
    for before, warmed, after in zip(first, warm, last, strict=True):
        daemons[before.host] = {
            "pid_before": before.pid, "pid_after": after.pid,
            "fds_before": before.fds, "fds_after": after.fds,
            "rss_kib_before": before.rss_kib, "rss_kib_after": after.rss_kib,
            "rss_kib_growth": after.rss_kib - before.rss_kib,
            "rss_kib_growth_after_warmup": after.rss_kib - warmed.rss_kib,
            "heap_in_use_kib_before": before.heap_in_use_kib,
            "heap_in_use_kib_after": after.heap_in_use_kib,
            "heap_in_use_kib_max": max((s.heap_in_use_kib or 0 for _, sample in samples
                                        for s in sample if s.host == before.host)),
            "threads_before": before.threads, "threads_after": after.threads,
            "rss_kib_every_10": [next(s.rss_kib for s in sample if s.host == before.host)
                                 for n, sample in samples
                                 if n % FULL_CHECK_EVERY == 0 or n == samples[-1][0]],
        }
    restarted = [f"livemigd of {host} restarted: pid {d['pid_before']} -> {d['pid_after']}"
                 for host, d in daemons.items() if d["pid_before"] != d["pid_after"]]
    return {
        "runs": len(runs),
        "warm_after_run": warm_n,
        "failures": sum(not r.ok for r in runs),
        "median_downtime_ms": _median([r.downtime_ms for r in runs]),
        "max_downtime_ms": max((r.downtime_ms for r in runs if r.downtime_ms is not None),
                               default=None),
        "median_total_time_s": _median([r.total_time_s for r in runs]),
        "median_wall_s": _median([r.wall_s for r in runs]),
        "all_verified": all(r.verified is True for r in runs),
        "integrity_errors": sum(r.integrity_errors or 0 for r in runs),
        "daemons": daemons,
        # A restarted daemon would hide its leaks: that is a finding too.
        "leak_problems": [p for c in checks for p in c.problems] + restarted,
    }


def print_summary(s: dict[str, Any], checks: list[FullCheck]) -> None:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    def kib(v: int | None) -> str:
        return "n/a" if v is None else f"{v / 1024:.1f}"

    print(f"\n{s['runs']} migrations, {s['failures']} failed; all verified: "
          f"{s['all_verified']}; mmuncher errors: {s['integrity_errors']}")
    print(f"median engine downtime {ms(s['median_downtime_ms'])} ms "
          f"(max {ms(s['max_downtime_ms'])}), median total {s['median_total_time_s']:.2f} s, "
          f"median wall {s['median_wall_s']:.2f} s")
    for host, d in s["daemons"].items():
        print(f"livemigd {host} (pid {d['pid_before']}->{d['pid_after']}): fds "
              f"{d['fds_before']} -> {d['fds_after']}, threads {d['threads_before']} -> "
              f"{d['threads_after']}, RSS {d['rss_kib_before'] / 1024:.1f} -> "
              f"{d['rss_kib_after'] / 1024:.1f} MiB (growth {d['rss_kib_growth']} KiB, "
              f"{d['rss_kib_growth_after_warmup']} KiB after move {s['warm_after_run']}); "
              f"RSS every 10 moves (MiB): "
              + " ".join(f"{k / 1024:.1f}" for k in d["rss_kib_every_10"])
              + f"; C heap in use {kib(d['heap_in_use_kib_before'])} -> "
                f"{kib(d['heap_in_use_kib_after'])} MiB (max {kib(d['heap_in_use_kib_max'])})")
    first, last = checks[0], checks[-1]
    for label, c in (("before", first), (f"after move {last.after_run}", last)):
        procs = sum(len(v) for v in c.processes.values())
        taps = {h: [x for x in v if x.startswith("tap")] for h, v in c.links.items()}
        print(f"{label:>14}: {procs} processes in our namespaces, taps {taps}, "
              f"/dev/shm {c.shm}, records {c.records}")
    problems = s["leak_problems"]
    print("leak checks: " + ("clean" if not problems else f"{len(problems)} problems"))
    for p in problems:
        print(f"  {p}")


# -- main ---------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, runs: list[Run],
               samples: list[tuple[int, list[DaemonSample]]], checks: list[FullCheck]) -> None:
    options = (("mm_mib", str(args.mm_mib)), ("mm_rate", str(args.mm_rate)))
    await start_vm(args.mem, options)
    # The daemons' own links (lo, uplink, br0) before the VM's tap came; the VM's is known.
    tap = qemu.find(VM_NAME).spec.tap
    baseline_links = {h: [x for x in links(testbed.host_node(h).netns) if x != tap]
                      for h in HOSTS}
    samples.append((0, await daemon_samples()))
    checks.append(full_check(0, HOSTS[0], baseline_links))
    migration = MigrateOptions(min_rate_mbps=args.min_rate, max_rate_mbps=args.max_rate,
                               verify=True)
    host = HOSTS[0]
    for n in range(1, args.runs + 1):
        target = HOSTS[1] if host == HOSTS[0] else HOSTS[0]
        run = Run(n, host, target)
        await migrate_once(run, migration)
        runs.append(run)
        # Where the VM is now decides the next move: a failed migration leaves it at home.
        host = qemu.find(VM_NAME).host
        samples.append((n, await daemon_samples()))
        fds = " ".join(f"{s.fds}" for s in samples[-1][1])
        rss = " ".join(f"{s.rss_kib / 1024:.1f}" for s in samples[-1][1])
        heap = " ".join(f"{(s.heap_in_use_kib or 0) / 1024:.1f}/{(s.heap_free_kib or 0) / 1024:.1f}"
                        f"/{s.rss_shmem_kib / 1024:.1f}" for s in samples[-1][1])
        blocks = " ".join(f"{s.python_blocks}" for s in samples[-1][1])
        print(f"{n:3d} {run.source}->{run.target}  downtime "
              f"{run.downtime_ms if run.downtime_ms is not None else float('nan'):7.1f} ms  "
              f"total {run.total_time_s or float('nan'):6.2f} s  verified {run.verified!s:<5}  "
              f"integrity {'ok' if run.integrity_errors == 0 else run.integrity_errors}  "
              f"fds {fds}  rss {rss} MiB  heap used/free/shmem {heap} MiB  blocks {blocks}"
              + (f"  FAILED: {run.error}" if run.error else ""),
              flush=True)
        if n % FULL_CHECK_EVERY == 0 or n == args.runs:
            checks.append(full_check(n, host, baseline_links))
            for p in checks[-1].problems:
                print(f"    leak check after move {n}: {p}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="migrations (default 50)")
    parser.add_argument("--mem", type=int, default=128, metavar="MiB", help="guest RAM")
    parser.add_argument("--mm-mib", type=int, default=32, help="mmuncher's region (MiB)")
    parser.add_argument("--mm-rate", type=int, default=16,
                        help="mmuncher's write rate, MiB/s (0 = flat out)")
    parser.add_argument("--min-rate", type=float, default=DEFAULT_OPTIONS.min_rate_mbps,
                        help="Mbit/s")
    parser.add_argument("--max-rate", type=float, default=DEFAULT_OPTIONS.max_rate_mbps,
                        help="Mbit/s")
    parser.add_argument("--json", type=Path, metavar="FILE")
    parser.add_argument("--plot", type=Path, metavar="FILE.png")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    print(f"instance {paths.instance()!r}: namespaces {paths.netns_prefix()}*", file=sys.stderr)
    runs: list[Run] = []
    samples: list[tuple[int, list[DaemonSample]]] = []
    checks: list[FullCheck] = []
    interrupted = stopped = False
    try:
        with exclusive_test_bed(len(HOSTS)):
            asyncio.run(soak(args, runs, samples, checks))
    except BedInUse as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaned up", file=sys.stderr)
    except LivemigError as exc:
        stopped = True  # what was measured until then is still worth its summary
        print(f"soak stopped: {exc}", file=sys.stderr)
    if not runs or len(samples) < 2:
        return 130 if interrupted else 1
    result = summary(runs, samples, checks)
    print_summary(result, checks)
    if args.json:
        document = {"summary": result, "runs": [asdict(r) for r in runs],
                    "samples": [{"after_run": n, "daemons": [asdict(s) for s in sample]}
                                for n, sample in samples],
                    "checks": [asdict(c) for c in checks],
                    "options": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"JSON: {args.json}")
    if args.plot:
        plot(args.plot, runs, samples)
        print(f"plot: {args.plot}")
    if interrupted:
        return 130
    return 0 if not stopped and result["failures"] == 0 and not result["leak_problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
