"""The stage table: the paper's order, the point of no return, and nothing else."""

from __future__ import annotations

import pytest

from livemig.migration.stages import (
    TRANSITIONS,
    Event,
    IllegalTransition,
    Stage,
    StageMachine,
)

HAPPY_PATH = [
    (Event.BEGIN, Stage.RESERVATION),
    (Event.RESERVED, Stage.PRECOPY),
    (Event.PRECOPY_DONE, Stage.STOP_AND_COPY),
    (Event.IMAGE_CONSISTENT, Stage.COMMITMENT),
    (Event.COMMITTED, Stage.ACTIVATION),
    (Event.ACTIVATED, Stage.DONE),
]


def test_the_six_stages_in_the_papers_order() -> None:
    machine = StageMachine()
    for t, (event, stage) in enumerate(HAPPY_PATH):
        assert machine.handle(event, at=float(t)) is stage
    assert machine.stage.terminal
    assert machine.entered(Stage.PRECOPY) == 1.0
    assert [s for s, _ in machine.history] == [s for _, s in HAPPY_PATH]


@pytest.mark.parametrize("steps", range(4))
def test_failure_or_cancel_before_commitment_aborts_with_the_source_primary(steps: int) -> None:
    for event in (Event.FAILED, Event.CANCELLED):
        machine = StageMachine()
        for e, _ in HAPPY_PATH[:steps]:
            machine.handle(e, at=0.0)
        assert machine.stage.source_is_primary
        assert machine.handle(event, at=1.0) is Stage.ABORTED
        assert machine.stage.source_is_primary


def test_commitment_is_the_point_of_no_return() -> None:
    machine = StageMachine()
    for e, _ in HAPPY_PATH[:4]:
        machine.handle(e, at=0.0)
    with pytest.raises(IllegalTransition):
        machine.handle(Event.CANCELLED, at=0.0)  # too late to cancel once committing
    machine.handle(Event.COMMITTED, at=0.0)
    assert not machine.stage.source_is_primary
    assert machine.handle(Event.FAILED, at=0.0) is Stage.FAILED_AFTER_COMMIT


def test_every_illegal_event_raises_and_changes_nothing() -> None:
    for stage, allowed in TRANSITIONS.items():
        for event in Event:
            if event in allowed:
                continue
            machine = StageMachine(stage=stage)
            with pytest.raises(IllegalTransition) as caught:
                machine.handle(event, at=0.0)
            assert (caught.value.stage, caught.value.event) == (stage, event)
            assert machine.stage is stage and machine.history == []


def test_terminal_stages_accept_nothing() -> None:
    assert all(not TRANSITIONS[s] for s in Stage if s.terminal)


def test_only_the_targets_proof_leads_back_from_activation() -> None:
    """A commit that did not take (the target never ran the VM and holds no copy) makes
    the source primary again; nothing else after commitment does."""
    machine = StageMachine()
    for e, _ in HAPPY_PATH[:5]:
        machine.handle(e, at=0.0)
    assert machine.handle(Event.NOT_ACTIVATED, at=1.0) is Stage.ABORTED
    assert machine.stage.source_is_primary
    assert [s for s, events in TRANSITIONS.items() if Event.NOT_ACTIVATED in events] == [
        Stage.ACTIVATION]


def test_a_cancel_applies_exactly_where_the_table_accepts_one() -> None:
    """Source-primary (a failure aborts) and cancellable (a cancel aborts) differ only in
    COMMITMENT, where the commit handshake has begun: both read the one table."""
    for stage, allowed in TRANSITIONS.items():
        assert stage.cancellable == (Event.CANCELLED in allowed), stage
        assert stage.source_is_primary == (
            stage is Stage.ABORTED or allowed.get(Event.FAILED) is Stage.ABORTED), stage
    assert [s for s in Stage if s.source_is_primary and not s.cancellable and not s.terminal
            ] == [Stage.COMMITMENT]
