"""Argument types and the parser of the command line: bad input ends as one sentence.

argparse calls a ``type=`` function on each value and turns its ``ArgumentTypeError``
into a usage error; ``Parser.error`` prints that as one line (not argparse's usage block
first) and exits with status 2. Checks that need more than one argument live in the
commands themselves and raise ``LivemigError``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import NoReturn

from livemig import config, paths
from livemig.errors import BadName, LivemigError
from livemig.net import shaping
from livemig.vm.spec import MAX_MEM_MIB, MIN_MEM_MIB, unicast_mac

# A rate beyond any link we could pace (100 Gbit/s) is a typo, not a wish.
MIN_RATE_MBPS = 1.0
MAX_RATE_MBPS = 100_000.0


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: what is wrong, and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


MAX_DOWNTIME_MS = 60_000.0  # a minute of pause is a stop-and-copy, not a target


def milliseconds(text: str) -> float:
    """A downtime in ms: '100' or '100ms'."""
    try:
        value = float(text.lower().removesuffix("ms"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not (math.isfinite(value) and 0 < value <= MAX_DOWNTIME_MS):
        raise argparse.ArgumentTypeError(
            f"give milliseconds between 0 and {MAX_DOWNTIME_MS:g}, not {text!r}")
    return value


def percent(text: str) -> float:
    """A share of the link in percent, 0 to 90: '20' or '20%'. The migration keeps at
    least a tenth, or it would never end."""
    try:
        value = float(text.removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if not (math.isfinite(value) and 0 <= value <= 90):
        raise argparse.ArgumentTypeError(f"give a percentage from 0 to 90, not {text!r}")
    return value


def rate(text: str) -> float:
    """A rate in Mbit/s: '500', '500M', '500k', '1G' or '1g'."""
    scale = {"k": 1e-3, "m": 1.0, "g": 1e3}.get(text[-1:].lower(), None)
    try:
        value = float(text[:-1]) * scale if scale is not None else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (e.g. 500, 500M, 1G)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be a positive number, not {text!r}")
    if not MIN_RATE_MBPS <= value <= MAX_RATE_MBPS:
        raise argparse.ArgumentTypeError(
            f"a rate must be between {MIN_RATE_MBPS:g} Mbit/s and {MAX_RATE_MBPS / 1e3:g} "
            f"Gbit/s, not {text!r}"
        )
    return value


def link_rate(text: str) -> int | None:
    """A test bed link's rate in bit/s ('100mbit', '1gbit', '10gbit'); None: 'unlimited'."""
    try:
        return shaping.parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def latency_ms(text: str) -> float:
    """A one-way latency in ms ('0.1', '0.1ms')."""
    try:
        return shaping.parse_latency_ms(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def mem_mib(text: str) -> int:
    """Guest RAM in MiB, within what the guest boots in and the VM record allows."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
    if not MIN_MEM_MIB <= value <= MAX_MEM_MIB:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, not {value}"
        )
    return value


def name(text: str) -> str:
    """A VM or image name: it becomes part of file paths, so it is checked first."""
    try:
        return paths.check_name(text)
    except BadName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def writable_file(text: str, *, makes_parents: bool = False) -> Path:
    """An output file that can be written, checked before the work that fills it.

    With ``makes_parents`` the writer creates missing directories itself, so the nearest
    directory that exists is the one that must take new entries.
    """
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    directory = path.parent
    while makes_parents and not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {directory} is not a directory")
    # Root passes every access() check, so try it: a file beside the target, removed at
    # once, tells about permissions, read-only mounts and /proc alike.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}."):
            pass
        if path.exists():
            with path.open("ab"):  # opened for appending, not truncated: nothing changes
                pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {exc.strerror}") from None
    return path


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """A type for a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    return parse


def ipv4(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def ipv4_network(text: str) -> IPv4Network:
    try:
        network = IPv4Network(text, strict=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a network like 10.99.0.0/24 "
                                         f"({exc})") from None
    if network.prefixlen > 24:
        raise argparse.ArgumentTypeError(f"{text}: give a /24 or larger, for the hosts and "
                                         f"their VM pools")
    return network


def mac(text: str) -> str:
    try:
        return unicast_mac(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def host_names(text: str) -> int | list[str]:
    """--hosts: a count, or names separated by commas."""
    if text.isdigit():
        return int(text)
    names = [n.strip() for n in text.split(",")]
    for name in names:
        try:
            config.check_host_name(name)
        except LivemigError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; give a number of hosts or their "
                                             f"names, like alpha,beta") from None
    return names


def hold_rounds(text: str) -> int:
    """--hold-hot: 0 (off), or the rounds in a row that make a page hot (2 to 64)."""
    value = whole_number(0, 64)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("1 round does not make a page hot: give 0 (off) "
                                         "or 2 to 64")
    return value
