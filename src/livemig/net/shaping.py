"""The test bed's LAN has a speed: a token bucket on both ends of every cable.

Each node's cable to the switch is a veth pair. A qdisc shapes only what leaves an
interface, so both ends carry one: the node's end (``uplink``, ``eth0``) shapes what the
node sends, and the switch's port (``sw-*``) shapes what the node receives. A host's VMs
sit on its bridge behind the uplink, so their traffic and the migration's share it.

The tree on each end, by ``tc``'s names::

    tbf 1: root  rate R  burst B  limit L     (its own byte FIFO of L bytes as the queue)
    netem root delay D, tbf 10: its child     (the node's end only, when a latency is set)

Why tbf and not htb: one class would be all htb gives us, and htb's leaf FIFO counts
packets, so its queue in bytes depends on GSO sizes; tbf's queue is a byte limit. Its
burst is at least 128 KiB, so a 64 KiB GSO packet passes whole (tbf would otherwise
segment it) and a dequeue late by a scheduling hiccup does not lose the link's time; at
10 Gbit/s the burst is 1 ms of the rate, for the same reason.

Why the latency on the node's end only: every path between two nodes leaves one node's
end and one switch port, so a delay on the node's end is met exactly once per direction.
netem delays first and the token bucket below it shapes, as netem's own documentation
builds it. A kernel without netem (CONFIG_NET_SCH_NETEM unset) gets the rate alone; the
latency read back then says so, since the bed keeps no state but the kernel's.

Everything before ``apply`` is sans-IO: parsing, the parameters, and reading them back.
"""

from __future__ import annotations

import errno
import math
import re
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from livemig.errors import TestbedError

DEFAULT_RATE = "1gbit"  # the paper's gigabit LAN
DEFAULT_LATENCY_MS = 0.1
# pyroute2 sends tbf's rate as 32 bits of bytes/s (no TCA_TBF_RATE64): 34 Gbit/s at most.
MAX_RATE_BPS = 32_000_000_000
MIN_RATE_BPS = 64_000
MAX_LATENCY_MS = 1000.0
MIN_BURST_BYTES = 128 * 1024
BURST_S = 0.001
MIN_QUEUE_BYTES = 256 * 1024
QUEUE_S = 0.002
NETEM_LIMIT_PACKETS = 1000  # netem only holds the delay line; the queue is tbf's
ROOT = 0xFFFFFFFF
TBF_HANDLE = 0x10000
NETEM_HANDLE = 0x20000
TBF_UNDER_NETEM = 0x100000
# Per full segment, what a frame adds to TCP's payload (Ethernet 14, IPv4 20, TCP 20 and
# its timestamps 12): tbf counts frames, TCP counts payload.
FRAME_OVERHEAD_BYTES = 66

_SUFFIX = {"kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}
_RATE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>[kmg]bit)", re.IGNORECASE)


def parse_rate(text: str) -> int | None:
    """A link rate in bit/s from '1gbit', '100mbit', '2.5gbit', '512kbit'; None for
    'unlimited'. Raises ``ValueError`` with a sentence about what is wrong."""
    if text.strip().lower() == "unlimited":
        return None
    found = _RATE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not a link rate (e.g. 100mbit, 1gbit, 10gbit, unlimited)")
    bps = round(float(found["number"]) * _SUFFIX[found["unit"].lower()])
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise ValueError(f"a link rate must be from {format_rate(MIN_RATE_BPS)} to "
                         f"{format_rate(MAX_RATE_BPS)}, not {text!r}")
    return bps


def parse_latency_ms(text: str) -> float:
    """A one-way latency in ms, from 0 to 1000; 0 adds none."""
    try:
        ms = float(text.removesuffix("ms"))
    except ValueError:
        raise ValueError(f"{text!r} is not a latency in ms (e.g. 0.1)") from None
    if not (math.isfinite(ms) and 0 <= ms <= MAX_LATENCY_MS):
        raise ValueError(f"a latency must be from 0 to {MAX_LATENCY_MS:g} ms, not {text!r}")
    return ms


def format_rate(bps: int | None) -> str:
    if bps is None:
        return "unlimited"
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps}bit"


