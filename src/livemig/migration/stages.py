"""The six stages of a live migration (Clark et al., Fig. 1), as one transition table.

Everything that moves a migration from one stage to the next lives in ``TRANSITIONS``;
an event that the table does not list for the current stage raises ``IllegalTransition``.

    PRE_MIGRATION --begin--> RESERVATION --reserved--> PRECOPY --precopy_done-->
    STOP_AND_COPY --image_consistent--> COMMITMENT --committed--> ACTIVATION --activated--> DONE

Until ``committed``, the source is primary: ``failed`` or ``cancelled`` leads to ABORTED, where
the VM runs on at the source with nothing lost. After it, the destination is primary and
no failure leads back: a failure then is FAILED_AFTER_COMMIT, and the VM is the
destination's to run. The one way back is the target's proof that the commit did not take
(``not_activated``: it never ran the VM and has torn its copy down).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from livemig.errors import LivemigError


class Stage(enum.Enum):
    PRE_MIGRATION = "pre-migration"
    RESERVATION = "reservation"
    PRECOPY = "iterative pre-copy"
    STOP_AND_COPY = "stop-and-copy"
    COMMITMENT = "commitment"
    ACTIVATION = "activation"
    DONE = "done"
    ABORTED = "aborted"
    FAILED_AFTER_COMMIT = "failed after commitment"

    # Both read TRANSITIONS, so that the table stays the one truth about each stage.

    @property
    def source_is_primary(self) -> bool:
        """True while a failure must leave (or put) the VM running on the source: the
        table takes a failure here to ABORTED, or this is ABORTED."""
        return self is Stage.ABORTED or TRANSITIONS[self].get(Event.FAILED) is Stage.ABORTED

    @property
    def cancellable(self) -> bool:
        """True while an operator's cancel applies. Narrower than ``source_is_primary``:
        in COMMITMENT a failure still aborts, but a cancel no longer applies."""
        return Event.CANCELLED in TRANSITIONS[self]

    @property
    def terminal(self) -> bool:
        return self in (Stage.DONE, Stage.ABORTED, Stage.FAILED_AFTER_COMMIT)


class Event(enum.Enum):
    BEGIN = "begin"  # the target answered and is authenticated
    RESERVED = "reserved"  # the destination holds memory, disk and an -incoming QEMU
    PRECOPY_DONE = "precopy_done"  # the planner says stop: the source VM is paused now
    IMAGE_CONSISTENT = "image_consistent"  # destination: every page and the device state
    COMMITTED = "committed"  # the source acknowledged: the destination is primary
    ACTIVATED = "activated"  # the destination VM runs and has announced itself
    FAILED = "failed"
    CANCELLED = "cancelled"
    # The commit did not take: the target proved it never ran the VM and holds no copy.
    NOT_ACTIVATED = "not_activated"


_ABORTABLE = {Event.FAILED: Stage.ABORTED, Event.CANCELLED: Stage.ABORTED}

# Everything that affects the stage of a migration lives here.
TRANSITIONS: dict[Stage, dict[Event, Stage]] = {
    Stage.PRE_MIGRATION: {Event.BEGIN: Stage.RESERVATION, **_ABORTABLE},
    Stage.RESERVATION: {Event.RESERVED: Stage.PRECOPY, **_ABORTABLE},
    Stage.PRECOPY: {Event.PRECOPY_DONE: Stage.STOP_AND_COPY, **_ABORTABLE},
    Stage.STOP_AND_COPY: {Event.IMAGE_CONSISTENT: Stage.COMMITMENT, **_ABORTABLE},
    # The commit handshake is the point of no return; a cancel no longer applies once
    # it has begun, but a failure inside it still leaves the source primary.
    Stage.COMMITMENT: {Event.COMMITTED: Stage.ACTIVATION, Event.FAILED: Stage.ABORTED},
    # Only proof from the target that it never ran the VM leads back: then it is ours.
    Stage.ACTIVATION: {Event.ACTIVATED: Stage.DONE, Event.FAILED: Stage.FAILED_AFTER_COMMIT,
                       Event.NOT_ACTIVATED: Stage.ABORTED},
    Stage.DONE: {},
    Stage.ABORTED: {},
    Stage.FAILED_AFTER_COMMIT: {},
}


class IllegalTransition(LivemigError):
    """An event the current stage does not accept: a bug in a role, or a confused peer."""

    def __init__(self, stage: Stage, event: Event) -> None:
        allowed = ", ".join(e.value for e in TRANSITIONS[stage]) or "nothing"
        super().__init__(f"{event.value!r} is not allowed in stage {stage.value!r} "
                         f"(allowed: {allowed})")
        self.stage = stage
        self.event = event


@dataclass
class StageMachine:
    """The stage of one migration and how it got there. Sans-IO: times come from outside."""

    stage: Stage = Stage.PRE_MIGRATION
    history: list[tuple[Stage, float]] = field(default_factory=list)

    def handle(self, event: Event, at: float) -> Stage:
        try:
            self.stage = TRANSITIONS[self.stage][event]
        except KeyError:
            raise IllegalTransition(self.stage, event) from None
        self.history.append((self.stage, at))
        return self.stage

    def entered(self, stage: Stage) -> float | None:
        """When ``stage`` was entered, if it was."""
        return next((t for s, t in self.history if s is stage), None)
