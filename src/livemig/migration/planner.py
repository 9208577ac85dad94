"""The pre-copy planner, sans-IO: which pages go in a round, at what rate, and when to stop.

This is the algorithm of Clark et al., "Live Migration of Virtual Machines" (NSDI 2005),
with the numbers of their Xen implementation (DESIGN.md, "The paper's algorithm"):

- *Iterative pre-copy* (§3.1; Fig. 1, stage 2): round 1 sends every page; each later round
  sends the pages dirtied during the round before.
- *Rapid page dirtying* (§5.4): each round goes in pseudo-random order, because writes
  cluster physically and a linear scan would keep running into the cluster being written.
  The source peeks before each batch and skips pages dirtied again since the round began;
  they are in the next round's dirty set anyway. The planner only counts them.
- *Dynamic rate limiting* (§5.3): round 1 runs at the minimum rate; each later round at
  the previous round's dirty rate plus a fixed increment. Pre-copy ends when that rate
  would exceed the maximum, or when less than 256 KiB remains dirty; the stop-and-copy
  runs at the maximum. Xen also ends after 29 rounds or once 3 x RAM has been sent.

Beyond the paper, the default policy (``DowntimeTarget``, ``rates=auto``) has no rate to
choose. Each round runs as fast as the link delivers, less a share kept for the VM's own
traffic (``service_share_bps``); the source measures both and paces by them. After each
round it predicts the downtime of a switchover now (``predict_downtime_s``): the
switchover's fixed cost learnt from past migrations, the dirty pages at the measured
link rate, and the final collect. Pre-copy ends when that prediction fits the target,
or when the time allowed runs out (``TIMEOUT``: the source then aborts or switches over
as the operator said), or at once if the fixed cost alone does not fit
(``TARGET_UNREACHABLE``). Xen's round and data limits do not apply: the time does.

It owns no socket and no clock: the source role (and the simulator) feed it observations
(pages sent, skipped and zero, pages dirtied, how long a round took) and it returns
decisions. Rates are in bits per second throughout. Every step is a handful of numpy
calls over page-index arrays, never a Python loop over pages: the simulator runs
thousands of migrations of gigabyte VMs on top of it.

Life cycle, one table (``_ALLOWED``)::

    READY --first()--> IN_ROUND --end_round()--> IN_ROUND ... --> DONE
      |                  record_batch() any number of times          ^
      +--first() in stop-and-copy mode--------------------------------+

A call the current phase does not allow raises :class:`PlannerStateError`. Arguments that
are wrong in themselves (a page index out of range, a duration of zero) raise
``ValueError``: both are bugs in the caller, not something an operator can fix.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from livemig.errors import LivemigError
from livemig.units import MBIT as MBIT
from livemig.units import PAGE_SIZE as PAGE_SIZE
from livemig.wire.messages import DEFAULT_OPTIONS, MigrateOptions
from livemig.wire.messages import Mode as Mode
from livemig.wire.messages import RoundStats as RoundStats

Pages = npt.NDArray[np.int64]

_PAGE_BITS = PAGE_SIZE * 8


class StopReason(enum.StrEnum):
    """Why pre-copy ended (or never began).

    When several hold at the end of the same round, one is reported, in this order:
    FEW_PAGES_LEFT, RATE_ABOVE_MAX, SENT_LIMIT, ROUND_LIMIT. The paper's own two
    conditions (§5.3) come before Xen's safety limits, and "converged" before "gave up",
    because that is the more useful thing to tell an operator.
    """

    FEW_PAGES_LEFT = "few-pages-left"  # less than final_bytes remain
    RATE_ABOVE_MAX = "rate-above-max"  # the next round would need more than max_bps
    ROUND_LIMIT = "round-limit"  # max_rounds done
    SENT_LIMIT = "sent-limit"  # max_sent_factor x RAM sent
    STOP_AND_COPY_MODE = "stop-and-copy-mode"
    # The downtime target (rates=auto):
    WITHIN_TARGET = "within-target"  # the predicted downtime fits the target
    TIMEOUT = "timeout"  # out of time with the target still out of reach
    TARGET_UNREACHABLE = "target-unreachable"  # the fixed cost alone exceeds the target

    @property
    def within_target(self) -> bool:
        """False when switching over now would break the downtime target: the source
        aborts, unless the operator accepted that (``on_timeout=switchover``)."""
        return self not in (StopReason.TIMEOUT, StopReason.TARGET_UNREACHABLE)


class Phase(enum.StrEnum):
    """Where the planner is in its life cycle."""

    READY = "ready"  # constructed; first() not called yet
    IN_ROUND = "in-round"  # a RoundPlan is out; record_batch() and end_round() expected
    DONE = "done"  # a StopAndCopy is out; the planner has nothing more to decide


# Everything that moves the planner between phases is checked against this table.
_ALLOWED: dict[Phase, frozenset[str]] = {
    Phase.READY: frozenset({"first"}),
    Phase.IN_ROUND: frozenset({"record_batch", "end_round"}),
    Phase.DONE: frozenset(),
}

_WHAT_TO_DO: dict[Phase, str] = {
    Phase.READY: "call first() to get round 1",
    Phase.IN_ROUND: "a round is in progress: report it with record_batch() and end_round()",
    Phase.DONE: "pre-copy is over (a StopAndCopy was returned); use a new Planner",
}


class PlannerStateError(LivemigError):
    """A planner method was called in a phase that does not allow it (a caller's bug)."""

    def __init__(self, operation: str, phase: Phase) -> None:
        super().__init__(
            f"Planner.{operation}() is not allowed in phase {phase.value!r}: {_WHAT_TO_DO[phase]}"
        )
        self.operation = operation
        self.phase = phase


@dataclass(frozen=True)
class RateLimits:
    """§5.3's rate policy in bit/s. The defaults are the migrate options' (Xen's), whose
    one home is ``wire.messages.MigrateOptions``, where they are in Mbit/s."""

    min_bps: float = DEFAULT_OPTIONS.min_rate_mbps * MBIT
    max_bps: float = DEFAULT_OPTIONS.max_rate_mbps * MBIT
    increment_bps: float = DEFAULT_OPTIONS.increment_mbps * MBIT

    @classmethod
    def of(cls, options: MigrateOptions) -> RateLimits:
        """The engine's limits for a migrate request: its one conversion of units."""
        return cls(options.min_rate_mbps * MBIT, options.max_rate_mbps * MBIT,
                   options.increment_mbps * MBIT)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_bps) and self.min_bps > 0):
            raise ValueError(f"min_bps must be a positive rate, not {self.min_bps!r}")
        if not (math.isfinite(self.max_bps) and self.max_bps >= self.min_bps):
            raise ValueError(
                f"max_bps ({self.max_bps!r}) must be finite and at least min_bps ({self.min_bps!r})"
            )
        if not (math.isfinite(self.increment_bps) and self.increment_bps >= 0):
            raise ValueError(f"increment_bps must be >= 0, not {self.increment_bps!r}")


