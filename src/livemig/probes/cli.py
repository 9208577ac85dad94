"""``livemig probe echo|http|game``: the probes as commands for the client namespace.

The main CLI calls ``add_probe_commands(subparsers)`` and then ``args.func(args)``.
Every command runs until ``--duration`` has passed or until SIGTERM/SIGINT (the way an
experiment stops a probe it started in the background), then writes its JSON to
``-o FILE`` atomically (a reader never sees half a file) and prints a one-line summary;
without ``-o`` the JSON goes to stdout and the summary to stderr. Exit status: 0 after a
run, 2 when the target cannot be probed at all.

A probe always measures from the test bed's client namespace and enters it by itself
(see ``_measure_from_client``); only loopback targets are probed from where it stands.

``python -m livemig.probes.cli probe ...`` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from livemig import argtypes
from livemig.errors import LivemigError
from livemig.net import testbed
from livemig.probes import echo, game, tcpflow
from livemig.probes import http as http_probe

Handler = Callable[[argparse.Namespace], int]


def _number(text: str, kind: type[int] | type[float]) -> float:
    # argparse would say "invalid _positive_float value"; the operator needs the reason.
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return value


def _port(text: str) -> int:
    value = int(_number(text, int))
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text}")
    return value


def _client_id(text: str) -> int:
    value = int(_number(text, int))
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"client ids are 32-bit unsigned, not {text}")
    return value


def _output(text: str) -> str:
    """'-' for stdout, or a file that can be written: checked before the probe runs."""
    if text != "-":
        argtypes.writable_file(text, makes_parents=True)  # write_atomic makes them
    return text


def _mix(text: str) -> tuple[http_probe.WeightedPath, ...]:
    try:
        return http_probe.parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _url(text: str) -> str:
    try:
        http_probe.parse_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=_nonnegative_float,
        default=None,
        metavar="S",
        help="seconds to run (default: until SIGTERM or SIGINT)",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        type=_output,
        default=None,
        help="write the JSON result here, atomically (default: stdout)",
    )


def add_probe_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``probe echo``, ``probe http`` and ``probe game`` to the main CLI."""
    probe = subparsers.add_parser(
        "probe",
        help="measure what clients of a VM feel (run it in the client namespace)",
        description="Client-side probes. Each runs for --duration or until SIGTERM/SIGINT, "
        "then writes a JSON result.",
    )
    kinds = probe.add_subparsers(
        dest="probe_kind", required=True, metavar="{echo,http,game,tcp,download}"
    )

    p = kinds.add_parser(
        "echo",
        help="UDP echo every millisecond; client downtime = longest gap in replies",
    )
    p.add_argument("target", help="host or IP address of the VM")
    p.add_argument("--port", type=_port, default=echo.DEFAULT_PORT)
    p.add_argument(
        "--interval-ms", type=_positive_float, default=1.0, help="send period (default 1)"
    )
    p.add_argument(
        "--drain-ms",
        type=_nonnegative_float,
        default=100.0,
        help="how long to wait for late replies after the last send (default 100)",
    )
    _add_common(p)
    p.set_defaults(func=echo_command)

    p = kinds.add_parser(
        "http",
        help="HTTP/1.0 load from N clients; throughput in 100 ms buckets",
    )
    p.add_argument("url", type=_url, help="http://HOST[:PORT]/PATH")
    p.add_argument("--clients", type=_positive_int, default=http_probe.DEFAULT_CLIENTS)
    p.add_argument(
        "--mix",
        type=_mix,
        default=None,
        metavar="[POST ]PATH:W,...",
        help="weighted paths instead of the URL's path, e.g. /file.bin:0.7,/cgi-bin/dyn?kb=16:0.25,"
             "'POST /cgi-bin/post:0.05' (a POST sends a small form)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=http_probe.DEFAULT_TIMEOUT_S,
        metavar="S",
        help="per-request timeout in seconds (default 5)",
    )
    p.add_argument(
        "--backoff-ms",
        type=_nonnegative_float,
        default=http_probe.DEFAULT_BACKOFF_S * 1000,
        help="pause after a failed request (default 50)",
    )
    p.add_argument(
        "--bucket-ms",
        type=_positive_int,
        default=http_probe.DEFAULT_BUCKET_MS,
        help="width of the throughput buckets (default 100)",
    )
    p.add_argument(
        "--think-ms",
        type=_nonnegative_float,
        default=http_probe.DEFAULT_THINK_S * 1000,
        help="each client's pause after a completed request (default 0: back to back)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for the choice of paths")
    _add_common(p)
    p.set_defaults(func=http_command)

    p = kinds.add_parser(
        "game",
        help="P game clients of lm-game; gaps between snapshots",
    )
    p.add_argument("target", help="host or IP address of the VM")
    p.add_argument("--port", type=_port, default=game.DEFAULT_PORT)
    p.add_argument("--players", type=_positive_int, default=4)
    p.add_argument("--first-id", type=_client_id, default=1, help="client id of the first player")
    _add_common(p)
    p.set_defaults(func=game_command)

    p = kinds.add_parser(
        "tcp",
        help="one TCP echo connection, a message every 5 ms; its longest stall",
    )
    p.add_argument("target", help="host or IP address of the VM")
    p.add_argument("--port", type=_port, default=7)
    p.add_argument("--interval-ms", type=_positive_float, default=5.0)
    _add_common(p)
    p.set_defaults(func=tcp_command)

    p = kinds.add_parser("download", help="one HTTP download, read at a fixed pace")
    p.add_argument("url", type=_url, help="http://HOST[:PORT]/PATH")
    p.add_argument("--rate-kbps", type=_positive_float, default=2000.0,
                   help="kilobytes per second to read at (default 2000)")
    p.add_argument("-o", "--output", metavar="FILE", type=_output, default=None)
    p.set_defaults(func=download_command)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event that SIGTERM and SIGINT set while the block runs.

    Signals can only be caught in the main thread; elsewhere the Event is returned
    without handlers, and only ``--duration`` ends the run. The previous handlers are
    restored afterwards.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            # fsync before the rename, so that a crash leaves the old file or the new
            # one, never an empty one.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def emit(data: dict[str, Any], line: str, output: str | None) -> None:
    """Write the JSON result (to ``output``, or stdout) and the one-line summary."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n"
    if output is None or output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        print(line, file=sys.stderr)
    else:
        try:
            write_atomic(Path(output), text)
        except OSError as exc:
            raise LivemigError(f"the probe ran ({line}), but {output} could not be written: "
                               f"{exc.strerror}") from exc
        print(line)


def _measure_from_client(host: str) -> None:
    """Probes run inside the test bed's client namespace; they enter it by themselves.

    Only a loopback target (a server in the same namespace, as in the unit tests) is
    probed from where the process stands: any other address, sent from the machine's own
    namespace, would leave the test bed for the real network.
    """
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        # Not a result to measure: no request could ever reach a name that resolves to
        # nothing (the HTTP load would count it as errors for its whole duration).
        raise LivemigError(f"cannot resolve {host!r} ({exc.strerror}); give the VM's "
                           f"address, e.g. 10.77.0.100") from exc
    if not all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos):
        testbed.enter_client_namespace()


def _fail(exc: LivemigError) -> int:
    print(f"livemig probe: {exc}", file=sys.stderr)
    return 2


def echo_command(args: argparse.Namespace) -> int:
    """``probe echo``: run the echo prober, write its result."""
    try:
        _measure_from_client(args.target)
        with stop_on_signals() as stop:
            result = echo.run_echo(
                args.target,
                port=args.port,
                interval_ms=args.interval_ms,
                duration_s=args.duration,
                stop=stop,
                drain_ms=args.drain_ms,
            )
    except LivemigError as exc:
        return _fail(exc)
    emit(result.to_json(), result.one_line(), args.output)
    return 0


def tcp_command(args: argparse.Namespace) -> int:
    """``probe tcp``: one established TCP flow; its longest stall."""
    try:
        _measure_from_client(args.target)
        with stop_on_signals() as stop:
            result = tcpflow.run_tcp_echo(args.target, port=args.port,
                                          interval_ms=args.interval_ms,
                                          duration_s=args.duration, stop=stop)
    except LivemigError as exc:
        return _fail(exc)
    except OSError as exc:
        print(f"livemig probe: cannot connect to {args.target}:{args.port}: {exc}",
              file=sys.stderr)
        return 2
    emit(result.to_json(), result.one_line(), args.output)
    return 0


def download_command(args: argparse.Namespace) -> int:
    """``probe download``: a paced HTTP download that must arrive whole."""
    target = http_probe.parse_url(args.url)
    try:
        _measure_from_client(target.host)
    except LivemigError as exc:
        return _fail(exc)
    result = tcpflow.run_download(target.host, target.path, port=target.port,
                                  rate_kbps=args.rate_kbps)
    emit(result.to_json(), result.one_line(), args.output)
    return 0


def http_command(args: argparse.Namespace) -> int:
    """``probe http``: run the HTTP load, write its result."""
    try:
        _measure_from_client(http_probe.parse_url(args.url).host)
        with stop_on_signals() as stop:
            result = http_probe.run_http_blocking(
                args.url,
                clients=args.clients,
                duration_s=args.duration,
                stop=stop,
                mix=args.mix,
                timeout_s=args.timeout,
                backoff_s=args.backoff_ms / 1000,
                bucket_ms=args.bucket_ms,
                think_s=args.think_ms / 1000,
                seed=args.seed,
            )
    except LivemigError as exc:
        return _fail(exc)
    emit(result.to_json(), result.one_line(), args.output)
    return 0


def game_command(args: argparse.Namespace) -> int:
    """``probe game``: run the game clients, write their result."""
    try:
        _measure_from_client(args.target)
        with stop_on_signals() as stop:
            result = game.run_game(
                args.target,
                port=args.port,
                players=args.players,
                duration_s=args.duration,
                stop=stop,
                first_id=args.first_id,
            )
    except LivemigError as exc:
        return _fail(exc)
    emit(result.to_json(), result.one_line(), args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the probe commands, for ``python -m livemig.probes.cli``."""
    parser = argtypes.Parser(prog="livemig", description="livemig client probes")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_probe_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except LivemigError as exc:
        return _fail(exc)


if __name__ == "__main__":
    sys.exit(main())
