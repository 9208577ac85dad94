"""``livemig``: the command line. Arguments in, library calls, human or JSON output out.

No policy lives here. Every failure that livemig foresaw is a ``LivemigError`` and ends as
one sentence on stderr with exit status 1; anything else is a bug and keeps its traceback.
Bad arguments are found before anything is touched: argument types (``argtypes``) turn
them into one-line usage errors (status 2), and checks across arguments come first in each
command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from livemig import argtypes, config, keys, paths, reporting
from livemig.analysis import cli_commands as analysis_commands
from livemig.daemon import control, remote, server
from livemig.daemon.history import SwitchoverHistory
from livemig.errors import LivemigError, SetupError, VMNotFound
from livemig.experiments import bed, demo, paper
from livemig.image import builder
from livemig.lab import launch
from livemig.net import shaping, testbed
from livemig.probes.cli import add_probe_commands
from livemig.vm.spec import DEFAULT_MEM_MIB, WORKLOAD_OPTIONS, Workload, workload_misfit
from livemig.wire import messages


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# -- image ------------------------------------------------------------------------------


def cmd_image_build(args: argparse.Namespace) -> int:
    recipe = builder.Recipe(
        name=args.name,
        additions=tuple(builder.Addition.parse(spec) for spec in args.add),
        run=args.run,
    )
    result = builder.build(recipe, force=args.force, log=lambda m: print(m, file=sys.stderr))
    image = result.image
    if args.json:
        _print_json(
            {
                "name": image.name,
                "directory": str(image.directory),
                "digest": image.digest,
                "cache_hit": result.cache_hit,
                "seconds": round(result.seconds, 3),
            }
        )
    else:
        how = "cached" if result.cache_hit else "built"
        print(f"image {image.name!r} {how} in {result.seconds:.1f} s: {image.directory}")
    return 0


# -- vm ---------------------------------------------------------------------------------


def _parse_options(
    pairs: Sequence[str], workload: Workload, mem_mib: int
) -> tuple[tuple[str, str], ...]:
    """The workload options, each a known key with a whole number in its range."""
    options = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LivemigError(f"--opt takes KEY=VALUE, e.g. mm_mib=64, not {pair!r}")
        if key not in WORKLOAD_OPTIONS:
            raise LivemigError(f"--opt {key!r} is not a workload option; the options are "
                               f"{', '.join(WORKLOAD_OPTIONS)}")
        low, high = WORKLOAD_OPTIONS[key]
        # isdigit alone takes '²' and other digits int() does not.
        if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
            raise LivemigError(f"--opt {key} takes a whole number from {low} to {high}, "
                               f"not {value!r}")
        options.append((key, value))
    if problem := workload_misfit(workload, tuple(options), mem_mib):
        raise LivemigError(problem)
    return tuple(options)


# Which daemon a command goes to: --host's, else this host's own; on the test bed's own
# namespace (no configuration), the lab reaches every host's daemon on its socket.


def _own_host(args: argparse.Namespace) -> str:
    if getattr(args, "host", None):
        return str(args.host)
    own = config.current()
    if own is not None:
        return own.name
    hosts = testbed.host_names()
    raise LivemigError(f"this machine is no livemig host (no {config.DEFAULT_PATH}): "
                       "name one with --host" + (f" (the test bed's: {', '.join(hosts)})"
                                                 if hosts else ""))


def _all_hosts() -> list[str]:
    """Every host this one knows: itself and its peers, or the test bed's."""
    own = config.current()
    if own is not None:
        return [own.name, *sorted(own.peers)]
    if hosts := testbed.host_names():
        return hosts
    raise LivemigError(f"this machine is no livemig host (no {config.DEFAULT_PATH}; "
                       f"docs/real-hosts.md), and no test bed is up ('livemig testbed up')")


async def _list_everywhere(hosts: list[str]) -> tuple[list[messages.VMInfo], dict[str, str]]:
    """Every host's VMs, asked at once; and the hosts that did not answer, with why."""

    async def ask(host: str) -> list[messages.VMInfo]:
        return (await control.request(host, messages.ListVMs(), messages.VMs)).vms

    vms, silent = await remote.vms_of(hosts, ask)
    return vms, {host: _with_lab_hint(exc) for host, exc in silent.items()}


