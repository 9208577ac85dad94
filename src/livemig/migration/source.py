"""The source side of a migration: drives the six stages from the host the VM runs on.

    pre-migration   the VM runs here; connect to the target's daemon and authenticate
    reservation     ask the target to check memory and disk and start QEMU -incoming
    pre-copy        rounds planned by the sans-IO planner, pages from the dirty tracker,
                    paced by a token bucket at the planner's rate
    stop-and-copy   QMP stop, the last dirty pages at the maximum rate, then QEMU's own
                    device-state-only migration (x-ignore-shared: QEMU never moves RAM)
    commitment      the target says it holds a consistent image; our acknowledgement
                    makes it primary
    activation      the target runs ``cont`` and announces the VM's new place on the LAN

Until the acknowledgement is sent, any failure (or a cancel) resumes the VM here, tells
the target to tear down, and raises ``MigrationError`` with the VM still running here.

Every wait has a time-out. Pre-copy tolerates a peer that takes no data for
``stall_timeout_s``; the stop window, where the VM is paused, tolerates at most
``STOP_WINDOW_STALL_S`` of silence per step, so that after any fault the VM runs here again
within a few seconds. If the answer to "commit" never comes, the commit is in doubt: the
target may or may not run the VM. Then we ask the target's daemon afresh where the VM
runs (``locate``, which also makes it tear down an uncommitted copy) and act on the
answer: release our copy, or resume it. Until an answer comes the VM stays paused here,
never running twice. A journal (``switchover.json`` beside the VM's record) lets a daemon
that restarts mid-switchover settle the same question (``recover_switchover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from livemig.errors import LivemigError, MigrationCancelled, MigrationError, ReservationRefused
from livemig.migration.holds import HoldPoint, hold
from livemig.migration.meters import WINDOW_S, LinkMeter, WindowedRate, pace_bps
from livemig.migration.planner import (
    DEFAULT_LIMITS,
    DEFAULT_SWITCHOVER_COST_S,
    DEFAULT_TARGET,
    DowntimeTarget,
    Mode,
    Planner,
    PlannerConfig,
    RateLimits,
    RoundPlan,
    StopAndCopy,
    service_share_bps,
)
from livemig.migration.stages import Event, Stage, StageMachine
from livemig.migration.tunnel import StateSource
from livemig.units import MBIT, PAGE_SIZE
from livemig.vm import dirtylog
from livemig.vm.handle import MigratableVM
from livemig.vm.qemu import ENGINE_MIGRATION_CAPABILITIES
from livemig.vm.spec import VMRecord
from livemig.wire import frames, messages
from livemig.wire.channel import Channel
from livemig.wire.messages import DEFAULT_OPTIONS, MigrationReport, OnTimeout, Progress

log = logging.getLogger(__name__)

MAX_BATCH_PAGES = frames.MAX_PAGES_PER_FRAME
MIN_BATCH_PAGES = 64
BATCH_SECONDS = 0.02  # a frame is paced as one lump: keep it to ~20 ms of the rate
RESERVE_TIMEOUT_S = 30.0  # the target boots a QEMU -incoming meanwhile
STOP_WINDOW_STALL_S = 2.0  # the VM is paused: no step of the stop window may stall longer
STOP_WINDOW_S = 2.5  # nor the whole window, beyond the final pages' time at the max rate
DEVICE_STATE_TIMEOUT_S = 3.0  # ~5 ms when all is well
DRAIN_TIMEOUT_S = 1.0  # the stop waits this long at most for pre-copy's queue to empty
COMMIT_TIMEOUT_S = 5.0
RESOLVE_TIMEOUT_S = 30.0  # how long to keep asking a silent target where the VM runs
ABORT_TIMEOUT_S = 1.0  # telling the target to tear down is best effort
PROGRESS_INTERVAL_S = 0.1
# Under the downtime target the time allowed is a soft deadline, looked at between
# rounds; a round that runs far past it (round 1 on a link far slower than measured,
# say) is cut off at this multiple, and the migration aborts.
HARD_DEADLINE_FACTOR = 1.5
STALL_ROUNDS = 3  # rounds without a better prediction: the migration is stalled
FALLBACK_LINK_BPS = 100 * MBIT  # the stop window's deadline before any measurement


@dataclass(frozen=True)
class MigrationOptions:
    """``messages.MigrateOptions`` in the engine's units; the defaults are its."""

    limits: RateLimits = DEFAULT_LIMITS
    # None: the paper's rates (``limits``); else the default policy, a downtime target.
    target: DowntimeTarget | None = DEFAULT_TARGET
    max_impact: float = DEFAULT_OPTIONS.max_impact_pct / 100  # of the link, for the VM
    on_timeout: OnTimeout = DEFAULT_OPTIONS.on_timeout
    mode: Mode = DEFAULT_OPTIONS.mode
    tracker: str = DEFAULT_OPTIONS.tracker
    verify: bool = DEFAULT_OPTIONS.verify  # checksum both images; costs time before cont
    seed: int = DEFAULT_OPTIONS.seed
    stall_timeout_s: float = DEFAULT_OPTIONS.stall_timeout_s  # the target took no data
    timeout_s: float | None = DEFAULT_OPTIONS.timeout_s  # the budget, up to commitment
    hold_at: HoldPoint | None = DEFAULT_OPTIONS.hold_at  # fault drills (migration.holds)
    hold_hot: int = DEFAULT_OPTIONS.hold_hot  # rounds that make a page hot; 0: off

    @classmethod
    def of(cls, options: messages.MigrateOptions,
           switchover_cost_s: float = DEFAULT_SWITCHOVER_COST_S,
           final_collect_s: float = 0.0) -> MigrationOptions:
        """The engine's options for a request; ``switchover_cost_s`` and
        ``final_collect_s`` are what past switchovers to this target measured."""
        target = None
        if options.rates is messages.Rates.AUTO:
            target = DowntimeTarget(options.downtime_ms / 1000, switchover_cost_s,
                                    options.timeout_s, final_collect_s)
        return cls(limits=RateLimits.of(options), target=target,
                   max_impact=options.max_impact_pct / 100, on_timeout=options.on_timeout,
                   mode=options.mode, tracker=options.tracker,
                   verify=options.verify, seed=options.seed,
                   stall_timeout_s=options.stall_timeout_s, timeout_s=options.timeout_s,
                   hold_at=options.hold_at, hold_hot=options.hold_hot)