@dataclass(frozen=True)
class Link:
    """A link's speed: ``rate_bps`` (None: unlimited) and one-way ``latency_us``."""

    rate_bps: int | None = 1_000_000_000
    latency_us: int = round(DEFAULT_LATENCY_MS * 1000)

    @classmethod
    def of(cls, rate_bps: int | None, latency_ms: float = DEFAULT_LATENCY_MS) -> Link:
        return cls(rate_bps, round(latency_ms * 1000))

    @classmethod
    def parse(cls, rate: str = DEFAULT_RATE, latency_ms: float = DEFAULT_LATENCY_MS) -> Link:
        return cls.of(parse_rate(rate), latency_ms)

    def __str__(self) -> str:
        return f"{format_rate(self.rate_bps)}, {self.latency_us / 1000:g} ms one-way"

    @property
    def rate_bytes(self) -> int | None:
        return None if self.rate_bps is None else self.rate_bps // 8

    def end(self, *, delays: bool) -> End:
        """What one end of the cable carries; only the node's end ``delays``."""
        rate = self.rate_bytes
        return End(rate, None if rate is None else queue_bytes(rate),
                   self.latency_us if delays else 0)


DEFAULT_LINK = Link()


def burst_bytes(rate_bytes: int) -> int:
    return max(MIN_BURST_BYTES, round(rate_bytes * BURST_S))


def queue_bytes(rate_bytes: int) -> int:
    """tbf's limit: the burst, plus 2 ms of the rate waiting (a short switch buffer)."""
    return burst_bytes(rate_bytes) + max(MIN_QUEUE_BYTES, round(rate_bytes * QUEUE_S))


@dataclass(frozen=True)
class End:
    """One interface's shaping, as the kernel holds it: what ``read`` returns and what
    ``apply`` compares with to stay idempotent."""

    rate_bytes: int | None
    limit_bytes: int | None
    latency_us: int

    @property
    def rate_bps(self) -> int | None:
        return None if self.rate_bytes is None else self.rate_bytes * 8

    def describe(self) -> dict[str, object]:
        return {"rate": format_rate(self.rate_bps), "rate_bps": self.rate_bps,
                "latency_ms": self.latency_us / 1000}


def end_from_qdiscs(qdiscs: list[tuple[str, dict[str, Any]]], tick_per_us: float) -> End:
    """Read an ``End`` back from (kind, options) of an interface's qdiscs."""
    rate = limit = None
    latency_us = 0
    for kind, options in qdiscs:
        if kind == "tbf":
            rate, limit = options["rate"], options["limit"]
        elif kind == "netem":
            latency_us = round(options["delay"] / tick_per_us)
    return End(rate, limit, latency_us)


# -- the kernel ------------------------------------------------------------------------


def _tick_per_us() -> float:
    from pyroute2.netlink.rtnl.tcmsg import common

    return float(common.tick_in_usec)


def read(ipr: Any, index: int) -> End:
    found = []
    for msg in ipr.get_qdiscs(index=index):
        kind = msg.get_attr("TCA_KIND")
        options = msg.get_attr("TCA_OPTIONS")
        if kind == "tbf" and options is not None:
            parms = options.get_attr("TCA_TBF_PARMS")
            found.append((kind, {"rate": parms["rate"], "limit": parms["limit"]}))
        elif kind == "netem" and options is not None:
            found.append((kind, {"delay": options["delay"]}))
    return end_from_qdiscs(found, _tick_per_us())


def has_netem(ipr: Any, lo_index: int) -> bool:
    """Whether the kernel can delay: tried on a loopback ``lo_index`` nothing else uses
    (the switch's, which has no address), and removed at once."""
    try:
        ipr.tc("add", "netem", index=lo_index, handle=NETEM_HANDLE, parent=ROOT, delay=1)
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return False
        raise
    ipr.tc("del", index=lo_index, parent=ROOT)
    return True


def apply(ipr: Any, index: int, want: End, where: str, *, netem: bool) -> End:
    """Shape one interface as ``want`` says, unless it already is; returns what the
    kernel holds afterwards. Without ``netem`` in the kernel, no latency is asked for."""
    if not netem:
        want = End(want.rate_bytes, want.limit_bytes, 0)
    have = read(ipr, index)
    if have == want:
        return have
    try:
        ipr.tc("del", index=index, parent=ROOT)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL):  # no root qdisc of ours yet
            raise
    tbf_handle, tbf_parent = TBF_HANDLE, ROOT
    if want.latency_us:
        ipr.tc("add", "netem", index=index, handle=NETEM_HANDLE, parent=ROOT,
               delay=want.latency_us, limit=NETEM_LIMIT_PACKETS)
        tbf_handle, tbf_parent = TBF_UNDER_NETEM, NETEM_HANDLE + 1
    if want.rate_bytes is not None:
        assert want.limit_bytes is not None
        try:
            ipr.tc("add", "tbf", index=index, handle=tbf_handle, parent=tbf_parent,
                   rate=want.rate_bytes, burst=burst_bytes(want.rate_bytes),
                   limit=want.limit_bytes)
        except NetlinkError as exc:
            raise TestbedError(f"could not shape {where} to {format_rate(want.rate_bps)}: "
                               f"{exc}") from exc
    return read(ipr, index)