def _with_lab_hint(exc: LivemigError | OSError) -> str:
    """The error's sentence, and on the test bed how to start a missing daemon there."""
    if isinstance(exc, control.DaemonUnavailable) and config.current() is None:
        return f"{exc}; on the test bed, 'livemig testbed up' starts it"
    return str(exc)


def _where(args: argparse.Namespace, name: str) -> str:
    """The host whose daemon runs ``name`` (its primary copy): --host's word, else the
    daemons' answers."""
    if getattr(args, "host", None):
        return str(args.host)
    vms, unreachable = asyncio.run(_list_everywhere(_all_hosts()))
    copies = [vm for vm in vms if vm.name == name]
    primary = [vm for vm in copies if vm.copy == "primary"] or copies
    if primary:
        return primary[0].host
    if unreachable:
        host, why = next(iter(unreachable.items()))
        raise VMNotFound(name, extra=f" on the hosts that answer, and {why}")
    raise VMNotFound(name)


def _request(host: str, message: messages.ControlRequest,
             expected: type[messages.FinalReply]) -> messages.FinalReply:
    return asyncio.run(control.request(host, message, expected))


def cmd_vm_start(args: argparse.Namespace) -> int:
    workload = Workload(args.workload)
    options = _parse_options(args.opt, workload, args.mem)
    host = _own_host(args)
    if config.current() is None:
        testbed.require_host(host)
        image = builder.Image.load(args.image)  # the lab's is every host's (read only)
        if workload is Workload.CUSTOM and image.run is None:
            raise SetupError(f"image {image.name!r} has no custom workload; build it with --run")
    done = _request(host, messages.StartVM(
        name=args.name, workload=str(workload), mem_mib=args.mem, image=args.image,
        options=list(options), ip=args.ip and str(args.ip), mac=args.mac),
        messages.VMDone)
    assert done.vm is not None
    if args.json:
        _print_json(msgspec.to_builtins(done.vm))
    else:
        print(done.vm.ip)
    return 0


def cmd_vm_stop(args: argparse.Namespace) -> int:
    host = _where(args, args.name)
    _request(host, messages.StopVM(vm=args.name), messages.VMDone)
    print(f"stopped {args.name} on {host}", file=sys.stderr)
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    if args.all or (config.current() is None and not args.host):
        vms, unreachable = asyncio.run(_list_everywhere(_all_hosts()))
    else:
        vms, unreachable = asyncio.run(_list_everywhere([_own_host(args)]))
    if args.json:
        _print_json({"vms": msgspec.to_builtins(vms), "unreachable": unreachable})
        return 1 if unreachable else 0
    print(f"{'NAME':<12} {'HOST':<8} {'IP':<15} {'STATE':<12} {'COPY':<9} {'WORKLOAD':<9} "
          f"{'PID':>7}")
    for vm in vms:
        print(f"{vm.name:<12} {vm.host:<8} {vm.ip:<15} {vm.state:<12} {vm.copy:<9} "
              f"{vm.workload:<9} {vm.pid:>7}")
    for host, why in unreachable.items():
        print(f"livemig: {host}: unreachable: {why}", file=sys.stderr)
    return 1 if unreachable else 0


def cmd_vm_console(args: argparse.Namespace) -> int:
    host = _where(args, args.name)

    async def show() -> str:
        request = messages.Console(vm=args.name, follow=args.follow)
        async with contextlib.aclosing(control.call(host, request)) as replies:
            async for reply in replies:
                if isinstance(reply, messages.ConsoleText):
                    sys.stdout.write(reply.text)
                    sys.stdout.flush()
                elif isinstance(reply, messages.ConsoleEnd):
                    return reply.why
                elif isinstance(reply, messages.Failed):
                    raise LivemigError(reply.message)
        return "the daemon went away"

    try:
        why = asyncio.run(show())
    except KeyboardInterrupt:
        return 0  # --follow ends so, as 'docker logs -f' does
    if args.follow:
        print(f"livemig: {why}", file=sys.stderr)
    return 0