ProgressCallback = Callable[[Progress], None]
Connect = Callable[[], Awaitable[Channel]]


@dataclass(frozen=True)
class _StopWindow:
    """What the stop-and-copy measured and got: times on this machine's monotonic clock,
    ``stopped_event_at`` on QEMU's CLOCK_REALTIME (its STOP event)."""

    stopped_event_at: float | None
    stopped_at: float
    final_pages: int
    final_bytes: int
    final_collect_s: float
    device_started: float
    image_asked: float
    destination_checksum: str | None
    verify_ms: float


@dataclass(frozen=True)
class _Commit:
    commit_sent: float
    cont_returned_at: float  # the target's, on the same clock (one machine)


def _pace_moved(old: float | None, new: float | None) -> bool:
    """Whether a pace changed enough (5 %) to set again: setting it wakes every sender
    waiting on the pacer, so the measurements' jitter should not."""
    if old is None or new is None:
        return old is not new
    return abs(new - old) > 0.05 * old


class _NotActivated(LivemigError):
    """The target proved that it did not run the VM and holds no copy that could."""


def journal_file(record: VMRecord) -> Path:
    return record.directory / "switchover.json"


class Journal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a daemon restarting mid-switchover must know: the target, and whether the
    commit may have reached it."""

    target: str
    commit_sent: bool


def read_journal(record: VMRecord) -> Journal | None:
    """The switchover ``record``'s VM was stopped in, if any. A journal that does not
    parse raises ``msgspec.DecodeError`` (a ValueError)."""
    try:
        return msgspec.json.decode(journal_file(record).read_bytes(), type=Journal)
    except FileNotFoundError:
        return None


async def locate(vm: str, connect: Connect, patience_s: float) -> messages.Location | None:
    """Ask the target's daemon, on fresh connections, where ``vm`` stands: "running"
    there, or "absent" (it holds no copy, and tore down any uncommitted one before
    answering). Asks again on "activating" or no answer, for up to ``patience_s``;
    None if no final answer came."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                async with await connect() as peer:
                    answer = await peer.ask(messages.Locate(vm=vm), messages.Location, 5.0)
            if isinstance(answer, messages.Location) and answer.final:
                return answer
        except (LivemigError, OSError, TimeoutError) as exc:
            log.info("locating %s: %s", vm, exc)
        await asyncio.sleep(0.5)
    return None


async def recover_switchover(vm: MigratableVM, connect: Connect) -> tuple[bool, str]:
    """``vm`` has a switchover journal: its migration ended in its stop window (its
    daemon died, or the commit's fate stayed unknown). Settle it the way the migration
    would have; returns (settled, what was done). Unsettled means in doubt: ask again."""
    entry = read_journal(vm.record)
    if entry is None:
        return True, f"{vm.name} was in no switchover"
    target = entry.target
    answer = await locate(vm.name, connect, RESOLVE_TIMEOUT_S)
    if answer is not None and answer.state == "running":
        await vm.stop()  # the target runs it: this copy is the stale one
        return True, f"{vm.name} runs on {target}; released the copy here"
    if answer is None and entry.commit_sent:
        return False, (f"{vm.name}: the commit to {target} is in doubt and {target} does "
                       f"not answer; {vm.name} stays paused here")
    # Not committed, or the target proved it holds no copy: the VM is ours.
    with contextlib.suppress(LivemigError):
        await vm.qmp_command("migrate_cancel")
    if await vm.status() != "running":
        await vm.resume()
    journal_file(vm.record).unlink(missing_ok=True)
    return True, f"{vm.name} resumed here (its migration to {target} never completed)"