# Module-level defaults, so that dataclass and argument defaults are one shared frozen
# value rather than a call evaluated at import (ruff RUF009 / B008).
DEFAULT_LIMITS = RateLimits()

# The switchover's fixed cost before any migration to a target has measured it: device
# state, the image check, the commit's round trip and cont. Measured on the gigabit test
# bed at 25-35 ms for a 256 MiB guest; a first migration assumes a little more.
DEFAULT_SWITCHOVER_COST_S = 0.040
# The time allowed, by default: ten passes over RAM at the measured link rate, and never
# less than MIN_TIMEOUT_S (a small VM still gets rounds enough to converge).
TIMEOUT_RAM_PASSES = 10
MIN_TIMEOUT_S = 30.0
# The VM's own traffic keeps this much headroom above what it was measured sending.
SERVICE_HEADROOM = 1.25


def default_timeout_s(ram_bytes: int, link_bps: float) -> float:
    """How long a migration may take by default: it scales with RAM over the link."""
    return max(MIN_TIMEOUT_S, TIMEOUT_RAM_PASSES * ram_bytes * 8 / link_bps)


def service_share_bps(link_bps: float, service_bps: float, max_impact: float) -> float:
    """The part of the link kept for the VM's own outbound traffic: what it was measured
    sending, with headroom, but at most ``max_impact`` of the link. A quiet VM leaves the
    migration the whole link; a busy one never has more than that share taken back."""
    return min(max_impact * link_bps, SERVICE_HEADROOM * max(0.0, service_bps))