def _vm_action(action: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        host = _where(args, args.name)
        _request(host, messages.PauseVM(vm=args.name, resume=action == "resume"),
                 messages.VMDone)
        return 0

    return run


def cmd_testbed_exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise LivemigError("name a command to run: livemig testbed exec HOST -- CMD ...")
    inside = testbed.require_host(args.host_name).exec_argv(argv)
    os.execvpe(inside[0], inside, testbed.host_environment())


# -- testbed ----------------------------------------------------------------------------


def cmd_testbed_up(args: argparse.Namespace) -> int:
    link = shaping.Link.of(args.link, args.latency)
    nodes = testbed.up(args.hosts, link, args.lan)
    if link.latency_us and not testbed.netem_available():
        print("warning: this kernel has no netem (CONFIG_NET_SCH_NETEM), so the link has "
              "its rate but only the veths' own latency", file=sys.stderr)
    if args.insecure_plaintext:
        print(f"warning: {server.PLAINTEXT_WARNING}", file=sys.stderr)
    launch.ensure_daemons(plaintext=args.insecure_plaintext)
    for node in nodes:
        print(f"{node.name:<8} {node.ip}  (netns {node.netns})")
    return 0


def cmd_testbed_down(args: argparse.Namespace) -> int:
    stopped = asyncio.run(bed.stop_all_vms())
    removed = testbed.down()
    print(
        f"stopped {len(stopped)} VMs, ended {len(removed.processes)} processes, "
        f"removed {len(removed.namespaces)} namespaces and {len(removed.ram_files)} RAM files",
        file=sys.stderr,
    )
    return 0


def _link_line(link: dict[str, Any]) -> str:
    """'1gbit, 0.1 ms added each way', or each direction where they differ (a half-made bed)."""
    send, receive = link["send"], link["receive"]
    if send is None or receive is None:
        return "not cabled"
    rate = (send["rate"] if send["rate"] == receive["rate"]
            else f"{send['rate']} out, {receive['rate']} in")
    return f"{rate}, {send['latency_ms']:g} ms added each way"


def cmd_testbed_status(args: argparse.Namespace) -> int:
    status = testbed.status()
    if args.json:
        _print_json(status)
    elif not status["up"]:
        print("the test bed is down")
    else:
        for node in status["nodes"]:  # type: ignore[attr-defined]
            print(f"{node['name']:<8} {node['ip']}  (netns {node['netns']})  "
                  f"link {_link_line(node['link'])}")
    return 0


# -- migrate ----------------------------------------------------------------------------


class _ProgressDisplay:
    """Progress as a line rewritten in place (a terminal) or one per update, on stderr;
    a stall is said once, on a line of its own."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._stalled = False

    def __call__(self, update: messages.Progress) -> None:
        if update.stalled and not self._stalled:
            print(("\n" if self.tty else "") + f"livemig: warning: round {update.round} "
                  "brought the predicted downtime no closer to the target; the migration "
                  "goes on until its time-out", file=sys.stderr)
        self._stalled = update.stalled
        line = reporting.progress_line(update)
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)


def _print_json_line(update: messages.Progress) -> None:
    """--progress json: the control protocol's own line, for programs."""
    sys.stdout.buffer.write(messages.encode_control(update))
    sys.stdout.flush()


def _seconds(text: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds between 0 and 86400")
    return value


def _migrate_options(args: argparse.Namespace) -> messages.MigrateOptions:
    defaults = messages.DEFAULT_OPTIONS
    rates = messages.Rates(args.rates)
    if rates is messages.Rates.AUTO:
        knobs = [flag for flag, value in (("--min-rate", args.min_rate),
                                          ("--max-rate", args.max_rate)) if value is not None]
        if knobs:
            raise LivemigError(f"{' and '.join(knobs)} apply to --rates paper only: by "
                               f"default the engine measures the link and needs no rate")
    min_rate = defaults.min_rate_mbps if args.min_rate is None else args.min_rate
    max_rate = defaults.max_rate_mbps if args.max_rate is None else args.max_rate
    if min_rate > max_rate:
        raise LivemigError(f"--min-rate {min_rate:g} is above --max-rate {max_rate:g}; "
                           f"the minimum must not exceed the maximum")
    return messages.MigrateOptions(
        mode=messages.Mode(args.mode), rates=rates, downtime_ms=args.downtime,
        max_impact_pct=args.max_impact, on_timeout=messages.OnTimeout(args.on_timeout),
        min_rate_mbps=min_rate, max_rate_mbps=max_rate, tracker=args.tracker,
        verify=not args.no_verify, stall_timeout_s=args.stall_timeout, timeout_s=args.timeout,
        hold_at=messages.HoldPoint(args.hold_at) if args.hold_at else None,
        hold_hot=args.hold_hot)


def cmd_migrate(args: argparse.Namespace) -> int:
    options = _migrate_options(args)
    if config.current() is None:  # the lab knows its hosts: a typo is caught first
        testbed.require_host(args.to)
    source = _where(args, args.name)
    if source == args.to:
        raise LivemigError(f"{args.name} already runs on {args.to}; name another host")
    request = messages.Migrate(vm=args.name, to=args.to, options=options)
    json_progress = args.progress == "json"
    show: Callable[[messages.Progress], None] | None = (
        _print_json_line if json_progress else None if args.quiet else _ProgressDisplay())
    try:
        report = asyncio.run(control.migrate(source, request, show))
    except KeyboardInterrupt:
        # Only this command stops: the daemon runs the migration on, by design.
        fresh_line = "\n" if sys.stderr.isatty() and not args.quiet else ""  # after a \r line
        print(f"{fresh_line}livemig: interrupted; the migration of {args.name} goes on in "
              f"{source}'s daemon, and 'livemig cancel {args.name}' stops it",
              file=sys.stderr)
        return 130
    if json_progress:
        sys.stdout.buffer.write(messages.encode_control(messages.Migrated(report=report)))
    else:
        if not args.quiet and sys.stderr.isatty():
            print(file=sys.stderr)
        print(reporting.report_text(report))
    if args.json:
        _write_report(args.json, report)
    return 0 if report.verified is not False else 1


def _write_report(path: Path, report: messages.MigrationReport) -> None:
    try:
        path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    except OSError as exc:
        # The migration itself is done: say so, or the operator would retry it.
        raise LivemigError(f"the migration completed, but its report could not be written to "
                           f"{path}: {exc.strerror}") from exc


def cmd_switchovers(args: argparse.Namespace) -> int:
    """A source host's past switchovers: the downtime predicted against the one had."""
    host = _own_host(args)
    entries = SwitchoverHistory(paths.state_dir(host) / "switchovers.jsonl").entries()
    if args.json:
        print(json.dumps([msgspec.to_builtins(e) for e in entries], indent=2))
        return 0
    if not entries:
        print(f"{host} has no switchover on record", file=sys.stderr)
        return 0
    print(f"{'vm':<12} {'target':<8} {'rates':<6} {'downtime ms':>11} {'predicted':>9} "
          f"{'ratio':>6} {'target ms':>9} {'fixed ms':>8} {'pages':>6}")
    ratios = []
    for e in entries[-args.last:]:
        ratio = (e.downtime_ms / e.predicted_downtime_ms if e.predicted_downtime_ms
                 else None)
        if ratio is not None:
            ratios.append(ratio)
        print(f"{e.vm:<12} {e.target:<8} {e.rates:<6} {e.downtime_ms:>11.1f} "
              f"{e.predicted_downtime_ms or 0:>9.1f} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>6} "
              f"{'-' if e.downtime_target_ms is None else f'{e.downtime_target_ms:g}':>9} "
              f"{e.switchover_cost_ms:>8.1f} {e.final_pages:>6}")
    if ratios:
        print(f"actual/predicted over {len(ratios)}: median {statistics.median(ratios):.2f}, "
              f"worst {max(ratios):.2f}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    host = _where(args, args.name)
    _request(host, messages.Cancel(vm=args.name), messages.Cancelled)
    print(f"cancelled the migration of {args.name}", file=sys.stderr)
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    argv = ["--config", str(args.config or config.DEFAULT_PATH)]
    argv += ["--insecure-plaintext"] if args.insecure_plaintext else []
    return server.main(argv)


# -- keys -------------------------------------------------------------------------------


def cmd_keys_init(args: argparse.Namespace) -> int:
    try:
        cert = keys.init_ca(args.dir, force=args.force)
    except OSError as exc:
        raise LivemigError(f"cannot make a CA in {args.dir}: {exc.strerror}") from exc
    print(f"CA certificate {cert}; its key {args.dir / keys.CA_KEY} (0600) stays with you, "
          "never on a host", file=sys.stderr)
    return 0


def cmd_keys_host(args: argparse.Namespace) -> int:
    try:
        files = keys.issue_host(args.dir, args.name, args.ip, days=args.days, out=args.out)
    except OSError as exc:
        raise LivemigError(f"cannot write {args.name}'s certificate: {exc.strerror} "
                           f"({exc.filename})") from exc
    crl = f", {files.crl}" if files.crl is not None and files.crl.is_file() else ""
    print(f"{args.name}: {files.cert}, {files.key} (0600), {files.ca}{crl}; copy these to "
          f"the host's [tls] dir (/etc/livemig/tls)", file=sys.stderr)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    try:
        done = keys.revoke(args.dir, host=args.name, cert=args.cert,
                           reason=keys.REVOKE_REASONS[args.reason])
    except OSError as exc:
        raise LivemigError(f"cannot revoke: {exc.strerror} ({exc.filename})") from exc
    what = args.name or str(args.cert)
    if done.added:
        serials = ", ".join(f"{s:x}" for s in done.added)
        print(f"revoked {what} (serial {serials}) in {done.crl}; copy it to every host's "
              "[tls] dir, where daemons take it up at their next connection", file=sys.stderr)
    else:
        print(f"{what} is revoked already in {done.crl}; nothing changed", file=sys.stderr)
    return 0


def cmd_keys_crl(args: argparse.Namespace) -> int:
    try:
        crl = keys.sign_crl(args.dir)
    except OSError as exc:
        raise LivemigError(f"cannot sign {args.dir / keys.CA_CRL}: {exc.strerror}") from exc
    print(f"signed {crl} anew; copy it to every host's [tls] dir", file=sys.stderr)
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    try:
        described = keys.describe(args.cert)
    except OSError as exc:
        raise LivemigError(f"cannot read {args.cert}: {exc.strerror}") from exc
    except ValueError as exc:  # cryptography's word for "this is no PEM certificate"
        raise LivemigError(f"{args.cert} is neither a PEM certificate nor a PEM CRL") from exc
    print(json.dumps(described, indent=2))
    if warning := described.get("warning"):
        print(f"livemig: warning: {warning}", file=sys.stderr)
    return 0


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(prog="livemig", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help=f"this host's configuration (default {config.DEFAULT_PATH})")
    parser.add_argument("--host", default=None, metavar="NAME",
                        help="the host whose daemon to ask (default: this one)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    image = commands.add_parser("image", help="the guest image").add_subparsers(
        dest="action", required=True
    )
    build = image.add_parser("build", help="build (or find cached) the guest image")
    build.add_argument("--name", type=argtypes.name, default=builder.DEFAULT_IMAGE,
                       help="image name")
    build.add_argument("--add", action="append", default=[], metavar="SRC:DEST",
                       help="put a file or static program into the image (repeatable)")
    build.add_argument("--run", metavar="CMD", help="command of the 'custom' workload")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--json", action="store_true")
    build.set_defaults(func=cmd_image_build)

    vm = commands.add_parser("vm", help="virtual machines").add_subparsers(
        dest="action", required=True
    )
    start = vm.add_parser("start", help="boot a VM on a host; prints its IP when ready")
    start.add_argument("name", type=argtypes.name)
    start.add_argument("--host", default=argparse.SUPPRESS, metavar="NAME",
                       help="the host to boot it on (default: this one)")
    start.add_argument("--ip", type=argtypes.ipv4, default=None,
                       help="its address (default: the host's pool's first free one)")
    start.add_argument("--mac", type=argtypes.mac, default=None,
                       help="its MAC (default: 52:54:00 and the address's last 3 bytes)")
    start.add_argument("--workload", required=True, choices=[w.value for w in Workload])
    start.add_argument("--mem", type=argtypes.mem_mib, default=DEFAULT_MEM_MIB, metavar="MiB")
    start.add_argument("--image", type=argtypes.name, default=builder.DEFAULT_IMAGE)
    start.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                       help="workload option, e.g. web_kb=512, mm_mib=64, mm_rate=100")
    start.add_argument("--json", action="store_true")
    start.set_defaults(func=cmd_vm_start)
    stop = vm.add_parser("stop", help="stop a VM and remove its files")
    stop.add_argument("name")
    stop.set_defaults(func=cmd_vm_stop)
    listing = vm.add_parser("list", help="list a host's VMs, or every host's")
    listing.add_argument("--all", action="store_true",
                         help="ask every host of the inventory (an unreachable one is named)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_vm_list)
    console = vm.add_parser("console", help="a VM's serial console, from the host it runs on")
    console.add_argument("name")
    console.add_argument("--follow", "-f", action="store_true",
                         help="keep printing what comes, until the VM ends or Ctrl-C")
    console.set_defaults(func=cmd_vm_console)
    for action in ("pause", "resume"):
        act = vm.add_parser(action, help=f"{action} a VM")
        act.add_argument("name")
        act.set_defaults(func=_vm_action(action))

    bed = commands.add_parser("testbed", help="hosts and a client on one LAN").add_subparsers(
        dest="action", required=True
    )
    bed_up = bed.add_parser("up", help="create the test bed (idempotent)")
    bed_up.add_argument("--hosts", type=argtypes.host_names, default=3, metavar="N|A,B,...",
                        help="how many hosts (hostA, hostB, ...) or their names (default 3)")
    bed_up.add_argument("--lan", type=argtypes.ipv4_network, default=None, metavar="CIDR",
                        help=f"the LAN (default {testbed.LAN})")
    bed_up.add_argument("--link", type=argtypes.link_rate, metavar="RATE",
                        default=shaping.DEFAULT_RATE,
                        help="every node's link to the switch, both ways: 100mbit, "
                             f"1gbit, 10gbit, ... or unlimited (default {shaping.DEFAULT_RATE})")
    bed_up.add_argument("--latency", type=argtypes.latency_ms, metavar="MS",
                        default=shaping.DEFAULT_LATENCY_MS,
                        help=f"one-way latency added per direction, in ms (default "
                             f"{shaping.DEFAULT_LATENCY_MS:g}; needs netem in the kernel)")
    bed_up.add_argument("--insecure-plaintext", action="store_true",
                        help="daemons without TLS (default: mutual TLS, keys made for you)")
    bed_up.set_defaults(func=cmd_testbed_up)
    bed.add_parser("down", help="remove everything livemig made").set_defaults(
        func=cmd_testbed_down
    )
    bed_exec = bed.add_parser("exec", help="run a command inside a host (both namespaces)")
    bed_exec.add_argument("host_name", metavar="HOST")
    bed_exec.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    bed_exec.set_defaults(func=cmd_testbed_exec)
    bed_status = bed.add_parser("status", help="what is up")
    bed_status.add_argument("--json", action="store_true")
    bed_status.set_defaults(func=cmd_testbed_status)

    mig = commands.add_parser("migrate", help="live-migrate a VM to another host")
    mig.add_argument("name")
    mig.add_argument("--to", required=True, metavar="HOST")
    defaults = messages.DEFAULT_OPTIONS
    mig.add_argument("--downtime", type=argtypes.milliseconds, default=defaults.downtime_ms,
                     metavar="MS", help=f"the VM's paused time to keep within: the engine "
                     f"switches over once its prediction fits (default {defaults.downtime_ms:g})")
    mig.add_argument("--max-impact", type=argtypes.percent, default=defaults.max_impact_pct,
                     metavar="PCT", help="the most of the link kept for the VM's own traffic, "
                     f"as measured (default {defaults.max_impact_pct:g})")
    mig.add_argument("--on-timeout", choices=[str(o) for o in messages.OnTimeout],
                     default=str(defaults.on_timeout),
                     help="when the target is out of reach at the time-out: abort (the VM "
                          "stays here) or switch over with the downtime predicted")
    mig.add_argument("--rates", choices=[str(r) for r in messages.Rates],
                     default=str(defaults.rates),
                     help="auto: measure the link (default); paper: §5.3's rate knobs")
    mig.add_argument("--min-rate", type=argtypes.rate, default=None,
                     metavar="R", help=f"--rates paper: Mbit/s of round 1 and the floor "
                                       f"(default {defaults.min_rate_mbps:g})")
    mig.add_argument("--max-rate", type=argtypes.rate, default=None,
                     metavar="R", help=f"--rates paper: Mbit/s ceiling and the stop-and-copy's "
                                       f"rate (default {defaults.max_rate_mbps:g})")
    mig.add_argument("--mode", choices=[str(m) for m in messages.Mode],
                     default=str(defaults.mode))
    mig.add_argument("--tracker", choices=typing.get_args(messages.Tracker),
                     default=defaults.tracker)
    mig.add_argument("--no-verify", action="store_true",
                     help="skip the checksum of both images (it costs downtime)")
    mig.add_argument("--json", type=argtypes.writable_file, metavar="FILE",
                     help="write the report here")
    mig.add_argument("--quiet", action="store_true", help="no live progress")
    mig.add_argument("--progress", choices=["line", "json"], default="line",
                     help="json: progress and the result as JSON lines on stdout")
    mig.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                     help="the time allowed before --on-timeout applies (default: ten "
                          "times RAM over the measured link, at least 30 s; with --rates "
                          "paper, none)")
    mig.add_argument("--stall-timeout", type=_seconds, default=defaults.stall_timeout_s,
                     metavar="S", help=f"abort if the target takes no data for S seconds "
                                       f"(default {defaults.stall_timeout_s:g})")
    mig.add_argument("--hold-hot", type=argtypes.hold_rounds, default=defaults.hold_hot,
                     metavar="K", help="convergence aid: pages dirtied in each of the last K "
                     "rounds (K >= 2) go only in the stop-and-copy (default 0: off)")
    mig.add_argument("--hold-at", choices=[str(p) for p in messages.HoldPoint], default=None,
                     help="fault drills: wait at this point until holds/VM@POINT is removed")
    mig.set_defaults(func=cmd_migrate)
    hist = commands.add_parser("switchovers",
                               help="a host's past switchovers: downtime predicted and had")
    hist.add_argument("--host", default=argparse.SUPPRESS, metavar="NAME",
                      help="the source host whose record to read (default: this one)")
    hist.add_argument("--last", type=int, default=50, metavar="N")
    hist.add_argument("--json", action="store_true")
    hist.set_defaults(func=cmd_switchovers)
    cancel = commands.add_parser("cancel", help="cancel a running migration")
    cancel.add_argument("name")
    cancel.set_defaults(func=cmd_cancel)
    daemon = commands.add_parser("daemon", help="run this host's daemon (systemd's "
                                 "livemigd.service, or the test bed, starts it)")
    daemon.add_argument("--insecure-plaintext", action="store_true",
                        help="no TLS; logs a warning; never on a real network")
    daemon.set_defaults(func=cmd_daemon)

    keys_cmd = commands.add_parser("keys", help="a CA and host certificates for mutual TLS")
    keys_sub = keys_cmd.add_subparsers(dest="action", required=True)
    k_init = keys_sub.add_parser("init", help="create a CA in --dir")
    k_init.add_argument("--dir", type=Path, required=True)
    k_init.add_argument("--force", action="store_true", help="replace an existing CA")
    k_init.set_defaults(func=cmd_keys_init)
    k_host = keys_sub.add_parser("host", help="issue a host certificate from --dir's CA")
    k_host.add_argument("name")
    k_host.add_argument("--ip", action="append", default=[], help="an address (repeatable)")
    k_host.add_argument("--dir", type=Path, required=True)
    k_host.add_argument("--out", type=Path, help="where the host's files go (default --dir)")
    # X.509 dates end in 9999: a century is plenty, and 0 days is a certificate never valid.
    k_host.add_argument("--days", type=argtypes.whole_number(1, 36500), default=keys.HOST_DAYS)
    k_host.set_defaults(func=cmd_keys_host)
    k_revoke = keys_sub.add_parser("revoke", help="list a host's certificates in --dir's CRL")
    victim = k_revoke.add_mutually_exclusive_group(required=True)
    victim.add_argument("name", nargs="?", metavar="HOST",
                        help="every certificate the CA issued to this host")
    victim.add_argument("--cert", type=Path, help="this certificate file")
    k_revoke.add_argument("--dir", type=Path, required=True)
    k_revoke.add_argument("--reason", choices=sorted(keys.REVOKE_REASONS), default="unspecified")
    k_revoke.set_defaults(func=cmd_keys_revoke)
    k_crl = keys_sub.add_parser("crl", help="sign --dir's CRL anew (makes one for an old CA)")
    k_crl.add_argument("--dir", type=Path, required=True)
    k_crl.set_defaults(func=cmd_keys_crl)
    k_show = keys_sub.add_parser("show", help="what a certificate or a CRL says")
    k_show.add_argument("cert", type=Path)
    k_show.set_defaults(func=cmd_keys_show)

    add_probe_commands(commands)
    demo.add_demo_command(commands)
    analysis_commands.register(commands)  # trace, wws, simulate
    paper.add_experiment_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.config is not None:
            config.use(config.load(args.config))
        return int(args.func(args))
    except LivemigError as exc:
        print(f"livemig: {_with_lab_hint(exc)}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        if os.geteuid() == 0:
            raise  # root was refused: that is no foreseen failure
        print(f"livemig: permission denied on {exc.filename or 'a file it needs'}; "
              f"livemig runs as root", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("livemig: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
