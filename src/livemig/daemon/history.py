"""What a source daemon remembers of its past switchovers, per target host.

Two uses:

- the switchover's fixed cost to a target, which the downtime prediction needs before
  this migration can measure it: QEMU's device state, the image check, the commit's
  round trip, ``cont``, and whatever else the stop window spent beyond the last pages
  and the last collect. It depends on the pair of hosts, the VM's devices and the load
  on both, not on the workload, so past migrations to the same target predict it;
- the accuracy of the predictions over many migrations (``livemig history``): predicted
  against actual downtime, migration by migration.

One JSON line per migration, in the daemon's state directory, the newest KEEP kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import msgspec

from livemig.migration.planner import DEFAULT_SWITCHOVER_COST_S
from livemig.wire.messages import MigrationReport

log = logging.getLogger(__name__)

KEEP = 500
# The fixed cost predicted is the median of the last few switchovers of the same VM to
# that target (of any VM there, until it has SAME_VM of its own): not the maximum, nor a
# high quantile. A bench run with both showed why: a few slow switchovers of a web
# server (its clients' traffic queued ahead of the commit) set the cost of every VM
# to 230 ms, every target below that was refused as unreachable, and refused
# migrations measure nothing that could bring it down again.
RECENT = 8
QUANTILE = 0.5
SAME_VM = 3


class Switchover(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    at: float  # wall-clock time of the migration's end (s since the epoch)
    vm: str
    target: str
    rates: str
    downtime_ms: float
    predicted_downtime_ms: float | None
    downtime_target_ms: float | None
    switchover_cost_ms: float  # measured: see measured_cost_ms
    final_pages: int
    link_mbps: float | None
    final_collect_ms: float = 0.0


def measured_cost_ms(report: MigrationReport) -> float:
    """The fixed part of this migration's downtime: all of it but what the prediction
    counts apart, the last pages at the measured link rate and the last collect. Taking
    the rest whole, not the sum of the steps we think of, leaves nothing out that a
    future prediction would miss."""
    pages_ms = (0.0 if not report.link_mbps
                else report.final_bytes * 8 / (report.link_mbps * 1e6) * 1000)
    return max(0.0, report.downtime_ms - pages_ms - report.final_collect_ms)


class SwitchoverHistory:
    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[Switchover]:
        """Oldest first; a line that does not parse (a crash mid-write) is skipped."""
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("could not read the switchover history %s: %s", self.path, exc)
            return []
        decoder: msgspec.json.Decoder[Switchover] = msgspec.json.Decoder(Switchover)
        entries = []
        for line in lines:
            with contextlib.suppress(msgspec.DecodeError):
                entries.append(decoder.decode(line))
        return entries

    def switchover_cost_s(self, target: str, vm: str | None = None) -> float:
        """The fixed cost to predict for a switchover of ``vm`` to ``target``: the
        QUANTILE of the last RECENT measured there (rounded up to a measured value), or
        the default before any."""
        return self._recent(target, "switchover_cost_ms", DEFAULT_SWITCHOVER_COST_S, vm)

    def final_collect_s(self, target: str, vm: str | None = None) -> float:
        """The dirty log's last collect, the VM stopped, as past switchovers measured it:
        it can take far longer than the collects of the rounds (22 ms against 1 ms,
        seen), so the prediction takes the larger."""
        return self._recent(target, "final_collect_ms", 0.0, vm)

    def _recent(self, target: str, field: str, default_s: float, vm: str | None) -> float:
        there = [e for e in self.entries() if e.target == target]
        mine = [e for e in there if e.vm == vm]
        values = [getattr(e, field) for e in (mine if len(mine) >= SAME_VM else there)]
        if not values:
            return default_s
        recent = sorted(values[-RECENT:])
        return float(recent[math.ceil(QUANTILE * (len(recent) - 1))]) / 1000

    def record(self, report: MigrationReport) -> None:
        entry = Switchover(
            at=time.time(), vm=report.vm, target=report.target, rates=report.rates,
            downtime_ms=report.downtime_ms, predicted_downtime_ms=report.predicted_downtime_ms,
            downtime_target_ms=report.downtime_target_ms,
            switchover_cost_ms=measured_cost_ms(report), final_pages=report.final_pages,
            link_mbps=report.link_mbps, final_collect_ms=report.final_collect_ms)
        kept = self.entries()[-(KEEP - 1):] + [entry]
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(b"".join(msgspec.json.encode(e) + b"\n" for e in kept))
            tmp.replace(self.path)  # atomic: a crash leaves the old history or the new
        except OSError as exc:
            # The migration is done; a history not kept only makes the next prediction
            # fall back on older figures.
            log.warning("could not record the switchover in %s: %s", self.path, exc)