@dataclass(frozen=True)
class DowntimeTarget:
    """The default policy (``rates=auto``): switch over once the predicted downtime
    fits ``downtime_s``. ``timeout_s`` None: ``default_timeout_s`` at the link rate
    measured in round 1."""

    downtime_s: float = DEFAULT_OPTIONS.downtime_ms / 1000
    switchover_cost_s: float = DEFAULT_SWITCHOVER_COST_S
    timeout_s: float | None = None
    final_collect_s: float = 0.0  # the last collect, VM stopped, as past ones measured it

    def __post_init__(self) -> None:
        if not (math.isfinite(self.downtime_s) and self.downtime_s > 0):
            raise ValueError(f"downtime_s must be positive, not {self.downtime_s!r}")
        if not (math.isfinite(self.switchover_cost_s) and self.switchover_cost_s >= 0):
            raise ValueError(f"switchover_cost_s must be >= 0, not {self.switchover_cost_s!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {self.timeout_s!r}")


DEFAULT_TARGET = DowntimeTarget()


@dataclass(frozen=True)
class PlannerConfig:
    """``target`` None is the paper's policy (``limits``, its stop rules); a
    ``DowntimeTarget`` is the default policy of the engine (see the module's text)."""

    limits: RateLimits = DEFAULT_LIMITS
    target: DowntimeTarget | None = None
    mode: Mode = Mode.PRECOPY
    max_rounds: int = 29  # pre-copy rounds, as Xen
    max_sent_factor: float = 3.0  # stop once this many x RAM has been sent
    final_bytes: int = 256 * 1024  # stop when less than this remains dirty
    seed: int = 0  # of the pseudo-random send order
    # Hot pages held back (0: off): a page dirtied in each of the last ``hold_hot``
    # rounds is sent only by the stop-and-copy, where it is sent once. See ``end_round``.
    hold_hot: int = 0

    def __post_init__(self) -> None:
        if self.hold_hot < 0 or self.hold_hot == 1:
            raise ValueError(f"hold_hot must be 0 (off) or at least 2 rounds, not "
                             f"{self.hold_hot!r}: one dirty round does not make a page hot")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, not {self.max_rounds!r}")
        if not (math.isfinite(self.max_sent_factor) and self.max_sent_factor > 0):
            raise ValueError(f"max_sent_factor must be positive, not {self.max_sent_factor!r}")
        if self.final_bytes < 0:
            raise ValueError(f"final_bytes must be >= 0, not {self.final_bytes!r}")


DEFAULT_CONFIG = PlannerConfig()


@dataclass(frozen=True)
class RoundPlan:
    """A pre-copy round: send ``pages`` in this (pseudo-random) order at ``rate_bps``;
    None: as fast as the link delivers, less ``service_share_bps`` (rates=auto).

    In round 1 the holes given to ``first()`` come first, sorted: ``pages[:zero_pages]``.
    They go as indexes only and take no time at the paced rate, so the §5.4 reason for a
    random order (not to chase the cluster being written) does not apply to them, and
    the source can tell them apart with a slice instead of reading them (reading a hole
    of a /dev/shm file allocates it). The rest follows in pseudo-random order.
    ``pages`` is read-only.
    """

    number: int  # 1-based
    pages: Pages
    rate_bps: float | None
    zero_pages: int = 0  # leading entries of ``pages`` that are known holes (round 1 only)


@dataclass(frozen=True)
class StopAndCopy:
    """Pause the VM, then send ``pages`` (the last dirty set) at the maximum rate.

    ``pages`` is sorted and read-only: with the VM paused nothing is dirtied any more, so
    the random order of §5.4 would buy nothing, and ascending order reads RAM linearly.
    ``rate_bps`` None: as fast as the link delivers (the VM is paused, its traffic too).
    ``predicted_downtime_s`` is the prediction the decision was made on (None when no
    link rate was known, as in stop-and-copy mode).
    """

    pages: Pages
    rate_bps: float | None
    reason: StopReason
    predicted_downtime_s: float | None = None


