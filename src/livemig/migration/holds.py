"""Hold points: stop a migration at a named point until someone lets it go.

Fault drills need a migration to be *at* a given point when the fault strikes, and most
points last milliseconds (the stop-and-copy of an idle VM takes ~1 ms), far too short to
hit by watching progress. A migration started with ``hold_at=POINT`` creates the file
``holds/VM@POINT`` in the run directory when it gets there and waits until the file is
removed, or ``HOLD_TIMEOUT_S`` has passed. ``livemig migrate --hold-at`` exposes it for
drills by hand; the fault-matrix tests use it to inject each fault at each point.

A hold adds no behaviour: while held, every time-out that can fire (the peer's idle
time-out, say) fires as it would if the engine were merely slow.
"""

from __future__ import annotations

import asyncio
import enum
import time
from pathlib import Path

from livemig import paths

HOLD_TIMEOUT_S = 120.0
POLL_S = 0.01


class HoldPoint(enum.StrEnum):
    RESERVATION = "reservation"  # the destination has reserved: its QEMU -incoming runs
    ROUND_1 = "round-1"  # round 1 is under way: some pages have gone
    LATER_ROUND = "later-round"  # a round after the first is under way
    STOP_AND_COPY = "stop-and-copy"  # the source VM is paused; the last pages have not gone
    DEVICE_STATE = "device-state"  # all pages are there; QEMU's device state is next
    COMMITMENT = "commitment"  # the destination has the commit, has not run cont yet


def hold_file(vm: str, point: HoldPoint) -> Path:
    return paths.run_dir() / "holds" / f"{vm}@{point}"


async def hold(vm: str, point: HoldPoint, wanted: HoldPoint | None) -> None:
    """Wait here while ``holds/VM@POINT`` exists, if the migration asked to hold here."""
    if wanted is not point:
        return
    path = hold_file(vm, point)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    try:
        while path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
    finally:
        path.unlink(missing_ok=True)


async def wait_until_held(vm: str, point: HoldPoint, timeout: float) -> None:
    """The drill's side: return once the migration of ``vm`` waits at ``point``."""
    path = hold_file(vm, point)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the migration of {vm} did not reach {point} in {timeout} s")
        await asyncio.sleep(POLL_S)


def release(vm: str, point: HoldPoint) -> None:
    hold_file(vm, point).unlink(missing_ok=True)