class SourceMigration:
    def __init__(
        self,
        vm: MigratableVM,
        *,
        source_host: str,
        target_host: str,
        connect: Connect,
        options: MigrationOptions,
        on_progress: ProgressCallback = lambda _: None,
    ) -> None:
        self.vm = vm
        self.source_host = source_host
        self.target_host = target_host
        self._connect = connect
        self.options = options
        self.on_progress = on_progress
        self.machine = StageMachine()
        self._channel: Channel | None = None
        self._tracker: dirtylog.DirtyTracker | None = None
        self._state_tunnel: StateSource | None = None
        self._started = time.monotonic()
        self._last_progress = 0.0
        self.planner: Planner | None = None
        self._holes: npt.NDArray[np.bool_] | None = None
        self._rate_bps: float | None = 0.0  # of the round under way (None: unpaced)
        self._budget: asyncio.Timeout | None = None
        self._budget_s: float | None = None  # the hard cut-off
        self._allowed_s: float | None = None  # the time allowed, as the operator sees it
        self._loop_started = 0.0
        self._cancel_accepted = False
        self._aborting: asyncio.Task[None] | None = None  # see _put_back
        self._resumed_event_at: float | None = None  # the target's RESUME event
        self._cont_ms: float | None = None  # how long the target's cont took
        self._device_state_bytes = 0
        self._link = LinkMeter()
        self._service = WindowedRate()
        self._service_sampled = -WINDOW_S
        self._percent = 0.0
        self._switchover_forced = False

    @property
    def stage(self) -> Stage:
        return self.machine.stage

    def _event(self, event: Event) -> None:
        self.machine.handle(event, time.monotonic() - self._started)
        self._progress(force=True)

    def refuse_cancel(self) -> str | None:
        """An operator asks to cancel: why the cancel does not apply, or None when it
        does (the caller then cancels the task that runs ``run()``). A cancel is acted
        on once: while the first one puts the VM back, another would only interrupt it."""
        if self._cancel_accepted or self._aborting is not None:
            return (f"the migration of {self.vm.name} is already being aborted; it runs on "
                    f"{self.source_host} again once its clean-up is done")
        if not self.stage.cancellable:
            return f"too late to cancel: {self.vm.name} is committed to {self.target_host}"
        self._cancel_accepted = True
        return None

    # -- the whole migration ----------------------------------------------------------

    async def run(self) -> MigrationReport:
        self._loop_started = asyncio.get_running_loop().time()
        budget = self._budget = asyncio.timeout_at(self._deadline(self.options.timeout_s))
        try:
            async with budget:
                return await self._migrate()
        except _NotActivated as exc:
            # The commit did not take: the target proved it never ran the VM and never will.
            await self._put_back(str(exc), Event.NOT_ACTIVATED)
            raise MigrationError(
                self.vm.name, Stage.ACTIVATION.value,
                f"{self.target_host} did not activate {self.vm.name} ({exc}); "
                f"it runs on {self.source_host} as before", self.source_host,
            ) from exc
        except asyncio.CancelledError:
            if self.stage.source_is_primary:
                await self._put_back("the migration was cancelled", Event.CANCELLED)
                raise MigrationCancelled(
                    self.vm.name, self.stage.value, f"migration of {self.vm.name} cancelled; "
                    f"it runs on {self.source_host} as before", self.source_host
                ) from None
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and budget.expired():
                exc = LivemigError(f"it did not finish within its time budget of "
                                   f"{self._allowed_s:g} s" + (
                                       "" if self._budget_s == self._allowed_s else
                                       f" (cut off mid-round at {self._budget_s:g} s)"))
            elif (isinstance(exc, frames.WireError) and self._channel is not None
                  and (why := self._channel.last_words())):
                exc = LivemigError(f"{self.target_host} gave up: {why}")
            # Any failure before commitment, a bug included, puts the VM back as it was.
            if self.stage.source_is_primary:
                failed_in = self.stage.value
                await self._put_back(str(exc), Event.FAILED)
                if isinstance(exc, MigrationError) or not isinstance(exc, LivemigError):
                    raise
                raise MigrationError(
                    self.vm.name, failed_in,
                    f"migration of {self.vm.name} failed in {failed_in}: {exc}; "
                    f"it runs on {self.source_host} as before", self.source_host,
                ) from exc
            self.machine.handle(Event.FAILED, time.monotonic() - self._started)
            if not isinstance(exc, LivemigError):
                raise
            raise MigrationError(
                self.vm.name, Stage.ACTIVATION.value,
                f"the commit of {self.vm.name} to {self.target_host} is in doubt: {exc}. "
                f"It stays paused on {self.source_host} so that it never runs twice; "
                f"{self.source_host}'s daemon settles it when {self.target_host} answers",
                None,
            ) from exc
        finally:
            if self._tracker is not None:
                self._tracker.close()
            if self._state_tunnel is not None:
                await self._state_tunnel.close()
            if self._channel is not None:
                await self._channel.close()

    def _deadline(self, timeout_s: float | None) -> float | None:
        """When (loop time) the budget cuts the migration off wherever it is. Under the
        downtime target the time allowed is looked at between rounds (the planner's),
        and this is only its backstop."""
        self._allowed_s = self._budget_s = timeout_s
        if timeout_s is not None and self.options.target is not None:
            self._budget_s = timeout_s * HARD_DEADLINE_FACTOR
        return None if self._budget_s is None else self._loop_started + self._budget_s

    async def _migrate(self) -> MigrationReport:
        await self._pre_migration()
        reserved_at = time.monotonic()
        await self._reservation()
        stop = await self._precopy()
        window = await self._stop_and_copy(stop)
        commit = await self._commitment()
        source_checksum, released_at = await self._activation()
        return self._report(stop, window, commit, source_checksum,
                            total_time_s=released_at - reserved_at)

    # Each stage below is one method, with what undoes it beside it. ``_abort`` runs the
    # undo of the stage the migration failed in (UNDO, after the class): the stage, not
    # flags, says what there is to put back.

    async def _pre_migration(self) -> None:
        """Stage 0: the VM runs here, and the target answers and is authenticated."""
        spec = self.vm.record.spec
        if (state := await self.vm.status()) != "running":
            raise MigrationError(spec.name, Stage.PRE_MIGRATION.value,
                                 f"{spec.name} is {state}, not running; nothing to migrate",
                                 self.source_host)
        self._channel = await self._connect()
        self._event(Event.BEGIN)

    async def _reservation(self) -> None:
        """Stage 1: the target holds memory and an incoming QEMU for the VM. Undone by
        the target itself when the channel brings it an Abort or breaks."""
        spec = self.vm.record.spec
        reserve = messages.Reserve(
            spec=msgspec.convert(spec.to_json(), messages.VMSpecFields), source=self.source_host,
            # The target holds that one point; the others are ours.
            hold_at=(HoldPoint.COMMITMENT if self.options.hold_at is HoldPoint.COMMITMENT
                     else None))
        reserved = await self._request(reserve, messages.Reserved, RESERVE_TIMEOUT_S)
        if isinstance(reserved, messages.Refusal):
            raise ReservationRefused(
                spec.name, Stage.RESERVATION.value,
                f"{self.target_host} cannot take {spec.name}: {reserved.error}",
                self.source_host,
            )
        # Set now, not in the stop window: every millisecond there is downtime. QEMU
        # migrates into a socket our daemon holds; the state goes on through the channel.
        await self.vm.qmp_command("migrate-set-capabilities",
                                  capabilities=list(ENGINE_MIGRATION_CAPABILITIES))
        self._state_tunnel = await StateSource.open(self.vm)
        self._event(Event.RESERVED)
        await hold(self.source_host, spec.name, HoldPoint.RESERVATION, self.options.hold_at)

    async def _precopy(self) -> StopAndCopy:
        """Stage 2: rounds of pages while the VM runs, until the planner says stop.
        Nothing to undo here: the VM never stopped (the tracker goes in ``run``)."""
        assert self._channel is not None
        memory = self.vm.memory
        self._tracker = dirtylog.open_tracker(self.vm.pid, memory, self.options.tracker)
        self._tracker.start()  # before the hole scan: a page written after it is tracked
        self._holes = np.ones(memory.npages, dtype=bool)
        for start, end in memory.data_ranges():
            self._holes[start:end] = False
        self.planner = Planner(
            memory.npages,
            PlannerConfig(limits=self.options.limits, target=self.options.target,
                          mode=self.options.mode, seed=self.options.seed,
                          hold_hot=self.options.hold_hot),
        )
        step = self.planner.first(zero_pages=np.flatnonzero(self._holes).astype(np.int64))
        while isinstance(step, RoundPlan):
            self._rate_bps = step.rate_bps
            self._channel.pacer.rate_bps = self._pace()  # the channel paces every frame
            self._link.restart()  # the gap since the last round measured nothing
            round_started = time.monotonic()
            sent = await self._send(step.number, step.pages, skip_dirtied=True)
            collect_started = time.monotonic()
            dirtied = self._tracker.collect()
            collect_s = time.monotonic() - collect_started
            self._holes[dirtied] = False
            duration_s = collect_started - round_started
            # A round too short to close a measuring window, or a socket that is not
            # TCP, measures the round as a whole; one that sent nothing, nothing at all.
            link_bps = (self._link.link_bps or sent * 8 / duration_s or FALLBACK_LINK_BPS)
            step = self.planner.end_round(
                dirtied, duration_s, link_bps=link_bps,
                elapsed_s=time.monotonic() - self._started, collect_s=collect_s)
            self._after_round()
        assert isinstance(step, StopAndCopy)
        if not step.reason.within_target:
            self._out_of_reach(step)
        return step

    def _pace(self) -> float | None:
        """This round's pace: the planner's (the paper's policy), or the measured link
        less the share the VM's own traffic keeps."""
        if self.options.target is None:
            return self._rate_bps
        if self._link.probing(time.monotonic()):
            return None
        link = self._link.link_bps
        share = 0.0 if link is None else service_share_bps(
            link, self._service.last_bps or 0.0, self.options.max_impact)
        return pace_bps(link, share)

    def _after_round(self) -> None:
        """Once round 1 has measured the link, the time allowed is fixed: the budget
        becomes its backstop."""
        assert self.planner is not None
        if (self._budget is not None and self._budget.when() is None
                and self.options.target is not None and self.planner.timeout_s is not None):
            self._budget.reschedule(self._deadline(self.planner.timeout_s))
        self._progress(force=True)

    def _out_of_reach(self, stop: StopAndCopy) -> None:
        """The downtime target cannot be met: abort, unless the operator said to switch
        over anyway (then it is reported, never silent)."""
        assert self.planner is not None and self.options.target is not None
        target_ms = self.options.target.downtime_s * 1000
        best = self.planner.best_predicted_downtime_s
        within_reach = "" if best is None else f"; the best within reach was {best * 1000:.0f} ms"
        why = {
            "timeout": f"after {self.planner.timeout_s:.0f} s",
            "target-unreachable": "at all: the switchover's fixed cost and final "
                                  "collect alone come to "
                                  f"{self.planner.predict_downtime_s(0) * 1000:.0f} ms",
        }.get(str(stop.reason), str(stop.reason))
        message = f"the downtime target of {target_ms:g} ms was not within reach {why}"
        if self.options.on_timeout is OnTimeout.SWITCHOVER:
            predicted = stop.predicted_downtime_s
            log.warning("%s: %s; switching over anyway (--on-timeout switchover), "
                        "predicted downtime %s", self.vm.name, message,
                        "unknown" if predicted is None else f"{predicted * 1000:.0f} ms")
            self._switchover_forced = True
            return
        raise LivemigError(f"{message}{within_reach}. Give a larger --downtime, or "
                           f"--on-timeout switchover to accept it")

    async def _stop_and_copy(self, stop: StopAndCopy) -> _StopWindow:
        """Stage 3: the VM stops here; the last pages and QEMU's device state go, and the
        target confirms a consistent image. Undone by ``_undo_stop_and_copy``."""
        assert self._channel is not None and self._tracker is not None
        assert self._holes is not None and self.planner is not None
        spec = self.vm.record.spec
        # While the VM still runs: what pre-copy queued (megabytes, at the link's rate)
        # would otherwise delay every step of the stop window. Pages written meanwhile
        # are in the final collect.
        await self._channel.drained(DRAIN_TIMEOUT_S)
        self._journal(commit_sent=False)  # first: a daemon restarting now must resume it
        self._event(Event.PRECOPY_DONE)  # before the stop: an undo resumes either way
        stopped_event_at = await self.vm.pause()
        stopped_at = time.monotonic()
        await hold(self.source_host, spec.name, HoldPoint.STOP_AND_COPY,
                   self.options.hold_at)
        collect_started = time.monotonic()
        last = np.union1d(stop.pages, self._tracker.collect())
        final_collect_s = time.monotonic() - collect_started
        self._holes[last] = False
        # A new transfer at the maximum rate (unpaced under the downtime target: the VM is
        # paused, its own traffic too): the last round's debt must not delay it.
        self._channel.pacer.reset(stop.rate_bps)
        self._rate_bps = stop.rate_bps
        self._link.restart()
        # The VM is paused: the whole window, not just each step, has a deadline, so that
        # after any fault it runs here again within seconds.
        rate = stop.rate_bps or self._link.link_bps or FALLBACK_LINK_BPS
        window_s = STOP_WINDOW_S + len(last) * PAGE_SIZE * 8 / rate
        window = asyncio.timeout(window_s)
        try:
            async with window:
                # The planner plans no further; the stop-and-copy's bytes are counted here.
                final_bytes = await self._send(len(self.planner.rounds) + 1, last,
                                               skip_dirtied=False)
                held = await hold(self.source_host, spec.name, HoldPoint.DEVICE_STATE,
                                  self.options.hold_at)
                if held and (when := window.when()) is not None:
                    window.reschedule(when + held)
                device_started = time.monotonic()
                assert self._state_tunnel is not None
                self._state_tunnel.start(self._channel)
                await self.vm.qmp_command("migrate", uri=self._state_tunnel.uri)
                await self._wait_device_state()
                image_asked = time.monotonic()
                image = await self._request(messages.Image(verify=self.options.verify),
                                            messages.ImageConsistent,
                                            STOP_WINDOW_STALL_S + DEVICE_STATE_TIMEOUT_S)
        except TimeoutError as exc:
            if not window.expired():
                raise
            raise LivemigError(f"the stop-and-copy did not finish within {window_s:.1f} s "
                               f"({self.target_host} too slow or unreachable)") from exc
        if isinstance(image, messages.Refusal) or not image.consistent:
            why = image.error if isinstance(image, messages.Refusal) else "it says it is not"
            raise MigrationError(spec.name, self.stage.value,
                                 f"{self.target_host} does not hold a consistent image: "
                                 f"{why}", self.source_host)
        self._event(Event.IMAGE_CONSISTENT)
        return _StopWindow(
            stopped_event_at=stopped_event_at, stopped_at=stopped_at,
            final_pages=len(last), final_bytes=final_bytes, final_collect_s=final_collect_s,
            device_started=device_started,
            image_asked=image_asked, destination_checksum=image.checksum,
            verify_ms=image.verify_ms)

    async def _undo_stop_and_copy(self) -> None:
        """The VM runs here again. QEMU's device-state migration, if it began, is
        cancelled first (a no-op otherwise); ``cont`` on a running VM changes nothing."""
        with contextlib.suppress(LivemigError):
            await self.vm.qmp_command("migrate_cancel")
        await self.vm.resume()

    async def _commitment(self) -> _Commit:
        """Stage 4: "commit" goes out; once it is on its way the target may be primary,
        and the VM resumes here only if the target proves it never ran it (then the
        stop-and-copy's undo applies)."""
        self._journal(commit_sent=True)
        self.machine.handle(Event.COMMITTED, time.monotonic() - self._started)
        if self._budget is not None:
            self._budget.reschedule(None)  # a time budget never aborts a committed migration
        commit_sent = time.monotonic()
        return _Commit(commit_sent=commit_sent, cont_returned_at=await self._commit())

    async def _activation(self) -> tuple[str | None, float]:
        """Stage 5: the target ran ``cont`` on commit. This copy is released; returns
        its checksum (frozen since the stop) and when it was gone. No undo: done."""
        self._event(Event.ACTIVATED)
        checksum = self.vm.memory.checksum() if self.options.verify else None
        await self.vm.stop()  # release: the source's copy, tap and RAM file go
        return checksum, time.monotonic()

    def _report(self, stop: StopAndCopy, window: _StopWindow, commit: _Commit,
                source_checksum: str | None, *, total_time_s: float) -> MigrationReport:
        assert self.planner is not None and self._tracker is not None
        spec = self.vm.record.spec
        device_state_ms = (window.image_asked - window.device_started) * 1000
        resumed, stopped = self._resumed_event_at, window.stopped_event_at
        bytes_sent = self.planner.bytes_sent + window.final_bytes
        downtime_ms = (commit.cont_returned_at - window.stopped_at) * 1000
        predicted_ms = (None if stop.predicted_downtime_s is None
                        else stop.predicted_downtime_s * 1000)
        target = self.options.target
        link_bps, service_bps = self._link.link_bps, self._service.last_bps
        return MigrationReport(
            vm=spec.name,
            source=self.source_host,
            target=self.target_host,
            mode=str(self.options.mode),
            tracker=self._tracker.name,
            ram_bytes=spec.ram_bytes,
            downtime_ms=downtime_ms,
            total_time_s=total_time_s,
            bytes_sent=bytes_sent,
            rounds=list(self.planner.rounds),
            data_sent_ratio=round(bytes_sent / spec.ram_bytes, 4),
            stop_reason=str(stop.reason),
            final_pages=window.final_pages,
            device_state_ms=device_state_ms,
            verify_ms=window.verify_ms,
            verified=((source_checksum == window.destination_checksum)
                      if self.options.verify else None),
            source_checksum=source_checksum,
            destination_checksum=window.destination_checksum,
            stages=[(s.value, round(t, 4)) for s, t in self.machine.history],
            stopped_at=window.stopped_at,
            cont_returned_at=commit.cont_returned_at,
            vcpus_stopped_ms=(None if stopped is None or resumed is None
                              else (resumed - stopped) * 1000),
            device_state_bytes=self._device_state_bytes,
            cont_ms=self._cont_ms,
            rates=("paper" if target is None else "auto"),
            downtime_target_ms=None if target is None else target.downtime_s * 1000,
            predicted_downtime_ms=predicted_ms,
            downtime_over_predicted=(None if not predicted_ms
                                     else round(downtime_ms / predicted_ms, 3)),
            switchover_cost_ms=self.planner.switchover_cost_s * 1000,
            link_mbps=None if link_bps is None else link_bps / MBIT,
            service_mbps=None if service_bps is None else service_bps / MBIT,
            switchover_forced=self._switchover_forced,
            aids=["hold-hot"] if any(r.pages_held for r in self.planner.rounds) else [],
            final_bytes=window.final_bytes,
            final_collect_ms=window.final_collect_s * 1000,
            # Where the engine's downtime goes, step by step (ms).
            stop_window_ms={
                "final_pages": (window.device_started - window.stopped_at) * 1000,
                "device_state": device_state_ms,
                "image_consistent": (commit.commit_sent - window.image_asked) * 1000,
                "commit_to_cont": (commit.cont_returned_at - commit.commit_sent) * 1000,
            },
        )

    # -- pages --------------------------------------------------------------------------

    async def _send(
        self, round_number: int, pages: npt.NDArray[np.int64], *, skip_dirtied: bool
    ) -> int:
        """Send ``pages`` (all zero ones as indexes only); returns the page bytes sent.

        With ``skip_dirtied`` (pre-copy rounds) pages written again since the last collect
        are left for the next round, and the planner is told of every batch."""
        assert self._channel is not None and self._tracker is not None
        assert self._holes is not None and self.planner is not None
        memory = self.vm.memory
        sent_bytes = 0
        # Small frames at low rates keep the link smooth for the guest's own traffic and
        # keep each peek (§5.4) fresh; large ones at high rates keep per-frame costs low.
        rate = self._rate_bps or self._link.link_bps
        batch_pages = MAX_BATCH_PAGES if rate is None else int(min(MAX_BATCH_PAGES, max(
            MIN_BATCH_PAGES, rate / 8 * BATCH_SECONDS / PAGE_SIZE)))
        for start in range(0, len(pages), batch_pages):
            batch = pages[start:start + batch_pages]
            skipped = 0
            if skip_dirtied:
                # §5.4: a page written again since the last collect will go next round.
                again = self._tracker.peek(batch)
                skipped = int(again.sum())
                batch = batch[~again]
            holes = self._holes[batch]
            candidates = batch[~holes]
            data = memory.pages[candidates]  # a copy: what we send is what we record
            is_zero = ~data.view(np.uint64).any(axis=1)
            send = candidates[~is_zero]
            payload = data[~is_zero]
            zero = np.concatenate([batch[holes], candidates[is_zero]])
            self._tracker.sent(send, payload)
            if len(zero):
                self._tracker.sent(zero, np.zeros((len(zero), PAGE_SIZE), dtype=np.uint8))
            await self._channel.send_pages(frames.Pages(
                round=round_number,
                indexes=send.astype(np.uint32),
                zero_indexes=zero.astype(np.uint32),
                data=payload.reshape(-1).data,
            ), timeout=self.options.stall_timeout_s if skip_dirtied else STOP_WINDOW_STALL_S)
            sent_bytes += payload.nbytes
            self._measure()
            if skip_dirtied:
                self.planner.record_batch(sent=len(send), skipped=skipped, zero=len(zero))
            self._progress(pages_left=len(pages) - start - len(batch) - skipped)
            if start == 0 and skip_dirtied and round_number <= 2:
                point = HoldPoint.ROUND_1 if round_number == 1 else HoldPoint.LATER_ROUND
                await hold(self.source_host, self.vm.name, point, self.options.hold_at)
        return sent_bytes

    def _measure(self) -> None:
        """After a frame: what the link delivered, what the VM itself sends, and the
        pace that leaves it its share (the downtime target's policy)."""
        assert self._channel is not None
        now = time.monotonic()
        pacer = self._channel.pacer
        if (acked := self._channel.bytes_acked()) is not None:
            self._link.sample(now, acked, pacer.rate_bps)
        if now - self._service_sampled >= WINDOW_S:
            self._service_sampled = now
            if (nic := self.vm.nic_sent_bytes()) is not None:
                self._service.sample(now, nic)
        if self.options.target is not None and self.stage is Stage.PRECOPY:
            pace = self._pace()
            if _pace_moved(pacer.rate_bps, pace):
                pacer.rate_bps = pace

    async def _wait_device_state(self) -> None:
        """Until QEMU has written its device state and the tunnel has put all of it, and
        its end, on the channel."""
        assert self._state_tunnel is not None
        deadline = time.monotonic() + DEVICE_STATE_TIMEOUT_S
        try:
            info = await self.vm.migration_ended(DEVICE_STATE_TIMEOUT_S,
                                                 alongside=self._state_tunnel.pump)
        except TimeoutError:
            raise LivemigError(f"QEMU's device-state transfer took over "
                               f"{DEVICE_STATE_TIMEOUT_S} s") from None
        if info.get("status") != "completed":
            raise LivemigError(f"QEMU's device-state transfer {info.get('status')}: "
                               f"{info.get('error-desc', 'no reason given')}")
        self._device_state_bytes = await self._state_tunnel.finished(
            max(0.0, deadline - time.monotonic()))

    # -- helpers ------------------------------------------------------------------------

    async def _request(self, request: messages.PeerRequest, expected: type[messages.R],
                       timeout: float) -> messages.R | messages.Refusal:
        assert self._channel is not None
        return await self._channel.ask(request, expected, timeout)

    async def _commit(self) -> float:
        """Send "commit"; return when the target's ``cont`` returned (on its monotonic
        clock, which is ours: one machine). Raises _NotActivated if the target proves it
        did not run the VM, LivemigError if nobody can tell."""
        assert self._channel is not None
        try:
            reply = await self._request(messages.Commit(), messages.Activated,
                                        COMMIT_TIMEOUT_S)
        except frames.WireError as exc:
            return await self._resolve(f"no answer to commit ({exc})")
        if isinstance(reply, messages.Activated):
            self._resumed_event_at, self._cont_ms = reply.resumed_at, reply.cont_ms
            return reply.cont_returned_at
        if reply.running is False:
            raise _NotActivated(reply.error)
        return await self._resolve(f"{self.target_host} failed to activate the VM: "
                                   f"{reply.error}")

    async def _resolve(self, why: str) -> float:
        log.warning("%s: %s; asking %s where %s runs", self.vm.name, why, self.target_host,
                    self.vm.name)
        answer = await locate(self.vm.name, self._connect, RESOLVE_TIMEOUT_S)
        if answer is None:
            raise LivemigError(f"{why}, and {self.target_host} has not answered since")
        if answer.state == "absent":
            raise _NotActivated(f"{why}; {self.target_host} holds no copy of it now")
        return answer.cont_returned_at or time.monotonic()

    async def _put_back(self, reason: str, event: Event) -> None:
        """``_abort``, in a task of its own that no cancel of ours can reach: a cancel
        that interrupted ``vm.resume()`` would leave the VM paused until the daemon
        restarts. A cancel that arrives meanwhile (the daemon shutting down) still ends
        this task at once, never swallowed; the clean-up goes on to its end."""
        self._aborting = asyncio.ensure_future(self._abort(reason, event))
        await asyncio.shield(self._aborting)

    async def _abort(self, reason: str, event: Event) -> None:
        """Put everything back as it was: the VM runs here, the target tears down."""
        if (undo := UNDO.get(self.stage)) is not None:
            await undo(self)
        self._journal(None)
        if self._channel is not None:
            await self._channel.abort(reason, ABORT_TIMEOUT_S)  # best effort, then closed
        self.machine.handle(event, time.monotonic() - self._started)
        self._progress(force=True)

    def _journal(self, commit_sent: bool | None) -> None:
        """What a daemon restarting mid-switchover must know (None: nothing to know)."""
        path = journal_file(self.vm.record)
        if commit_sent is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(Journal(self.target_host, commit_sent)))
        tmp.replace(path)  # atomic: a restart sees the old or the new, never half

    def _progress(self, *, pages_left: int | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        planner = self.planner
        rounds = planner.rounds if planner is not None else []
        last = rounds[-1] if rounds else None
        left = pages_left if pages_left is not None else 0
        sent = planner.bytes_sent if planner is not None else 0
        # Still to send, as now predicted: the rest of this round, then at least what
        # the last round dirtied. The share of the whole only ever grows.
        to_send = left * PAGE_SIZE + (last.pages_dirtied * PAGE_SIZE if last else 0)
        if self.stage is Stage.DONE:
            self._percent = 100.0
        elif sent + to_send:
            self._percent = max(self._percent, min(99.0, 100 * sent / (sent + to_send)))
        link = self._link.link_bps
        predicted = None if planner is None else planner.predicted_downtime_s
        target = self.options.target
        self.on_progress(Progress(
            stage=self.stage.value,
            round=len(rounds) + (1 if self.stage is Stage.PRECOPY else 0),
            pages_left=left,
            rate_mbps=(self._rate_bps or link or 0.0) / MBIT,
            dirty_rate_mbps=(last.dirty_rate_bps if last else 0.0) / MBIT,
            bytes_sent=sent,
            elapsed_s=now - self._started,
            percent=round(self._percent, 1),
            eta_s=None if link is None else to_send * 8 / link + (predicted or 0.0),
            link_mbps=None if link is None else link / MBIT,
            service_mbps=(None if self._service.last_bps is None
                          else self._service.last_bps / MBIT),
            predicted_downtime_ms=None if predicted is None else predicted * 1000,
            downtime_target_ms=None if target is None else target.downtime_s * 1000,
            stalled=self._stalled(),
            held_pages=last.pages_held if last else 0,
        ))

    def _stalled(self) -> bool:
        """The last STALL_ROUNDS rounds brought the prediction no closer to the target."""
        if self.planner is None or self.options.target is None:
            return False
        history = self.planner.predictions_s
        if len(history) <= STALL_ROUNDS:
            return False
        return min(history[-STALL_ROUNDS:]) >= 0.95 * min(history[:-STALL_ROUNDS])


# What undoes each stage on the source, if the migration fails or is cancelled there.
# Stages missing here leave nothing to undo locally: the Abort that ``_abort`` always
# sends (or the broken channel) has the target tear its reservation down.
Undo = Callable[[SourceMigration], Awaitable[None]]
UNDO: dict[Stage, Undo] = {
    Stage.STOP_AND_COPY: SourceMigration._undo_stop_and_copy,
    Stage.COMMITMENT: SourceMigration._undo_stop_and_copy,  # "commit" not yet sent
    Stage.ACTIVATION: SourceMigration._undo_stop_and_copy,  # the target proved it never ran
}