@dataclass(frozen=True)
class Progress:
    """A snapshot for status displays: where the planner is and what it has sent."""

    phase: Phase
    round: int  # the round in progress or last planned; 0 before first()
    pages_planned: int  # in the current round
    pages_sent: int  # in the current round, with data
    pages_skipped: int  # in the current round
    pages_zero: int  # in the current round, as indexes only
    bytes_sent: int  # page bytes over all rounds so far
    ram_bytes: int

    @property
    def pages_left(self) -> int:
        """Pages of the current round not yet reported by ``record_batch()``."""
        return self.pages_planned - self.pages_sent - self.pages_skipped - self.pages_zero


class Planner:
    """``first()`` gives round 1; after each round ``end_round()`` gives the next step.

    Between the two the source reports each batch with ``record_batch()``. The step is a
    :class:`RoundPlan` while pre-copy goes on and a :class:`StopAndCopy` when it ends;
    after that the planner only answers questions (``rounds``, ``bytes_sent``, ...).
    """

    def __init__(self, npages: int, config: PlannerConfig = DEFAULT_CONFIG) -> None:
        if isinstance(npages, bool) or not isinstance(npages, int | np.integer) or npages < 1:
            raise ValueError(f"npages must be a positive integer, not {npages!r}")
        self._npages = int(npages)
        self._config = config
        self._rng = np.random.default_rng(config.seed)
        self._phase = Phase.READY
        self._rounds: list[RoundStats] = []
        self._bytes_sent = 0
        self._final: StopAndCopy | None = None
        # The round in progress.
        self._number = 0
        self._planned = 0
        self._rate_bps: float | None = 0.0
        self._sent = 0
        self._skipped = 0
        self._zero = 0
        # What the source measured, for the prediction.
        self._link_bps: float | None = None
        self._collect_s = 0.0
        self._predicted_s: float | None = None
        self._predictions: list[float] = []
        self._timeout_s: float | None = None
        # Hot pages: how many rounds in a row each page was dirtied, and the pages held
        # back (dirty, not yet sent again) for the stop-and-copy.
        self._streak = np.zeros(self._npages if config.hold_hot else 0, dtype=np.uint8)
        self._held: Pages = np.empty(0, dtype=np.int64)

    # -- decisions -------------------------------------------------------------------

    def first(self, zero_pages: Pages | None = None) -> RoundPlan | StopAndCopy:
        """Round 1: every page, pseudo-random order, at the minimum rate. ``zero_pages``
        (holes never written) still count as pages of the round but are cheap: the source
        sends them as indexes only. In stop-and-copy mode: a StopAndCopy of every page.

        Holes lead round 1's order (see :class:`RoundPlan`); duplicates among them are
        ignored. Pre-copy mode always plans round 1, even for a VM smaller than
        ``final_bytes``, as Xen does: the stop conditions are looked at after a round.
        """
        self._require("first")
        holes = (
            np.empty(0, dtype=np.int64)
            if zero_pages is None
            # Sorted already when they come from a hole scan: _as_set skips the sort then.
            else _as_set(self._checked_pages(zero_pages, "zero_pages"))
        )
        if self._config.mode is Mode.STOP_AND_COPY:
            # The pure baseline (§3.1, "pure stop-and-copy"): no round at all; holes are
            # the source's to skip, as in any final copy.
            return self._stop(
                np.arange(self._npages, dtype=np.int64), StopReason.STOP_AND_COPY_MODE
            )
        if holes.size:
            is_data = np.ones(self._npages, dtype=np.bool_)
            is_data[holes] = False
            data = self._rng.permutation(np.flatnonzero(is_data)).astype(np.int64, copy=False)
            order = np.concatenate((holes, data))
        else:
            order = self._rng.permutation(self._npages).astype(np.int64, copy=False)
        return self._plan(order, self._round_rate(None), zero_pages=int(holes.size))

    def record_batch(self, sent: int, skipped: int, zero: int = 0) -> None:
        """Progress inside the current round (the source calls it per batch).

        The three counts are disjoint: ``sent`` pages went with their data, ``skipped``
        were dirtied again before their turn and not sent (§5.4), ``zero`` went as indexes
        only because they were all zero. Only ``sent`` adds to :attr:`bytes_sent`.
        """
        self._require("record_batch")
        for name, value in (("sent", sent), ("skipped", skipped), ("zero", zero)):
            if value < 0:
                raise ValueError(f"record_batch: {name} must be >= 0, not {value!r}")
        total = self._sent + self._skipped + self._zero + sent + skipped + zero
        if total > self._planned:
            raise ValueError(
                f"record_batch: round {self._number} planned {self._planned} pages, but "
                f"the batches reported so far account for {total}"
            )
        self._sent += sent
        self._skipped += skipped
        self._zero += zero
        self._bytes_sent += sent * PAGE_SIZE

    def end_round(self, dirtied: Pages, duration_s: float, *, link_bps: float | None = None,
                  elapsed_s: float | None = None, collect_s: float = 0.0,
                  ) -> RoundPlan | StopAndCopy:
        """The round is over: ``dirtied`` is the tracker's collect() at its end.

        ``dirtied`` is taken as a set (order and duplicates do not matter); it must
        include the pages skipped in this round, as a dirty log's collect() does. Every
        page of the plan must have been reported through ``record_batch()`` first.
        ``link_bps`` is what the link delivered, as measured; ``elapsed_s`` the time
        since the migration began; ``collect_s`` what that collect took. The downtime
        target needs the first two; the paper's policy uses ``link_bps`` only for the
        prediction it reports.

        The next round sends exactly ``dirtied``, in a fresh pseudo-random order, or
        pre-copy stops; see :class:`StopReason` for the conditions and the order they
        are looked at in.

        With ``hold_hot`` = k, what is pending is ``dirtied`` and the pages held back
        before; a pending page dirtied in each of the last k rounds is hot (the writable
        working set of §4, as the engine sees it live) and is held back again: sending
        it now would only be sending it again. The rest goes, so each round sends what
        will stay sent. The prediction and the stop-and-copy count every pending page,
        held ones included. A round whose pending pages are all hot sends them all
        (holding everything back would make a round of nothing).
        """
        self._require("end_round")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(
                f"end_round: the duration of round {self._number} must be a positive "
                f"number of seconds, not {duration_s!r}"
            )
        target = self._config.target
        if target is not None and (link_bps is None or elapsed_s is None):
            raise ValueError("end_round: a downtime target needs link_bps and elapsed_s")
        if link_bps is not None and not (math.isfinite(link_bps) and link_bps > 0):
            raise ValueError(f"end_round: link_bps must be a positive rate, not {link_bps!r}")
        accounted = self._sent + self._skipped + self._zero
        if accounted != self._planned:
            raise ValueError(
                f"end_round: round {self._number} planned {self._planned} pages but "
                f"record_batch() accounted for {accounted} (sent {self._sent}, skipped "
                f"{self._skipped}, zero {self._zero}); report every page first"
            )
        dirtied_now = _as_set(self._checked_pages(dirtied, "dirtied"))
        dirty, send = self._hold_back_hot(dirtied_now)

        dirty_rate = dirtied_now.size * _PAGE_BITS / duration_s
        self._rounds.append(
            RoundStats(
                number=self._number,
                pages_planned=self._planned,
                pages_sent=self._sent,
                pages_skipped=self._skipped,
                pages_dirtied=int(dirtied_now.size),
                # Paced rounds report their pace; the auto policy what the round achieved.
                rate_bps=(self._rate_bps if self._rate_bps is not None
                          else self._sent * _PAGE_BITS / duration_s),
                duration_s=float(duration_s),
                dirty_rate_bps=dirty_rate,
                pages_zero=self._zero,
                pages_held=int(dirty.size - send.size),
            )
        )
        self._collect_s = collect_s
        if link_bps is not None:
            self._link_bps = link_bps
            self._predicted_s = self.predict_downtime_s(int(dirty.size))
            self._predictions.append(self._predicted_s)
        if target is not None:
            assert link_bps is not None and elapsed_s is not None
            reason = self._target_reason(target, dirty, link_bps, elapsed_s)
            if reason is not None:
                return self._stop(dirty, reason)
            return self._plan(self._rng.permutation(send), self._round_rate(dirty_rate))
        reason = self._paper_reason(dirty, dirty_rate)
        if reason is not None:
            return self._stop(dirty, reason)
        return self._plan(self._rng.permutation(send), self._round_rate(dirty_rate))

    def _hold_back_hot(self, dirtied: Pages) -> tuple[Pages, Pages]:
        """(what is pending, what the next round sends of it); see ``end_round``."""
        k = self._config.hold_hot
        if not k:
            return dirtied, dirtied
        streak = self._streak
        was = streak[dirtied]
        streak[:] = 0
        streak[dirtied] = np.minimum(was.astype(np.int64) + 1, 255)
        pending = np.union1d(dirtied, self._held)
        hot = streak[pending] >= k
        send = pending[~hot]
        if send.size == 0:
            send = pending
        self._held = np.setdiff1d(pending, send, assume_unique=True)
        return pending, send

    def _target_reason(self, target: DowntimeTarget, dirty: Pages, link_bps: float,
                       elapsed_s: float) -> StopReason | None:
        if self._timeout_s is None:
            # Fixed once, at the rate round 1 measured: a deadline that moved with every
            # estimate would be no deadline.
            self._timeout_s = (target.timeout_s if target.timeout_s is not None
                               else default_timeout_s(self.ram_bytes, link_bps))
        if self.predict_downtime_s(int(dirty.size)) <= target.downtime_s:
            return StopReason.WITHIN_TARGET
        if self.predict_downtime_s(0) > target.downtime_s:
            return StopReason.TARGET_UNREACHABLE  # no round can help
        if elapsed_s >= self._timeout_s:
            return StopReason.TIMEOUT
        return None

    def _paper_reason(self, dirty: Pages, dirty_rate: float) -> StopReason | None:
        """§5.3's stop rules, then Xen's limits."""
        limits = self._config.limits
        next_rate = self._paper_rate(dirty_rate)
        if dirty.size == 0 or dirty.size * PAGE_SIZE < self._config.final_bytes:
            # Checked as "empty" too, so that final_bytes=0 cannot plan a round of nothing.
            return StopReason.FEW_PAGES_LEFT
        if next_rate > limits.max_bps:
            return StopReason.RATE_ABOVE_MAX
        if self._bytes_sent >= self._config.max_sent_factor * self.ram_bytes:
            return StopReason.SENT_LIMIT
        if self._number >= self._config.max_rounds:
            return StopReason.ROUND_LIMIT
        return None

    def _round_rate(self, dirty_rate: float | None) -> float | None:
        """A round's pace: None under the downtime target (the link's, measured), else
        §5.3's: the minimum for round 1, then the dirty rate plus the increment."""
        if self._config.target is not None:
            return None
        if dirty_rate is None:
            return self._config.limits.min_bps
        return self._paper_rate(dirty_rate)

    def _paper_rate(self, dirty_rate: float) -> float:
        """§5.3: the next round must outpace this round's dirtying by the increment, but
        a quiet VM still gets the minimum: it costs the service little and ends sooner."""
        limits = self._config.limits
        return max(limits.min_bps, dirty_rate + limits.increment_bps)

    # -- questions -------------------------------------------------------------------

    @property
    def rounds(self) -> list[RoundStats]:
        """The finished pre-copy rounds, oldest first (a copy)."""
        return list(self._rounds)

    @property
    def bytes_sent(self) -> int:
        """Page bytes put on the wire so far (zero pages count nothing).

        Counts the pre-copy rounds, as reported by ``record_batch()``; the final
        stop-and-copy's pages are the caller's to add (``len(pages) x PAGE_SIZE`` at
        most). This is also what the ``max_sent_factor`` budget is measured in: a zero
        page costs only its index on the wire, so it does not spend the budget. A VM that
        keeps re-dirtying zero pages is still bounded by ``max_rounds``.
        """
        return self._bytes_sent

    def predict_downtime_s(self, pages: int) -> float:
        """The VM's paused time if it stopped with ``pages`` dirty: the switchover's
        fixed cost, the last collect again (or as long as past final collects took, if
        longer), and the pages at the last measured link rate
        (capped at the maximum under the paper's policy, which sends them at that). A
        link rate must have been measured (an ``end_round`` with ``link_bps``)."""
        if pages < 0:
            raise ValueError(f"pages must be >= 0, not {pages!r}")
        if self._link_bps is None:
            raise ValueError("predict_downtime_s: no link rate measured yet")
        rate = self._link_bps
        if self._config.target is None:
            rate = min(rate, self._config.limits.max_bps)
        collect_s = max(self._collect_s, (self._config.target or DEFAULT_TARGET).final_collect_s)
        return self.switchover_cost_s + collect_s + pages * _PAGE_BITS / rate

    @property
    def switchover_cost_s(self) -> float:
        target = self._config.target
        return (target or DEFAULT_TARGET).switchover_cost_s

    @property
    def predicted_downtime_s(self) -> float | None:
        """The prediction at the end of the last round, None before one with a link
        rate."""
        return self._predicted_s

    @property
    def best_predicted_downtime_s(self) -> float | None:
        """The lowest prediction of any round: the downtime that was within reach."""
        return min(self._predictions, default=None)

    @property
    def predictions_s(self) -> list[float]:
        """The predicted downtime at the end of each round with a link rate (a copy)."""
        return list(self._predictions)

    @property
    def timeout_s(self) -> float | None:
        """The time allowed under the downtime target, once round 1 has fixed it."""
        return self._timeout_s

    @property
    def npages(self) -> int:
        return self._npages

    @property
    def ram_bytes(self) -> int:
        return self._npages * PAGE_SIZE

    @property
    def config(self) -> PlannerConfig:
        return self._config

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def final(self) -> StopAndCopy | None:
        """The StopAndCopy that ended pre-copy, once there is one."""
        return self._final

    @property
    def progress(self) -> Progress:
        return Progress(
            phase=self._phase,
            round=self._number,
            pages_planned=self._planned,
            pages_sent=self._sent,
            pages_skipped=self._skipped,
            pages_zero=self._zero,
            bytes_sent=self._bytes_sent,
            ram_bytes=self.ram_bytes,
        )

    # -- internals -------------------------------------------------------------------

    def _require(self, operation: str) -> None:
        if operation not in _ALLOWED[self._phase]:
            raise PlannerStateError(operation, self._phase)

    def _plan(self, pages: Pages, rate_bps: float | None, zero_pages: int = 0) -> RoundPlan:
        pages.setflags(write=False)
        self._phase = Phase.IN_ROUND
        self._number += 1
        self._planned = int(pages.size)
        self._rate_bps = rate_bps
        self._sent = self._skipped = self._zero = 0
        return RoundPlan(self._number, pages, rate_bps, zero_pages)

    def _stop(self, pages: Pages, reason: StopReason) -> StopAndCopy:
        pages.setflags(write=False)
        self._phase = Phase.DONE
        rate = None if self._config.target is not None else self._config.limits.max_bps
        self._final = StopAndCopy(pages, rate, reason, predicted_downtime_s=(
            None if self._link_bps is None else self.predict_downtime_s(int(pages.size))))
        return self._final

    def _checked_pages(self, pages: object, name: str) -> Pages:
        """``pages`` as a 1-D int64 array of valid indexes, or ValueError/TypeError."""
        arr = np.asarray(pages)
        if arr.size == 0:
            # np.array([]) is float64; an empty set of pages is fine whatever its dtype.
            return np.empty(0, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array of page indexes, not shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer page indexes, not {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self._npages:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} holds page index {bad}, outside this VM's 0..{self._npages - 1}"
            )
        return arr.astype(np.int64, copy=False)


def _as_set(pages: Pages) -> Pages:
    """Sorted and without duplicates; a fresh array, so the caller's stays its own.

    A dirty log's collect() is already sorted and unique, so check that in O(n) first
    and save np.unique's sort on the common path."""
    if pages.size < 2 or bool(np.all(pages[1:] > pages[:-1])):
        return pages.copy()
    return np.unique(pages)
